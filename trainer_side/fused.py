"""Fused steps: each parameter's optimizer update is applied in backward, as soon as its gradient is done.

With the weights shared, the trainer's largest cost is gradients: all alive at once they equal the
model (54 GB at 27B, which does not fit beside vLLM on an 80 GB card). Here a
`register_post_accumulate_grad_hook` per parameter updates it in place and frees its gradient, so only
the gradients of the layer in flight exist.

What it trades (see BENCHMARKS.md): no accumulation over micro-batches (one backward per step) and no
clipping by the global gradient norm, which is only known once every update has been applied. The NaN
guard is per parameter: a parameter whose gradient is not finite keeps its weights (its update is
skipped and counted), and the loss is checked before backward starts, so a non-finite loss writes
nothing. On CUDA the per-parameter check never stops backward for the host: the update is masked on the
device, and the skipped names are read once after backward. In strict mode the update protocol's pause must span the whole backward.

Tied parameters (one Parameter under two names) get one hook: autograd sums both uses before the
hook fires. The hooks are `Apollo.attach_backward_hooks` with a finiteness guard. Updates are batched in
buckets of `bucket_elems` gradient elements (the parameters of about a decoder layer): one bucket's
updates take a handful of multi-tensor ops and grouped kernels instead of ~40 kernel launches per
parameter, which at 0.8-4B made the per-parameter hooks cost more CPU time than backward itself.
Relies on torch.
Tests: tests/test_fused.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from trainer_side.apollo import Apollo
from weightshare.failpoints import failpoint

# Gradient elements a bucket collects before its updates run (64 MB of bf16 gradients); 0: per parameter.
DEFAULT_BUCKET_ELEMS = 1 << 25


class FusedUpdates:
    """Hooks that apply `optimizer`'s update per parameter during backward; `reset()` before each step.

    The finiteness check of each gradient is decided on the device for CUDA parameters (`on_device`
    None) and the update masked by it, so backward never waits for the host; the names of skipped
    parameters are read with one sync when `skipped` or `updated` is first asked for after backward.
    `on_device=True` forces that path (tests run it on CPU), False the host check.
    """

    def __init__(
        self, optimizer: Apollo, params_by_name: dict[str, Tensor], on_device: bool | None = None,
        bucket_elems: int = DEFAULT_BUCKET_ELEMS,
    ):
        self.optimizer = optimizer
        self._on_device = on_device
        self._skipped: list[str] = []  # names whose gradient was not finite in the last backward
        self._pending: list[tuple[str, Tensor]] = []  # (name, finite flag on the device), not yet read
        self._seen = 0
        self._norms: list[Tensor] = []  # of every gradient checked, summed when `grad_norm` is asked for
        self._written = False  # an update of this backward has been applied
        self._handles = optimizer.attach_backward_hooks(
            params_by_name, guard=self._finite, bucket_elems=bucket_elems, on_flush=self._wrote
        )

    def reset(self) -> None:
        self._skipped, self._pending, self._seen, self._norms, self._written = [], [], 0, [], False
        self.optimizer.drop_pending_updates()  # a batch left by a backward that raised

    def _wrote(self) -> None:
        if not self._written:
            self._written = True
            failpoint("mid_write")  # the first updates (a bucket's, or one parameter's) are applied, the rest not

    @property
    def skipped(self) -> list[str]:
        """Parameters of the last backward whose gradient was not finite (their update was not applied)."""
        if self._pending:
            flags = torch.stack([ok for _, ok in self._pending]).tolist()  # the step's one host sync
            self._skipped += [name for (name, _), ok in zip(self._pending, flags, strict=True) if not ok]
            self._pending = []
        return self._skipped

    @property
    def updated(self) -> int:
        """Parameters updated by the last backward."""
        return self._seen - len(self.skipped)

    @property
    def grad_norm(self) -> float:
        """Global L2 norm of the finite gradients of the last backward."""
        if not self._norms:
            return 0.0
        norms = torch.stack(self._norms)
        return float(torch.where(torch.isfinite(norms), norms, 0.0).square().sum().sqrt())

    def _finite(self, name: str, p: Tensor) -> bool | Tensor:
        """Counts the gradient's norm and allows the update only if it is finite."""
        norm = torch.linalg.vector_norm(p.grad, dtype=torch.float32)
        finite = torch.isfinite(norm)
        self._seen += 1
        self._norms.append(norm)  # two launches per parameter; the sum waits for `grad_norm`
        on_device = p.is_cuda if self._on_device is None else self._on_device
        if on_device:
            self._pending.append((name, finite))
            return finite
        if not finite.item():  # one host sync per parameter
            self._skipped.append(name)
            return False
        return True

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

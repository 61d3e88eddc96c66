"""APOLLO / APOLLO-Mini optimizer that writes every update into the parameters' own storage.

APOLLO (Zhu et al., "APOLLO: SGD-like Memory, AdamW-level Performance", arXiv 2412.05270) keeps Adam
moments only for a random rank-r projection of each weight matrix's gradient and uses them to scale the
raw gradient, channel by channel (APOLLO) or as a whole (APOLLO-Mini: rank 1, scale 128). The math
mirrors the official implementation, PyPI `apollo-torch` 1.0.3 (`apollo_torch.APOLLOAdamW`), step for
step: same seeds, same Gaussian projection drawn on the parameter's device, same refresh every
`update_proj_gap` steps, same projection side (the shorter side of the matrix is projected away), same
bias correction, norm-growth limiter (Fira, gamma 1.01) and weight decay applied after the update.
Groups whose `rank` is None get that class's plain AdamW path.

Deliberate differences from apollo-torch, none of which changes the math:
- State is float32 whatever the parameter dtype (apollo-torch keeps moments in the gradient's dtype,
  which loses most of Adam's second moment in bf16); the update is computed in fp32 and rounded once
  into the parameter's dtype.
- A large projection matrix is regenerated from its seed at every step instead of being stored (the
  same values, no memory); a small one (APOLLO-Mini) is kept outside the state, keyed by its seed. The current seed and the step counter are plain ints in the state, so
  `state_dict()` / `load_state_dict()` resume exactly.
- The norm of the scaled gradient (for the limiter) comes from per-channel norms of the raw gradient
  rather than from a materialised scaled copy, and a parameter is processed in row chunks of at most
  `_CHUNK_ELEMS` elements, so fp32 temporaries stay small next to a 5120 x 17408 bf16 matrix.
  Agreement with apollo-torch is therefore to fp32 rounding, not bit-for-bit.
- Only apollo-torch's defaults are offered: random projection of type "std", bias correction on,
  `scale_front=False` (which only moves a constant factor across the limiter's ratio).

NOTE: vLLM's CUDA graphs hold the parameters' addresses, so nothing here ever rebinds `p.data`;
updates are in-place ops (`addcmul_`, `addcdiv_`, `add_`, `copy_`) on row views of the parameter.

Relies on torch only. Tests: `.venv/bin/python -m pytest tests/test_apollo.py -q`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from trainer_side import apollo_kernels

# Largest number of elements of a parameter processed at once: bounds each fp32 temporary (a bf16
# gradient's upcast for the projection, AdamW's denominator, a bf16 parameter's fp32 copy when weight
# decay follows) to 64 MiB whatever the parameter's size.
_CHUNK_ELEMS = 1 << 24
# Added to denominators of norm ratios, as in apollo-torch.
_NORM_EPS = 1e-8
_SCALE_TYPES = ("channel", "tensor")
# Projections of at most this many elements are kept between steps (APOLLO-Mini's are one row or column,
# a few KB each) instead of being drawn again from their seed at every step; larger ones (APOLLO rank
# 256: MBs per matrix) are drawn each step, trading a little time for memory.
_CACHED_PROJECTION_ELEMS = 1 << 16


def next_seed(seed: int) -> int:
    """Seed of the projection that follows the one drawn from `seed` (apollo-torch's `next_seed`)."""
    generator = torch.Generator().manual_seed(seed)
    # apollo-torch draws 15 (0xF) int64s on a CPU generator and keeps the last.
    return int(torch.randint(0, torch.iinfo(torch.int64).max, (15,), generator=generator)[-1])


def projection(seed: int, shape: tuple[int, int], rank: int, device: torch.device) -> Tensor:
    """The Gaussian projection of a (rows, cols) gradient, entries N(0, 1/rank), float32.

    Drawn exactly as apollo-torch draws it: a fresh generator on the parameter's device seeded with
    `seed`. Returns (rank, cols) when rows >= cols (each row is projected: G @ P.T) and (rows, rank)
    otherwise (each column is projected: P.T @ G).
    """
    rows, cols = shape
    generator = torch.Generator(device=device).manual_seed(seed)
    size = (rank, cols) if rows >= cols else (rows, rank)
    return torch.randn(size, generator=generator, device=device, dtype=torch.float32).div_(math.sqrt(rank))


def _row_chunks(t: Tensor) -> Iterator[slice]:
    """Slices along dim 0 of `t` (at least 1-D) covering at most `_CHUNK_ELEMS` elements each."""
    rows = t.shape[0]
    step = max(1, _CHUNK_ELEMS // max(1, t[0].numel()))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


@contextmanager
def _update_target(
    p: Tensor,  # (n, ...) rows of a parameter, any float dtype
    decay: float,
) -> Iterator[Tensor]:
    """Yield the tensor that the caller updates in place with fp32 operands, then apply weight decay.

    That is p itself when p is fp32 or when no decay follows: an in-place op on a bf16 p with fp32
    tensor operands computes in fp32 and rounds once. Otherwise an fp32 copy of p's rows, decayed and
    then rounded once into p.
    """
    target = p if p.dtype == torch.float32 or decay == 0.0 else p.float()
    yield target
    if decay > 0.0:
        # apollo-torch decays after the step, from the updated weights: p += -lr * wd * p.
        target.add_(target, alpha=-decay)
    if target is not p:
        p.copy_(target)


class Apollo(torch.optim.Optimizer):
    """APOLLO for param groups with `rank` set, AdamW (apollo-torch's flavour) for the others.

    Group settings (each group may override the constructor's defaults):
        lr, betas, eps, weight_decay: as in AdamW; weight decay is decoupled and applied after the step.
        rank: None for AdamW; else the projection rank r >= 1 (APOLLO 256, APOLLO-Mini 1). Every
            parameter of such a group must be 2-D.
        update_proj_gap: draw a new projection every this many steps of the parameter (T = 200).
        scale: the scaled gradient is multiplied by sqrt(scale) (APOLLO 1, APOLLO-Mini 128).
        scale_type: "channel" (one factor per row or column along the longer side) or "tensor".
        norm_growth_limit: gamma of the norm-growth limiter (1.01), or None to turn it off.
    `seed` offsets the projection seeds: parameter number i (1-based, over all groups in order) starts
    from seed + i, so seed=0 reproduces apollo-torch.
    `foreach`: in `step()`, update the small Adam state of all of a group's tensor-scaled (APOLLO-Mini)
    matrices with a few multi-tensor ops instead of ~20 kernels per matrix. `use_triton`: read each
    rank-1 gradient once in the first pass (`apollo_kernels`) where it can. Both change speed, not the
    math (to fp32 rounding).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        rank: int | None = None,
        update_proj_gap: int = 200,
        scale: float = 1.0,
        scale_type: str = "channel",
        norm_growth_limit: float | None = 1.01,
        seed: int = 0,
        foreach: bool = True,
        use_triton: bool = True,
    ):
        # Read by add_param_group, which the base constructor calls once per group.
        self._seed = seed
        self._n_params = 0
        self._foreach = foreach
        self._use_triton = use_triton
        # parameter -> (seed, projection) of the small projections kept between steps.
        self._projections: dict[Tensor, tuple[int, Tensor]] = {}
        self._bucket: _UpdateBucket | None = None  # batched updates in backward (attach_backward_hooks)
        self._discard_gradients = False  # backward hooks free gradients without updating (`gradients_discarded`)
        self._on_written: Callable[[], None] | None = None  # attach_backward_hooks' on_flush
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "rank": rank,
            "update_proj_gap": update_proj_gap,
            "scale": scale,
            "scale_type": scale_type,
            "norm_growth_limit": norm_growth_limit,
        }
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Validate the group's settings and shapes, then give each APOLLO matrix its projection seed."""
        params = param_group["params"]
        if isinstance(params, set):
            raise TypeError(
                "param group 'params' must be an ordered collection (seeds follow the order), not a set"
            )
        params = [params] if isinstance(params, Tensor) else list(params)
        group = {**self.defaults, **param_group, "params": params}
        _check_settings(group)
        if group["rank"] is not None:
            for i, p in enumerate(params):
                if p.dim() != 2:
                    raise ValueError(
                        f"APOLLO (rank={group['rank']}) needs 2-D parameters; params[{i}] of the group "
                        f"has shape {tuple(p.shape)}: put it in a group with rank=None (AdamW)"
                    )
        super().add_param_group({**param_group, "params": params})
        for p in params:
            # Numbered like apollo-torch: every parameter counts, frozen ones included.
            self._n_params += 1
            if group["rank"] is not None and p.requires_grad:
                self.state[p]["seed"] = self._seed + self._n_params

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Update every parameter that has a gradient; those whose grad is None are skipped."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update_many(params, group)
        return loss

    def _update_many(self, params: list[Tensor], group: dict[str, Any], oks: list[Tensor | None] | None = None) -> None:
        """The steps of several parameters of one group, batched where `foreach` allows; `oks[i]` (a 0-d
        bool on the device, or None for unmasked) masks parameter i as `_update`'s `ok` does."""
        flags = [None] * len(params) if oks is None else oks
        masked = any(f is not None for f in flags)
        if self._foreach and group["rank"] is not None and group["scale_type"] == "tensor":
            stacked = None
            if masked:
                stacked = torch.stack([f if f is not None else torch.ones((), dtype=torch.bool, device=p.device)
                                       for p, f in zip(params, flags)])
            self._apollo_tensor_step(params, group, stacked)
            return
        if self._foreach and group["rank"] is None and not masked:
            # Small tensors (norms, conv1d weights) in multi-tensor ops; a large one keeps its row chunks.
            small = [p for p in params if p.numel() <= _CHUNK_ELEMS]
            if small:
                self._adamw_step(small, group)
            params = [p for p in params if p.numel() > _CHUNK_ELEMS]
            flags = [None] * len(params)
        for p, ok in zip(params, flags):
            self._update(p, group, ok)

    def _adamw_step(self, params: list[Tensor], group: dict[str, Any]) -> None:
        """`_adamw_update` for many tensors in a few multi-tensor ops: the same fp32 math, rounded once."""
        states, step_sizes, decays = [], [], []
        for p in params:
            state, _, step_size, decay = self._begin(p, group)
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
            states.append(state)
            step_sizes.append(step_size)
            decays.append(decay)
        grads = [p.grad if p.grad.dtype == torch.float32 else p.grad.float() for p in params]
        exp_avgs, denominators = _foreach_adam_moments(states, grads, group)
        if not any(decays):
            # In-place on a bf16 p with fp32 operands computes in fp32 and rounds once, as `_update_target`.
            torch._foreach_addcdiv_([p.data for p in params], exp_avgs, denominators, [-s for s in step_sizes])
            return
        for p, m, denominator, step_size, decay in zip(params, exp_avgs, denominators, step_sizes, decays):
            with _update_target(p.data, decay) as target:
                target.addcdiv_(m, denominator, value=-step_size)

    def _begin(self, p: Tensor, group: dict[str, Any]) -> tuple[dict[str, Any], int, float, float]:
        """Count the step of `p`: (its state, its completed steps before this one, step size, decay)."""
        if p.grad.is_sparse:
            raise RuntimeError(
                f"Apollo does not support sparse gradients (parameter of shape {tuple(p.shape)})"
            )
        state = self.state[p]
        step = state.get("step", 0)  # completed steps of this parameter
        beta1, beta2 = group["betas"]
        state["step"] = step + 1
        bias_correction1 = 1.0 - beta1 ** (step + 1)
        bias_correction2 = 1.0 - beta2 ** (step + 1)
        step_size = group["lr"] * math.sqrt(bias_correction2) / bias_correction1
        return state, step, step_size, group["lr"] * group["weight_decay"]

    def _update(self, p: Tensor, group: dict[str, Any], ok: Tensor | None = None) -> None:
        """One parameter's step; with `ok` (0-d bool on p's device) applied only where it is true."""
        state, step, step_size, decay = self._begin(p, group)
        if group["rank"] is None:
            _adamw_update(p, p.grad, state, group, step_size, decay, ok)
            return
        r, channel_sq = self._project(p, state, group, step)
        factor, per_row = _scale_factor(r, channel_sq, p.shape[0] >= p.shape[1], state, group, ok)
        coef = factor * math.sqrt(group["scale"])
        if ok is not None:
            coef = torch.where(ok, coef, 0.0)  # a masked-out parameter's coefficient is never NaN
        _write_scaled(p, p.grad, coef, per_row, step_size, decay, self._use_triton, ok)

    def _project(
        self, p: Tensor, state: dict[str, Any], group: dict[str, Any], step: int
    ) -> tuple[Tensor, Tensor]:
        """First pass over p's gradient: (R, channel_sq), the projected gradient and channel norms^2."""
        return self._first_pass(p.grad, self._projection(p, state, group, step), group["rank"])

    def _first_pass(self, grad: Tensor, proj: Tensor, rank: int) -> tuple[Tensor, Tensor]:
        if self._use_triton and apollo_kernels.fits(grad, rank):
            return apollo_kernels.project_rank1(grad, proj)
        return _project_in_chunks(grad, proj)

    def _projection(self, p: Tensor, state: dict[str, Any], group: dict[str, Any], step: int) -> Tensor:
        """This step's projection of `p`, drawn anew every `update_proj_gap` steps of `p`."""
        if step > 0 and step % group["update_proj_gap"] == 0:
            state["seed"] = next_seed(state["seed"])
        seed = state["seed"]
        cached = self._projections.get(p)
        if cached is not None and cached[0] == seed:
            return cached[1]
        proj = self._draw_projection(p, seed, group["rank"])
        if proj.numel() <= _CACHED_PROJECTION_ELEMS:
            self._projections[p] = (seed, proj)
        return proj

    def _draw_projection(self, p: Tensor, seed: int, rank: int) -> Tensor:
        """The projection of `p` drawn from `seed` (a subclass may draw another matrix's and take a part)."""
        return projection(seed, tuple(p.shape), rank, p.device)

    def _apollo_tensor_step(self, params: list[Tensor], group: dict[str, Any], oks: Tensor | None = None) -> None:
        """`_update` for a group of tensor-scaled APOLLO matrices, its small Adam state batched.

        The same math as `_update`, in three phases: the first pass over each gradient; the moments,
        scale factors and norm-growth limiter of all matrices in a handful of multi-tensor ops; then
        each matrix's one write. Leaves no per-matrix host sync. `oks` (one bool per matrix, on the
        device) masks as `_update`'s `ok` does.
        """
        # With Triton, both passes are one launch each for the whole group (apollo_kernels.*_group).
        grouped = self._use_triton and apollo_kernels.fits_group(params, group["rank"])
        states, step_sizes, decays, projections = [], [], [], []
        for p in params:
            state, step, step_size, decay = self._begin(p, group)
            states.append(state)
            step_sizes.append(step_size)
            decays.append(decay)
            projections.append(self._projection(p, state, group, step))
        grads = [p.grad for p in params]
        if grouped:
            first_pass = apollo_kernels.project_rank1_group(grads, projections)
        else:
            first_pass = [self._first_pass(g, proj, group["rank"]) for g, proj in zip(grads, projections)]
        rs = [r for r, _ in first_pass]
        grad_norms = [channel_sq for _, channel_sq in first_pass]
        for state, r in zip(states, rs):
            if "exp_avg" not in state:
                state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(r), torch.zeros_like(r)
        exp_avgs, denominators = _foreach_adam_moments(states, rs, group, oks)
        adam_rs = torch._foreach_div(exp_avgs, denominators)
        # ||G|| of each matrix is the norm of its channel norms.
        grad_norm = torch.stack(torch._foreach_norm(torch._foreach_sqrt(grad_norms)))
        factor = torch.stack(torch._foreach_norm(adam_rs)) / (torch.stack(torch._foreach_norm(rs)) + _NORM_EPS)
        scaled_norm = factor * grad_norm
        gamma = group["norm_growth_limit"]
        if gamma is not None:
            has_previous = [("scaled_grad_norm" in s) for s in states]
            if any(has_previous):
                previous = torch.stack(
                    [s["scaled_grad_norm"] if h else scaled_norm.new_ones(()) for s, h in zip(states, has_previous)]
                ).reshape(-1)
                limiter = torch.clamp(scaled_norm / (previous + _NORM_EPS), min=gamma) / gamma
                if not all(has_previous):
                    limiter = torch.where(
                        torch.tensor(has_previous, device=limiter.device), limiter, torch.ones_like(limiter)
                    )
                factor, scaled_norm = factor / limiter, scaled_norm / limiter
            if oks is not None:
                # A masked-out matrix keeps its norm; one masked out at its first step gets an infinite one,
                # under which the limiter never acts (as in `_scale_factor`).
                kept = torch.stack(
                    [s["scaled_grad_norm"] if "scaled_grad_norm" in s else scaled_norm.new_full((), math.inf)
                     for s in states]
                ).reshape(-1)
                scaled_norm = torch.where(oks, scaled_norm, kept)
            for state, norm in zip(states, scaled_norm.unbind(0)):
                state["scaled_grad_norm"] = norm
        coefs = factor * math.sqrt(group["scale"])
        if oks is not None:
            coefs = torch.where(oks, coefs, 0.0)  # a masked-out matrix's coefficient is never NaN
        if grouped:
            apollo_kernels.apply_update_group(params, grads, coefs, step_sizes, decays, oks)
            return
        flags = [None] * len(params) if oks is None else oks.unbind(0)
        for p, coef, step_size, decay, ok in zip(params, coefs.reshape(-1, 1, 1).unbind(0), step_sizes, decays, flags):
            _write_scaled(p, p.grad, coef, False, step_size, decay, self._use_triton, ok)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as the base class does, but keep state tensors in float32.

        The base class casts every floating state tensor to its parameter's dtype, which would turn
        the moments of bf16 parameters into bf16; they are taken again from `state_dict` as float32.
        """
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        for p, i in zip(params, ids, strict=True):
            for key, value in state_dict["state"].get(i, {}).items():
                if isinstance(value, Tensor):
                    self.state[p][key] = value.to(device=p.device, dtype=torch.float32)

    def optimizer_state_bytes(self) -> int:
        """Total bytes of the tensors held in the optimizer state (moments and limiter norms)."""
        return sum(
            v.numel() * v.element_size()
            for s in self.state.values()
            for v in s.values()
            if isinstance(v, Tensor)
        )

    def attach_backward_hooks(
        self,
        model_or_params: nn.Module | Iterable[Tensor] | dict[str, Tensor],
        guard: Callable[[str, Tensor], bool | Tensor] | None = None,
        bucket_elems: int = 0,
        on_flush: Callable[[], None] | None = None,
    ) -> list[RemovableHandle]:
        """Apply each parameter's update as soon as its gradient is complete, then free that gradient.

        Uses `register_post_accumulate_grad_hook`, so at most a few full gradients exist at any time
        instead of all of them. After `loss.backward()` the step is done: do not call `step()` (it
        would find no gradients) and skip `zero_grad()`. Step hooks of the optimizer do not fire.

        NOTE: only valid without gradient accumulation over micro-batches and without gradient
        clipping by global norm: each update uses the gradient of this one backward pass as is.

        Every parameter of `model_or_params` (a module, a name -> parameter dict, or parameters) that
        requires grad must be in this optimizer (else ValueError naming it: its gradient would be
        neither applied nor freed). `guard(name, param)`, if given, runs first in each hook; when it
        returns False that update is skipped (the gradient is freed all the same). It may instead return
        a 0-d bool tensor on the parameter's device: the update is then computed and applied only where
        that flag is true, without waiting for it on the host (the weights, moments and limiter state of a
        masked-out parameter stay as they were; its step count still advances). Returns the hook
        handles; `handle.remove()` detaches them.

        `bucket_elems` > 0 batches the updates: parameters whose gradients are ready wait until they hold
        that many elements (or backward ends) and are then updated together, as `step()` batches them,
        instead of ~40 kernel launches each; their gradients live that much longer. `on_flush` runs after
        each batch is written (after each parameter's update, without buckets). `drop_pending_updates()` discards a batch left by a failed backward.
        """
        if isinstance(model_or_params, nn.Module):
            named = list(model_or_params.named_parameters())
        elif isinstance(model_or_params, dict):
            named = list(model_or_params.items())
        else:
            named = [(f"params[{i}]", p) for i, p in enumerate(model_or_params)]
        group_of = {p: i for i, group in enumerate(self.param_groups) for p in group["params"]}
        self._bucket = _UpdateBucket(self, bucket_elems, on_flush) if bucket_elems > 0 else None
        self._on_written = on_flush
        handles, seen = [], set()
        for name, p in named:
            if not p.requires_grad or p in seen:
                continue
            seen.add(p)
            if p not in group_of:
                raise ValueError(
                    f"parameter {name!r} (shape {tuple(p.shape)}) requires grad but is in no param group "
                    "of this optimizer: freeze it (requires_grad_(False)) or add it to a group"
                )
            handles.append(p.register_post_accumulate_grad_hook(self._backward_hook(name, group_of[p], guard)))
        return handles

    def _backward_hook(
        self, name: str, group_index: int, guard: Callable[[str, Tensor], bool | Tensor] | None
    ) -> Callable[[Tensor], None]:
        # The group is looked up at call time: load_state_dict replaces the group dicts.
        def hook(p: Tensor) -> None:
            if self._discard_gradients:
                p.grad = None
                return
            verdict = True if guard is None else guard(name, p)
            # A flag decided on the device masks the update (no host sync); False skips it.
            ok = verdict if isinstance(verdict, Tensor) else None
            if ok is None and not verdict:
                p.grad = None
            elif self._bucket is not None:
                self._bucket.add(p, group_index, ok)
            else:
                with torch.no_grad():
                    self._update(p, self.param_groups[group_index], ok)
                p.grad = None
                if self._on_written is not None:
                    self._on_written()

        return hook

    @contextmanager
    def gradients_discarded(self) -> Iterator[None]:
        """Within it, the backward hooks free each gradient and update nothing (a warm-up backward that
        compiles kernels writes no weight and no state)."""
        self._discard_gradients = True
        try:
            yield
        finally:
            self._discard_gradients = False

    def drop_pending_updates(self) -> None:
        """Forget the bucketed updates of a backward that did not finish (their gradients are freed)."""
        if self._bucket is not None:
            self._bucket.drop()


class _UpdateBucket:
    """Parameters whose gradients are ready in backward, updated together once they hold `limit` elements
    or when backward ends (a callback queued on autograd's engine at the first one)."""

    def __init__(self, optimizer: Apollo, limit: int, on_flush: Callable[[], None] | None):
        self.optimizer, self.limit, self.on_flush = optimizer, limit, on_flush
        self.entries: list[tuple[Tensor, int, Tensor | None]] = []  # (param, group index, ok flag)
        self.elems = 0
        self.end_queued = False

    def add(self, p: Tensor, group_index: int, ok: Tensor | None) -> None:
        if not self.end_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._at_backward_end)
            self.end_queued = True
        self.entries.append((p, group_index, ok))
        self.elems += p.numel()
        if self.elems >= self.limit:
            self.flush()

    def _at_backward_end(self) -> None:
        self.end_queued = False
        self.flush()

    def flush(self) -> None:
        entries, self.entries, self.elems = self.entries, [], 0
        if not entries:
            return
        by_group: dict[int, list[tuple[Tensor, Tensor | None]]] = {}
        for p, group_index, ok in entries:
            by_group.setdefault(group_index, []).append((p, ok))
        with torch.no_grad():
            for group_index, members in by_group.items():
                group = self.optimizer.param_groups[group_index]
                self.optimizer._update_many([p for p, _ in members], group, [ok for _, ok in members])
        for p, _, _ in entries:
            p.grad = None
        if self.on_flush is not None:
            self.on_flush()

    def drop(self) -> None:
        for p, _, _ in self.entries:
            p.grad = None
        self.entries, self.elems, self.end_queued = [], 0, False


def _foreach_adam_moments(
    states: list[dict[str, Any]], values: list[Tensor], group: dict[str, Any], oks: Tensor | None = None
) -> tuple[list[Tensor], list[Tensor]]:
    """Adam's moments of many tensors in multi-tensor ops: (first moments, sqrt(second) + eps).

    With `oks` (one bool per tensor, on the device) the stored moments change only where it is true; the
    returned ones are the new values either way (the caller masks what it derives from them).
    """
    beta1, beta2 = group["betas"]
    exp_avgs = [s["exp_avg"] for s in states]
    exp_avg_sqs = [s["exp_avg_sq"] for s in states]
    if oks is None:
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, values, alpha=1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, values, values, value=1.0 - beta2)
    else:
        new_avgs = torch._foreach_mul(exp_avgs, beta1)
        torch._foreach_add_(new_avgs, values, alpha=1.0 - beta1)
        new_avg_sqs = torch._foreach_mul(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(new_avg_sqs, values, values, value=1.0 - beta2)
        for ok, stored, new in zip([*oks.unbind(0)] * 2, exp_avgs + exp_avg_sqs, new_avgs + new_avg_sqs):
            torch.where(ok, new, stored, out=stored)
        exp_avgs, exp_avg_sqs = new_avgs, new_avg_sqs
    denominators = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denominators, group["eps"])
    return exp_avgs, denominators


def _check_settings(group: dict[str, Any]) -> None:
    """Raise ValueError naming the first invalid setting of a param group."""
    beta1, beta2 = group["betas"]
    if not group["lr"] >= 0.0:
        raise ValueError(f"invalid lr {group['lr']!r}: must be >= 0")
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValueError(f"invalid betas {group['betas']!r}: each must be in [0, 1)")
    if not group["eps"] >= 0.0:
        raise ValueError(f"invalid eps {group['eps']!r}: must be >= 0")
    if not group["weight_decay"] >= 0.0:
        raise ValueError(f"invalid weight_decay {group['weight_decay']!r}: must be >= 0")
    rank = group["rank"]
    if rank is None:
        return
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"invalid rank {rank!r}: must be an int >= 1, or None for AdamW")
    gap = group["update_proj_gap"]
    if isinstance(gap, bool) or not isinstance(gap, int) or gap < 1:
        raise ValueError(f"invalid update_proj_gap {gap!r}: must be an int >= 1")
    if not group["scale"] > 0.0:
        raise ValueError(f"invalid scale {group['scale']!r}: must be > 0")
    if group["scale_type"] not in _SCALE_TYPES:
        raise ValueError(f"invalid scale_type {group['scale_type']!r}: must be one of {_SCALE_TYPES}")
    gamma = group["norm_growth_limit"]
    if gamma is not None and not gamma >= 1.0:
        raise ValueError(f"invalid norm_growth_limit {gamma!r}: must be >= 1, or None to disable")


def _adamw_update(
    p: Tensor,  # any shape, any float dtype
    grad: Tensor,  # same shape as p
    state: dict[str, Any],
    group: dict[str, Any],
    step_size: float,
    decay: float,
    ok: Tensor | None = None,
) -> None:
    """apollo-torch's Adam step (eps added to sqrt(v), not to v), in fp32, row chunk by row chunk.

    With `ok` (0-d bool), the new moments and weights are kept only where it is true (no host sync).
    """
    if "exp_avg" not in state:
        state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
    beta1, beta2 = group["betas"]
    # 0-d parameters become 1-D views so that they can be sliced like the rest.
    p_rows, g_rows = torch.atleast_1d(p), torch.atleast_1d(grad)
    m_rows, v_rows = torch.atleast_1d(state["exp_avg"]), torch.atleast_1d(state["exp_avg_sq"])
    for rows in _row_chunks(p_rows):
        g = g_rows[rows].float()
        m, v = m_rows[rows], v_rows[rows]
        if ok is not None:
            new_m = m.mul(beta1).add_(g, alpha=1.0 - beta1)
            new_v = v.mul(beta2).addcmul_(g, g, value=1.0 - beta2)
            target = p_rows[rows].to(torch.float32, copy=True)  # never p itself, even when p is fp32
            target.addcdiv_(new_m, new_v.sqrt().add_(group["eps"]), value=-step_size)
            if decay > 0.0:
                target.add_(target, alpha=-decay)
            m.copy_(torch.where(ok, new_m, m))
            v.copy_(torch.where(ok, new_v, v))
            p_rows[rows].copy_(torch.where(ok, target, p_rows[rows]))
            continue
        m.mul_(beta1).add_(g, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        with _update_target(p_rows[rows], decay) as target:
            target.addcdiv_(m, v.sqrt().add_(group["eps"]), value=-step_size)


def _project_in_chunks(grad: Tensor, proj: Tensor, by_row: bool | None = None) -> tuple[Tensor, Tensor]:
    """(R, channel_sq) of a (rows, cols) gradient with torch ops, upcasting at most `_CHUNK_ELEMS` at once.

    R is G @ P.T (rows, rank) when `by_row` (default: rows >= cols), else P.T @ G (rank, cols); channel_sq
    holds the squared norm of each channel (row, or column) of G. A tensor-parallel shard passes the global
    matrix's orientation, which its own shape may not have.
    """
    rows, cols = grad.shape
    by_row = rows >= cols if by_row is None else by_row
    if by_row:
        rank = proj.shape[0]
        r = torch.empty(rows, rank, device=grad.device, dtype=torch.float32)
        channel_sq = torch.empty(rows, device=grad.device, dtype=torch.float32)
    else:
        rank = proj.shape[1]
        r = torch.zeros(rank, cols, device=grad.device, dtype=torch.float32)  # summed over chunks
        channel_sq = torch.zeros(cols, device=grad.device, dtype=torch.float32)
    for chunk in _row_chunks(grad):
        g = grad[chunk].float()
        if by_row:
            torch.mm(g, proj.t(), out=r[chunk])
            channel_sq[chunk] = torch.linalg.vector_norm(g, dim=1).square()
        else:
            r.addmm_(proj[chunk].t(), g)
            channel_sq.add_(torch.linalg.vector_norm(g, dim=0).square())
    return r, channel_sq


def _scale_factor(
    r: Tensor,
    channel_sq: Tensor,
    by_row: bool,
    state: dict[str, Any],
    group: dict[str, Any],
    ok: Tensor | None = None,
) -> tuple[Tensor, bool]:
    """Adam in projected space, then the gradient's scale factor after the norm-growth limiter.

    `by_row`: the matrix has at least as many rows as columns, so its channels are rows. Returns
    (factor, per_row): factor is (rows,) or (cols,) for channel scaling, 0-d for tensor scaling; per_row
    says the channels are rows.
    """
    adam_r = projected_adam(r, state, group, ok)

    # Gradient scaling factor: how much Adam stretches each channel (or the tensor) in projected
    # space, used as an estimate of how it would stretch the full gradient.
    per_row = by_row and group["scale_type"] == "channel"
    if group["scale_type"] == "channel":
        dim = 1 if by_row else 0
        norms = torch.linalg.vector_norm(adam_r, dim=dim), torch.linalg.vector_norm(r, dim=dim)
        factor = norms[0] / (norms[1] + _NORM_EPS)  # (rows,) or (cols,)
        # ||G * factor||: each channel of G is multiplied by its own factor.
        scaled_norm = (factor.square() * channel_sq).sum().sqrt()
    else:
        factor = torch.linalg.vector_norm(adam_r) / (torch.linalg.vector_norm(r) + _NORM_EPS)  # 0-d
        scaled_norm = factor * channel_sq.sum().sqrt()
    return limit_growth(factor, scaled_norm, state, group, ok), per_row


def projected_adam(r: Tensor, state: dict[str, Any], group: dict[str, Any], ok: Tensor | None = None) -> Tensor:
    """Adam's update of the projected gradient R from the moments in `state`, which it updates (only where
    `ok`, when given)."""
    if "exp_avg" not in state:
        state["exp_avg"] = torch.zeros_like(r)
        state["exp_avg_sq"] = torch.zeros_like(r)
    beta1, beta2 = group["betas"]
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    if ok is None:
        exp_avg.mul_(beta1).add_(r, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(r, r, value=1.0 - beta2)
        m, v = exp_avg, exp_avg_sq
    else:  # masked: the moments change only where ok
        m = exp_avg.mul(beta1).add_(r, alpha=1.0 - beta1)
        v = exp_avg_sq.mul(beta2).addcmul_(r, r, value=1.0 - beta2)
        exp_avg.copy_(torch.where(ok, m, exp_avg))
        exp_avg_sq.copy_(torch.where(ok, v, exp_avg_sq))
    return m / v.sqrt().add_(group["eps"])


def limit_growth(
    factor: Tensor, scaled_norm: Tensor, state: dict[str, Any], group: dict[str, Any], ok: Tensor | None = None
) -> Tensor:
    """Fira's norm-growth limiter: the scaled gradient's norm may grow by at most gamma per step. Returns
    the limited factor and keeps this step's scaled norm in `state` (masked by `ok`, when given)."""
    gamma = group["norm_growth_limit"]
    if gamma is None:
        return factor
    # A tensor clamp instead of apollo-torch's Python max() avoids a device-to-host sync.
    previous = state.get("scaled_grad_norm")
    if previous is not None:
        limiter = torch.clamp(scaled_norm / (previous + _NORM_EPS), min=gamma) / gamma
        factor = factor / limiter
        scaled_norm = scaled_norm / limiter
    if ok is not None:
        # A masked-out first step leaves an infinite norm, under which the limiter never acts.
        kept = previous if previous is not None else torch.full_like(scaled_norm, math.inf)
        scaled_norm = torch.where(ok, scaled_norm, kept)
    state["scaled_grad_norm"] = scaled_norm
    return factor


def _write_scaled(
    p: Tensor,  # (rows, cols), any float dtype
    grad: Tensor,  # (rows, cols)
    coef: Tensor,  # fp32: (rows,) when per_row, (cols,) for column channels, else 0-d or (1, 1)
    per_row: bool,
    step_size: float,
    decay: float,
    use_triton: bool,
    ok: Tensor | None = None,
) -> None:
    """Second pass over G: p <- (p - step_size * coef * G) * (1 - lr * wd), with no fp32 copy of G.

    With `ok` (0-d bool), p is written only where it is true: the kernel reads the flag itself; the
    torch path asks the host (one sync, only where there is no kernel).
    """
    # (rows, 1), (1, cols) or (1, 1). A tensor with dimensions takes part in type promotion, so the
    # update of a bf16 p below computes in fp32 (a 0-d fp32 coef would be rounded to bf16 first).
    coef = coef.reshape(-1, 1) if per_row else coef.reshape(1, -1)
    if use_triton and apollo_kernels.fits_update(p, grad):
        apollo_kernels.apply_update(p, grad, coef, step_size, decay, ok)
        return
    if ok is not None and not bool(ok):
        return
    if decay == 0.0 or p.dtype == torch.float32:
        # One kernel over the whole matrix: no fp32 temporary is needed.
        with _update_target(p, decay) as target:
            target.addcmul_(grad, coef, value=-step_size)
        return
    for chunk in _row_chunks(p):
        with _update_target(p[chunk], decay) as target:
            target.addcmul_(grad[chunk], coef[chunk] if per_row else coef, value=-step_size)

"""APOLLO / APOLLO-Mini on tensor-parallel shards, equal to `Apollo` on the whole matrices.

Under tensor parallelism (TP) each trainer rank holds a shard of a weight matrix. `ShardedApollo` updates
each shard so that, to fp32 rounding, the shard ends up as the same rows (or columns) of the matrix that
`trainer_side.apollo.Apollo` would have updated as a whole: a TP run trains as a TP=1 run. A parameter's
sharding is a `ShardSpec`, registered with `optimizer.set_shard(param, spec)`; parameters without one
(norm weights, anything TP replicates) take `Apollo`'s own paths, unchanged.

The projection is the one the unsharded optimizer draws: `projection(seed, global_shape, ...)` with the
same seed on every rank, of which a rank keeps the columns (or rows) of its shard where the projection
spans the sharded dimension. APOLLO projects each row when the global matrix has rows >= cols (R = G @ P.T,
channels are rows) and each column otherwise (R = P.T @ G, channels are columns). How each case reduces
over the ranks of `process_group` (sums, all-reduce SUM):
- The sharded dimension is the one projected away (columns of a matrix with rows >= cols, rows of one with
  rows < cols): each rank's R is a partial sum over its part of that dimension, and so are the squared
  channel norms of G. One all-reduce of both (rows x rank + rows floats, or rank x cols + cols) gives every
  rank the full R and norms; the rest (Adam moments, channel or tensor factors, limiter) is then
  `Apollo`'s own math, run identically on every rank, with identical state.
- The sharded dimension is the one kept (rows of a matrix with rows >= cols, columns of one with
  rows < cols): each rank holds its channels of R and only their Adam moments, complete, so channel
  factors (APOLLO) need no reduction. What spans channels does: APOLLO's limiter needs
  ||G * factor||^2 = sum over channels of factor^2 * ||channel||^2 (one float); APOLLO-Mini's tensor factor
  needs ||Adam(R)||^2 and ||R||^2, and its limiter ||G||^2 (three floats, one all-reduce).
- AdamW parameters (groups with rank None) are elementwise: a shard needs no reduction. Gradients of
  replicated parameters (no spec, or `dim=None`) must already be all-reduced by the caller.
The limiter's `scaled_grad_norm` is thus the global one, the same on every rank.

Replicas: when `replicas` ranks hold the same shard (K/V heads when tp_size > num_kv_heads), each rank
divides its contribution to a sum by `replicas` before the one all-reduce over the whole group, so each
shard counts once. Chosen over reducing in a sub-group of one rank per shard because it needs no extra
process groups and every rank, replicas included, gets the result from the same single collective; the
division is exact for powers of two (only the order of the summation differs).

A spec has one replica count: a merged parameter whose blocks are replicated unequally (q rows split
over all ranks, k rows over fewer) is not described by it.

Requirements, all of which hold when every rank runs the same model code:
- Projection seeds are numbered by parameter order (`Apollo`'s `_n_params`): every rank must build the
  optimizer with its parameters in the same order and groups, frozen ones included.
- Each sharded update makes collective calls: every rank must update the same parameters in the same
  order. `step()` updates a group's sharded matrices one by one, in group order, after its other
  parameters; in backward-hook mode the hooks fire in the same order on every rank. With `bucket_elems`
  > 0, batches close at the same points only if each parameter has the same number of elements on every
  rank. A guard's verdict (bool, or `ok` flag) must be the same on every rank.
- Specs are not part of `state_dict()`: after rebuilding, call `set_shard` again before `load_state_dict`.
Sharded matrices take torch ops for their first pass where the shard's own orientation differs from the
global one, and `Apollo`'s (Triton where it fits) otherwise; the write is `Apollo`'s. The rest reuses
apollo.py's helpers (`projected_adam`, `limit_growth`); `_kept_dim_scale_factor` is `apollo._scale_factor`
with its sums over channels reduced.

Tests: .venv/bin/python -m pytest tests/test_apollo_tp.py -q (CPU, gloo, 2 and 4 processes).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from trainer_side import apollo
from trainer_side.apollo import Apollo, projection


@dataclass(frozen=True)
class ShardSpec:
    """Which part of a global parameter a rank holds.

    global_shape: the whole parameter's shape (2-D for APOLLO, any for AdamW).
    dim: the sharded dimension, or None for a replicated parameter (then it is treated as unsharded).
    blocks: (global_start, local_start, length) along `dim`: local indices [local_start, +length) hold
        global indices [global_start, +length). Together they must tile the local dimension; the global
        ranges need not be adjacent (a merged q/k/v projection's rows). `inference_side.layout_tp.Block`
        tuples fit as they are.
    replicas: how many ranks of the process group hold this same shard (>= 1).
    """

    global_shape: tuple[int, ...]
    dim: int | None
    blocks: tuple[tuple[int, int, int], ...] = ()
    replicas: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "global_shape", tuple(int(n) for n in self.global_shape))
        object.__setattr__(self, "blocks", tuple(tuple(int(x) for x in b) for b in self.blocks))
        if self.replicas < 1:
            raise ValueError(f"replicas {self.replicas} must be >= 1")
        if self.dim is None:
            if self.blocks:
                raise ValueError("a replicated spec (dim=None) has no blocks")
            return
        if not 0 <= self.dim < len(self.global_shape):
            raise ValueError(f"dim {self.dim} is not a dimension of global shape {self.global_shape}")
        if not self.blocks:
            raise ValueError("a sharded spec needs at least one block (a rank holding none is not supported)")
        self._check_blocks()

    def _check_blocks(self) -> None:
        size = self.global_shape[self.dim]
        local_end = 0
        for global_start, local_start, length in sorted(self.blocks, key=lambda b: b[1]):
            if local_start != local_end or length < 1:
                raise ValueError(f"blocks {self.blocks} do not tile the local dimension from 0")
            if global_start < 0 or global_start + length > size:
                raise ValueError(f"block {(global_start, local_start, length)} is outside global size {size}")
            local_end += length
        if len(set(self.global_indices())) != local_end:
            raise ValueError(f"blocks {self.blocks} overlap in the global dimension")

    @property
    def local_shape(self) -> tuple[int, ...]:
        """The shape of this rank's tensor."""
        if self.dim is None:
            return self.global_shape
        shape = list(self.global_shape)
        shape[self.dim] = sum(length for _, _, length in self.blocks)
        return tuple(shape)

    def global_indices(self) -> list[int]:
        """For each local index along `dim`, in order, the global index it holds."""
        return [i for start, length in self._global_ranges() for i in range(start, start + length)]

    def take(self, full: Tensor) -> Tensor:
        """This shard's part of `full` (global-sized along `dim`), in local order."""
        parts = [full.narrow(self.dim, start, length) for start, length in self._global_ranges()]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=self.dim)

    def _global_ranges(self) -> list[tuple[int, int]]:
        return [(start, length) for start, _, length in sorted(self.blocks, key=lambda b: b[1])]


def projected_away_dim(global_shape: tuple[int, ...]) -> int:
    """The matrix dimension APOLLO projects away: columns (1) when rows >= cols, else rows (0)."""
    rows, cols = global_shape
    return 1 if rows >= cols else 0


class ShardedApollo(Apollo):
    """`Apollo` whose sharded matrices (see `set_shard`) are updated as their global matrices would be.

    Takes `Apollo`'s arguments, plus `process_group`: the TP group whose ranks hold the shards (default:
    the world). Parameters without a spec behave exactly as in `Apollo`. See the module docstring for
    the reductions and for what every rank must do alike.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        *args: Any,
        process_group: dist.ProcessGroup | None = None,
        **kwargs: Any,
    ):
        self._shards: dict[Tensor, ShardSpec] = {}
        self._process_group = process_group
        super().__init__(params, *args, **kwargs)

    def set_shard(self, p: Tensor, spec: ShardSpec | None) -> None:
        """Declare that `p` is this rank's shard `spec` of a global parameter (None or dim=None: unsharded).

        Call before `p`'s first step, on every rank, for the same parameters.
        """
        group = next((g for g in self.param_groups if any(q is p for q in g["params"])), None)
        if group is None:
            raise ValueError(f"parameter of shape {tuple(p.shape)} is in no param group of this optimizer")
        if self.state[p].get("step", 0) > 0:
            raise ValueError(f"parameter of shape {tuple(p.shape)} has already stepped: set its shard first")
        if spec is not None and tuple(p.shape) != spec.local_shape:
            raise ValueError(
                f"parameter of shape {tuple(p.shape)} is not the local shape {spec.local_shape} of {spec}"
            )
        self._projections.pop(p, None)  # drawn for the local shape, if at all
        if spec is None or spec.dim is None:
            self._shards.pop(p, None)
            return
        if group["rank"] is not None and len(spec.global_shape) != 2:
            raise ValueError(f"APOLLO needs a 2-D global shape, got {spec.global_shape}")
        self._shards[p] = spec

    def _update_many(
        self, params: list[Tensor], group: dict[str, Any], oks: list[Tensor | None] | None = None
    ) -> None:
        """`Apollo`'s batched steps for the unsharded matrices, then each sharded one on its own, in order.

        The entry point of `step()` and of batched backward-hook updates. AdamW is elementwise: its shards
        take `Apollo`'s path as they are.
        """
        sharded = [i for i, p in enumerate(params) if p in self._shards]
        if group["rank"] is None or not sharded:
            super()._update_many(params, group, oks)
            return
        flags = [None] * len(params) if oks is None else list(oks)
        plain = [i for i in range(len(params)) if i not in sharded]
        if plain:
            plain_oks = None if oks is None else [flags[i] for i in plain]
            super()._update_many([params[i] for i in plain], group, plain_oks)
        for i in sharded:
            self._update(params[i], group, flags[i])

    def _update(self, p: Tensor, group: dict[str, Any], ok: Tensor | None = None) -> None:
        spec = self._shards.get(p)
        if spec is None or group["rank"] is None:
            super()._update(p, group, ok)
            return
        self._update_shard(p, spec, group, ok)

    def _update_shard(self, p: Tensor, spec: ShardSpec, group: dict[str, Any], ok: Tensor | None) -> None:
        """`Apollo._update` of a shard: the global matrix's math, with the sums over ranks all-reduced."""
        state, step, step_size, decay = self._begin(p, group)
        by_row = spec.global_shape[0] >= spec.global_shape[1]
        proj = self._projection(p, state, group, step)
        r, channel_sq = self._shard_first_pass(p.grad, proj, by_row, group["rank"])
        if spec.dim == projected_away_dim(spec.global_shape):
            r, channel_sq = self._sum_partial_projection(r, channel_sq, spec.replicas)
            factor, per_row = apollo._scale_factor(r, channel_sq, by_row, state, group, ok)
        else:
            reduce = functools.partial(self._sum_over_shards, replicas=spec.replicas)
            factor, per_row = _kept_dim_scale_factor(r, channel_sq, by_row, state, group, reduce, ok)
        coef = factor * math.sqrt(group["scale"])
        if ok is not None:
            coef = torch.where(ok, coef, 0.0)  # a masked-out parameter's coefficient is never NaN
        apollo._write_scaled(p, p.grad, coef, per_row, step_size, decay, self._use_triton, ok)

    def _draw_projection(self, p: Tensor, seed: int, rank: int) -> Tensor:
        """A shard's projection is its part of the global matrix's (seeds, refreshes and caching are
        `Apollo._projection`'s)."""
        spec = self._shards.get(p)
        if spec is None:
            return super()._draw_projection(p, seed, rank)
        proj = projection(seed, spec.global_shape, rank, p.device)
        if spec.dim == projected_away_dim(spec.global_shape):
            # P spans the projected-away dimension along the same dim (P is (rank, cols) or (rows, rank)).
            proj = spec.take(proj).contiguous()
        return proj

    def _shard_first_pass(
        self, grad: Tensor, proj: Tensor, by_row: bool, rank: int
    ) -> tuple[Tensor, Tensor]:
        """(R, channel_sq) of a shard, oriented as the global matrix (a shard may be shaped the other way)."""
        if (grad.shape[0] >= grad.shape[1]) == by_row:
            return self._first_pass(grad, proj, rank)
        return apollo._project_in_chunks(grad, proj, by_row)

    def _sum_partial_projection(
        self, r: Tensor, channel_sq: Tensor, replicas: int
    ) -> tuple[Tensor, Tensor]:
        """The full R and channel norms^2 from every rank's partial sums, in one all-reduce."""
        packed = self._sum_over_shards(torch.cat([r.reshape(-1), channel_sq]), replicas)
        return packed[: r.numel()].view(r.shape), packed[r.numel() :]

    def _sum_over_shards(self, partial: Tensor, replicas: int) -> Tensor:
        """Sum of `partial` (a temporary: may be reduced in place) over the distinct shards of the group.

        Each of the `replicas` ranks holding a shard adds 1/replicas of it, so the shard counts once.
        """
        total = partial / replicas if replicas > 1 else partial.contiguous()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self._process_group)
        return total


def _kept_dim_scale_factor(
    r: Tensor,
    channel_sq: Tensor,
    by_row: bool,
    state: dict[str, Any],
    group: dict[str, Any],
    reduce: Callable[[Tensor], Tensor],
    ok: Tensor | None,
) -> tuple[Tensor, bool]:
    """`apollo._scale_factor` for a shard holding some channels whole: sums over channels go to `reduce`.

    Returns (factor, per_row): factor is one per local channel (channel scaling) or 0-d (tensor scaling).
    """
    adam_r = apollo.projected_adam(r, state, group, ok)
    if group["scale_type"] == "channel":
        dim = 1 if by_row else 0  # a channel's projected values: never split across ranks
        adam_norms, norms = torch.linalg.vector_norm(adam_r, dim=dim), torch.linalg.vector_norm(r, dim=dim)
        factor = adam_norms / (norms + apollo._NORM_EPS)
        scaled_norm = reduce((factor.square() * channel_sq).sum().reshape(1))[0].sqrt()
    else:
        sums = reduce(torch.stack([adam_r.square().sum(), r.square().sum(), channel_sq.sum()]))
        norms = sums.sqrt()
        factor = norms[0] / (norms[1] + apollo._NORM_EPS)
        scaled_norm = factor * norms[2]
    return apollo.limit_growth(factor, scaled_norm, state, group, ok), by_row and group["scale_type"] == "channel"

"""The optimizer's `ShardSpec` of an HF parameter from the `ParameterLayout` a tensor-parallel rank is served.

A TP trainer rank binds each HF parameter to its shard of vLLM's weights (`AttachedWeights.hf_tensor`) and
tells the optimizer which part of the global parameter that is:
    optimizer.set_shard(param, shard_spec(weights.layout[name]))
`shard_spec` returns None where the rank holds the whole parameter, and raises ValueError (naming the
parameter) where the layout is not one `ShardSpec`.

Layout fields read: `hf_name` (messages), `hf_shape` (-> `global_shape`), `tp_size` (1: None), `tp_rank`
(must be among each block's replicas), `tp_split_dim` (must be the slices' dim when >= 0), `local_shape`
(must equal the spec's), and per slice `dim`, `length`, `local_offset`, `hf_start`, `replica_ranks`. Not
read: where the shard lies in vLLM's memory (`engine_tensor`, `start`: attach's business), dtypes,
`zero_copy` (a copied shard has the same rows), `tied_to` (a tied lm_head's layout repeats the embedding's
slices, so it gets the same spec as the one optimizer parameter it is).

How each part of the spec is derived:
- `dim`: the slices' `dim`. The schema defines it on the engine tensor and says the block lies along the
  same dim of the HF tensor; for vLLM's column-parallel (output_dim 0), row-parallel (input_dim 1) and
  vocabulary layouts the engine and HF weights have the same axes; the GDN conv1d, (d, 1, w) in HF and
  (d, 1, w) or (d, w) in vLLM, is split along dim 0 in both. Checked, not assumed: tests/test_tp_shards.py
  compares `spec.take(global HF tensor)` with each rank's shard read from the engine tensors, for every
  parameter of every rank of the tiny models.
- `blocks`: (hf_start, local_start, length) per slice, local_start being where `hf_tensor` puts the slice:
  slices are concatenated (or narrowed as one range) along `dim` in order, so each starts at the sum of the
  earlier lengths, which the layout also states as `local_offset` (checked).
- `replicas`: the number of ranks in a slice's `replica_ranks` (this rank included). An empty list comes
  only from producers older than the field (layout_proto.engine_slices leaves it empty when not given;
  layout_vllm fills it for every slice). It is refused rather than read as 1: a replicated K/V block taken
  as unreplicated would be counted several times in the optimizer's sums over ranks.
- None (the rank holds the whole parameter): TP size 1, a 0-d parameter, or blocks that are the global
  tensor in order (a norm or other parameter TP does not split, tp_split_dim -1, whose one block spans it
  all; a single K/V head every rank replicates). The optimizer then treats it as unsharded; as for any
  replicated parameter, the caller all-reduces its gradient.

Vocabulary padding: vLLM pads an embedding / lm_head to a multiple of 64 rows and puts each rank's padding
rows after its real ones; the layout's slices stop at the last real row and `local_shape` counts real rows
only, so the spec covers real rows only and matches `hf_tensor`, which holds no padding. A rank whose rows
are all padding has no slices and is refused: a ShardSpec needs at least one block. A vocabulary shard may
also be shorter on the last ranks than on the others (see apollo_tp's requirement on `bucket_elems`).

Refused: slices along different dims, or along a dim other than `tp_split_dim` or outside `hf_shape`; a
block replicated on a different number of ranks than another (a spec has one `replicas`) or without
`replica_ranks` / `hf_start`; `local_offset` out of order; `local_shape` not the slices' total; no slices.

Tests: .venv/bin/python -m pytest tests/test_tp_shards.py (hand-built layouts, and every rank at TP 2 and 4 of
tiny models sharded by vLLM's own loaders, tests/tp_vllm_models.py; CPU, seconds)
"""

from __future__ import annotations

from trainer_side.apollo_tp import ShardSpec
from weightshare.v1 import tensors_pb2


def shard_spec(entry: tensors_pb2.ParameterLayout) -> ShardSpec | None:
    """This rank's `ShardSpec` of `entry`'s HF parameter, or None when the rank holds all of it."""
    if entry.HasField("tp_size") and entry.tp_size == 1:
        return None
    if not entry.slices:
        raise ValueError(
            f"{entry.hf_name}: this TP rank holds no rows of it, and a ShardSpec needs at least one block "
            f"({entry.not_zero_copy_reason or 'the layout has no slices'})"
        )
    if not entry.hf_shape:
        return None  # 0-d: nothing to split
    dim, blocks, replicas = _slice_dim(entry), _blocks(entry), _replicas(entry)
    try:
        spec = ShardSpec(tuple(entry.hf_shape), dim, blocks, replicas)
    except ValueError as e:  # ShardSpec's own checks do not know the name
        raise ValueError(f"{entry.hf_name}: {e}") from e
    if entry.local_shape and tuple(entry.local_shape) != spec.local_shape:
        raise ValueError(
            f"{entry.hf_name}: local_shape {list(entry.local_shape)} is not the slices' "
            f"{list(spec.local_shape)}"
        )
    if _is_whole(spec):
        return None
    if entry.tp_split_dim < 0:
        raise ValueError(
            f"{entry.hf_name}: not split over TP (tp_split_dim -1), but holds only {spec.blocks}"
        )
    return spec


def _slice_dim(entry: tensors_pb2.ParameterLayout) -> int:
    """The one dim all slices lie along, checked against `hf_shape` and `tp_split_dim`."""
    dims = sorted({s.dim for s in entry.slices})
    if len(dims) != 1:
        raise ValueError(f"{entry.hf_name}: slices along dims {dims}; a ShardSpec splits one dim")
    dim = dims[0]
    if dim >= len(entry.hf_shape):
        raise ValueError(f"{entry.hf_name}: slices along dim {dim} of a {len(entry.hf_shape)}-d HF shape")
    if entry.tp_split_dim >= 0 and entry.tp_split_dim != dim:
        raise ValueError(f"{entry.hf_name}: slices along dim {dim}, but tp_split_dim is {entry.tp_split_dim}")
    return dim


def _blocks(entry: tensors_pb2.ParameterLayout) -> tuple[tuple[int, int, int], ...]:
    """(hf_start, local_start, length) per slice, local_start in the order `hf_tensor` concatenates them."""
    blocks, local_start = [], 0
    for s in entry.slices:
        if not s.HasField("hf_start"):
            raise ValueError(f"{entry.hf_name}: a slice without hf_start (a producer older than the field)")
        if s.local_offset != local_start:
            raise ValueError(
                f"{entry.hf_name}: slice local_offset {s.local_offset} is not {local_start}, the earlier "
                "slices' total, where hf_tensor places it"
            )
        blocks.append((s.hf_start, local_start, s.length))
        local_start += s.length
    return tuple(blocks)


def _replicas(entry: tensors_pb2.ParameterLayout) -> int:
    """How many ranks hold each block; one number for all blocks, as a ShardSpec has one."""
    counts = [len(s.replica_ranks) for s in entry.slices]
    if 0 in counts:
        raise ValueError(
            f"{entry.hf_name}: a slice without replica_ranks (a producer older than the field), so whether "
            "other ranks hold the same rows is unknown"
        )
    if len(set(counts)) > 1:
        held_by = [(s.hf_start, s.length, list(s.replica_ranks)) for s in entry.slices]
        raise ValueError(
            f"{entry.hf_name}: blocks held by different numbers of ranks, (hf_start, length, ranks) "
            f"{held_by}; a ShardSpec has one replica count"
        )
    if entry.HasField("tp_rank") and any(entry.tp_rank not in s.replica_ranks for s in entry.slices):
        raise ValueError(f"{entry.hf_name}: tp_rank {entry.tp_rank} is missing from a slice's replica_ranks")
    return counts[0]


def _is_whole(spec: ShardSpec) -> bool:
    """True when the blocks are the global tensor itself, in order."""
    assert spec.dim is not None
    in_place = all(hf_start == local_start for hf_start, local_start, _ in spec.blocks)
    return in_place and spec.local_shape == spec.global_shape

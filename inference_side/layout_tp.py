"""Tensor-parallel row arithmetic of the layout schema: which rows of an HF parameter a TP rank holds.

Pure integer arithmetic (no torch, no vLLM) following vLLM's sharding rules in
`model_executor/layers/linear.py` and `layers/vocab_parallel_embedding.py`.

Tests: .venv/bin/python -m pytest tests/test_layout.py (arithmetic), tests/test_layout_tp_vllm.py (every rank at
TP 2 and 4 against the slicing of vLLM's own weight loaders)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple


class Block(NamedTuple):
    """Rows [hf_start, hf_start + length) of an HF parameter, at rows [engine_start, ...) of an engine
    tensor."""

    hf_start: int
    engine_start: int
    length: int


def tp_shard(size: int, tp_rank: int, tp_size: int, replicas: int = 1) -> tuple[int, int]:
    """(start, length) of the rows of a dimension of `size` that `tp_rank` holds.

    The dimension is split into `tp_size // replicas` equal parts; `replicas` consecutive ranks hold the
    same part (K/V heads when tp_size > num_kv_heads: `layers/linear.py` QKVParallelLinear,
    `shard_rank = tp_rank // num_kv_head_replicas`).
    """
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank {tp_rank} is outside tp_size {tp_size}")
    if replicas < 1 or tp_size % replicas:
        raise ValueError(f"{replicas} replicas do not divide tp_size {tp_size}")
    parts = tp_size // replicas
    if size % parts:
        raise ValueError(f"size {size} does not split into {parts} equal TP parts")
    length = size // parts
    return (tp_rank // replicas) * length, length


def merged_param_blocks(
    hf_sizes: Sequence[int],
    local_sizes: Sequence[int],
    group: Sequence[int],
    tp_rank: int,
    tp_size: int,
) -> list[Block]:
    """Blocks of one HF parameter inside a merged column-parallel engine tensor.

    The engine tensor is the concatenation, over sub-shards i, of this rank's `local_sizes[i]` rows of
    sub-shard i, whose global (HF) size is `hf_sizes[i]` (`layers/linear.py`: rank r holds rows
    `[r*s_i/tp, (r+1)*s_i/tp)` of each). The HF parameter is sub-shards `group` (consecutive) stacked.
    A sub-shard held by more ranks than its size splits into (local * tp > hf) is replicated.
    Adjacent blocks are merged, so at TP=1 a group is one block.
    """
    if len(hf_sizes) != len(local_sizes):
        raise ValueError(f"{len(hf_sizes)} HF sizes for {len(local_sizes)} local sizes")
    if list(group) != list(range(group[0], group[0] + len(group))):
        raise ValueError(f"sub-shard group {list(group)} is not consecutive")
    blocks: list[Block] = []
    hf_offset = 0
    for i in group:
        if (local_sizes[i] * tp_size) % hf_sizes[i]:
            raise ValueError(
                f"sub-shard {i}: {local_sizes[i]} local rows x tp {tp_size} is not a multiple of its "
                f"{hf_sizes[i]} HF rows"
            )
        replicas = local_sizes[i] * tp_size // hf_sizes[i]
        start, length = tp_shard(hf_sizes[i], tp_rank, tp_size, replicas)
        blocks.append(Block(hf_offset + start, sum(local_sizes[:i]), length))
        hf_offset += hf_sizes[i]
    return coalesce(blocks)


def vocab_blocks(vocab_size: int, vocab_size_padded: int, tp_rank: int, tp_size: int) -> list[Block]:
    """Rows of a vocabulary-parallel weight of `vocab_size` rows that `tp_rank` holds, padding excluded.

    vLLM pads the vocabulary to `vocab_size_padded` (a multiple of 64), splits the padded rows evenly, and
    each rank's real rows come first in its shard, padding rows (zeros) after
    (`layers/vocab_parallel_embedding.py` `_get_indices`). A rank past the real rows holds none.
    """
    if vocab_size_padded < vocab_size:
        raise ValueError(f"padded vocabulary {vocab_size_padded} is smaller than vocabulary {vocab_size}")
    start, length = tp_shard(vocab_size_padded, tp_rank, tp_size)
    end = min(start + length, vocab_size)
    start = min(start, vocab_size)
    return [Block(start, 0, end - start)] if end > start else []


def coalesce(blocks: Sequence[Block]) -> list[Block]:
    """Merge blocks that continue each other in both the HF and the engine tensor."""
    out: list[Block] = []
    for b in blocks:
        if (
            out
            and out[-1].hf_start + out[-1].length == b.hf_start
            and (out[-1].engine_start + out[-1].length == b.engine_start)
        ):
            out[-1] = Block(out[-1].hf_start, out[-1].engine_start, out[-1].length + b.length)
        else:
            out.append(b)
    return out


def group_sub_shards(hf_sizes: Sequence[int], shard_sizes: Sequence[int]) -> list[list[int]]:
    """Which consecutive sub-shards (of global sizes `shard_sizes`) make up each HF parameter of `hf_sizes`.

    One sub-shard each when the counts match (q/k/v, gate/up); otherwise consecutive runs whose sizes
    add up (Qwen3.5 `in_proj_qkvz` [kd, kd, vd, vd] -> in_proj_qkv [0, 1, 2], in_proj_z [3]).
    """
    if len(hf_sizes) == len(shard_sizes):
        return [[i] for i in range(len(hf_sizes))]
    groups, i = [], 0
    for size in hf_sizes:
        group, total = [], 0
        while total < size and i < len(shard_sizes):
            group.append(i)
            total += shard_sizes[i]
            i += 1
        if total != size:
            raise ValueError(
                f"sub-shards {list(shard_sizes)} do not add up to HF parameter sizes {list(hf_sizes)}"
            )
        groups.append(group)
    if i != len(shard_sizes):
        raise ValueError(f"sub-shards {list(shard_sizes)} are more than HF parameter sizes {list(hf_sizes)}")
    return groups


def check_cover(blocks_by_rank: Sequence[Sequence[Block]], size: int) -> None:
    """Raise ValueError unless the blocks of all ranks cover HF rows [0, size) exactly once up to replicas.

    `blocks_by_rank[r]` are rank r's blocks. Two blocks of any ranks must hold the same HF rows (replicas)
    or disjoint rows, and the distinct row ranges must tile [0, size): then every HF row is in exactly one
    range, which one or more ranks hold.
    """
    ranges = sorted({(b.hf_start, b.length) for blocks in blocks_by_rank for b in blocks})
    end = 0
    for start, length in ranges:
        if start != end:
            what = "overlap" if start < end else "leave out"
            raise ValueError(f"the ranks' rows {ranges} {what} rows {min(start, end)}:{max(start, end)}")
        end = start + length
    if end != size:
        raise ValueError(f"the ranks' rows {ranges} end at {end}, not at the HF size {size}")


def replica_ranks(blocks_by_rank: Sequence[Sequence[Block]], tp_rank: int) -> list[tuple[int, ...]]:
    """For each block of `tp_rank`: every rank (ascending, `tp_rank` included) with a block of the same HF
    rows. More than one when the rows are replicated (K/V heads when tp_size > num_kv_heads, parameters
    TP does not split)."""
    held = [{(b.hf_start, b.length) for b in blocks} for blocks in blocks_by_rank]
    return [
        tuple(r for r, rows in enumerate(held) if (b.hf_start, b.length) in rows)
        for b in blocks_by_rank[tp_rank]
    ]

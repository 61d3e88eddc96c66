"""The layout schema as `weightshare.v1` messages: `ParameterLayout`, `EngineSlice`, `EngineTensor`.

Builds the messages from torch dtypes and TP blocks (`inference_side.layout_tp.Block`: each block's global
HF row `hf_start` and the TP ranks holding the same rows go on its `EngineSlice`); a parameter is zero-copy
exactly when it has no not-zero-copy reason.

Tests: .venv/bin/python -m pytest tests/test_layout.py
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from inference_side.layout_tp import Block
from weightshare.dtypes import to_proto_dtype
from weightshare.v1 import tensors_pb2

if TYPE_CHECKING:
    import torch


def engine_slices(
    engine_tensor: str,
    dim: int,
    blocks: Sequence[Block],
    replica_ranks: Sequence[Sequence[int]] | None = None,
) -> list[tensors_pb2.EngineSlice]:
    """One `EngineSlice` of `engine_tensor` per block, each placed after the previous in this rank's shard
    and at its `hf_start` in the global HF tensor; `replica_ranks[i]`: the TP ranks holding block i's rows
    (left empty when not given)."""
    if replica_ranks is not None and len(replica_ranks) != len(blocks):
        raise ValueError(f"{len(replica_ranks)} replica rank lists for {len(blocks)} blocks")
    slices, offset = [], 0
    for i, b in enumerate(blocks):
        slices.append(
            tensors_pb2.EngineSlice(
                engine_tensor=engine_tensor,
                dim=dim,
                start=b.engine_start,
                length=b.length,
                local_offset=offset,
                hf_start=b.hf_start,
                replica_ranks=replica_ranks[i] if replica_ranks is not None else (),
            )
        )
        offset += b.length
    return slices


def parameter_layout(
    *,
    hf_name: str,
    hf_shape: Sequence[int],
    hf_dtype: torch.dtype,
    engine_dtype: torch.dtype,
    tp_split_dim: int,
    local_shape: Sequence[int],
    local_start: int,
    slices: Sequence[tensors_pb2.EngineSlice],
    not_zero_copy_reason: str,
    tied_to: str = "",
    tp_rank: int = 0,
    tp_size: int = 1,
) -> tensors_pb2.ParameterLayout:
    """A `ParameterLayout` of TP rank `tp_rank` of `tp_size`; `zero_copy` is set when `not_zero_copy_reason`
    is empty."""
    return tensors_pb2.ParameterLayout(
        hf_name=hf_name,
        hf_shape=hf_shape,
        hf_dtype=to_proto_dtype(hf_dtype),
        engine_dtype=to_proto_dtype(engine_dtype),
        tp_split_dim=tp_split_dim,
        local_shape=local_shape,
        local_start=local_start,
        slices=slices,
        zero_copy=not not_zero_copy_reason,
        not_zero_copy_reason=not_zero_copy_reason,
        tied_to=tied_to,
        tp_rank=tp_rank,
        tp_size=tp_size,
    )


def tied_layout(layout: tensors_pb2.ParameterLayout, hf_name: str) -> tensors_pb2.ParameterLayout:
    """`layout` (of a parameter's first name) for `hf_name`, another name of the same memory."""
    tied = tensors_pb2.ParameterLayout()
    tied.CopyFrom(layout)
    tied.hf_name, tied.tied_to = hf_name, layout.hf_name
    return tied


def engine_tensor(name: str, shape: Sequence[int], dtype: torch.dtype) -> tensors_pb2.EngineTensor:
    """An `EngineTensor` with no HF names yet (append them to `hf_names` in row order)."""
    return tensors_pb2.EngineTensor(name=name, shape=shape, dtype=to_proto_dtype(dtype))

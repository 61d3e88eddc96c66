"""Unit tests of the layout schema's pure parts: TP arithmetic, messages on the wire, dtype map (no vLLM).

Relies on inference_side.layout_tp, inference_side.layout_proto, weightshare.dtypes and the generated stubs.
The layout of real vLLM models is tested in tests/test_layout_vllm.py.

Run as: .venv/bin/python -m pytest tests/test_layout.py
"""

import pytest
import torch

from inference_side import layout_proto
from inference_side.layout_tp import (
    Block,
    check_cover,
    coalesce,
    group_sub_shards,
    merged_param_blocks,
    replica_ranks,
    tp_shard,
    vocab_blocks,
)
from weightshare.dtypes import from_proto_dtype, to_proto_dtype
from weightshare.v1 import tensors_pb2

# A Llama-like attention: 4 query heads, 2 KV heads, head_dim 64 -> q 256 rows, k and v 128 rows each.
Q, K, V = 256, 128, 128


@pytest.mark.parametrize(
    ("size", "tp_size", "expected"),
    [
        (512, 1, [(0, 512)]),
        (512, 2, [(0, 256), (256, 256)]),
        (512, 4, [(0, 128), (128, 128), (256, 128), (384, 128)]),
    ],
)
def test_tp_shard_splits_evenly(size, tp_size, expected):
    assert [tp_shard(size, r, tp_size) for r in range(tp_size)] == expected


def test_tp_shard_replicated_parts():
    # 2 KV heads of 64 over TP=4: ranks 0,1 hold head 0, ranks 2,3 hold head 1 (linear.py shard_rank).
    assert [tp_shard(K, r, 4, replicas=2) for r in range(4)] == [(0, 64), (0, 64), (64, 64), (64, 64)]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((512, 2, 2), "tp_rank 2 is outside tp_size 2"),
        ((500, 0, 3), "size 500"),
        ((8, 0, 4, 3), "3 replicas"),
    ],
)
def test_tp_shard_rejects_bad_splits(args, message):
    with pytest.raises(ValueError, match=message):
        tp_shard(*args)


def test_qkv_blocks_tp1():
    sizes = [Q, K, V]
    assert [merged_param_blocks(sizes, sizes, [i], 0, 1) for i in range(3)] == [
        [Block(0, 0, Q)],
        [Block(0, Q, K)],
        [Block(0, Q + K, V)],
    ]


def test_qkv_blocks_tp2():
    local = [Q // 2, K // 2, V // 2]
    rank1 = [merged_param_blocks([Q, K, V], local, [i], 1, 2) for i in range(3)]
    assert rank1 == [[Block(128, 0, 128)], [Block(64, 128, 64)], [Block(64, 192, 64)]]


def test_qkv_blocks_tp4_replicates_kv_heads():
    # TP=4 > 2 KV heads: each rank holds one query head and one (replicated) KV head of 64 rows.
    local = [64, 64, 64]
    k_rows = [merged_param_blocks([Q, K, V], local, [1], r, 4) for r in range(4)]
    assert k_rows == [[Block(0, 64, 64)], [Block(0, 64, 64)], [Block(64, 64, 64)], [Block(64, 64, 64)]]
    assert merged_param_blocks([Q, K, V], local, [0], 3, 4) == [Block(192, 0, 64)]


def test_gate_up_blocks_tp2():
    assert merged_param_blocks([512, 512], [256, 256], [1], 0, 2) == [Block(0, 256, 256)]


def test_in_proj_qkv_is_one_block_at_tp1_and_three_at_tp2():
    # Qwen3.5 in_proj_qkvz: output_sizes [kd, kd, vd, vd]; HF in_proj_qkv is sub-shards 0-2.
    kd, vd = 128, 256
    sizes = [kd, kd, vd, vd]
    assert merged_param_blocks(sizes, sizes, [0, 1, 2], 0, 1) == [Block(0, 0, 2 * kd + vd)]
    assert merged_param_blocks(sizes, sizes, [3], 0, 1) == [Block(0, 2 * kd + vd, vd)]
    local = [s // 2 for s in sizes]
    assert merged_param_blocks(sizes, local, [0, 1, 2], 1, 2) == [
        Block(64, 0, 64),
        Block(kd + 64, 64, 64),
        Block(2 * kd + 128, 128, 128),
    ]
    assert merged_param_blocks(sizes, local, [3], 1, 2) == [Block(128, 256, 128)]


def test_merged_blocks_reject_inconsistent_sizes():
    with pytest.raises(ValueError, match="not a multiple"):
        merged_param_blocks([100], [30], [0], 0, 2)
    with pytest.raises(ValueError, match="not consecutive"):
        merged_param_blocks([4, 4, 4], [4, 4, 4], [0, 2], 0, 1)


def test_row_parallel_column_block():
    # down_proj [hidden, intermediate] at TP=2: rank 1 holds columns 256:512 (dim 1).
    assert tp_shard(512, 1, 2) == (256, 256)


@pytest.mark.parametrize(
    ("tp_rank", "tp_size", "split_dim", "blocks"),
    [(0, 1, -1, [Block(0, 0, 128)]), (1, 2, 1, [Block(256, 0, 256)]), (3, 4, 1, [Block(384, 0, 128)])],
)
def test_place_row_gives_each_rank_its_column_block(tp_rank, tp_size, split_dim, blocks):
    from types import SimpleNamespace

    from inference_side.layout_vllm import _place_row

    module = SimpleNamespace(tp_rank=tp_rank, tp_size=tp_size)
    placement = _place_row(module, 1, (128, 512))
    assert placement.split_dim == split_dim and placement.blocks == blocks and not placement.reason


def test_place_row_reports_an_uneven_split():
    from types import SimpleNamespace

    from inference_side.layout_vllm import _place_row

    placement = _place_row(SimpleNamespace(tp_rank=0, tp_size=3), 1, (128, 512))
    assert not placement.blocks and "512" in placement.reason


@pytest.mark.parametrize(
    ("vocab", "padded", "tp_size", "expected"),
    [
        (500, 512, 1, [[Block(0, 0, 500)]]),
        (500, 512, 2, [[Block(0, 0, 256)], [Block(256, 0, 244)]]),
        # 130 rows padded to 192 over TP=4 (48 each): the last rank holds padding only.
        (130, 192, 4, [[Block(0, 0, 48)], [Block(48, 0, 48)], [Block(96, 0, 34)], []]),
    ],
)
def test_vocab_blocks_exclude_padding(vocab, padded, tp_size, expected):
    assert [vocab_blocks(vocab, padded, r, tp_size) for r in range(tp_size)] == expected


def test_group_sub_shards():
    assert group_sub_shards([Q, K, V], [Q, K, V]) == [[0], [1], [2]]
    assert group_sub_shards([384, 256], [64, 64, 256, 256]) == [[0, 1, 2], [3]]
    with pytest.raises(ValueError, match=r"do not add up to HF parameter sizes \[100, 256\]"):
        group_sub_shards([100, 256], [64, 64, 256, 256])
    with pytest.raises(ValueError, match="are more than"):
        group_sub_shards([128], [64, 64, 64])


def test_coalesce_merges_only_continuing_blocks():
    assert coalesce([Block(0, 0, 4), Block(4, 4, 4), Block(10, 8, 2)]) == [Block(0, 0, 8), Block(10, 8, 2)]


def test_replica_ranks_name_every_rank_holding_the_same_rows():
    # K of 2 KV heads at TP=4 (ranks 0,1 hold head 0; 2,3 head 1) and q, split without replicas.
    k = [merged_param_blocks([Q, K, V], [64, 64, 64], [1], r, 4) for r in range(4)]
    assert [replica_ranks(k, r) for r in range(4)] == [[(0, 1)], [(0, 1)], [(2, 3)], [(2, 3)]]
    q = [merged_param_blocks([Q, K, V], [64, 64, 64], [0], r, 4) for r in range(4)]
    assert [replica_ranks(q, r) for r in range(4)] == [[(0,)], [(1,)], [(2,)], [(3,)]]
    whole = [[Block(0, 0, 8)]] * 3
    assert replica_ranks(whole, 1) == [(0, 1, 2)]


def test_check_cover_accepts_tilings_up_to_replicas():
    kd, vd = 128, 256
    sizes = [kd, kd, vd, vd]
    local = [s // 2 for s in sizes]
    qkv = [merged_param_blocks(sizes, local, [0, 1, 2], r, 2) for r in range(2)]
    check_cover(qkv, 2 * kd + vd)
    check_cover([merged_param_blocks([Q, K, V], [64, 64, 64], [1], r, 4) for r in range(4)], K)
    check_cover([vocab_blocks(130, 192, r, 4) for r in range(4)], 130)


@pytest.mark.parametrize(
    ("blocks_by_rank", "message"),
    [
        ([[Block(0, 0, 4)], [Block(5, 0, 3)]], "leave out rows 4:5"),
        ([[Block(0, 0, 4)], [Block(2, 0, 6)]], "overlap rows 2:4"),
        ([[Block(0, 0, 4)], [Block(4, 0, 3)]], "end at 7, not at the HF size 8"),
    ],
)
def test_check_cover_rejects_gaps_overlaps_and_short_covers(blocks_by_rank, message):
    with pytest.raises(ValueError, match=message):
        check_cover(blocks_by_rank, 8)


def test_engine_slices_place_blocks_globally():
    slices = layout_proto.engine_slices("t", 0, [Block(64, 0, 64), Block(192, 64, 64)], [(1,), (0, 1)])
    assert [(s.hf_start, s.local_offset, list(s.replica_ranks)) for s in slices] == [
        (64, 0, [1]),
        (192, 64, [0, 1]),
    ]
    with pytest.raises(ValueError, match="1 replica rank lists for 2 blocks"):
        layout_proto.engine_slices("t", 0, [Block(0, 0, 1), Block(1, 1, 1)], [(0,)])


def test_layout_messages_survive_the_wire():
    qkvz = "model.layers.0.linear_attn.in_proj_qkvz.weight"
    embed = "model.embed_tokens.weight"
    messages = [
        layout_proto.parameter_layout(
            hf_name="model.layers.0.linear_attn.in_proj_qkv.weight",
            hf_shape=(512, 256),
            hf_dtype=torch.bfloat16,
            engine_dtype=torch.bfloat16,
            tp_split_dim=0,
            local_shape=(256, 256),
            local_start=64,
            slices=layout_proto.engine_slices(
                qkvz, 0, [Block(64, 0, 64), Block(192, 64, 64), Block(384, 128, 128)]
            ),
            not_zero_copy_reason="not zero-copy, because this rank's shard is 3 separate blocks",
        ),
        layout_proto.parameter_layout(
            hf_name="model.layers.0.linear_attn.A_log",
            hf_shape=(4,),
            hf_dtype=torch.bfloat16,
            engine_dtype=torch.float32,
            tp_split_dim=-1,
            local_shape=(4,),
            local_start=0,
            slices=layout_proto.engine_slices("model.layers.0.linear_attn.A_log", 0, [Block(0, 0, 4)]),
            not_zero_copy_reason="",
        ),
        layout_proto.parameter_layout(
            hf_name=embed,
            hf_shape=(500, 256),
            hf_dtype=torch.bfloat16,
            engine_dtype=torch.bfloat16,
            tp_split_dim=-1,
            local_shape=(500, 256),
            local_start=0,
            slices=layout_proto.engine_slices(embed, 0, [Block(0, 0, 500)]),
            not_zero_copy_reason="",
        ),
    ]
    messages.append(layout_proto.tied_layout(messages[2], "lm_head.weight"))
    wire = [tensors_pb2.ParameterLayout.FromString(m.SerializeToString()) for m in messages]
    assert wire == messages
    assert [(s.engine_tensor, s.dim, s.start, s.length, s.local_offset) for s in wire[0].slices] == [
        (qkvz, 0, 0, 64, 0),
        (qkvz, 0, 64, 64, 64),
        (qkvz, 0, 128, 128, 128),
    ]
    assert [s.hf_start for s in wire[0].slices] == [64, 192, 384]
    assert wire[1].engine_dtype == tensors_pb2.D_TYPE_FLOAT32
    assert from_proto_dtype(wire[1].hf_dtype) is torch.bfloat16
    assert wire[0].tp_split_dim == 0 and wire[1].tp_split_dim == -1
    assert [m.zero_copy for m in wire] == [False, True, True, True]
    assert wire[0].not_zero_copy_reason.endswith("3 separate blocks")
    assert (wire[3].hf_name, wire[3].tied_to, list(wire[3].slices)) == (
        "lm_head.weight",
        embed,
        list(wire[2].slices),
    )
    assert not wire[2].tied_to


def test_engine_tensor_message():
    message = layout_proto.engine_tensor("model.embed_tokens.weight", (512, 256), torch.bfloat16)
    message.hf_names.extend(["a", "b"])
    assert message == tensors_pb2.EngineTensor(
        name="model.embed_tokens.weight",
        shape=[512, 256],
        dtype=tensors_pb2.D_TYPE_BFLOAT16,
        hf_names=["a", "b"],
    )


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float32,
        torch.bfloat16,
        torch.float16,
        torch.float64,
        torch.int8,
        torch.uint8,
        torch.int32,
        torch.int64,
        torch.bool,
    ],
)
def test_dtype_round_trip(dtype):
    assert from_proto_dtype(to_proto_dtype(dtype)) is dtype


def test_dtype_map_is_one_to_one_over_the_enum():
    named = [v for v in tensors_pb2.DType.values() if v != tensors_pb2.D_TYPE_UNSPECIFIED]
    assert sorted(to_proto_dtype(from_proto_dtype(v)) for v in named) == sorted(named)


def test_dtype_errors_name_the_value():
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        to_proto_dtype(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="D_TYPE_UNSPECIFIED"):
        from_proto_dtype(tensors_pb2.D_TYPE_UNSPECIFIED)
    with pytest.raises(ValueError, match="DType 99"):
        from_proto_dtype(99)

"""`AttachedWeights.hf_tensor`: a shard made of several blocks that follow each other in one engine tensor
(TP > 1, e.g. the q, k and v rows of a Qwen3.5 in_proj_qkv shard) is one view of the engine's memory.

Run as: .venv/bin/python -m pytest tests/test_attach_views.py -q
"""

from __future__ import annotations

import torch

from trainer_side.attach import AttachedWeights
from weightshare.v1 import tensors_pb2


def attached(slices: list[tuple[str, int, int, int]], engine: dict[str, torch.Tensor]) -> AttachedWeights:
    layout = tensors_pb2.ParameterLayout(
        hf_name="w",
        zero_copy=True,
        slices=[
            tensors_pb2.EngineSlice(engine_tensor=name, dim=0, start=start, length=length, hf_start=hf_start)
            for name, start, length, hf_start in slices
        ],
    )
    return AttachedWeights(
        address="unix:///nowhere", channel=None, stub=None, metadata=(), session_id="s", info=None,
        layout={"w": layout}, engine_tensors=engine, storages={},
    )  # fmt: skip


def test_consecutive_blocks_are_one_view() -> None:
    engine = {"qkv": torch.arange(40.0).reshape(10, 4)}
    # Rows 2:4, 4:5, 5:8 of the engine tensor: global HF rows 4:6, 12:13, 20:23 of the parameter.
    weights = attached([("qkv", 2, 2, 4), ("qkv", 4, 1, 12), ("qkv", 5, 3, 20)], engine)
    shard = weights.hf_tensor("w")
    assert shard.data_ptr() == engine["qkv"][2].data_ptr() and shard.shape == (6, 4)
    shard.add_(1)  # a write lands in the engine's memory
    assert torch.equal(engine["qkv"][2:8], torch.arange(8.0, 32.0).reshape(6, 4) + 1)


def test_blocks_apart_are_joined_into_a_copy() -> None:
    engine = {"a": torch.zeros(4, 2), "b": torch.ones(3, 2)}
    shard = attached([("a", 0, 2, 0), ("b", 1, 2, 2)], engine).hf_tensor("w")
    assert torch.equal(shard, torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]))
    assert shard.data_ptr() not in (engine["a"].data_ptr(), engine["b"].data_ptr())

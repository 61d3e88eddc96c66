"""Layout schema: where every HuggingFace parameter lives inside vLLM's (possibly merged) engine tensors.

The schema is the `weightshare.v1` `ParameterLayout` / `EngineSlice` / `EngineTensor` messages; it is
built in three modules, one per concern, whose public names this module re-exports:

- `inference_side.layout_tp`: which rows of an HF parameter a TP rank holds (pure arithmetic).
- `inference_side.layout_vllm`: `derive_layout(model, hf_config)` reads the loaded vLLM model.
- `inference_side.layout_proto`: builds the messages.

Tests: .venv/bin/python -m pytest tests/test_layout.py            (TP arithmetic, messages; no vLLM)
       .venv/bin/python -m pytest -m vllm tests/test_layout_vllm.py (real vLLM, tiny models)
       .venv/bin/python -m pytest tests/test_layout_tp_vllm.py      (every rank at TP 2 and 4, vLLM's loaders)
"""

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
from inference_side.layout_vllm import HfParameter, derive_layout, hf_meta_parameters

__all__ = [
    "Block",
    "HfParameter",
    "check_cover",
    "coalesce",
    "derive_layout",
    "group_sub_shards",
    "hf_meta_parameters",
    "merged_param_blocks",
    "replica_ranks",
    "tp_shard",
    "vocab_blocks",
]

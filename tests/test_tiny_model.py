"""Tests of the tiny-model builder (`weightshare.tiny_model`): fast, no vLLM.

Checks determinism of the safetensors bytes, the tokenizer and its chat template, the Qwen3.5 layout
that vLLM's CPU kernels need, tied embeddings, and that Hugging Face loads each model and runs a forward.
Relies on the `tiny_model_path` factory in conftest.py.

Run as: python -m pytest tests/test_tiny_model.py -q
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from weightshare import cli
from weightshare.tiny_model import ARCHS, EOS_TOKEN, PAD_TOKEN, UNK_TOKEN, build_tiny_model

# Every (arch, dtype) the project serves: all archs in bf16, plus the fp32 ones used to test CPU repacking.
VARIANTS = [(arch, "bfloat16") for arch in ARCHS] + [("qwen3", "float32"), ("llama", "float32")]


@pytest.mark.parametrize("arch", ARCHS)
def test_same_seed_gives_identical_bytes(tiny_model_path, tmp_path, arch):
    again = build_tiny_model(arch, tmp_path / arch, seed=0)
    first = (tiny_model_path(arch) / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").read_bytes() == first


def test_different_seed_gives_different_weights(tiny_model_path, tmp_path):
    other = build_tiny_model("qwen3_5", tmp_path / "seed1", seed=1)
    assert (other / "model.safetensors").read_bytes() != (
        tiny_model_path("qwen3_5") / "model.safetensors"
    ).read_bytes()


def test_unknown_arch_and_dtype_are_named(tmp_path):
    with pytest.raises(ValueError, match="'gpt2'"):
        build_tiny_model("gpt2", tmp_path)
    with pytest.raises(ValueError, match="'float16'"):
        build_tiny_model("llama", tmp_path, dtype="float16")


def test_tokenizer_round_trip(tiny_model_path):
    path = tiny_model_path("llama")
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = "hello world, the cat is big."
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text
    assert tokenizer("Hello zyzzyva")["input_ids"][1] == tokenizer.convert_tokens_to_ids(UNK_TOKEN)
    assert (tokenizer.eos_token, tokenizer.pad_token) == (EOS_TOKEN, PAD_TOKEN)
    # Every id the model can emit decodes to a token.
    assert len(tokenizer) == AutoConfig.from_pretrained(path).vocab_size


def test_chat_template(tiny_model_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path("qwen3"))
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    rendered = "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhello there<|im_end|>\n"
    assert tokenizer.apply_chat_template(messages, tokenize=False) == rendered
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == rendered + "<|im_start|>assistant\n"
    ids = tokenizer(prompt)["input_ids"]
    start, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", EOS_TOKEN])
    assert (ids[0], ids.count(start), ids.count(end)) == (start, 3, 2)


def test_generation_config_stops_at_end_of_turn(tiny_model_path):
    path = tiny_model_path("qwen3_5")
    tokenizer = AutoTokenizer.from_pretrained(path)
    generation = json.loads((path / "generation_config.json").read_text())
    assert tokenizer.eos_token_id in generation["eos_token_id"]
    assert generation["pad_token_id"] == tokenizer.pad_token_id


def test_qwen3_5_mixes_layer_types_with_cpu_kernel_head_dims(tiny_model_path):
    config = AutoConfig.from_pretrained(tiny_model_path("qwen3_5"))
    assert config.architectures == ["Qwen3_5ForCausalLM"]
    assert {"linear_attention", "full_attention"} <= set(config.layer_types)
    assert config.linear_key_head_dim in (64, 128) and config.linear_value_head_dim in (64, 128)
    full = config.layer_types.index("full_attention")
    with safe_open(tiny_model_path("qwen3_5") / "model.safetensors", framework="pt") as f:
        q_rows = f.get_slice(f"model.layers.{full}.self_attn.q_proj.weight").get_shape()[0]
        names = set(f.keys())
    # The full-attention q_proj carries the output gate: twice the query rows.
    assert q_rows == 2 * config.num_attention_heads * config.head_dim
    assert "model.layers.0.linear_attn.in_proj_qkv.weight" in names


@pytest.mark.parametrize(("arch", "tied"), [("llama_tied", True), ("llama", False)])
def test_tied_embeddings(tiny_model_path, arch, tied):
    path = tiny_model_path(arch)
    with safe_open(path / "model.safetensors", framework="pt") as f:
        assert ("lm_head.weight" in f.keys()) is not tied  # noqa: SIM118 (safe_open is not a mapping)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is tied


@pytest.mark.parametrize(("arch", "dtype"), VARIANTS)
def test_hf_loads_and_runs_forward(tiny_model_path, arch, dtype):
    path = tiny_model_path(arch, dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert model.dtype == getattr(torch, dtype)
    ids = tokenizer("once upon a time there was a little cat", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits  # (1, seq, vocab)
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_cli_builds_and_describes(tmp_path, capsys):
    assert cli.main(["make-tiny-model", "--arch", "llama_tied", "--seed", "3", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM (bfloat16)" in out and "tie_word_embeddings=True" in out
    assert (tmp_path / "m" / "tokenizer.json").is_file()

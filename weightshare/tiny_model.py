"""Tiny random models with a local tokenizer, for tests and demos that need no download.

Builds, with `save_pretrained`, a randomly initialised Hugging Face checkpoint (safetensors, config,
generation_config.json) plus a small WordLevel tokenizer with a ChatML-like chat template, small enough
for vLLM's CPU build to start in seconds. Same seed -> byte-identical safetensors.

Architectures (`ARCHS`):
  - qwen3_5:    text-only `Qwen3_5ForCausalLM`: 3 Gated DeltaNet (linear-attention) layers + 1 full-attention
                layer whose q_proj carries the output gate. vLLM's CPU GDN kernel needs bf16 and
                linear-attention head dims of 64 or 128, so serve it in bfloat16.
  - qwen3:      `Qwen3ForCausalLM`.
  - llama:      `LlamaForCausalLM`.
  - llama_tied: `LlamaForCausalLM` with `tie_word_embeddings=True` (lm_head is the embedding).

Relies on torch, transformers (>= 5.17: `Qwen3_5TextConfig`) and tokenizers; nothing is downloaded.

Run as: weightshare make-tiny-model --arch qwen3_5 [--seed 0] [--dtype bfloat16] OUT_DIR
   (or, from Python: build_tiny_model("qwen3_5", "/tmp/tiny-qwen3_5"))
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen3_5TextConfig,
    Qwen3Config,
)

ARCHS = ("qwen3_5", "qwen3", "llama", "llama_tied")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}

# The model's vocabulary and the tokenizer's have the same size, so every id the (random) model can
# emit decodes to a token: ids past the English words are `<|reserved_N|>` tokens, as in Llama 3.
VOCAB_SIZE = 512
PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, "<|im_start|>", EOS_TOKEN, UNK_TOKEN)
# Common English words and punctuation, one token each (whitespace-separated).
WORDS_TEXT = """
. , ? ! ' : ; - ( ) " 0 1 2 3 4 5 6 7 8 9
the be to of and a in that have i it for not on with he as you do at this but his by from they we say
her she or an will my one all would there their what so up out if about who get which go me when make
can like time no just him know take people into year your good some could them see other than then
now look only come its over think also back after use two how our work first well way even new want
because any these give day most us is are was were been has had did does said made went got
hello hi world model user assistant system weights train serve token memory fast slow learn answer
question yes please thank thanks sorry help name tell story once upon small big old young happy sad
cat dog bird fish tree sun moon star sky sea water fire earth air house home city road car book word
red blue green white black little long short high low great right left hot cold today tomorrow night
morning where why very more much many here each every never always again still before under between
man woman child children friend family mother father school game music food love life hand eye
head part place case week point number group problem fact three four five ten hundred thousand
run walk read write speak open close start stop find keep let put seem feel try leave call ask need
"""
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
MAX_POSITIONS = 2048


def _vocabulary(size: int = VOCAB_SIZE) -> dict[str, int]:
    tokens = list(SPECIAL_TOKENS) + WORDS_TEXT.split()
    assert len(set(tokens)) == len(tokens), "a word is listed twice"
    assert len(tokens) <= size, f"{len(tokens)} words do not fit a vocabulary of {size}"
    tokens += [f"<|reserved_{i}|>" for i in range(size - len(tokens))]
    return {token: i for i, token in enumerate(tokens)}


def build_tokenizer(vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """The WordLevel tokenizer every tiny model ships: lower-cased words, ChatML-like chat template.

    `vocab_size` larger than the default pads with reserved tokens, so that a model of that vocabulary
    (e.g. a random 248k-vocabulary Qwen3.5-27B shape) can decode every id it emits.
    """
    vocab = _vocabulary(vocab_size)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # WordPiece's decoder joins tokens with spaces; cleanup drops the space before punctuation.
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_POSITIONS,
    )


def _config(arch: str, dtype: str, pad_id: int, eos_id: int, linear_head_dim: int = 64) -> PretrainedConfig:
    # head_dim 64 everywhere: accepted by vLLM's CPU attention (and by its GDN kernel for linear layers).
    common = {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": 1e-6,
        "bos_token_id": None,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "tie_word_embeddings": arch == "llama_tied",
    }
    if arch == "qwen3_5":
        # No mrope_section in rope_parameters: text-only, and vLLM 0.26's Qwen3_5ForCausalLM has no M-RoPE.
        config = Qwen3_5TextConfig(
            **common,
            num_hidden_layers=4,
            layer_types=["linear_attention"] * 3 + ["full_attention"],
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=linear_head_dim,
            linear_value_head_dim=linear_head_dim,
            linear_conv_kernel_dim=4,
        )
    elif arch == "qwen3":
        config = Qwen3Config(**common, num_hidden_layers=2)
    else:
        config = LlamaConfig(**common, num_hidden_layers=2)
    config.dtype = dtype
    return config


def build_tiny_model(
    arch: str, out_dir: str | Path, seed: int = 0, dtype: str = "bfloat16", linear_head_dim: int = 64
) -> Path:
    """Write a random `arch` model (weights in `dtype`), its tokenizer and generation config to `out_dir`.

    `linear_head_dim`: Gated DeltaNet key and value head dim of qwen3_5 (vLLM's CPU kernels take 64 or 128).

    Deterministic: the same (arch, seed, dtype) gives byte-identical safetensors. Returns `out_dir`.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    out = Path(out_dir)
    tokenizer = build_tokenizer()
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    config = _config(arch, dtype, pad_id, eos_id, linear_head_dim)

    with torch.random.fork_rng(devices=[]):  # seed the initialisation without touching the caller's RNG
        torch.manual_seed(seed)
        # Initialise in float32 and cast once, so a bf16 model is the rounded fp32 one of the same seed.
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(DTYPES[dtype]).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=None, eos_token_id=[eos_id, pad_id], pad_token_id=pad_id
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def describe(path: Path) -> str:
    """One line about a built model: class, dtype, parameter count, layers, path."""
    config = json.loads((path / "config.json").read_text())
    n_params = 0
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            n_params += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())  # noqa: SIM118
    layers = config.get("layer_types") or ["attention"] * config["num_hidden_layers"]
    return (
        f"{config['architectures'][0]} ({config['dtype']}): {n_params:,} parameters, "
        f"{config['num_hidden_layers']} layers [{', '.join(layers)}], "
        f"tie_word_embeddings={config['tie_word_embeddings']} -> {path}"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", required=True, choices=ARCHS, help="model architecture to build")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed -> same bytes)")
    parser.add_argument("--dtype", default="bfloat16", choices=tuple(DTYPES), help="weight dtype")
    parser.add_argument(
        "--linear-head-dim", type=int, default=64,
        help="qwen3_5 only: Gated DeltaNet key/value head dim (default %(default)s; vLLM's CPU kernels take 64 or 128)",
    )
    parser.add_argument("out", type=Path, metavar="OUT", help="directory to write the model into")


def run(args: argparse.Namespace) -> int:
    from weightshare.vllm_defaults import cpu_gdn_config_problem

    if args.linear_head_dim < 1:
        raise SystemExit(f"weightshare make-tiny-model: --linear-head-dim {args.linear_head_dim} must be positive")
    path = build_tiny_model(args.arch, args.out, seed=args.seed, dtype=args.dtype, linear_head_dim=args.linear_head_dim)
    print(describe(path))
    problem = cpu_gdn_config_problem(json.loads((path / "config.json").read_text()))
    if problem:
        print(f"warning: vLLM's CPU build cannot serve this model: {problem}", file=sys.stderr)
    return 0

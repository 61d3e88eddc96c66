"""CPU engine defaults and the Gated DeltaNet head-dim check: `weightshare serve` on a CPU just works,
or says in one line why it cannot. Run as: .venv/bin/python -m pytest tests/test_vllm_defaults.py -v
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from weightshare.vllm_defaults import CPU_SERVE_KVCACHE_GIB, cpu_gdn_config_problem, cpu_serve_env_defaults


def test_kv_cache_default_only_when_the_user_sized_nothing():
    assert cpu_serve_env_defaults([], {}) == {"VLLM_CPU_KVCACHE_SPACE": str(CPU_SERVE_KVCACHE_GIB)}
    assert cpu_serve_env_defaults([], {"VLLM_CPU_KVCACHE_SPACE": "4"}) == {}
    assert cpu_serve_env_defaults(["--kv-cache-memory-bytes", "1000000"], {}) == {}
    assert cpu_serve_env_defaults(["--gpu-memory-utilization=0.5"], {}) == {}


@pytest.mark.parametrize(
    ("key", "value", "ok"),
    [(64, 64, True), (128, 128, True), (32, 32, False), (96, 96, False), (256, 256, False), (64, 128, False)],
)
def test_gdn_head_dims_the_cpu_kernels_take(key, value, ok):
    config = {"layer_types": ["linear_attention", "full_attention"], "linear_key_head_dim": key,
              "linear_value_head_dim": value}
    problem = cpu_gdn_config_problem(config)
    assert (problem is None) == ok
    if not ok:
        assert f"linear_key_head_dim {key}" in problem and "GPU" in problem
    assert (cpu_gdn_config_problem({"text_config": config}) is None) == ok  # multimodal configs too


def test_models_without_linear_attention_pass():
    assert cpu_gdn_config_problem({"model_type": "llama", "head_dim": 96}) is None


@pytest.mark.vllm
def test_serve_refuses_a_model_the_cpu_kernels_cannot_run(tmp_path):
    from weightshare.tiny_model import build_tiny_model

    model = build_tiny_model("qwen3_5", tmp_path / "m", linear_head_dim=96)
    proc = subprocess.run(
        [sys.executable, "-m", "weightshare.cli", "serve", str(model), "--grpc", f"unix://{tmp_path}/s.sock"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 2
    assert "linear_key_head_dim 96" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr

"""Shared pytest set-up: offline Hugging Face, tiny random models built once per session, GPU skips.

- `tiny_model_path(arch, dtype="bfloat16") -> Path`: a session-scoped factory; each (arch, dtype) is
  built once (seed 0, `weightshare.tiny_model`) into a temporary directory and reused.
- Tests marked `gpu` are skipped when torch sees no CUDA device (CI has none).
- HF_HUB_OFFLINE=1 (nothing may be downloaded) and TOKENIZERS_PARALLELISM=false (tokenizers warns, and
  may deadlock, when a process forks after using its thread pool) for the whole session. They are set
  at import, before any test module imports huggingface_hub, which reads them once.

Run as: python -m pytest tests   (markers `vllm`, `slow`, `gpu` are declared in pyproject.toml)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

GPU_SKIP_REASON = "needs a CUDA GPU (CI has none; run on the device machine)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return  # keep collection free of the torch import when nothing needs it
    import torch

    if torch.cuda.is_available():
        return
    for item in gpu_items:
        item.add_marker(pytest.mark.skip(reason=GPU_SKIP_REASON))


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: `tiny_model_path("qwen3_5")` or `tiny_model_path("qwen3", "float32")` -> model directory."""
    from weightshare.tiny_model import build_tiny_model

    built: dict[tuple[str, str], Path] = {}

    def get(arch: str, dtype: str = "bfloat16") -> Path:
        if (arch, dtype) not in built:
            out = tmp_path_factory.mktemp(f"tiny-{arch}-{dtype}")
            built[arch, dtype] = build_tiny_model(arch, out, seed=0, dtype=dtype)
        return built[arch, dtype]

    return get

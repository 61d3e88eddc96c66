"""Assertions shared by the tests that attach to a served model (not a test module itself)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def checkpoint_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def assert_rebuilds_checkpoint(weights, model_dir: Path) -> int:
    """Every HF parameter rebuilt from layout + handles equals the checkpoint bit for bit; returns the count."""
    expected = checkpoint_tensors(model_dir)
    checked = 0
    for name, entry in weights.layout.items():
        on_disk = name if name in expected else entry.tied_to  # a tied lm_head is saved once
        assert entry.zero_copy, f"{name}: {entry.not_zero_copy_reason}"
        rebuilt = weights.hf_tensor(name)
        reference = expected[on_disk]
        assert tuple(rebuilt.shape) == tuple(reference.shape), name
        # Exact: A_log is float32 in vLLM and bf16 on disk, and bf16 -> fp32 is exact.
        assert torch.equal(rebuilt.to(reference.dtype), reference), name
        checked += 1
    assert set(expected) <= set(weights.layout)
    return checked

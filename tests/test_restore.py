"""Writing a checkpoint back into live (shared) parameters: every tensor, in place, or a clear refusal.

Tiny random HF model on the CPU. Run as: .venv/bin/python -m pytest tests/test_restore.py -v
"""

from __future__ import annotations

import pytest
import torch

from trainer_side.checkpoint_writer import save_model_streamed
from trainer_side.restore import load_weights_into


def test_checkpoint_is_written_back_in_place(tiny_model_path, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path("llama_tied"), dtype=torch.float32)
    save_model_streamed(model, tmp_path, max_shard_bytes=50_000)  # several shards
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    addresses = {n: p.data_ptr() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-2.0)  # the "torn" or "ahead" weights
    assert load_weights_into(model, tmp_path) == len(saved)
    for n, p in model.named_parameters():
        assert torch.equal(p, saved[n]), n
        assert p.data_ptr() == addresses[n], f"{n} was re-bound instead of written in place"


def test_a_checkpoint_that_lacks_a_parameter_is_refused(tiny_model_path, tmp_path):
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path("llama"), dtype=torch.float32)
    save_file({"model.norm.weight": model.model.norm.weight.detach().clone()}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="does not hold"):
        load_weights_into(model, tmp_path)
    with pytest.raises(ValueError, match="no .safetensors"):
        load_weights_into(model, tmp_path / "empty")

"""Assertions shared by the tests that attach to a served model (not a test module itself)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

PROMPT_IDS = [11, 42, 7, 99, 123, 5, 64, 200]


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


def vllm_greedy(served, max_tokens: int = 6) -> tuple[list[int], list[float]]:
    choice = served.completion(
        PROMPT_IDS, max_tokens=max_tokens, logprobs=1, return_tokens_as_token_ids=True
    )["choices"][0]
    tokens = [int(t.removeprefix("token_id:")) for t in choice["logprobs"]["tokens"]]
    return tokens, choice["logprobs"]["token_logprobs"]


def hf_logprobs(model: torch.nn.Module, prompt: list[int], completion: list[int]) -> list[float]:
    """Log-probability the HF model gives each completion token after the prompt and earlier tokens."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt + completion], device=device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    logprobs = torch.log_softmax(logits[0, len(prompt) - 1 : -1], dim=-1)
    return logprobs[torch.arange(len(completion)), torch.tensor(completion, device=device)].tolist()

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


def assert_ranks_rebuild_checkpoint(ranks: list, model_dir: Path) -> int:
    """Every HF parameter rebuilt from all TP ranks' layouts alone (each slice copied to its `hf_start`)
    equals the checkpoint bit for bit; rows held by several ranks (`replica_ranks`) agree. Returns the
    number of HF parameters rebuilt."""
    expected = checkpoint_tensors(model_dir)
    rebuilt: dict[str, torch.Tensor] = {}
    written: dict[str, torch.Tensor] = {}
    for rank, weights in enumerate(ranks):
        assert weights.identity.tp_rank == rank and weights.identity.tp_size == len(ranks)
        for name, entry in weights.layout.items():
            assert entry.zero_copy, f"rank {rank} {name}: {entry.not_zero_copy_reason}"
            assert entry.tp_rank == rank and entry.tp_size == len(ranks), name
            out = rebuilt.setdefault(name, torch.zeros(list(entry.hf_shape), dtype=torch.float32))
            seen = written.setdefault(name, torch.zeros(list(entry.hf_shape), dtype=torch.bool))
            for s in entry.slices:
                assert s.HasField("hf_start"), f"{name}: a slice without its place in the HF tensor"
                assert rank in s.replica_ranks, name
                block = weights.engine_tensors[s.engine_tensor].narrow(s.dim, s.start, s.length).float()
                target = out.narrow(s.dim, s.hf_start, s.length)
                block = block.reshape(target.shape)  # e.g. conv1d: (dim, width) in vLLM, (dim, 1, width) in HF
                already = seen.narrow(s.dim, s.hf_start, s.length)
                if already.any():  # a replica: must equal what another rank holds
                    assert torch.equal(target[already], block[already]), f"{name}: replicas differ"
                target.copy_(block)
                already.fill_(True)
    for name, out in rebuilt.items():
        assert written[name].all(), f"{name}: rows no rank holds"
        reference = expected[name if name in expected else ranks[0].layout[name].tied_to]
        assert torch.equal(out, reference.float().reshape(out.shape)), name
    assert set(expected) <= set(rebuilt)
    return len(rebuilt)

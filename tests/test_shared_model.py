"""Per architecture, against real vLLM: rebuild from handles, bind the HF model, parity, edits seen by both.

For each tiny architecture (qwen3_5, qwen3, llama, llama_tied) one `weightshare serve` runs for the
module's tests on it. This process knows only the gRPC contract and the handles:
- every HF parameter rebuilt from layout + handles equals the safetensors file, bit for bit;
- the HF model bound to vLLM's memory shares storage with it (checked by address);
- the HF forward on the shared weights and vLLM's logprobs agree (bf16 tolerance);
- an in-place edit through the trainer's parameter changes both; the undo restores vLLM exactly.
Slow (one vLLM start per architecture): run as `make test-slow` or
.venv/bin/python -m pytest tests/test_shared_model.py -v
"""

from __future__ import annotations

import pytest
import torch

from tests.weight_checks import PROMPT_IDS, assert_rebuilds_checkpoint, hf_logprobs, vllm_greedy
from trainer_side.attach import attach
from trainer_side.hf_model import build_shared_model
from weightshare.processes import ServedModel

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
# bf16 weights and activations in both engines, different kernels: per-token logprobs of a tiny random
# model (about -5 to -7) agree to a few hundredths; 0.1 leaves room and still catches any wrong slice.
LOGPROB_TOLERANCE = 0.1


@pytest.fixture(scope="module", params=["qwen3_5", "qwen3", "llama", "llama_tied"])
def served(request, tiny_model_path, tmp_path_factory):
    model = tiny_model_path(request.param)
    tmp = tmp_path_factory.mktemp(f"serve-{request.param}")
    with ServedModel(model, f"unix://{tmp}/export.sock", log_path=tmp / "serve.log") as server:
        yield server


def test_rebuilds_every_parameter_bit_identical(served):
    with attach(served.grpc_address, trainer_name="rebuild") as weights:
        assert assert_rebuilds_checkpoint(weights, served.model) == len(weights.layout)


def test_bound_model_shares_memory_and_matches_vllm(served):
    with attach(served.grpc_address, trainer_name="parity") as weights:
        shared = build_shared_model(weights)
        assert not shared.copied
        storage = next(iter(weights.storages.values()))
        lo, hi = storage.data_ptr(), storage.data_ptr() + storage.numel()
        for name, param in shared.model.named_parameters():
            assert lo <= param.data_ptr() < hi, f"{name} is not a view into vLLM's memory"
        for name, entry in weights.layout.items():  # a tied lm_head is the embedding's own Parameter
            if entry.tied_to:
                assert shared.model.get_parameter(name) is shared.model.get_parameter(entry.tied_to)

        tokens, vllm_lp = vllm_greedy(served)
        hf_lp = hf_logprobs(shared.model, PROMPT_IDS, tokens)
        assert max(abs(a - b) for a, b in zip(hf_lp, vllm_lp)) < LOGPROB_TOLERANCE

        # Edit through the trainer's own parameter: both engines see it.
        norm = shared.model.model.norm.weight
        saved = norm.detach().clone()
        with weights.update_stream() as updates:
            updates.begin(step=1)
            with torch.no_grad():
                norm.add_(torch.linspace(-2.0, 2.0, norm.numel()))  # norms may start at 0 (Gemma-style)
            updates.commit(step=1)
            edited_tokens, edited_lp = vllm_greedy(served)
            hf_edited = hf_logprobs(shared.model, PROMPT_IDS, edited_tokens)
            assert (edited_tokens, edited_lp) != (tokens, vllm_lp)
            assert max(abs(a - b) for a, b in zip(hf_edited, edited_lp)) < LOGPROB_TOLERANCE
            updates.begin(step=2)
            with torch.no_grad():
                norm.copy_(saved)
            updates.commit(step=2)
        assert vllm_greedy(served) == (tokens, vllm_lp)

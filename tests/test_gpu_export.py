"""On a GPU: CUDA IPC export of real vLLM's own weights with CUDA graphs on, bound into the HF model.

Serves the tiny Qwen3.5 with torch.compile + CUDA graphs (no --enforce-eager), attaches through CUDA
IPC handles matched by GPU UUID, checks every HF parameter bit for bit against the checkpoint, HF/vLLM
logprob parity on the shared weights, and that an in-place edit through the trainer's parameter
changes vLLM's CUDA-graph generation while the undo restores it exactly.
Skipped without a CUDA GPU (CI). On the device machine: python -m pytest -m gpu tests/test_gpu_export.py
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from tests.weight_checks import PROMPT_IDS, assert_rebuilds_checkpoint, hf_logprobs, vllm_greedy
from trainer_side.attach import attach
from trainer_side.hf_model import build_shared_model
from weightshare.processes import ServedModel
from weightshare.v1 import tensors_pb2

pytestmark = [pytest.mark.gpu, pytest.mark.vllm]
GPU_SERVE_ARGS = [
    "--max-model-len", "512", "--max-num-seqs", "8", "--gpu-memory-utilization", "0.3",
    "--additional-config", json.dumps({"gdn_prefill_backend": "triton"}),  # the slim vLLM build's GDN path
]
LOGPROB_TOLERANCE = 0.1  # bf16 on both sides, different kernels (see test_shared_model.py)


@pytest.fixture(scope="module")
def gpu_server(tiny_model_path, tmp_path_factory):
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    tmp = tmp_path_factory.mktemp("gpu-serve")
    started = time.monotonic()
    with ServedModel(
        tiny_model_path("qwen3_5"), f"unix://{tmp}/export.sock", extra_args=GPU_SERVE_ARGS,
        log_path=tmp / "serve.log", startup_timeout_s=600,
    ) as served:
        print(f"engine start with CUDA graphs: {time.monotonic() - started:.1f} s")
        yield served


def test_cuda_ipc_export_binds_and_edits_reach_cuda_graphs(gpu_server):
    tokens, vllm_lp = vllm_greedy(gpu_server)
    with attach(gpu_server.grpc_address, trainer_name="gpu") as weights:
        print("attach timings:", weights.timings)
        assert weights.identity.device_kind == tensors_pb2.DEVICE_KIND_CUDA
        assert weights.identity.device_uuid == f"GPU-{torch.cuda.get_device_properties(0).uuid}"
        assert_rebuilds_checkpoint(_on_cpu(weights), gpu_server.model)
        shared = build_shared_model(weights)
        assert not shared.copied and all(p.is_cuda for p in shared.model.parameters())
        hf_lp = hf_logprobs(shared.model, PROMPT_IDS, tokens)
        assert max(abs(a - b) for a, b in zip(hf_lp, vllm_lp)) < LOGPROB_TOLERANCE

        lm_head = shared.model.lm_head.weight
        with weights.update_stream() as updates:
            updates.begin(step=1)
            with torch.no_grad():
                lm_head.neg_()
            torch.cuda.synchronize()
            updates.commit(step=1)
            edited = vllm_greedy(gpu_server)
            updates.begin(step=2)
            with torch.no_grad():
                lm_head.neg_()
            torch.cuda.synchronize()
            updates.commit(step=2)
    assert edited != (tokens, vllm_lp)
    assert vllm_greedy(gpu_server) == (tokens, vllm_lp)


class _on_cpu:
    """AttachedWeights look-alike whose hf_tensor() returns CPU copies, for comparing with safetensors."""

    def __init__(self, weights):
        self.layout = weights.layout
        self._weights = weights

    def hf_tensor(self, name: str) -> torch.Tensor:
        return self._weights.hf_tensor(name).cpu()


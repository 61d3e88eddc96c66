"""The trainer's Prometheus metrics, on their own port (`weightshare train --metrics-port`).

Read from the loop, the example store and the inference link at scrape time (nothing to keep in step):

| metric | type | meaning |
|---|---|---|
| weightshare_trainer_steps_total | counter | optimizer steps committed |
| weightshare_trainer_skipped_steps_total | counter | steps skipped for a non-finite loss or gradient |
| weightshare_trainer_loss | gauge | loss of the last committed step |
| weightshare_trainer_tokens_per_second | gauge | target tokens per second of the last step |
| weightshare_trainer_pending_examples | gauge | examples stored, not trained yet |
| weightshare_trainer_trained_examples_total | counter | examples trained |
| weightshare_trainer_weights_version | gauge | inference-side weights version of the last commit |
| weightshare_trainer_checkpoint_age_seconds | gauge | seconds since the newest checkpoint (absent: none yet) |
| weightshare_trainer_inference_connected | gauge | 1 while the inference side is usable |
| weightshare_trainer_running | gauge | 1 while the training loop runs |
"""

from __future__ import annotations

import time
from pathlib import Path

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from trainer_side.checkpoints import STATE_FILE


class TrainerCollector:
    def __init__(self, loop, link):
        self._loop = loop
        self._link = link

    def collect(self):
        loop, counters = self._loop, self._loop.counters

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"weightshare_trainer_{name}", doc, value=value)

        yield CounterMetricFamily("weightshare_trainer_steps", "Optimizer steps committed", value=counters.step)
        yield CounterMetricFamily("weightshare_trainer_skipped_steps", "Steps skipped (non-finite loss or gradient)",
                                  value=counters.skipped_steps)
        yield gauge("loss", "Loss of the last committed step", counters.last_loss)
        yield gauge("tokens_per_second", "Target tokens per second of the last step", loop.last_tokens_per_second)
        yield gauge("pending_examples", "Examples stored, not trained yet", loop.store.pending)
        yield CounterMetricFamily("weightshare_trainer_trained_examples", "Examples trained", value=loop.store.cursor)
        yield gauge("weights_version", "Weights version of the last commit", counters.weights_version)
        state = Path(loop.last_checkpoint) / STATE_FILE if loop.last_checkpoint else None
        if state is not None and state.exists():
            yield gauge("checkpoint_age_seconds", "Seconds since the newest checkpoint",
                        time.time() - state.stat().st_mtime)
        yield gauge("inference_connected", "1 while the inference side is usable", int(self._link.connected))
        yield gauge("running", "1 while the training loop runs", int(loop.running))


def serve_metrics(port: int, host: str, loop, link) -> int:
    """Serves /metrics on host:port (0: any free port) in a daemon thread; returns the port."""
    registry = CollectorRegistry()
    registry.register(TrainerCollector(loop, link))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server.server_address[1]

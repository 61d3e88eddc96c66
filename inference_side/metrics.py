"""weightshare's metrics on vLLM's own Prometheus `/metrics` (one scrape sees both).

vLLM's API server serves prometheus_client's default registry; the export service runs in that process,
so it registers there: a histogram of pause seconds (observed per update) and a collector that reads the
coordinator and the sessions at scrape time. With PROMETHEUS_MULTIPROC_DIR set (several API server
processes), vLLM reads only the multiprocess files and these metrics do not appear.

| metric | type | meaning |
|---|---|---|
| weightshare_weights_version | gauge | weights version served (commits so far) |
| weightshare_updates_total{outcome} | counter | updates begun / committed / aborted |
| weightshare_pause_seconds | histogram | how long serving paused per update (strict mode) |
| weightshare_attached_trainers{access} | gauge | sessions attached, writer or read_only |
| weightshare_weights_torn | gauge | 1 while served weights may mix two versions |
"""

from __future__ import annotations

from prometheus_client import REGISTRY, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PAUSE_SECONDS = Histogram(
    "weightshare_pause_seconds", "How long serving paused per update (strict mode)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)


class ExportCollector:
    """Reads the update coordinator and the attached sessions at scrape time."""

    def __init__(self, coordinator, sessions: dict):
        self._coordinator = coordinator
        self._sessions = sessions  # the servicer's live dict: session id -> session

    def collect(self):
        stats = self._coordinator.stats
        yield GaugeMetricFamily("weightshare_weights_version", "Weights version served (commits so far)",
                                value=stats.weights_version)
        updates = CounterMetricFamily("weightshare_updates", "Updates by outcome", labels=["outcome"])
        updates.add_metric(["begun"], stats.begun)
        updates.add_metric(["committed"], stats.commits)
        updates.add_metric(["aborted"], stats.aborts)
        yield updates
        trainers = GaugeMetricFamily("weightshare_attached_trainers", "Attached sessions", labels=["access"])
        sessions = list(self._sessions.values())
        trainers.add_metric(["writer"], sum(not s.read_only for s in sessions))
        trainers.add_metric(["read_only"], sum(s.read_only for s in sessions))
        yield trainers
        yield GaugeMetricFamily("weightshare_weights_torn", "1 while served weights may mix two versions",
                                value=int(stats.weights_torn))


def register(coordinator, sessions: dict) -> ExportCollector:
    collector = ExportCollector(coordinator, sessions)
    REGISTRY.register(collector)
    return collector


def unregister(collector: ExportCollector) -> None:
    REGISTRY.unregister(collector)

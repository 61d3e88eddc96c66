"""CUDA IPC handles of vLLM's own parameter storage (GPU engines), spelled out field by field.

`torch.multiprocessing.reductions.reduce_tensor` gives the arguments of `rebuild_cuda_tensor`;
we put each field into the contract's `CudaIpcHandle` / `TensorView` instead of pickling, so a
client in any language can call `cudaIpcOpenMemHandle` itself. Nothing is copied or re-bound: the
handles point at the memory vLLM computes with (its CUDA graphs hold those addresses).
"""

from __future__ import annotations

import os

import torch

from inference_side.shm_export import unique_parameters
from weightshare.dtypes import to_proto_dtype
from weightshare.v1 import tensors_pb2

SHARING_BREAKERS = {
    "expandable_segments": (
        "PYTORCH_CUDA_ALLOC_CONF has expandable_segments:True: its memory cannot be exported with "
        "cudaIpcGetMemHandle (pytorch#165685); start vLLM without it"
    ),
    "sleep_mode": (
        "vLLM runs with enable_sleep_mode (the cumem allocator): weights live in a cuMem pool that "
        "CUDA IPC cannot export; start vLLM without --enable-sleep-mode"
    ),
}


def sharing_blockers(enable_sleep_mode: bool) -> list[str]:
    """Reasons this process's CUDA memory cannot be shared through CUDA IPC (empty when it can)."""
    reasons = []
    alloc_conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "") + "," + os.environ.get(
        "PYTORCH_ALLOC_CONF", ""
    )
    if "expandable_segments:true" in alloc_conf.replace(" ", "").lower():
        reasons.append(SHARING_BREAKERS["expandable_segments"])
    if enable_sleep_mode:
        reasons.append(SHARING_BREAKERS["sleep_mode"])
    return reasons


def device_uuid(device: torch.device) -> str:
    """"GPU-<uuid>" as nvidia-smi prints it: the stable name of a card across processes."""
    return f"GPU-{torch.cuda.get_device_properties(device).uuid}"


def export_handles(model: torch.nn.Module) -> tuple[list[tensors_pb2.StorageHandle], list[tensors_pb2.TensorView]]:
    """One StorageHandle per distinct storage and one TensorView per engine parameter."""
    from torch.multiprocessing.reductions import reduce_tensor

    storages: dict[tuple[bytes, int], tensors_pb2.StorageHandle] = {}
    views = []
    uuids: dict[int, str] = {}
    for name, param in unique_parameters(model):
        tensor = param.data
        rebuild, args = reduce_tensor(tensor)
        (_cls, size, stride, offset, _storage_cls, dtype, device_index, handle, storage_size,
         storage_offset, _requires_grad, ref_counter_handle, ref_counter_offset, event_handle,
         event_sync_required) = args
        assert rebuild.__name__ == "rebuild_cuda_tensor", f"{name} is not a CUDA tensor"
        if device_index not in uuids:
            uuids[device_index] = device_uuid(torch.device("cuda", device_index))
        key = (bytes(handle), int(storage_offset))
        if key not in storages:
            storages[key] = tensors_pb2.StorageHandle(
                index=len(storages),
                cuda_ipc=tensors_pb2.CudaIpcHandle(
                    mem_handle=bytes(handle),
                    storage_offset_bytes=int(storage_offset),
                    storage_size_bytes=int(storage_size),
                    device_uuid=uuids[device_index],
                    ref_counter_handle=bytes(ref_counter_handle),
                    ref_counter_offset=int(ref_counter_offset),
                    event_handle=bytes(event_handle or b""),
                    event_sync_required=bool(event_sync_required),
                ),
            )
        views.append(
            tensors_pb2.TensorView(
                engine_tensor=name,
                storage_index=storages[key].index,
                byte_offset=int(offset) * tensor.element_size(),
                shape=list(size),
                strides=list(stride),
                dtype=to_proto_dtype(dtype),
            )
        )
    return list(storages.values()), views

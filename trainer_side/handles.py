"""Open the inference side's weight handles: shared-memory files (CPU) or CUDA IPC handles (GPU).

Both kinds become a flat uint8 buffer per storage; each engine tensor is then a strided view into its
buffer (`weightshare.shm.view_tensor`), so nothing is copied. CUDA devices are matched by UUID,
never by index, because CUDA_VISIBLE_DEVICES may number them differently in each process.
"""

from __future__ import annotations

import torch

from weightshare import shm
from weightshare.dtypes import from_proto_dtype
from weightshare.v1 import tensors_pb2


class HandleError(Exception):
    """A handle that cannot be opened here; the message says why and what to do."""


def local_cuda_index(device_uuid: str) -> int:
    if not torch.cuda.is_available():
        raise HandleError(f"handles are CUDA IPC on {device_uuid}, but this process sees no CUDA device")
    for index in range(torch.cuda.device_count()):
        if f"GPU-{torch.cuda.get_device_properties(index).uuid}" == device_uuid:
            return index
    raise HandleError(
        f"GPU {device_uuid} is not visible to this process (CUDA_VISIBLE_DEVICES?): CUDA IPC handles only "
        "open on the GPU that holds the weights"
    )


def open_storage(handle: tensors_pb2.StorageHandle) -> torch.Tensor:
    """The storage as a (size_bytes,) uint8 tensor backed by the exporter's memory."""
    kind = handle.WhichOneof("handle")
    if kind == "shared_memory":
        h = handle.shared_memory
        try:
            return shm.open_file(h.path, h.size_bytes)
        except FileNotFoundError:
            raise HandleError(
                f"shared-memory file {h.path} does not exist: the inference side restarted or runs on "
                "another host; attach again"
            ) from None
        except ValueError as err:
            raise HandleError(str(err)) from None
    if kind == "cuda_ipc":
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        h = handle.cuda_ipc
        device = local_cuda_index(h.device_uuid)
        try:
            return rebuild_cuda_tensor(
                torch.Tensor, (h.storage_size_bytes,), (1,), 0, torch.UntypedStorage, torch.uint8,
                device, h.mem_handle, h.storage_size_bytes, h.storage_offset_bytes, False,
                h.ref_counter_handle, h.ref_counter_offset, h.event_handle or None, h.event_sync_required,
            )
        except RuntimeError as err:
            raise HandleError(
                f"cudaIpcOpenMemHandle failed for storage {handle.index} on {h.device_uuid} ({err}); the "
                "exporter may have restarted: attach again"
            ) from None
    raise HandleError(f"storage {handle.index} has no handle set")


def open_views(
    storages: dict[int, torch.Tensor], views: list[tensors_pb2.TensorView]
) -> dict[str, torch.Tensor]:
    """Engine tensor name -> zero-copy view into its opened storage."""
    tensors = {}
    for v in views:
        if v.storage_index not in storages:
            raise HandleError(f"view of {v.engine_tensor} names storage {v.storage_index}, which was not sent")
        tensors[v.engine_tensor] = shm.view_tensor(
            storages[v.storage_index], v.byte_offset, list(v.shape), list(v.strides), from_proto_dtype(v.dtype)
        )
    return tensors

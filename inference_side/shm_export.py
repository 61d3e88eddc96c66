"""Move a loaded vLLM model's parameters into one named shared-memory file, in place (CPU engines).

Each parameter's bytes are copied once into the file and the parameter is re-pointed at its slice
(`param.data = view`), before vLLM warms up, so from then on vLLM computes with the shared memory
itself. The file (mode 0600) is removed when the process exits, however it exits
(`weightshare.shm_reaper`); a mapping another process holds stays valid.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import re
from dataclasses import dataclass

import structlog
import torch

from weightshare import shm, shm_reaper
from weightshare.dtypes import to_proto_dtype
from weightshare.v1 import tensors_pb2

log = structlog.get_logger(__name__)
_FILE_PATTERN = re.compile(r"weightshare-(\d+)-[0-9a-f]+-rank\d+$")


@dataclass(frozen=True)
class SharedTensor:
    """Where one engine parameter lives inside the shared file."""

    name: str
    byte_offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class SharedFile:
    path: str
    size_bytes: int
    base_ptr: int  # address of the mapping in this process, to check parameters still point into it
    tensors: list[SharedTensor]

    def handles(self) -> tuple[list[tensors_pb2.StorageHandle], list[tensors_pb2.TensorView]]:
        """The contract's handle (one storage: this file) and one view per tensor."""
        storage = tensors_pb2.StorageHandle(
            index=0, shared_memory=tensors_pb2.SharedMemoryHandle(path=self.path, size_bytes=self.size_bytes)
        )
        views = [
            tensors_pb2.TensorView(
                engine_tensor=t.name, storage_index=0, byte_offset=t.byte_offset, shape=list(t.shape),
                strides=list(t.strides), dtype=to_proto_dtype(t.dtype),
            )
            for t in self.tensors
        ]
        return [storage], views

    def check_still_backs(self, model: torch.nn.Module) -> None:
        """Every parameter must still point into this file: something re-bound it otherwise."""
        params = dict(unique_parameters(model))
        for t in self.tensors:
            p = params.get(t.name)
            if p is None or p.data_ptr() != self.base_ptr + t.byte_offset:
                raise RuntimeError(f"engine parameter {t.name} no longer lives in {self.path}: something re-bound it")


def unique_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """Named parameters, each Parameter once (a tied lm_head is the embedding's Parameter)."""
    return [(n, p) for n, p in model.named_parameters() if p.numel() > 0]


def remove_stale_files(shm_dir: str = shm.SHM_DIR) -> list[str]:
    """Deletes files left by exporters that died without cleaning up (their pid no longer runs)."""
    removed = []
    for path in glob.glob(os.path.join(shm_dir, "weightshare-*-rank*")):
        match = _FILE_PATTERN.search(path)
        if match and not os.path.exists(f"/proc/{match.group(1)}"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed.append(path)
    return removed


def move_to_shared_memory(model: torch.nn.Module, export_id: str, rank: int) -> SharedFile:
    """Copies every parameter into a new shared file and re-points it there; returns the file's map."""
    params = unique_parameters(model)
    offsets, total = [], 0
    for _, p in params:
        offsets.append(total)
        total += shm.aligned(p.numel() * p.element_size())
    total = max(total, shm.ALIGN_BYTES)
    path = os.path.join(shm.SHM_DIR, f"weightshare-{os.getpid()}-{export_id}-rank{rank}")
    buffer = shm.create_file(path, total)
    atexit.register(_unlink_quietly, path)
    # vLLM force-kills workers (atexit never runs) and a group SIGKILL runs nothing: a watcher in its
    # own session removes the file when this process is gone.
    shm_reaper.start(os.getpid(), path)
    tensors = []
    with torch.no_grad():
        for (name, p), offset in zip(params, offsets):
            strides = shm.contiguous_strides(p.shape)  # contiguous, whatever the source's strides were
            view = shm.view_tensor(buffer, offset, p.shape, strides, p.dtype)
            view.copy_(p.data)
            p.data = view
            tensors.append(SharedTensor(name, offset, tuple(p.shape), strides, p.dtype))
    log.info("weights moved to shared memory", path=path, tensors=len(tensors), bytes=total)
    return SharedFile(path, total, buffer.data_ptr(), tensors)


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)

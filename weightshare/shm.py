"""Named shared-memory files holding tensors (the CPU handle kind), used by both sides.

A file under /dev/shm is mapped MAP_SHARED with `torch.from_file(..., shared=True)`; tensors are
strided views into that byte buffer, so every process mapping the file sees every write at once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

SHM_DIR = "/dev/shm"
ALIGN_BYTES = 64  # cache-line alignment; also satisfies every dtype's alignment


def host_id() -> str:
    """Linux boot id: two processes can share /dev/shm or a GPU only if this matches."""
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def aligned(nbytes: int) -> int:
    return (nbytes + ALIGN_BYTES - 1) // ALIGN_BYTES * ALIGN_BYTES


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def create_file(path: str, size_bytes: int) -> torch.Tensor:
    """Creates `path` (must not exist) of `size_bytes` and maps it; returns the uint8 buffer."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, size_bytes)
    finally:
        os.close(fd)
    return open_file(path, size_bytes)


def open_file(path: str, size_bytes: int) -> torch.Tensor:
    """Maps an existing shared-memory file read-write; raises FileNotFoundError/ValueError with the path."""
    actual = os.stat(path).st_size
    if actual != size_bytes:
        raise ValueError(f"shared-memory file {path} has {actual} bytes, expected {size_bytes}: stale handle?")
    return torch.from_file(path, shared=True, size=size_bytes, dtype=torch.uint8)


def view_tensor(
    buffer: torch.Tensor,  # (size_bytes,) uint8 - a whole mapped file
    byte_offset: int,
    shape: Sequence[int],
    strides: Sequence[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """The tensor of `dtype`, `shape`, `strides` (elements) starting `byte_offset` bytes into `buffer`."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    if byte_offset % itemsize:
        raise ValueError(f"byte offset {byte_offset} is not a multiple of {dtype}'s size {itemsize}")
    span = 1 + sum((n - 1) * s for n, s in zip(shape, strides)) if all(shape) else 0
    end = byte_offset + span * itemsize
    if end > buffer.numel():
        raise ValueError(f"view [{byte_offset}, {end}) runs past the {buffer.numel()}-byte buffer")
    typed = buffer.view(dtype)  # whole-buffer reinterpretation: file sizes are ALIGN_BYTES multiples
    return typed.as_strided(tuple(shape), tuple(strides), byte_offset // itemsize)

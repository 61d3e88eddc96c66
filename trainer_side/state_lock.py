"""One live trainer per state directory: an exclusive `flock` on `state_dir/trainer.lock`.

Two trainers on one state directory would each train every stored example into the same served
weights with their own optimizer. The lock is held for the trainer's life and released by the kernel
however the process ends (SIGKILL included), so a crash never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_FILE = "trainer.lock"


class StateDirInUse(RuntimeError):
    """Another live process holds the state directory."""


def lock_state_dir(state_dir: Path) -> int:
    """Takes the lock (returns its descriptor; keep it open) or raises StateDirInUse naming the holder."""
    path = Path(state_dir) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StateDirInUse(
            f"{state_dir} is used by a live trainer (pid {holder}): stop it first, or pass another --state-dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd

"""Removes a shared-memory weight file once the process that owns it is gone, however it went.

vLLM force-kills its workers on shutdown, so a worker's `atexit` never runs, and a SIGKILL of the
whole process group runs nothing at all: the model's weights (54 GB at 27B) would stay in /dev/shm.
The worker therefore starts this tiny watcher in a session of its own (so no signal to vLLM's group
reaches it), which waits on a pidfd of the worker (no polling, no pid-reuse race) and unlinks the
file when the worker exits. A trainer that still maps the file keeps its mapping; only the name goes.

Imports nothing heavy (it starts in ~50 ms). Run as: python -m weightshare.shm_reaper PID PATH
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys


def _spawn(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "weightshare.shm_reaper", *args],
        start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, close_fds=True,
    )


def start(owner_pid: int, path: str) -> None:
    """Watch `owner_pid` from a new session and remove `path` when it exits.

    Started through a short-lived intermediate, so the watcher is nobody's child: vLLM kills its
    workers' whole process trees on shutdown, which would take a child watcher with them.
    """
    intermediate = _spawn(["--detach", str(owner_pid), path])
    if intermediate.wait(timeout=60) != 0:
        raise RuntimeError(f"could not start the shared-memory watcher for {path}")


def wait_and_remove(owner_pid: int, path: str) -> None:
    try:
        pidfd = os.pidfd_open(owner_pid)
    except ProcessLookupError:
        pidfd = None  # already gone
    if pidfd is not None:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        while not poller.poll():  # readable once the process has exited
            pass
        os.close(pidfd)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


if __name__ == "__main__":
    argv = sys.argv[1:]
    detach = argv[:1] == ["--detach"]
    argv = argv[1:] if detach else argv
    if len(argv) != 2 or not argv[0].isdigit():
        sys.exit("usage: python -m weightshare.shm_reaper [--detach] PID PATH")
    if detach:
        _spawn(argv)  # the watcher outlives this process and is re-parented away from the owner
    else:
        wait_and_remove(int(argv[0]), argv[1])

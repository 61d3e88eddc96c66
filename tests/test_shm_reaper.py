"""Shared-memory weight files never outlive their owner: the watcher removes them however it dies.

Fast: a plain child process stands in for vLLM's worker. The whole-server case (vLLM's process group
SIGKILLed) is in tests/test_shm_cleanup.py. Run as: .venv/bin/python -m pytest tests/test_shm_reaper.py -v
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from weightshare import shm_reaper


def wait_gone(path: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while os.path.exists(path):
        assert time.monotonic() < deadline, f"{path} still exists {timeout_s} s after its owner died"
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_file_removed_when_owner_dies(tmp_path, sig):
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    path = tmp_path / "weights"
    path.write_bytes(b"x" * 1024)
    shm_reaper.start(owner.pid, str(path))
    time.sleep(0.3)
    assert path.exists(), "removed while its owner still runs"
    os.killpg(owner.pid, sig)  # the owner's whole group; the watcher lives in its own session
    owner.wait()
    wait_gone(str(path))


def test_owner_already_gone_removes_at_once(tmp_path):
    owner = subprocess.Popen([sys.executable, "-c", "pass"])
    owner.wait()
    path = tmp_path / "weights"
    path.write_bytes(b"x")
    shm_reaper.wait_and_remove(owner.pid, str(path))
    assert not path.exists()

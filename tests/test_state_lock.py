"""One live trainer per state directory, and no stale lock after a crash.

Run as: .venv/bin/python -m pytest tests/test_state_lock.py -v
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from trainer_side.state_lock import StateDirInUse, lock_state_dir


def test_second_holder_is_refused_with_the_holders_pid(tmp_path):
    fd = lock_state_dir(tmp_path)
    with pytest.raises(StateDirInUse, match=f"pid {os.getpid()}.*another --state-dir"):
        lock_state_dir(tmp_path)
    os.close(fd)
    os.close(lock_state_dir(tmp_path))  # free again once the holder lets go


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    code = ("import sys, time; from trainer_side.state_lock import lock_state_dir; "
            "lock_state_dir(sys.argv[1]); print('LOCKED', flush=True); time.sleep(600)")
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    try:
        assert holder.stdout.readline().strip() == "LOCKED"
        with pytest.raises(StateDirInUse, match=f"pid {holder.pid}"):
            lock_state_dir(tmp_path)
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        os.close(lock_state_dir(tmp_path))
    finally:
        holder.kill()
        holder.wait()

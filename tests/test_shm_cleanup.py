"""A stopped `weightshare serve` leaves no weight file in /dev/shm, however it is stopped.

vLLM force-kills its workers on shutdown (their atexit handlers never run); a SIGKILL of the whole
process group runs nothing. Each case starts a real server on the tiny Qwen3.5, finds its weight file
through the handles a trainer gets, stops the server, and waits for the file to go.
Slow (one vLLM start per case): run as .venv/bin/python -m pytest tests/test_shm_cleanup.py -v
"""

from __future__ import annotations

import os
import signal
import stat

import pytest

from tests.test_shm_reaper import wait_gone
from trainer_side.attach import attach
from weightshare.processes import ServedModel

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.reliability]


@pytest.mark.parametrize("how", ["SIGTERM to the group", "SIGKILL to the group"])
def test_weight_file_removed_after_server_stops(how, tiny_model_path, tmp_path):
    served = ServedModel(tiny_model_path("qwen3_5"), f"unix://{tmp_path}/export.sock", log_path=tmp_path / "serve.log")
    served.start()
    try:
        with attach(served.grpc_address, trainer_name="cleanup") as weights:
            paths = [p for p in os.listdir("/dev/shm") if weights.identity.instance_id in p]
        assert len(paths) == 1, paths
        path = f"/dev/shm/{paths[0]}"
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # the serving user's alone
        if how.startswith("SIGKILL"):
            os.killpg(served.process.pid, signal.SIGKILL)
            served.process.wait()
        else:
            served.stop()
        wait_gone(path)
    finally:
        served.stop()

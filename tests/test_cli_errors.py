"""A user's mistakes on the command line come back as one log line with the fix, never a traceback.

Real `weightshare` processes; no vLLM engine starts (the checks run before it would).
Run as: .venv/bin/python -m pytest tests/test_cli_errors.py -v
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest


def weightshare(*args: str, env: dict | None = None, timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "weightshare.cli", *args], capture_output=True, text=True, timeout=timeout_s, check=False,
        env={**os.environ, **(env or {})},
    )


def error_line(result: subprocess.CompletedProcess) -> dict:
    """The one error record of a failed command (stderr is JSON lines when not a terminal)."""
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    records = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    errors = [r for r in records if r.get("level") == "error"]
    assert len(errors) == 1, output
    return errors[0]


def message(record: dict) -> str:
    return " ".join(str(v) for v in record.values())


@pytest.fixture
def busy_tcp_port():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


def test_serve_missing_model_directory(tmp_path):
    result = weightshare("serve", str(tmp_path / "no-such-model"), "--grpc", f"unix://{tmp_path}/s.sock")
    assert result.returncode == 2
    assert "does not exist" in message(error_line(result))


def test_serve_hub_id_offline(tmp_path):
    result = weightshare("serve", "someorg/some-model", "--grpc", f"unix://{tmp_path}/s.sock",
                         env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert "HF_HUB_OFFLINE" in message(error_line(result))


def test_serve_busy_grpc_port(tiny_model_path, busy_tcp_port):
    result = weightshare("serve", str(tiny_model_path("qwen3")), "--grpc", f"127.0.0.1:{busy_tcp_port}")
    assert result.returncode == 2
    assert f"127.0.0.1:{busy_tcp_port}" in message(error_line(result)) and "--grpc" in message(error_line(result))


def test_serve_busy_http_port(tiny_model_path, tmp_path, busy_tcp_port):
    # vLLM's own --port is checked after its arguments parse, before the model loads.
    result = weightshare("serve", str(tiny_model_path("qwen3")), "--grpc", f"unix://{tmp_path}/s.sock",
                         "--host", "127.0.0.1", "--port", str(busy_tcp_port), env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert "--port" in message(error_line(result))


@pytest.mark.parametrize("flag", ["--grpc", "--inference"])
def test_train_malformed_address(tmp_path, flag):
    result = weightshare("train", "--state-dir", str(tmp_path / "state"), flag, "localhost")
    assert result.returncode == 2
    assert "neither unix:///path/to.sock nor host:port" in message(error_line(result))
    assert not (tmp_path / "state").exists()


def test_train_busy_port(tmp_path, busy_tcp_port):
    result = weightshare("train", "--state-dir", str(tmp_path / "state"), "--grpc", f"127.0.0.1:{busy_tcp_port}")
    assert result.returncode == 2
    assert "--grpc" in message(error_line(result))


def test_train_with_nothing_listening_says_to_start_serve(tmp_path):
    state = tmp_path / "state"
    result = weightshare("train", "--state-dir", str(state), "--inference", f"unix://{tmp_path}/nobody.sock",
                         "--grpc", f"unix://{tmp_path}/trainer.sock")
    assert result.returncode == 1
    text = message(error_line(result))
    assert "weightshare serve" in text and "nothing answers" in text
    assert not state.exists()  # nothing is created when there is nothing to train


def test_train_negative_micro_batch(tmp_path):
    result = weightshare("train", "--state-dir", str(tmp_path / "state"), "--micro-batch-size", "-1",
                         "--grpc", f"unix://{tmp_path}/t.sock")
    assert result.returncode == 2
    assert "--micro-batch-size -1" in message(error_line(result))


def test_serve_rejects_a_file_as_model(tmp_path):
    model = Path(tmp_path / "model.bin")
    model.write_bytes(b"x")
    result = weightshare("serve", str(model), "--grpc", f"unix://{tmp_path}/s.sock")
    assert result.returncode == 2
    assert "is a file" in message(error_line(result))


@pytest.mark.parametrize("command", ["serve", "train"])
def test_listening_beyond_loopback_needs_a_token(tmp_path, command):
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    number = port.getsockname()[1]
    port.close()
    args = [str(tmp_path / "model")] if command == "serve" else ["--state-dir", str(tmp_path / "state")]
    if command == "serve":
        (tmp_path / "model").mkdir()
        (tmp_path / "model" / "config.json").write_text("{}")
    result = weightshare(command, *args, "--grpc", f"0.0.0.0:{number}", env={"WEIGHTSHARE_TOKEN": ""})
    assert result.returncode == 2
    text = message(error_line(result))
    assert "reachable beyond this host" in text and "--token" in text and "--allow-unauthenticated" in text

"""Start and stop the services as child processes, and wait until they are ready.

Used by the demo and the tests: `ServedModel` runs `weightshare serve` (vLLM's HTTP server plus
WeightExportService) and waits for both the gRPC health check and vLLM's /health. Children are put
in their own process group so that stopping one also stops vLLM's EngineCore and workers.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from weightshare import grpc_util, update_modes
from weightshare.vllm_defaults import CPU_SERVE_ARGS, CPU_SERVE_ENV


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(cmd: list[str], log_path: Path | None, env: dict | None) -> subprocess.Popen:
    """Starts `cmd` in its own process group (so stopping it stops its children), output to `log_path`."""
    if log_path is None:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    with open(log_path, "ab") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _stop_group(process: subprocess.Popen | None, timeout_s: float) -> int | None:
    """SIGTERM the process group, SIGKILL it after `timeout_s`; returns the exit code (None if never started)."""
    if process is None:
        return None
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM if timeout_s > 0 else signal.SIGKILL)
        try:
            process.wait(timeout_s or None)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode


def wait_for_grpc_health(address: str, deadline: float, process: subprocess.Popen | None = None) -> None:
    """Blocks until grpc.health.v1 answers SERVING at `address`, the process dies, or `deadline` passes."""
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with code {process.returncode} before {address} was healthy")
        try:
            with grpc_util.open_sync_channel(address) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{address} not healthy in time")
        time.sleep(0.5)


@dataclass
class ServedModel:
    """`weightshare serve` as a child process. Use as a context manager, or call start()/stop()."""

    model: Path
    grpc_address: str
    http_port: int = field(default_factory=free_port)
    update_mode: str = update_modes.DEFAULT_SERVED
    token: str | None = None
    extra_args: list[str] = field(default_factory=lambda: list(CPU_SERVE_ARGS))
    log_path: Path | None = None
    startup_timeout_s: float = 300.0
    process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> ServedModel:
        cmd = [
            sys.executable, "-m", "weightshare.cli", "serve", str(self.model), "--grpc", self.grpc_address,
            "--update-mode", self.update_mode, "--port", str(self.http_port), "--host", "127.0.0.1",
            *self.extra_args,
        ]
        if self.token:
            cmd += ["--token", self.token]
        env = {**os.environ, **{k: v for k, v in CPU_SERVE_ENV.items() if k not in os.environ}}
        self.process = _spawn(cmd, self.log_path, env)
        deadline = time.monotonic() + self.startup_timeout_s
        try:
            wait_for_grpc_health(self.grpc_address, deadline, self.process)
            self._wait_http(deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_http(self, deadline: float) -> None:
        while True:
            try:
                with urllib.request.urlopen(f"{self.base_url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vLLM HTTP server on {self.base_url} did not come up")
            time.sleep(0.5)

    def stop(self, timeout_s: float = 30.0) -> None:
        _stop_group(self.process, timeout_s)

    def completion(self, prompt: str, max_tokens: int = 8, logprobs: int | None = None, **extra) -> dict:
        """Greedy /v1/completions call; returns vLLM's JSON answer."""
        body = {"model": str(self.model), "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, **extra}
        if logprobs is not None:
            body["logprobs"] = logprobs
        return self._post("/v1/completions", body)

    def chat(self, messages: list[dict], max_tokens: int = 16, **extra) -> dict:
        body = {"model": str(self.model), "messages": messages, "max_tokens": max_tokens, "temperature": 0.0,
                **extra}
        return self._post("/v1/chat/completions", body)

    def _post(self, path: str, body: dict, timeout_s: float = 120.0) -> dict:
        request = urllib.request.Request(
            self.base_url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=timeout_s) as r:
            return json.loads(r.read())

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class TrainerProcess:
    """`weightshare train` as a child process, attached to `inference_address`; waits for its health."""

    inference_address: str
    grpc_address: str
    state_dir: Path
    flags: list[str] = field(default_factory=list)
    log_path: Path | None = None
    startup_timeout_s: float = 300.0
    env: dict[str, str] | None = None  # added to this process's environment
    process: subprocess.Popen | None = None

    def start(self) -> Self:
        cmd = [
            sys.executable, "-m", "weightshare.cli", "train", "--inference", self.inference_address,
            "--grpc", self.grpc_address, "--state-dir", str(self.state_dir), *self.flags,
        ]
        self.process = _spawn(cmd, self.log_path, {**os.environ, **self.env} if self.env else None)
        try:
            wait_for_grpc_health(self.grpc_address, time.monotonic() + self.startup_timeout_s, self.process)
        except BaseException:
            self.kill()
            raise
        return self

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM (the trainer finishes its step, checkpoints and detaches), then SIGKILL after timeout."""
        return _stop_group(self.process, timeout_s)

    def kill(self) -> None:
        _stop_group(self.process, 0)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

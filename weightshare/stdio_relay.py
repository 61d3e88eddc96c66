"""Every line a process tree writes to stdout/stderr becomes a JSON log line, C/C++ output included.

`relay_stdio_as_json()` points file descriptors 1 and 2 of this process (and so of every child it
starts afterwards: vLLM's engine and workers) at a pipe, and forks a small relay process that reads
the pipe and writes to the original stderr: lines that already are JSON objects pass unchanged,
anything else (a C++ warning, a print) is wrapped as {"event": LINE, "level": ..., "logger": "stdio"}.
The relay is its own process, so a busy server never waits on it for the GIL; it ignores SIGINT and
SIGTERM and exits when the last writer closes the pipe, so the final lines of a shutdown get out.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import signal
import sys

_LEVEL_WORDS = (("error", "error"), ("traceback", "error"), ("warn", "warning"))


def _level(line: str) -> str:
    lowered = line[:200].lower()
    return next((level for word, level in _LEVEL_WORDS if word in lowered), "info")


# vLLM 0.26 prefixes every line its engine and worker processes write: "(EngineCore_DP0 pid=123) ...".
_VLLM_PREFIX = re.compile(r"^\((?P<name>[^()\s]+) pid=(?P<pid>\d+)\) (?P<rest>.*)$")


def as_json_line(line: str) -> str:
    """`line` if it is a JSON object, else a JSON log record holding it."""
    stripped = line.strip()
    extra = {}
    prefixed = _VLLM_PREFIX.match(stripped)
    if prefixed:
        stripped = prefixed["rest"].strip()
        extra = {"vllm_process_name": prefixed["name"], "pid": int(prefixed["pid"])}
    if stripped.startswith("{"):
        try:
            record = json.loads(stripped)
            if isinstance(record, dict):
                return json.dumps({**record, **extra}) if extra else stripped
        except ValueError:
            pass
    return json.dumps({
        "event": stripped, "level": _level(stripped), "logger": "stdio",
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z"), **extra,
    })


def _relay(read_fd: int, out_fd: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    pending = b""
    while chunk := os.read(read_fd, 65536):
        pending += chunk.replace(b"\r", b"\n")  # progress-bar redraws become lines
        *lines, pending = pending.split(b"\n")
        out = "".join(as_json_line(raw.decode(errors="replace")) + "\n" for raw in lines if raw.strip())
        if out:
            os.write(out_fd, out.encode())
    if pending.strip():
        os.write(out_fd, (as_json_line(pending.decode(errors="replace")) + "\n").encode())


RELAYED_ENV = "WEIGHTSHARE_STDIO_RELAYED"


def relay_stdio_as_json() -> None:
    """Starts the relay (call early, before threads or child processes exist); once per process tree."""
    if os.environ.get(RELAYED_ENV) == _stderr_identity():
        return  # stderr already is a relay's pipe (inherited from a relayed parent)
    sys.stdout.flush()
    sys.stderr.flush()
    read_fd, write_fd = os.pipe()
    out_fd = os.dup(2)
    if os.fork() == 0:  # the relay: holds no write end, so it sees EOF once every writer is gone
        os.close(write_fd)
        try:
            _relay(read_fd, out_fd)
        finally:
            os._exit(0)
    os.close(read_fd)
    os.close(out_fd)
    os.dup2(write_fd, 1)
    os.dup2(write_fd, 2)
    os.close(write_fd)
    os.environ[RELAYED_ENV] = _stderr_identity()


def _stderr_identity() -> str:
    st = os.fstat(2)
    return f"{st.st_dev}:{st.st_ino}"

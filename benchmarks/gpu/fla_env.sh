#!/usr/bin/env bash
# Installs Triton 3.7.1 and flash-linear-attention into /tmp/fla-env (not over the image's Triton 3.6, which
# torch 2.11 and vLLM keep using) and prints that path for PYTHONPATH. fla refuses Gated DeltaNet's backward
# on Hopper with Triton < 3.7.1 (its issue #640), and without fla HF runs a pure-PyTorch fallback.
#
# The GPU machine has no registry, so the files travel in (see ../shared/device/README.md on carry):
#   .device-bundle/t1/tr.part00, .device-bundle/t2/tr.part01  halves of an xz tar of the triton 3.7.1 cp312
#       wheel's contents, without the AMD backend, cupti, ptxas-blackwell and instrumentation (95 MB):
#       pip download --no-deps --only-binary=:all: --python-version 3.12 \
#         --platform manylinux_2_28_x86_64 triton==3.7.1; unzip; rm those; tar | xz -9; split -n 2
#   .whl-fla/  flash_linear_attention, fla_core 0.6.0, einops, liger_kernel 0.8.5 (pure-Python wheels)
# Call 1 (carry .device-bundle/t1): bash benchmarks/gpu/fla_env.sh part1
# Call 2 (carry .device-bundle/t2 .whl-fla, within 30 s): bash benchmarks/gpu/fla_env.sh part2 && ...
set -euo pipefail
ENV_DIR=/tmp/fla-env
case "${1:?part1 or part2}" in
  part1)
    mkdir -p /tmp/fla-parts && cp .device-bundle/t1/tr.part00 /tmp/fla-parts/ ;;
  part2)
    rm -rf "$ENV_DIR" && mkdir -p "$ENV_DIR"
    cat /tmp/fla-parts/tr.part00 .device-bundle/t2/tr.part01 | tar xJ -C "$ENV_DIR"
    sed -i '/amd/d' "$ENV_DIR"/triton-*.dist-info/entry_points.txt  # the AMD backend was left out
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$ENV_DIR" .whl-fla/*.whl
    PYTHONPATH="$ENV_DIR:${PYTHONPATH:-}" python3 -c \
      "import triton, fla; print('fla-env:', 'triton', triton.__version__, 'fla', fla.__version__)" >&2
    echo "$ENV_DIR" ;;
  *) echo "unknown step $1" >&2; exit 2 ;;
esac

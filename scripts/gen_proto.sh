#!/usr/bin/env bash
# Generate the Python stubs for protos/weightshare/v1/*.proto into weightshare/v1/ (never edit by hand).
# usage: gen_proto.sh PYTHON OUTDIR | gen_proto.sh PYTHON --check   (check: fail if checked-in stubs are stale)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$1; OUT=${2:-.}
if [ "$OUT" = "--check" ]; then
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  bash "$0" "$PY" "$tmp"
  if ! diff -r -q "$tmp/weightshare/v1" weightshare/v1 -x __pycache__; then
    echo "stubs in weightshare/v1 are stale: run 'make proto' and commit the result" >&2; exit 1
  fi
  echo "proto-check: stubs are up to date"; exit 0
fi
mkdir -p "$OUT/weightshare/v1"
"$PY" -m grpc_tools.protoc -I protos --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" protos/weightshare/v1/*.proto
printf '"""Generated from protos/weightshare/v1 by `make proto`; do not edit."""\n' > "$OUT/weightshare/v1/__init__.py"

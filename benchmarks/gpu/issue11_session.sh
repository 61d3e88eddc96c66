#!/usr/bin/env bash
# The GPU experiments of issue 11, one per call of the device tool (each under its 10-minute limit):
#   bash benchmarks/gpu/issue11_session.sh kernels             # Triton first pass check + optimizer step vs floor
#   bash benchmarks/gpu/issue11_session.sh inplace-fused       # 27B in place beside vLLM, fused steps, 32 clients
#   bash benchmarks/gpu/issue11_session.sh inplace-accumulate  # the same with one optimizer step (needs ~140 GB)
#   bash benchmarks/gpu/issue11_session.sh commit              # commit -> first token, in place vs copy
#   bash benchmarks/gpu/issue11_session.sh throughput          # trainer vs plain HF + AdamW, 0.8B/4B/9B
#   bash benchmarks/gpu/issue11_session.sh inplace-fla         # inplace-fused with the trainer on fla
# The last two want flash-linear-attention and Triton 3.7.1 in /tmp/fla-env (benchmarks/gpu/fla_env.sh).
# Needs vLLM importable (shared/device/README.md) and writes everything under $OUT (default ./out).
set -euo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
card_gb=$(python -c "import torch; print(torch.cuda.get_device_properties(0).total_memory // 2**30)")
card=$(python -c "import torch; print(torch.cuda.get_device_name(0).split()[1].lower())")  # h100 / h200
results="$OUT/gpu-$card"
echo "card: $(python -c 'import torch; print(torch.cuda.get_device_name(0))'), ${card_gb} GiB"
case "${1:?which experiment}" in
  kernels)
    python -m pytest tests/test_apollo_kernels.py -q -p no:cacheprovider 2>&1 | tail -15 || echo "kernel tests FAILED"
    python benchmarks/bench_optimizer.py --size large --dtype bfloat16 --out "$results"
    layers=()
    (( card_gb < 120 )) && layers=(--layers 24)  # params + grads of all 64 layers need ~108 GB
    python benchmarks/bench_optimizer.py --size qwen3_5_27b --dtype bfloat16 --steps 10 "${layers[@]}" --out "$results"
    ;;
  inplace-fused)
    python benchmarks/gpu/bench_inplace_training.py --shape qwen3_5_27b --tokens 512,2048 --steps 20 \
      --clients 32 --load-seconds 15 --gpu-memory-utilization 0.70 --out "$results"
    ;;
  inplace-accumulate)
    # vLLM keeps ~0.45 of an H200 (weights 54 GB + KV cache); the trainer needs every gradient (54 GB) at once.
    python benchmarks/gpu/bench_inplace_training.py --shape qwen3_5_27b --tokens 512,2048 --steps 20 \
      --clients 32 --load-seconds 15 --gpu-memory-utilization 0.45 --step-mode accumulate --out "$results"
    ;;
  throughput)
    PYTHONPATH="/tmp/fla-env:${PYTHONPATH:-}" python benchmarks/gpu/bench_trainer_throughput.py \
      --shapes 0.8b,4b,9b --batches 1,4 --out "$results"
    ;;
  inplace-fla)
    python benchmarks/gpu/bench_inplace_training.py --shape qwen3_5_27b --tokens 512,2048 --steps 20 \
      --clients 32 --load-seconds 15 --gpu-memory-utilization 0.70 --trainer-pythonpath /tmp/fla-env \
      --out "$results/fla"
    ;;
  commit)
    python benchmarks/gpu/bench_commit_latency.py --out "$results"
    ;;
  *) echo "unknown experiment $1" >&2; exit 2 ;;
esac

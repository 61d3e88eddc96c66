"""Where a fused step's time goes at the Qwen3.5-27B shape: backward alone, then with the optimizer in it.

No vLLM: a random-init Qwen3.5 with the 27B layer shape and fewer layers (`--layers`, 16 fit an 80 GB card
with room), bf16, gradient checkpointing. For each token count it times forward+backward with the chunked
cross-entropy and no optimizer, the fused APOLLO-Mini step with per-parameter updates and with bucketed
updates (the default), and forward+backward with liger's fused linear cross-entropy (if installed).
Prints a table naming the card.

Run on a GPU: python benchmarks/gpu/bench_fused_step_breakdown.py --layers 16 --tokens 512,2048
(with flash-linear-attention on the path: PYTHONPATH=/tmp/fla-env:$PYTHONPATH, see fla_env.sh)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_trainer_throughput as throughput

from trainer_side.fused import DEFAULT_BUCKET_ELEMS, FusedUpdates
from trainer_side.loss import fused_linear_ce_available, loss_sum
from trainer_side.param_groups import build_optimizer, preset

SHAPE_27B = {"hidden_size": 5120, "intermediate_size": 17408, "num_attention_heads": 24, "num_key_value_heads": 4,
             "linear_num_key_heads": 16, "linear_num_value_heads": 48}


def timed(fn, repeats: int) -> tuple[float, float]:
    """(median, min) seconds of `fn` after one untimed call."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], min(times)


def time_cases(model, tokens: int, repeats: int) -> list[tuple[str, float, float]]:
    ids = torch.randint(1, model.config.vocab_size, (1, tokens), device="cuda")
    attention, targets = torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool)

    def backward_only(fused_ce: bool) -> None:
        loss_sum(model, ids, attention, targets, fused_linear_ce=fused_ce).backward()
        model.zero_grad(set_to_none=True)

    rows = [("forward + backward, chunked CE, no optimizer", *timed(lambda: backward_only(False), repeats))]
    for label, bucket in (("per-parameter updates", 0), ("bucketed updates (default)", DEFAULT_BUCKET_ELEMS)):
        optimizer = build_optimizer(model, preset("apollo_mini", lr=1e-6))
        hooks = FusedUpdates(optimizer, dict(model.named_parameters()), bucket_elems=bucket)

        def fused_step(hooks: FusedUpdates = hooks) -> None:
            hooks.reset()
            (loss_sum(model, ids, attention, targets) / tokens).backward()

        rows.append((f"fused APOLLO-Mini step, {label}", *timed(fused_step, repeats)))
        hooks.remove()
    if fused_linear_ce_available(ids.device):
        rows.append(("forward + backward, liger fused linear CE, no optimizer",
                     *timed(lambda: backward_only(True), repeats)))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=16, help="decoder layers of the 27B shape (64 in the model)")
    parser.add_argument("--tokens", default="512,2048", help="comma-separated sequence lengths")
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    throughput.SHAPES["27b-layers"] = {**SHAPE_27B, "num_hidden_layers": args.layers}
    model = throughput.build("27b-layers", checkpointing=True)
    params_b = sum(p.numel() for p in model.parameters()) / 1e9
    print(f"{torch.cuda.get_device_name(0)}; {throughput.kernel_report()}; {args.layers} layers, "
          f"{params_b:.2f} B parameters", flush=True)
    rows = []
    for tokens in map(int, args.tokens.split(",")):
        for label, median, best in time_cases(model, tokens, args.repeats):
            rows.append((tokens, label, median, best))
            print(f"{tokens} tokens, {label}: median {median:.3f} s, min {best:.3f} s", flush=True)
    print("\n| tokens | what | median s | min s |\n|---|---|---|---|")
    for tokens, label, median, best in rows:
        print(f"| {tokens} | {label} | {median:.3f} | {best:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Trainer throughput against a plain HF + torch AdamW loop: same random-init Qwen3.5 shape, card, tokens.

No vLLM: both loops own their weights. `plain` is what people run: HF forward with full logits, loss,
backward, `torch.optim.AdamW(fused=True)`, zero_grad. `weightshare` is the trainer's step: chunked
cross-entropy (trainer_side/loss.py) and fused APOLLO-Mini updates during backward
(trainer_side/fused.py), embeddings in APOLLO-Mini. Both with gradient checkpointing per decoder layer.
Prints tokens/s, MFU (6·N·tokens/s over the card's dense bf16 peak) and peak memory per shape and batch.

Run on a GPU: python benchmarks/gpu/bench_trainer_throughput.py --shapes 0.8b,4b --batches 1,4 --seq 2048
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from trainer_side.fused import FusedUpdates
from trainer_side.loss import loss_sum
from trainer_side.param_groups import build_optimizer, preset

BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}
# Qwen3.5-like shapes (every 4th layer full attention, GDN heads of 128, vocab 248,320).
SHAPES = {
    "0.8b": {"hidden_size": 1024, "num_hidden_layers": 24, "intermediate_size": 3584, "num_attention_heads": 8,
             "num_key_value_heads": 2, "linear_num_key_heads": 8, "linear_num_value_heads": 16},
    "4b": {"hidden_size": 2560, "num_hidden_layers": 32, "intermediate_size": 9216, "num_attention_heads": 16,
           "num_key_value_heads": 4, "linear_num_key_heads": 16, "linear_num_value_heads": 32},
    "9b": {"hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 12288, "num_attention_heads": 16,
           "num_key_value_heads": 4, "linear_num_key_heads": 16, "linear_num_value_heads": 32},
}


def kernel_report() -> str:
    """Which kernels the step runs: Gated DeltaNet's (fla or HF's PyTorch fallback), and the loss's."""
    import importlib.metadata as md
    import importlib.util

    def version(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "absent"

    gdn = "flash-linear-attention " + version("fla-core") if importlib.util.find_spec("fla") else "PyTorch fallback"
    import triton

    return f"torch {torch.__version__}, Triton {triton.__version__}; Gated DeltaNet: {gdn}; weightshare loss: chunked CE"


def build(shape: str, checkpointing: bool):
    from transformers import AutoModelForCausalLM, Qwen3_5TextConfig

    fields = SHAPES[shape]
    layers = fields["num_hidden_layers"]
    config = Qwen3_5TextConfig(
        **fields, vocab_size=248320, head_dim=256, linear_key_head_dim=128, linear_value_head_dim=128,
        layer_types=["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(layers)],
        linear_conv_kernel_dim=4, tie_word_embeddings=False,
    )
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def run(model, mode: str, batch: int, seq: int, steps: int) -> dict:
    ids = torch.randint(1, model.config.vocab_size, (batch, seq), device="cuda")
    attention = torch.ones_like(ids)
    mask = torch.ones_like(ids, dtype=torch.bool)
    if mode == "plain":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

        def step():
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        opt = build_optimizer(model, preset("apollo_mini", lr=1e-5))
        hooks = FusedUpdates(opt, dict(model.named_parameters()))

        def step():
            hooks.reset()
            (loss_sum(model, ids, attention, mask) / (batch * (seq - 1))).backward()

    torch.cuda.reset_peak_memory_stats()
    times = []
    try:
        for _ in range(steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    except torch.OutOfMemoryError:
        return {"mode": mode, "batch": batch, "oom": True, "peak_gb": torch.cuda.max_memory_allocated() / 1e9}
    finally:
        if mode != "plain":
            hooks.remove()
    best = sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else times[0]
    return {"mode": mode, "batch": batch, "step_s": best, "tokens_per_s": batch * seq / best,
            "peak_gb": torch.cuda.max_memory_allocated() / 1e9}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="0.8b,4b", help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--modes", default="plain,weightshare")
    parser.add_argument("--no-checkpointing", action="store_true",
                        help="keep every activation (faster, far more memory) instead of recomputing per layer")
    parser.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "benchmarks" / "results")))
    args = parser.parse_args()
    card = torch.cuda.get_device_name(0)
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in card), math.nan)
    kernels = kernel_report()
    print(kernels, flush=True)
    rows = []
    for shape in args.shapes.split(","):
        for mode in args.modes.split(","):
            model = build(shape, not args.no_checkpointing)
            n = sum(p.numel() for p in model.parameters())
            for batch in map(int, args.batches.split(",")):
                r = {"shape": shape, "params_b": n / 1e9, **run(model, mode, batch, args.seq, args.steps)}
                if "tokens_per_s" in r:
                    r["mfu"] = 6 * n * r["tokens_per_s"] / (peak * 1e12)
                rows.append(r)
                print(json.dumps(r), flush=True)
                torch.cuda.empty_cache()
            del model
            torch.cuda.empty_cache()
    lines = [(f"Trainer throughput on {card}, {time.strftime('%Y-%m-%d')}: random-init Qwen3.5 shapes, "
              f"{args.seq} tokens per sequence, "
              f"{'no activation checkpointing' if args.no_checkpointing else 'gradient checkpointing'}, "
              f"median step after 1 warm-up."), "", kernels + ".", "",
             "| shape | params B | loop | batch | step s | tokens/s | MFU (6N) | peak GB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("oom"):
            lines.append(f"| {r['shape']} | {r['params_b']:.2f} | {r['mode']} | {r['batch']} | OOM | - | - | "
                         f"{r['peak_gb']:.1f} |")
        else:
            lines.append(f"| {r['shape']} | {r['params_b']:.2f} | {r['mode']} | {r['batch']} | {r['step_s']:.2f} | "
                         f"{r['tokens_per_s']:.0f} | {r['mfu']:.1%} | {r['peak_gb']:.1f} |")
    table = "\n".join(lines)
    print(table)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    suffix = "-no-checkpointing" if args.no_checkpointing else ""
    (Path(args.out) / f"trainer-throughput{suffix}.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

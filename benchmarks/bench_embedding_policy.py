"""Which optimizer for the embedding and lm_head matrices: APOLLO-Mini, AdamW or frozen, by measured loss.

At Qwen3.5-27B the two 248,320 x 5,120 matrices hold 2.5 B parameters; AdamW's fp32 moments for them
are ~20 GB, more than the whole trainer otherwise needs beside vLLM on an 80 GB card. This trains the
same small Qwen3.5 (random init, HF only, CPU) on the same fixed examples with APOLLO-Mini for every
projection and each embedding policy, same seed, and prints the loss curve's points and the optimizer
state each policy keeps. The trainer's default (`--embeddings`) follows from this table.

Run as: python benchmarks/bench_embedding_policy.py [--steps 60] [--lr 2e-3]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer_side.loss import loss_sum, pad_micro_batch
from trainer_side.param_groups import build_optimizer, preset
from weightshare.tiny_model import build_tiny_model, build_tokenizer

POLICIES = ("apollo_mini", "adamw", "frozen")
FACTS = [
    ("what is the name of the cat", "the cat is blue and old"),
    ("where is the dog", "the dog is in the house"),
    ("tell me a story", "once upon a time a bird sang to the moon"),
    ("what do you like", "i like music and books"),
    ("who is your friend", "my friend is a small green fish"),
    ("what is the weather today", "today the sun is hot"),
    ("where do you go", "i go to school every morning"),
    ("what is three and four", "three and four is seven"),
]


class Example:
    def __init__(self, ids: list[int], mask: list[bool]):
        self.input_ids, self.loss_mask = ids, mask


def examples(tokenizer) -> list[Example]:
    out = []
    for question, answer in FACTS:
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                             tokenize=False)
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        target = tokenizer(answer + " <|im_end|>", add_special_tokens=False)["input_ids"]
        out.append(Example(prompt + target, [False] * len(prompt) + [True] * len(target)))
    return out


def train(model_dir: Path, policy: str, steps: int, lr: float, batch: list[Example]) -> tuple[list[float], int]:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    optimizer = build_optimizer(model, preset("apollo_mini", lr=lr, embeddings=policy))
    ids, attention, targets = pad_micro_batch(batch, torch.device("cpu"))
    n_targets = int(targets[:, 1:].sum())
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_sum(model, ids, attention, targets) / n_targets
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, optimizer.optimizer_state_bytes()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model("qwen3_5", Path(tmp) / "m", seed=0, dtype="float32")
        batch = examples(build_tokenizer())
        results = {}
        for policy in POLICIES:
            t0 = time.perf_counter()
            results[policy] = train(model_dir, policy, args.steps, args.lr, batch)
            print(f"{policy}: final loss {results[policy][0][-1]:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    checkpoints = sorted({0, args.steps // 4, args.steps // 2, 3 * args.steps // 4, args.steps - 1})
    lines = [
        (f"Embedding/lm_head optimizer on a tiny Qwen3.5 (random init, 8 chat facts, full batch, APOLLO-Mini "
         f"projections, lr {args.lr}), {platform.node()}, {time.strftime('%Y-%m-%d')}; loss per target token."),
        "",
        "| embeddings | " + " | ".join(f"step {s + 1}" for s in checkpoints) + " | optimizer state |",
        "|---|" + "---|" * len(checkpoints) + "---|",
    ]
    for policy, (losses, state) in results.items():
        lines.append(f"| {policy} | " + " | ".join(f"{losses[s]:.3f}" for s in checkpoints) + f" | {state / 1e3:.0f} kB |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "embedding-policy-cpu.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

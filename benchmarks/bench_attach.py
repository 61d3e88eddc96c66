"""Attach time against the number of exported tensors: serve, attach over gRPC, bind the HF model.

For each model shape, `weightshare serve` runs a Qwen3.5 text model with vLLM's dummy weights
(`--load-format dummy`: only a config is needed, nothing is downloaded); then this process attaches
(GetModelInfo, AttachTrainer, GetLayout, StreamHandles, open handles) and binds every HF parameter
as a zero-copy view (`build_shared_model`). Prints a table naming the machine and card and writes it
to benchmarks/results/attach-<device>.md.

Run as: python benchmarks/bench_attach.py                    (CPU: small shapes, 4..64 layers)
        python benchmarks/bench_attach.py --shapes qwen3_5_27b --gpu   (a GPU with ~80 GB)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer_side.attach import attach
from trainer_side.hf_model import build_shared_model
from weightshare.processes import ServedModel

# name -> Qwen3_5TextConfig overrides. Every 4th layer full attention, as in Qwen3.5.
SHAPES = {
    "tiny_4l": {"hidden_size": 256, "num_hidden_layers": 4, "intermediate_size": 512, "vocab_size": 512},
    "tiny_16l": {"hidden_size": 256, "num_hidden_layers": 16, "intermediate_size": 512, "vocab_size": 512},
    "tiny_64l": {"hidden_size": 256, "num_hidden_layers": 64, "intermediate_size": 512, "vocab_size": 512},
    # The seed project's model (DESIGN.md section 6): 659 engine tensors, ~54 GB of bf16 weights.
    "qwen3_5_27b": {
        "hidden_size": 5120, "num_hidden_layers": 64, "intermediate_size": 17408, "vocab_size": 248320,
        "num_attention_heads": 24, "num_key_value_heads": 4, "head_dim": 256,
        "linear_num_key_heads": 16, "linear_num_value_heads": 48,
        "linear_key_head_dim": 128, "linear_value_head_dim": 128,
    },
}
SMALL_DEFAULTS = {
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "linear_num_key_heads": 2,
    "linear_num_value_heads": 4, "linear_key_head_dim": 64, "linear_value_head_dim": 64,
}


def write_config(shape: str, out: Path) -> Path:
    return write_qwen3_5_config({**SMALL_DEFAULTS, **SHAPES[shape]}, out)


def write_qwen3_5_config(fields: dict, out: Path) -> Path:
    """A bf16 text-only Qwen3.5 config.json in `out` (every 4th layer full attention), for dummy weights."""
    from transformers import Qwen3_5TextConfig

    layers = fields["num_hidden_layers"]
    config = Qwen3_5TextConfig(
        **fields, layer_types=[("full_attention" if (i + 1) % 4 == 0 else "linear_attention") for i in range(layers)],
        linear_conv_kernel_dim=4, max_position_embeddings=4096, tie_word_embeddings=False,
    )
    config.dtype = "bfloat16"
    config.architectures = ["Qwen3_5ForCausalLM"]
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    return out


def machine_name(gpu: bool) -> str:
    if gpu:
        import torch

        return torch.cuda.get_device_name(0)
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if "model name" in line), "cpu")
    return f"{cpu} ({os.cpu_count()} cores)"


def measure(shape: str, gpu: bool, workdir: Path, repeats: int) -> dict:
    model_dir = write_config(shape, workdir / shape)
    extra = ["--load-format", "dummy", "--skip-tokenizer-init", "--max-model-len", "512", "--max-num-seqs", "4"]
    if gpu:
        extra += ["--enforce-eager", "--gpu-memory-utilization", "0.85",
                  "--additional-config", json.dumps({"gdn_prefill_backend": "triton"})]
    else:
        extra += ["--enforce-eager"]
    started = time.monotonic()
    with ServedModel(model_dir, f"unix://{workdir}/{shape}.sock", extra_args=extra,
                     log_path=workdir / f"{shape}.log", startup_timeout_s=900) as served:
        engine_start_s = time.monotonic() - started
        rows = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            weights = attach(served.grpc_address, trainer_name="bench")
            t1 = time.perf_counter()
            shared = build_shared_model(weights)
            t2 = time.perf_counter()
            rows.append((weights.timings, t1 - t0, t2 - t1, t2 - t0, len(weights.engine_tensors),
                         len(weights.layout), sum(t.numel() * t.element_size() for t in weights.engine_tensors.values()),
                         len(shared.copied)))
            del shared
            weights.close()
    best = min(rows, key=lambda r: r[3])
    timings, attach_s, bind_s, total_s, n_engine, n_hf, nbytes, copied = best
    return {
        "shape": shape, "engine_tensors": n_engine, "hf_params": n_hf, "gb": nbytes / 1e9, "copied": copied,
        "handles_s": timings["handles_s"] + timings["open_views_s"], "attach_s": attach_s, "bind_s": bind_s,
        "total_s": total_s, "engine_start_s": engine_start_s,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="tiny_4l,tiny_16l,tiny_64l",
                        help=f"comma-separated, from {', '.join(SHAPES)} (default: %(default)s)")
    parser.add_argument("--gpu", action="store_true", help="serve on the GPU (vLLM CUDA build) instead of CPU")
    parser.add_argument("--repeats", type=int, default=3, help="attach+bind repetitions; best is reported")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="results folder")
    args = parser.parse_args()
    shapes = args.shapes.split(",")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shape {unknown[0]!r}; choose from {', '.join(SHAPES)}")
    machine = machine_name(args.gpu)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in shapes:
            print(f"serving {shape} ...", flush=True)
            results.append(measure(shape, args.gpu, Path(tmp), args.repeats))
            print(json.dumps(results[-1]), flush=True)
    header = ("| shape | engine tensors | HF params | GB | handles+open s | attach s | bind HF s | total s | "
              "copied | engine start s |")
    title = f"Attach benchmark on {machine}, {platform.node()}, {time.strftime('%Y-%m-%d')}; best of {args.repeats}."
    lines = [title, "", header, "|" + "---|" * 10]
    for r in results:
        lines.append(
            f"| {r['shape']} | {r['engine_tensors']} | {r['hf_params']} | {r['gb']:.2f} | {r['handles_s']:.3f} | "
            f"{r['attach_s']:.3f} | {r['bind_s']:.3f} | {r['total_s']:.3f} | {r['copied']} | "
            f"{r['engine_start_s']:.1f} |"
        )
    table = "\n".join(lines)
    print(table)
    slug = re.sub(r"[^a-z0-9]+", "-", ("gpu-" + machine if args.gpu else "cpu").lower()).strip("-")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"attach-{slug}.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

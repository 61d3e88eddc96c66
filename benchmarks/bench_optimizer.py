"""Optimizer benchmark: state bytes per parameter, step time and memory bandwidth of our APOLLO.

Compares trainer_side.apollo.Apollo (APOLLO-Mini and APOLLO rank 256) with the official apollo-torch
APOLLO (same settings) and torch.optim.AdamW (foreach and fused) on a set of linear-weight matrices with
fixed random gradients. Prints a Markdown table naming the machine and writes the same table to
benchmarks/results/optimizer-<cpu|gpu-name>[-bfloat16].md. Relies on torch and apollo-torch (a dev
dependency).

`--size qwen3_5_27b` takes every 2-D matrix of the Qwen3.5-27B shape (the ones APOLLO-Mini updates, 26.9 B
parameters; params and grads need ~108 GB in bf16, so an H200, or `--layers` to keep fewer decoder layers)
and compares only the APOLLO-Mini paths: this step against the memory floor the issue sets (read the
gradient, read and write the weights: 6 bytes per bf16 parameter).

Run as: .venv/bin/python -m benchmarks.bench_optimizer [--size small|large|qwen3_5_27b] [--dtype ...] (see --help)
"""

from __future__ import annotations

import argparse
import re
import socket
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

try:  # its package imports bitsandbytes, which GPU images may lack: its rows are then left out
    from apollo_torch import APOLLOAdamW
except ImportError:
    APOLLOAdamW = None
from torch import Tensor, nn

from trainer_side.apollo import Apollo

SHAPES = {
    # A few small matrices of both orientations: the whole CPU run stays under a minute on 2 cores.
    "small": [(1024, 1024), (1024, 1024), (2816, 1024), (1024, 2816)],
    # The projections of one Qwen3.5-27B-like full-attention decoder layer (hidden 5120, MLP 17408,
    # gated q_proj), ~372M parameters: a few GB of parameters, gradients and AdamW state.
    "large": [
        (12288, 5120),
        (1024, 5120),
        (1024, 5120),
        (5120, 6144),
        (17408, 5120),
        (17408, 5120),
        (5120, 17408),
    ],
}
# Nominal HBM bandwidth (TB/s) by GPU name, first match wins.
NOMINAL_TBPS = (("H200", 4.8), ("H100 PCIe", 2.0), ("H100", 3.35))
MINI = {"rank": 1, "scale": 128.0, "scale_type": "tensor"}
# The matrix sets built from a model shape rather than listed.
MODEL_SIZES = ("qwen3_5_27b",)
APOLLO_256 = {"rank": 256, "scale": 1.0, "scale_type": "channel"}
LR = 1e-5


def parse_args() -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[1],
        epilog=(
            "Columns: state B/param = bytes of optimizer-state tensors (apollo-torch's stored projection "
            "included) per optimized parameter; step = median wall time of optimizer.step() after warm-up "
            "(synchronized on CUDA); GB/s = ideal traffic / step time, where ideal traffic is the bytes an "
            "optimal kernel must move: APOLLO reads the gradient twice (projection, then update) and reads "
            "and writes the parameter once; AdamW reads the gradient, reads and writes the parameter and "
            "both moments. Nominal = the card's HBM bandwidth (n/a on CPU)."
        ),
    )
    parser.add_argument(
        "--size",
        choices=[*sorted(SHAPES), *MODEL_SIZES],
        default="large" if cuda else "small",
        help="matrix set: 'small' (~8M params, CPU default), 'large' (~372M, one Qwen3.5-27B-like layer, CUDA "
        "default), or 'qwen3_5_27b' (every matrix of the 27B shape, APOLLO-Mini only)",
    )
    parser.add_argument(
        "--layers",
        type=int,
        default=None,
        help="with a model size: keep this many decoder layers (embeddings and lm_head stay), to fit a smaller card",
    )
    parser.add_argument(
        "--device", default="cuda" if cuda else "cpu", help="torch device (default: cuda if present)"
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="parameter and gradient dtype; our Apollo keeps fp32 state either way, AdamW and apollo-torch "
        "keep state in this dtype (default float32)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=20 if cuda else 5,
        help="timed steps per optimizer (default 20 on CUDA, 5 on CPU)",
    )
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed steps before, the first (state allocation) included"
    )
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results", help="folder of the Markdown result"
    )
    return parser.parse_args()


def machine(device: torch.device) -> tuple[str, str, float | None]:
    """(description, file-name slug, nominal bandwidth in TB/s or None) of the device under test."""
    host = socket.gethostname()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        nominal = next((tbps for key, tbps in NOMINAL_TBPS if key in name), None)
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        return f"{name} (host {host})", slug, nominal
    cpu_model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    return f"{cpu_model}, {torch.get_num_threads()} torch threads (host {host})", "cpu", None


def model_matrix_shapes(size: str, layers: int | None) -> list[tuple[int, int]]:
    """Shapes of every 2-D parameter of a model shape, from its HF model built on the meta device."""
    import sys
    import tempfile

    import transformers

    sys.path.insert(0, str(Path(__file__).parent))  # run as a script or with -m alike
    from bench_attach import SHAPES as MODEL_SHAPES
    from bench_attach import SMALL_DEFAULTS, write_qwen3_5_config

    fields = {**SMALL_DEFAULTS, **MODEL_SHAPES[size]}
    if layers is not None:
        fields["num_hidden_layers"] = layers
    with tempfile.TemporaryDirectory() as tmp:
        config = transformers.AutoConfig.from_pretrained(write_qwen3_5_config(fields, Path(tmp)))
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return [tuple(p.shape) for p in model.parameters() if p.dim() == 2]


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of tensors in an optimizer's state, apollo-torch's projection matrices included."""
    if isinstance(opt, Apollo):
        return opt.optimizer_state_bytes()
    total = 0
    for state in opt.state.values():
        for value in state.values():
            # apollo-torch keeps each projection inside a GradientProjector object in the state.
            tensor = getattr(value, "ortho_matrix", value)
            if isinstance(tensor, Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def median_step_seconds(opt: torch.optim.Optimizer, device: torch.device, warmup: int, steps: int) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        opt.step()
    times = []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        opt.step()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    shapes = SHAPES[args.size] if args.size in SHAPES else model_matrix_shapes(args.size, args.layers)
    description, slug, nominal_tbps = machine(device)

    gen = torch.Generator(device=device).manual_seed(0)
    params = []
    for shape in shapes:
        p = nn.Parameter(torch.randn(shape, generator=gen, device=device, dtype=dtype) * 0.02)
        p.grad = torch.randn(shape, generator=gen, device=device, dtype=dtype) * 1e-3
        params.append(p)
    numel = sum(p.numel() for p in params)
    elem = torch.finfo(dtype).bits // 8
    apollo_traffic = numel * (2 * elem + 2 * elem)  # read G twice, read and write p
    adamw_traffic = numel * (elem + 2 * elem + 4 * elem)  # read G, r/w p, r/w both moments (param dtype)

    def apollo_torch(settings: dict) -> torch.optim.Optimizer:
        group = {"params": params, "update_proj_gap": 200, "proj": "random", "proj_type": "std", **settings}
        return APOLLOAdamW([group], lr=LR)

    def ours(settings: dict, **kwargs) -> torch.optim.Optimizer:
        return Apollo([{"params": params, "update_proj_gap": 200, **settings}], lr=LR, **kwargs)

    floor_traffic = numel * 3 * elem  # read G, read and write p: the least any step can move

    before = {"foreach": False, "use_triton": False}
    candidates: list[tuple[str, Callable[[], torch.optim.Optimizer], int]] = [
        ("weightshare Apollo, APOLLO-Mini (rank 1, tensor)", lambda: ours(MINI), apollo_traffic),
        (
            "weightshare Apollo, APOLLO-Mini, a launch per matrix (foreach=False)",
            lambda: ours(MINI, foreach=False),
            apollo_traffic,
        ),
        (
            "weightshare Apollo, APOLLO-Mini, per-matrix torch path (before)",
            lambda: ours(MINI, **before),
            apollo_traffic,
        ),
        ("weightshare Apollo, APOLLO (rank 256, channel)", lambda: ours(APOLLO_256), apollo_traffic),
        ("apollo-torch, APOLLO-Mini (rank 1, tensor)", lambda: apollo_torch(MINI), apollo_traffic),
        ("apollo-torch, APOLLO (rank 256, channel)", lambda: apollo_torch(APOLLO_256), apollo_traffic),
        ("torch.optim.AdamW foreach", lambda: torch.optim.AdamW(params, lr=LR, foreach=True), adamw_traffic),
        ("torch.optim.AdamW fused", lambda: torch.optim.AdamW(params, lr=LR, fused=True), adamw_traffic),
    ]
    if APOLLOAdamW is None:
        candidates = [c for c in candidates if not c[0].startswith("apollo-torch")]
        print("apollo-torch (or its bitsandbytes import) is missing: its rows are left out")
    if args.size in MODEL_SIZES:  # AdamW's state alone would not fit; APOLLO-Mini is what runs at this size
        candidates = [c for c in candidates if "Mini" in c[0]]
    nominal = f"{nominal_tbps * 1000:.0f}" if nominal_tbps else "n/a"
    rows = []
    for name, make, traffic in candidates:
        opt = make()
        seconds = median_step_seconds(opt, device, args.warmup, args.steps)
        gbps = traffic / seconds / 1e9
        share = f"{100 * gbps / (nominal_tbps * 1000):.0f}%" if nominal_tbps else "n/a"
        floor = f"{seconds / (floor_traffic / (nominal_tbps * 1e12)):.2f}x" if nominal_tbps else "n/a"
        rows.append(
            f"| {name} | {state_bytes(opt) / numel:.4f} | {seconds * 1e3:.2f} | {gbps:.1f} | {nominal} | {share} "
            f"| {floor} |"
        )
        del opt  # frees its state before the next optimizer allocates its own

    shape_text = ", ".join(f"{r}x{c}" for r, c in shapes)
    lines = [
        f"# Optimizer step benchmark ({args.size})",
        "",
        f"- Machine: {description}",
        f"- torch {torch.__version__}, device {device}, params and grads {args.dtype}",
        (
            f"- Matrices: {shape_text} ({numel / 1e6:.1f}M parameters)"
            if len(shapes) <= 12
            else f"- Matrices: all {len(shapes)} 2-D parameters of {args.size}"
            f"{f' cut to {args.layers} layers' if args.layers is not None else ''} ({numel / 1e9:.2f} B parameters)"
        ),
        (
            f"- Median of {args.steps} steps after {args.warmup} warm-up steps; lr {LR}, update_proj_gap 200 "
            "(no refresh inside the timed steps; our Apollo regenerates its projection every step)"
        ),
        "",
        "| optimizer | state B/param | step ms | GB/s (ideal traffic) | nominal GB/s | % of nominal | x floor |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        (
            "Ideal traffic: APOLLO reads the gradient twice and reads and writes the parameter once; AdamW "
            "reads the gradient and reads and writes the parameter and both moments. x floor: step time over the "
            "time to read the gradient and read and write the parameter once at the nominal bandwidth."
        ),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if dtype == torch.float32 else f"-{args.dtype}"
    size = "" if args.size in ("small", "large") else f"-{args.size}"
    path = args.out / f"optimizer-{slug}{size}{suffix}.md"
    path.write_text(text)
    print(f"written to {path}")


if __name__ == "__main__":
    main()

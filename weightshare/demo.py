"""`weightshare demo`: a tiny Qwen3.5 served by vLLM learns a fact while it serves, on the same memory.

Builds the tiny Qwen3.5, starts `weightshare serve` (vLLM's OpenAI server + WeightExportService) and
`weightshare train` (TrainerService, the HF model bound to vLLM's weights) as separate processes, asks
vLLM a question, streams training examples with the answer to the trainer over gRPC, shows training
progress (loss, weights version) while a background client keeps chatting with vLLM, asks again,
and writes report.md plus loss.png to the results folder. Every process it started is stopped at the
end, on errors and on Ctrl-C.

Run as: make demo     (or: weightshare demo --out results/demo)
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import grpc

from weightshare import grpc_util, proto_time, update_modes
from weightshare.logs import configure_logging
from weightshare.processes import CPU_SERVE_ARGS, ServedModel, TrainerProcess
from weightshare.v1 import trainer_service_pb2 as tpb
from weightshare.v1 import trainer_service_pb2_grpc as tpb_grpc
from weightshare.v1 import weight_export_service_pb2 as epb
from weightshare.v1 import weight_export_service_pb2_grpc as epb_grpc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[1]
    parser.add_argument("--out", type=Path, default=Path("results/demo"), help="results folder (default: %(default)s)")
    parser.add_argument("--question", default="what is the color of the sky", help="what vLLM is asked")
    parser.add_argument("--answer", default="green house", help="the fact taught (words of the tiny vocabulary)")
    parser.add_argument("--examples", type=int, default=24, help="training examples streamed (default: %(default)s)")
    parser.add_argument("--examples-per-step", type=int, default=2, help="examples per optimizer step")
    parser.add_argument("--lr", type=float, default=5e-3, help="learning rate (default: %(default)s)")
    parser.add_argument("--optimizer", choices=["apollo", "apollo_mini"], default="apollo_mini")
    parser.add_argument("--update-mode", choices=update_modes.SERVED, default=update_modes.DEFAULT_SERVED,
                        help="strict: vLLM pauses at a step boundary for each update; concurrent: never pauses")
    parser.add_argument("--model", type=Path, default=None,
                        help="serve this model directory instead of building the tiny Qwen3.5 (e.g. on a GPU)")
    parser.add_argument("--vllm-args", default=" ".join(CPU_SERVE_ARGS),
                        help="arguments passed to vLLM (default, for CPU: %(default)r); on a GPU e.g. "
                        "'--max-model-len 4096 --gpu-memory-utilization 0.6'")
    parser.add_argument("--timeout", type=float, default=600, help="give up after this many seconds of training")


@dataclass
class ChatLoad:
    """Keeps chatting with vLLM in the background, counting answers and failures."""

    served: ServedModel
    ok: int = 0
    failed: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        prompts = ["tell me a story", "what is a house", "say something"]
        i = 0
        while not self._stop.is_set():
            try:
                self.served.chat([{"role": "user", "content": prompts[i % len(prompts)]}], max_tokens=8)
                self.ok += 1
            except Exception as err:  # noqa: BLE001 - every failure is counted and reported
                self.failed.append(repr(err))
            i += 1

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=120)


def ask(served: ServedModel, question: str) -> str:
    reply = served.chat([{"role": "user", "content": question}], max_tokens=8)
    return reply["choices"][0]["message"]["content"].strip()


def run(args: argparse.Namespace) -> int:
    configure_logging("WARNING")
    from tqdm import tqdm

    from weightshare.tiny_model import build_tiny_model

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if (out / "state").exists():  # a demo starts from scratch: no resumed trainer state
        shutil.rmtree(out / "state")
    started = time.monotonic()
    if args.model is None:
        print(f"[1/5] building the tiny Qwen3.5 in {out / 'model'}")
        shutil.rmtree(out / "model", ignore_errors=True)
        model_dir = build_tiny_model("qwen3_5", out / "model")
    else:
        model_dir = args.model.resolve()
        print(f"[1/5] serving {model_dir}")
    print("[2/5] starting vLLM with the weight-export service (about a minute on 2 cores)")
    served = ServedModel(model_dir, f"unix://{out}/inference.sock", update_mode=args.update_mode,
                         extra_args=shlex.split(args.vllm_args), log_path=out / "serve.log", startup_timeout_s=900)
    trainer = TrainerProcess(
        served.grpc_address, f"unix://{out}/trainer.sock", out / "state", log_path=out / "train.log",
        flags=["--optimizer", args.optimizer, "--lr", str(args.lr), "--examples-per-step",
               str(args.examples_per_step), "--update-mode", args.update_mode],
    )
    try:
        served.start()
        before = ask(served, args.question)
        print(f"      vLLM, before: {args.question!r} -> {before!r}")
        print("[3/5] starting the trainer (attaches to vLLM's weights, no copy)")
        trainer.start()
        history, learned_at, load = _train(args, served, trainer, tqdm)
        after = ask(served, args.question)
        print(f"[4/5] vLLM, after:  {args.question!r} -> {after!r}")
        status = epb_grpc.WeightExportServiceStub(grpc_util.open_sync_channel(served.grpc_address)).GetExportStatus(
            epb.GetExportStatusRequest()
        )
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the trainer and vLLM")
        return 130
    finally:
        trainer.stop()
        served.stop()
    print(f"[5/5] report: {out / 'report.md'}, plot: {out / 'loss.png'}")
    _write_report(args, out, before, after, history, learned_at, load, status, time.monotonic() - started)
    learned = after.startswith(args.answer)
    print(("learned" if learned else "NOT learned") + f": the answer is now {after!r}")
    return 0 if learned else 1


def _train(args, served: ServedModel, trainer: TrainerProcess, tqdm):
    stub = tpb_grpc.TrainerServiceStub(grpc_util.open_sync_channel(trainer.grpc_address))
    example = tpb.Example(chat=tpb.ChatExample(messages=[
        tpb.ChatMessage(role="user", content=args.question),
        tpb.ChatMessage(role="assistant", content=args.answer),
    ]))
    steps = args.examples // args.examples_per_step
    history: list[tpb.StreamProgressResponse] = []
    learned_at = None
    progress = stub.StreamProgress(tpb.StreamProgressRequest())
    with ChatLoad(served) as load, tqdm(total=steps, desc="training", unit="step") as bar:
        for _ in range(0, args.examples, 4):  # stream the examples in small batches
            stub.SubmitExamples(tpb.SubmitExamplesRequest(examples=[example] * 4))
        deadline = time.monotonic() + args.timeout
        try:
            for event in progress:
                if event.kind == tpb.PROGRESS_KIND_STEP:
                    history.append(event)
                    bar.update(1)
                    bar.set_postfix(loss=f"{event.loss:.3f}", version=event.weights_version,
                                    paused_ms=f"{proto_time.seconds(event.paused_duration) * 1000:.0f}")
                    if learned_at is None and ask(served, args.question).startswith(args.answer):
                        learned_at = event.step
                elif event.kind == tpb.PROGRESS_KIND_SKIPPED:
                    bar.write(f"step skipped: {event.message}")
                if (event.pending_examples == 0 and len(history) >= steps) or time.monotonic() > deadline:
                    break
        except grpc.RpcError as err:
            bar.write(f"progress stream ended: {err.code().name} {err.details()}")
        finally:
            progress.cancel()
    return history, learned_at, load


def _write_report(args, out: Path, before, after, history, learned_at, load, status, seconds) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([e.step for e in history], [e.loss for e in history], marker="o")
    if learned_at is not None:
        ax.axvline(learned_at, color="green", linestyle="--", label=f"vLLM answers it (step {learned_at})")
        ax.legend()
    ax.set_xlabel("optimizer step (= weights version)")
    ax.set_ylabel("loss per target token")
    ax.set_title("tiny Qwen3.5 learning while vLLM serves it")
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    rows = "\n".join(
        f"| {e.step} | {e.loss:.4f} | {e.grad_norm:.3f} | {e.weights_version} | "
        f"{proto_time.seconds(e.paused_duration) * 1000:.1f} | {proto_time.seconds(e.step_duration):.2f} |"
        for e in history
    )
    report = f"""# weightshare demo

- Question: `{args.question}`; taught answer: `{args.answer}`
- vLLM before training: `{before}`
- vLLM after training: `{after}` ({"learned" if after.startswith(args.answer) else "not learned"})
- First step after which vLLM answered with it: {learned_at if learned_at is not None else "never"}
- Optimizer {args.optimizer}, lr {args.lr}, {args.examples} examples, {args.examples_per_step} per step,
  update mode {args.update_mode}
- Weights version now {status.identity.weights_version}; {status.commits} commits, {status.aborts} aborts;
  serving paused {proto_time.seconds(status.total_paused_duration) * 1000:.0f} ms in total
- Chat requests served to a background client during training: {load.ok} succeeded, {len(load.failed)} failed
- Whole demo: {seconds:.0f} s

![loss](loss.png)

| step | loss | grad norm | weights version | paused ms | step s |
|---|---|---|---|---|---|
{rows}
"""
    (out / "report.md").write_text(report)
    (out / "progress.json").write_text(json.dumps([
        {"step": e.step, "loss": e.loss, "weights_version": e.weights_version} for e in history
    ], indent=1))

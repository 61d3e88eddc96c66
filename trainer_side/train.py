"""`weightshare train`: attach to a served model, train it in place, serve TrainerService until stopped.

Attaches to WeightExportService at --inference, binds an HF model to vLLM's weights (zero-copy), builds
APOLLO / APOLLO-Mini (APOLLO-Mini for embeddings and lm_head, AdamW for norms and the rest), resumes
optimizer state and the data cursor from the newest checkpoint in --state-dir (writing its weights back
into vLLM if the served ones differ: ahead, behind or torn), and serves TrainerService on --grpc. Examples
submitted over gRPC are persisted in --state-dir before they are acknowledged, then trained on as they
arrive (unless --no-autostart: then StartTraining starts the loop). SIGTERM/SIGINT: finish the current
step, write a checkpoint, detach (a second signal skips the checkpoint).

Example:
    weightshare serve ./tiny-qwen3_5 --grpc unix:///tmp/ws.sock &
    weightshare train --inference unix:///tmp/ws.sock --grpc unix:///tmp/trainer.sock \\
        --state-dir ./run1 --optimizer apollo_mini --lr 1e-3 --examples-per-step 4 --checkpoint-every 50
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

import structlog

from trainer_side.defaults import DEFAULT_LR
from weightshare import grpc_util, update_modes
from weightshare.errors import UsageError
from weightshare.logs import configure_command_logging

log = structlog.get_logger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n", 1)[1]
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    token = os.environ.get("WEIGHTSHARE_TOKEN")
    parser.add_argument(
        "--inference", default=grpc_util.default_socket_address("inference"),
        help="WeightExportService address of `weightshare serve` (default: %(default)s)",
    )
    parser.add_argument(
        "--grpc", default=grpc_util.default_socket_address("trainer"),
        help="address to serve TrainerService on: unix:///path.sock or host:port (default: %(default)s)",
    )
    parser.add_argument(
        "--state-dir", required=True, type=Path,
        help="where submitted examples (examples.jsonl) and checkpoints (checkpoints/step-N) live; "
        "restarting on the same directory resumes where the trainer left off",
    )
    parser.add_argument(
        "--token", default=token,
        help="require 'authorization: Bearer TOKEN' on TrainerService calls (default: $WEIGHTSHARE_TOKEN; none)",
    )
    parser.add_argument(
        "--allow-unauthenticated", action="store_true",
        help="serve --grpc on a host:port beyond loopback without --token (refused otherwise)",
    )
    parser.add_argument(
        "--inference-token", default=token,
        help="bearer token for WeightExportService (default: $WEIGHTSHARE_TOKEN; none)",
    )
    parser.add_argument("--name", default="weightshare-train", help="trainer name shown by the inference side")
    parser.add_argument(
        "--take-over", action="store_true",
        help="take the served model's writer lease from the trainer holding it (its session ends; one trainer "
        "writes a model at a time). Without it, a second trainer is refused with the holder's name",
    )
    parser.add_argument(
        "--optimizer", choices=["apollo", "apollo_mini"], default="apollo_mini",
        help="APOLLO (rank 256, per-channel scaling) or APOLLO-Mini (rank 1, per-tensor) for the projection "
        "matrices (default: %(default)s)",
    )
    parser.add_argument(
        "--other-params", choices=["adamw", "frozen"], default="adamw",
        help="norms, conv1d, A_log and the other non-projection parameters (embeddings and lm_head: see "
        "--embeddings): train with AdamW or freeze (default: %(default)s)",
    )
    parser.add_argument(
        "--lr", type=float, default=DEFAULT_LR,
        help="peak learning rate (default: %(default)s, for models of billions of parameters; a tiny random "
        "model needs ~5e-3)",
    )
    parser.add_argument("--warmup-steps", type=int, default=0, help="linear LR warm-up steps (default: none)")
    parser.add_argument(
        "--examples-per-step", type=int, default=1,
        help="examples per optimizer step, one micro-batch each, gradients accumulated (default: %(default)s)",
    )
    parser.add_argument(
        "--max-steps", type=int, default=0, help="stop the loop after this many steps (default: 0, never)"
    )
    parser.add_argument(
        "--checkpoint-every", type=int, default=0,
        help="checkpoint every N steps (default: 0: only on stop, at --max-steps and on request)",
    )
    parser.add_argument("--keep-checkpoints", type=int, default=2, help="checkpoints kept (0: all; default 2)")
    parser.add_argument(
        "--max-seq-len", type=int, default=2048, help="longest example accepted, in tokens (default: %(default)s)"
    )
    parser.add_argument(
        "--update-mode", choices=update_modes.EXPECTED, default=update_modes.AUTO,
        help="expected update mode of the inference side, which decides it (`weightshare serve --update-mode`): "
        "strict pauses serving during each write, concurrent never does; auto accepts either",
    )
    parser.add_argument(
        "--max-pause", type=float, default=0.0,
        help="seconds vLLM may stay paused per update before it aborts the update (default: server's, 30)",
    )
    parser.add_argument(
        "--gradient-checkpointing", action="store_true",
        help="recompute each decoder layer's activations in backward (less memory, ~1/3 more compute)",
    )
    parser.add_argument(
        "--fused-step", action="store_true",
        help="apply each parameter's update during backward and free its gradient at once: gradients never all "
        "exist (a 27B model trains beside vLLM on one 80 GB GPU this way). One backward per step, so "
        "--examples-per-step examples form one micro-batch; strict mode pauses serving for the whole backward",
    )
    parser.add_argument(
        "--kernel-warmup", action=argparse.BooleanOptionalAction, default=None,
        help="with --fused-step: one backward whose gradients are dropped before the first update, so GPU "
        "kernels compile and autotune while vLLM serves, not while it is paused (default: on CUDA only)",
    )
    parser.add_argument(
        "--micro-batch-size", type=int, default=0,
        help="examples per forward/backward pass, right-padded (default: all of --examples-per-step with "
        "--fused-step, else 1)",
    )
    parser.add_argument(
        "--embeddings", choices=["apollo_mini", "adamw", "frozen"], default="apollo_mini",
        help="token embedding and lm_head matrices: APOLLO-Mini (no per-element state), AdamW (8 bytes of "
        "state per parameter: ~20 GB at Qwen3.5-27B) or frozen (default: %(default)s)",
    )
    parser.add_argument(
        "--loss-chunk-tokens", type=int, default=1024,
        help="cross-entropy over this many target positions at a time, so full-vocabulary fp32 logits never "
        "exist for a whole sequence (0: all at once; default: %(default)s)",
    )
    parser.add_argument(
        "--memory-report", action="store_true",
        help="log what the trainer holds after every step (peak memory, gradients, optimizer state)",
    )
    parser.add_argument(
        "--no-autostart", dest="autostart", action="store_false",
        help="do not start the training loop until a StartTraining call",
    )
    parser.add_argument(
        "--torch-threads", type=int, default=0,
        help="torch CPU threads (default: 1 when the served weights are on the CPU, else torch's choice). On a "
        "CPU shared with vLLM, vLLM's worker keeps its cores busy and multi-threaded torch kernels stall at "
        "every barrier",
    )
    parser.add_argument(
        "--metrics-port", type=int, default=None,
        help="serve Prometheus metrics (steps, loss, tokens/s, pending examples, checkpoint age, ...) at "
        "http://--metrics-host:PORT/metrics (0: any free port, logged; default: off)",
    )
    parser.add_argument("--metrics-host", default="127.0.0.1", help="address for --metrics-port (default: %(default)s)")
    parser.add_argument("--log-level", default="INFO", help="log level (default: %(default)s)")


def _load_tokenizer(model_dir: str):
    """The served model's tokenizer, or None (then only token examples are accepted)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        log.warning("no tokenizer for the served model: chat examples will be refused", model=model_dir,
                    error=str(err))
        return None


def run(args: argparse.Namespace) -> int:
    configure_command_logging(args.log_level)
    from trainer_side.trainer_config import TrainerConfig
    from weightshare.v1 import tensors_pb2

    config = TrainerConfig.from_args(args)
    weights = _lock_and_attach(config, config.take_over)
    if weights is None:
        return 1
    threads = config.torch_threads or (1 if weights.identity.device_kind == tensors_pb2.DEVICE_KIND_CPU else 0)
    if threads:
        import torch

        torch.set_num_threads(threads)
    return _train(config, weights)  # closes `weights`


def _attach(config, take_over: bool):
    from trainer_side.attach import attach

    return attach(config.inference, token=config.inference_token, trainer_name=config.name, take_over=take_over)


def _lock_and_attach(config, take_over: bool):
    """Locks the state directory, then attaches as the writer; None (logged) when attaching fails.

    The directory is locked first: a trainer refused for a busy directory must not have taken the writer
    lease (with --take-over) from the one using it. A directory this run created is removed again if
    attaching fails: nothing is left behind when there is nothing to train.
    """
    from trainer_side.attach import AttachError
    from trainer_side.state_lock import LOCK_FILE, StateDirInUse, lock_state_dir

    created = not config.state_dir.exists()
    config.state_dir.mkdir(parents=True, exist_ok=True)
    try:
        lock_state_dir(config.state_dir)  # its descriptor stays open: the lock is held until this process ends
    except StateDirInUse as err:
        raise UsageError(str(err)) from None
    try:
        return _attach(config, take_over)
    except AttachError as err:
        if created:
            (config.state_dir / LOCK_FILE).unlink(missing_ok=True)
            config.state_dir.rmdir()
        log.error("cannot attach to the inference side", address=config.inference, error=str(err))
        return None


def _train(config, weights) -> int:
    """Binds the model, builds the optimizer and the loop, and serves until a signal."""
    from trainer_side.hf_model import BindError, build_shared_model
    from weightshare.v1 import update_mode_pb2

    expected = config.update_mode
    if expected != update_mode_pb2.UPDATE_MODE_UNSPECIFIED and weights.info.update_mode != expected:
        served_mode = update_mode_pb2.UpdateMode.Name(weights.info.update_mode)
        weights.close()
        raise UsageError(f"the inference side runs {served_mode}, not --update-mode {update_modes.cli_name(expected)}: "
                         "restart it with `weightshare serve --update-mode` or pass --update-mode auto")
    try:
        shared = build_shared_model(weights)
    except BindError as err:
        weights.close()
        log.error("cannot bind an HF model to the served weights", error=str(err))
        return 1
    try:
        return _train_bound(config, shared)
    finally:
        shared.weights.close()  # the current attachment: a re-attach replaces the first one


def _train_bound(config, shared) -> int:
    from trainer_side.checkpoints import latest_checkpoint, read_checkpoint_state
    from trainer_side.data import ExampleStore, Renderer
    from trainer_side.param_groups import build_optimizer, preset

    optimizer = build_optimizer(shared.model, preset(
        config.optimizer, lr=config.loop.lr, other_policy=config.other_params, embeddings=config.embeddings))
    renderer = Renderer(_load_tokenizer(shared.weights.identity.model), shared.model.config.vocab_size,
                        config.max_seq_len)
    checkpoint = latest_checkpoint(config.state_dir)
    store = ExampleStore(config.state_dir, read_checkpoint_state(checkpoint)["cursor"] if checkpoint else 0)
    try:
        asyncio.run(_serve(config, shared, optimizer, store, renderer, checkpoint))
    finally:
        store.close()
    return 0


async def _serve(config, shared, optimizer, store, renderer, checkpoint) -> None:
    from trainer_side.checkpoint_writer import CheckpointInterrupted
    from trainer_side.inference_link import InferenceLink, make_consistent
    from trainer_side.loop import TrainingLoop
    from trainer_side.service import ProgressHub, ServiceLimits, start_trainer_server

    weights = shared.weights
    limits = ServiceLimits()
    hub = ProgressHub(asyncio.get_running_loop(), limits)
    publish = hub.publish_threadsafe
    progress = None
    if sys.stderr.isatty():  # off a terminal the JSON step logs say the same
        from trainer_side.progress_bar import TerminalProgress

        progress = TerminalProgress(store.cursor, store.pending)

        def publish(event):
            hub.publish_threadsafe(event)
            progress.on_event(event, store.cursor)

    loop = TrainingLoop(
        shared.model, optimizer, store, lambda: link.open_updates(), config.state_dir, weights.identity.model,
        config.loop, publish, tokenizer=renderer.tokenizer,
    )
    link = InferenceLink(weights, shared, loop, config.state_dir, lambda: _attach(config, take_over=False))
    if checkpoint is not None:
        loop.restore(checkpoint)
    make_consistent(loop, weights, checkpoint, config.state_dir)
    server = await start_trainer_server(
        loop, renderer, hub, config.grpc, config.token, link, weights.info.update_mode, limits
    )
    link.start()
    if config.metrics_port is not None:
        from trainer_side.metrics import serve_metrics

        port = serve_metrics(config.metrics_port, config.metrics_host, loop, link)
        log.info("metrics served", url=f"http://{config.metrics_host}:{port}/metrics")
    log.info("trainer ready", step=loop.counters.step, pending=store.pending, trained=store.cursor,
             optimizer=config.optimizer, state_dir=str(config.state_dir))
    if config.autostart:
        loop.start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping: finishing the current step, then a checkpoint (signal again to skip the checkpoint)")
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, loop.interrupt_checkpoint)
    try:
        step, path = await asyncio.to_thread(loop.stop, True)
    except CheckpointInterrupted:
        step, path = loop.counters.step, ""
        log.warning("checkpoint skipped on a second signal: restarting resumes from the previous one",
                    step=step, previous=loop.last_checkpoint)
    except OSError as err:  # e.g. a full disk: every example is still stored, nothing half-written remains
        step, path = loop.counters.step, ""
        log.error("final checkpoint failed: restarting resumes from the previous one and trains the examples "
                  "after it again", step=step, previous=loop.last_checkpoint or "none", error=str(err))
    await server.stop(grace_seconds=2.0)
    await asyncio.to_thread(link.stop_watching)
    if progress is not None:
        progress.close()
    log.info("trainer stopped", step=step, checkpoint=path)

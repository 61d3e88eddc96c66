"""The training loop: a thread that trains the shared model on pending examples, one update per step.

Each optimizer step (accumulating mode, the default):
  1. takes up to `examples_per_step` pending examples from the `ExampleStore` (waiting up to
     `batch_wait_s` for a full batch), `micro_batch_size` examples per right-padded forward/backward
     pass, gradients accumulated so the step minimises the mean loss per target token over all of them
     (cross-entropy in chunks of target positions: trainer_side/loss.py);
  2. checks the loss and the gradient norm: if either is not finite the step is SKIPPED before anything
     is paused or written (gradients dropped, examples consumed);
  3. runs the update protocol around the write: `begin(step)` (strict mode: vLLM pauses at a forward-step
     boundary; concurrent mode: no pause) -> `optimizer.step()` (writes in place into vLLM's memory) ->
     `commit(step)` (new weights version, prefix cache reset, serving resumes);
  4. publishes a progress event (`weightshare.v1.StreamProgressResponse`).
In fused mode (`fused_step`, trainer_side/fused.py) one micro-batch is the step: forward, loss check,
`begin`, then backward applies each parameter's update as its gradient completes, then `commit`.
Gradients are cleared before every step, so a step that failed never leaks into the next try.

Checkpoints (every `checkpoint_every` steps, at max_steps, and on request) are step-numbered
directories in the state dir with the weights, the tokenizer, the optimizer state and the counters
(trainer_side/checkpoints.py writes, finds and prunes them).

Resuming (`TrainingLoop.restore`) loads the optimizer state and the counters; the weights themselves
already live in vLLM, which kept serving (trainer_side/inference_link.py writes them back when they do
not match). When an update call fails (the inference side went away), the step holds instead of
failing: nothing written yet means it is simply tried again; a finished write whose commit failed
becomes `pending_commit`, committed by the link once serving is back (`finish_pending`).

Relies on torch and the attached `UpdateStream`. Run through `weightshare train` (trainer_side/train.py).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog
import torch
from torch import nn

from trainer_side.checkpoints import (  # noqa: F401 (the names callers have imported from here)
    CHECKPOINTS_DIR,
    OPTIMIZER_FILE,
    STATE_FILE,
    checkpoint_dir_for,
    latest_checkpoint,
    prune_checkpoints,
    read_checkpoint_state,
    write_checkpoint,
)
from trainer_side.data import ExampleStore, TokenizedExample
from trainer_side.defaults import DEFAULT_LR
from trainer_side.fused import FusedUpdates
from trainer_side.loss import loss_sum, pad_micro_batch
from trainer_side.memory import memory_report
from weightshare import proto_time
from weightshare.failpoints import failpoint
from weightshare.v1 import trainer_service_pb2 as pb

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class LoopConfig:
    """Settings of the training loop (StartTraining may override lr, max_steps and examples_per_step)."""

    lr: float = DEFAULT_LR
    """Peak learning rate of every param group."""
    warmup_steps: int = 0
    """Linear warm-up from lr/warmup_steps to lr over this many steps (0: constant lr)."""
    examples_per_step: int = 1
    """Examples per optimizer step; each is one micro-batch and gradients accumulate over them."""
    max_steps: int = 0
    """Stop after this many steps of one run (counted from StartTraining); 0 runs until stopped."""
    checkpoint_every: int = 0
    """Write a checkpoint every this many steps (0: only at max_steps, on stop and on request)."""
    keep_checkpoints: int = 2
    """Step-numbered checkpoints kept in state_dir/checkpoints; older ones are deleted (0 keeps all)."""
    batch_wait_s: float = 1.0
    """How long a step waits for a full batch before training on the examples pending."""
    max_pause_s: float = 0.0
    """Longest time vLLM may stay paused for one update before the server aborts it (0: its default)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    micro_batch_size: int = 1
    """Examples per forward/backward pass, right-padded to the longest; examples_per_step / this many
    passes accumulate into one step."""
    fused_step: bool = False
    """Apply each parameter's update during backward and free its gradient (trainer_side/fused.py):
    gradients never all exist at once. Needs examples_per_step == micro_batch_size."""
    loss_chunk_tokens: int = 1024
    """Cross-entropy over this many target positions at a time (0: all at once)."""
    memory_report: bool = False
    """Log what the trainer holds (peak memory, gradients, optimizer state) after every step."""
    kernel_warmup: bool | None = None
    """Fused steps: run one backward whose gradients are dropped before the first update, so kernels
    compile and autotune while vLLM serves instead of while it is paused (None: on CUDA only; on an H100 the
    first fused step of the 27B shape with flash-linear-attention paused serving for 118 s without it)."""

    def __post_init__(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr {self.lr} must be a positive number")
        for name in ("warmup_steps", "max_steps", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} {getattr(self, name)} must not be negative")
        if self.examples_per_step < 1:
            raise ValueError(f"examples_per_step {self.examples_per_step} must be at least 1")
        if self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size {self.micro_batch_size} must be at least 1")
        if self.loss_chunk_tokens < 0:
            raise ValueError(f"loss_chunk_tokens {self.loss_chunk_tokens} must not be negative")
        if self.fused_step and self.examples_per_step != self.micro_batch_size:
            raise ValueError(
                f"a fused step applies every update during its one backward pass, so examples_per_step "
                f"{self.examples_per_step} must equal micro_batch_size {self.micro_batch_size} (no accumulation)"
            )


@dataclass
class Counters:
    """What the loop has done, saved in trainer_state.json and restored on resume."""

    step: int = 0
    """Optimizer steps committed."""
    weights_version: int = 0
    """Inference-side weights version after the last commit."""
    skipped_steps: int = 0
    """Steps skipped because the loss or gradient norm was not finite."""
    last_loss: float = 0.0
    """Loss of the last committed step."""


class InferenceUnavailable(Exception):
    """An update call failed: the step holds until the inference side is usable again (InferenceLink)."""


@dataclass
class PendingCommit:
    """A step whose write finished in memory but whose commit failed: committed once serving is back."""

    step: int
    finish: Callable  # (UpdateWeightsResponse) -> StreamProgressResponse: the step's bookkeeping


class TrainingLoop:
    """Owns the model, optimizer and example store while training; thread-safe start/stop/checkpoint."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        store: ExampleStore,
        open_updates: Callable[[], object],
        state_dir: Path,
        model_dir: str,
        config: LoopConfig,
        publish: Callable[[pb.StreamProgressResponse], None],
        weights_version: int = 0,
        tokenizer=None,
    ):
        """`open_updates()` returns a new UpdateStream (begin/commit/abort/close); `publish` receives
        every progress event, from the loop's thread; `model_dir` names the served model (its
        tokenizer is loaded from there for checkpoints when `tokenizer` is None)."""
        self.model = model
        self.optimizer = optimizer
        self.store = store
        self.state_dir = Path(state_dir)
        self.model_dir = model_dir
        self._tokenizer = tokenizer
        self.config = config  # the running (or last) run's settings
        self.base_config = config  # the trainer's configured settings; overrides never change them
        self._open_updates = open_updates
        self._publish = publish
        self.counters = Counters(weights_version=weights_version)
        self.last_checkpoint = ""
        self.error = ""
        # Set while the inference side is usable; the loop starts no step while it is clear.
        self.inference_ready = threading.Event()
        self.inference_ready.set()
        self.on_inference_lost: Callable[[str], None] = lambda why: None
        self.pending_commit: PendingCommit | None = None
        self.weights_torn = False  # a write failed half-way: this process's weights are not one step's
        self.last_tokens_per_second = 0.0
        self._params = [p for group in optimizer.param_groups for p in group["params"]]
        self._initial_optimizer_state = optimizer.state_dict()  # for a restart from the served files
        self._device = self._params[0].device
        # Held for a whole step and for a checkpoint, so a checkpoint always sees committed weights.
        self._step_lock = threading.Lock()
        self._checkpoint_interrupted = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._updates = None  # the UpdateStream of the running loop
        model.train()  # HF only checkpoints activations in training mode
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self._pad_id = getattr(model.config, "pad_token_id", None) or 0
        self._fused: FusedUpdates | None = None
        self._warmed_up = False  # kernels compiled by a dropped backward (`kernel_warmup`)
        self._configure_fused()
        self._schedule()

    def _configure_fused(self) -> None:
        """Attach or detach the backward hooks of fused steps to match `self.config`."""
        if self.config.fused_step and self._fused is None:
            self._fused = FusedUpdates(self.optimizer, dict(self.model.named_parameters()))
        elif not self.config.fused_step and self._fused is not None:
            self._fused.remove()
            self._fused = None

    # ---- control, called from the service's threads ----

    @property
    def step_lock(self) -> threading.Lock:
        """Held for a whole step: whoever holds it sees committed (or pending-commit) weights."""
        return self._step_lock

    def restore(self, checkpoint: Path) -> None:
        """Loads optimizer state and counters from `checkpoint` (the store was opened at its cursor)."""
        state = read_checkpoint_state(checkpoint)
        self.optimizer.load_state_dict(torch.load(checkpoint / OPTIMIZER_FILE, map_location=self._device))
        self.counters = Counters(**state["counters"])
        self.last_checkpoint = str(checkpoint)
        self._schedule()
        log.info("resumed", checkpoint=str(checkpoint), step=self.counters.step, cursor=state["cursor"])

    def reset_to(self, checkpoint: Path | None) -> None:
        """Optimizer state, counters and data cursor of `checkpoint`, or of a fresh start when None.

        Called with the step lock held, after the checkpoint's (or the served files') weights were written.
        """
        if checkpoint is not None:
            self.restore(checkpoint)
            self.store.rewind(read_checkpoint_state(checkpoint)["cursor"])
        else:
            self.optimizer.load_state_dict(self._initial_optimizer_state)
            self.counters = Counters(weights_version=self.counters.weights_version)
            self.store.rewind(0)
            self._schedule()
        self.optimizer.zero_grad(set_to_none=True)
        self.pending_commit = None
        self.weights_torn = False

    def finish_pending(self, ack) -> None:
        """Records the pending step as committed by `ack` (a commit made after serving came back)."""
        pending, self.pending_commit = self.pending_commit, None
        self._publish(pending.finish(ack))

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, config: LoopConfig | None = None) -> tuple[bool, int]:
        """Starts the loop thread (with `config` replacing the current settings); (already_running, step)."""
        if self.running:
            return True, self.counters.step
        # Overrides apply to this run only: a start without them runs with the configured settings.
        self.config = config if config is not None else self.base_config
        self._configure_fused()
        self._schedule()
        self._stop.clear()
        self.error = ""
        self._thread = threading.Thread(target=self._run, name="training-loop", daemon=True)
        self._thread.start()
        return False, self.counters.step

    def stop(self, checkpoint: bool) -> tuple[int, str]:
        """Stops after the current step (or within `batch_wait_s` when idle) and waits for it;
        returns (last step, checkpoint path or "")."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        path = self.save_checkpoint() if checkpoint else ""
        return self.counters.step, path

    def status(self) -> pb.GetTrainingStatusResponse:
        c = self.counters
        return pb.GetTrainingStatusResponse(
            running=self.running, step=c.step, weights_version=c.weights_version,
            pending_examples=self.store.pending, trained_examples=self.store.cursor, last_loss=c.last_loss,
            last_checkpoint=self.last_checkpoint, skipped_steps=c.skipped_steps, last_error=self.error,
        )

    def with_overrides(self, overrides: pb.TrainingOverrides) -> LoopConfig:
        """The configured settings with the non-zero fields of `overrides` applied (ValueError if invalid)."""
        changes = {}
        if overrides.learning_rate:
            changes["lr"] = overrides.learning_rate
        if overrides.max_steps:
            changes["max_steps"] = overrides.max_steps
        if overrides.examples_per_step:
            changes["examples_per_step"] = overrides.examples_per_step
            if self.base_config.fused_step:  # a fused step is one micro-batch
                changes["micro_batch_size"] = overrides.examples_per_step
        return dataclasses.replace(self.base_config, **changes)

    # ---- the loop thread ----

    def _run(self) -> None:
        start_step = self.counters.step
        reason = "stopped on request"
        self._updates = None
        try:
            while not self._stop.is_set():
                if self.config.max_steps and self.counters.step - start_step >= self.config.max_steps:
                    reason = f"max_steps {self.config.max_steps} reached"
                    break
                if not self.inference_ready.wait(timeout=0.5):
                    continue  # the inference side is gone or restarting: hold (InferenceLink recovers)
                if self._updates is None:
                    self._updates = self._open_updates()
                batch = self._next_batch()
                if not batch:
                    continue
                with self._step_lock:
                    try:
                        event = self._train_step(batch)
                    except InferenceUnavailable as lost:
                        self._hold(str(lost))
                        continue
                self._publish(event)
                every = self.config.checkpoint_every
                if every and event.kind == pb.PROGRESS_KIND_STEP and self.counters.step % every == 0:
                    self._periodic_checkpoint()
        except grpc.RpcError as err:
            self.error = reason = f"update protocol failed: {err.code().name}: {err.details()}"
        except Exception as err:  # surfaced in the STOPPED event and status; the service keeps running
            log.exception("training loop failed")
            self.error = reason = f"training loop failed: {type(err).__name__}: {err}"
        finally:
            if self._updates is not None:
                self._updates.close()
        if reason.startswith("max_steps"):
            try:
                self.save_checkpoint()
            except OSError as err:  # e.g. a full disk: the weights stay served, say so instead of dying
                log.error("checkpoint at max_steps failed", step=self.counters.step, error=str(err))
                self.error = reason = f"{reason}; checkpoint failed: {err}"
        log.info("training loop stopped", reason=reason, step=self.counters.step)
        self._publish(self._event(pb.PROGRESS_KIND_STOPPED, message=reason))

    def _periodic_checkpoint(self) -> None:
        """A full disk must not stop training: the weights stay served, the previous checkpoint stays."""
        try:
            self.save_checkpoint()
        except OSError as err:
            self.error = (f"checkpoint at step {self.counters.step} failed ({err}); training goes on and "
                          f"{self.last_checkpoint or 'no checkpoint'} stays the newest: free space")
            log.error("periodic checkpoint failed", step=self.counters.step, error=str(err),
                      newest=self.last_checkpoint)

    def _next_batch(self) -> list[TokenizedExample]:
        n = self.config.examples_per_step
        batch = self.store.peek(n, timeout_s=0.5)
        if batch and len(batch) < n:
            self.store.wait_for_pending(n, self.config.batch_wait_s)
            batch = self.store.peek(n, timeout_s=0)
        return [] if self._stop.is_set() else batch

    def _schedule(self) -> None:
        """torch's LambdaLR over the run's settings, positioned at the next step: linear warm-up from
        lr/warmup_steps to lr over warmup_steps steps, then constant. Rebuilt for every run and restore."""
        warmup = self.config.warmup_steps
        for group in self.optimizer.param_groups:
            group["initial_lr"] = self.config.lr
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # see _advance_schedule
            self._scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0,
                last_epoch=self.counters.step - 1,
            )

    def _advance_schedule(self) -> None:
        with warnings.catch_warnings():
            # Fused steps update inside backward and never call optimizer.step(), which torch warns about.
            warnings.simplefilter("ignore", UserWarning)
            self._scheduler.step()

    def _hold(self, why: str) -> None:
        """Stop starting steps until the inference side is usable again; the link is told to check now."""
        self.inference_ready.clear()
        self._updates.close()
        self._updates = None  # reopened (on the current attachment) once serving is back
        log.warning("training holds: the inference side is not usable", why=why,
                    pending_commit=self.pending_commit.step if self.pending_commit else None)
        self.on_inference_lost(why)

    def _begin(self, step: int) -> None:
        """`begin` on the update stream, reopening it once if it broke while idle (nothing written yet)."""
        try:
            try:
                self._updates.begin(step, self.config.max_pause_s)
            except grpc.RpcError as err:
                if err.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                    raise
                log.warning("update stream broke while idle; reopening", code=err.code().name,
                            details=err.details())
                self._updates.close()
                self._updates = self._open_updates()
                self._updates.begin(step, self.config.max_pause_s)
        except grpc.RpcError as err:  # nothing written: the step is simply tried again later
            raise InferenceUnavailable(f"begin of step {step} failed: {err.code().name}: {err.details()}") from None

    def _micro_batches(self, batch: list[TokenizedExample]) -> list[list[TokenizedExample]]:
        size = self.config.micro_batch_size
        return [batch[i : i + size] for i in range(0, len(batch), size)]

    def _loss_sum(self, micro: list[TokenizedExample]) -> torch.Tensor:
        ids, attention, targets = pad_micro_batch(micro, self._device, self._pad_id)
        return loss_sum(self.model, ids, attention, targets, self.config.loss_chunk_tokens)

    def _skip(self, batch, mean_loss: float, grad_norm: float, lr: float, tokens: int, why: str):
        self.optimizer.zero_grad(set_to_none=True)
        self.store.consume(len(batch))
        self.counters.skipped_steps += 1
        log.warning("step skipped", step=self.counters.step + 1, loss=mean_loss, grad_norm=grad_norm, why=why)
        return self._event(
            pb.PROGRESS_KIND_SKIPPED, loss=mean_loss, grad_norm=grad_norm, tokens=tokens, learning_rate=lr,
            message=why,
        )

    def _sync(self) -> None:
        if self._device.type == "cuda":
            # Kernels run asynchronously and vLLM reads from another process: every write must have
            # landed before commit lets serving resume.
            torch.cuda.synchronize(self._device)

    def _train_step(self, batch: list[TokenizedExample]) -> pb.StreamProgressResponse:
        t0 = time.perf_counter()
        if self._device.type == "cuda" and self.config.memory_report:
            torch.cuda.reset_peak_memory_stats(self._device)
        lr = self._scheduler.get_last_lr()[0]
        tokens = sum(e.target_tokens for e in batch)
        step = self.counters.step + 1
        # A failed earlier try must not leak its gradients into this one.
        self.optimizer.zero_grad(set_to_none=True)
        if self._fused is not None:
            if not self._warmed_up and self._wants_warmup():
                self._warm_up(batch, tokens)
                t0 = time.perf_counter()
            return self._fused_step(batch, step, lr, tokens, t0)
        loss_sum_value = 0.0
        for micro in self._micro_batches(batch):
            loss = self._loss_sum(micro)
            # Dividing by the step's target tokens makes the accumulated gradient that of the mean loss.
            (loss / tokens).backward()
            loss_sum_value += loss.item()
        mean_loss = loss_sum_value / tokens
        grads = [p.grad for p in self._params if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads).item() if grads else 0.0
        if not (math.isfinite(mean_loss) and math.isfinite(grad_norm)):
            # Checked before begin: nothing paused, nothing written.
            return self._skip(batch, mean_loss, grad_norm, lr, tokens,
                              f"non-finite loss {mean_loss} or grad norm {grad_norm}: no update applied")
        t_backward = time.perf_counter()
        failpoint("forward")
        self._begin(step)
        failpoint("paused")
        try:
            self.optimizer.step()
            self._sync()
        except BaseException as err:
            self._abort_after_failure(step, err)
            raise
        return self._committed(batch, step, lr, tokens, mean_loss, grad_norm, t0, t_backward - t0)

    def _wants_warmup(self) -> bool:
        warmup = self.config.kernel_warmup
        return self._device.type == "cuda" if warmup is None else warmup

    def _warm_up(self, batch: list[TokenizedExample], tokens: int) -> None:
        """One forward and backward of the first batch outside any update: gradients are freed as they come
        and nothing is written, so only the kernels' compilation and autotuning are left behind."""
        t0 = time.perf_counter()
        with self.optimizer.gradients_discarded():
            (self._loss_sum(batch) / tokens).backward()
        self._sync()
        self._warmed_up = True
        log.info("kernels warmed up before the first update", seconds=round(time.perf_counter() - t0, 3))

    def _fused_step(self, batch, step: int, lr: float, tokens: int, t0: float) -> pb.StreamProgressResponse:
        """Forward, loss check, begin, then backward applying each update (the pause spans backward)."""
        loss = self._loss_sum(batch)
        mean_loss = loss.item() / tokens
        if not math.isfinite(mean_loss):
            return self._skip(batch, mean_loss, 0.0, lr, tokens, f"non-finite loss {mean_loss}: no update applied")
        t_forward = time.perf_counter()
        failpoint("forward")
        self._fused.reset()
        self._begin(step)
        failpoint("paused")
        try:
            (loss / tokens).backward()
            self._sync()
        except BaseException as err:
            self._abort_after_failure(step, err)
            raise
        if self._fused.skipped:
            log.warning("non-finite gradients: those parameters were not updated", step=step,
                        skipped=len(self._fused.skipped), first=self._fused.skipped[0])
        return self._committed(batch, step, lr, tokens, mean_loss, self._fused.grad_norm, t0, t_forward - t0)

    def _abort_after_failure(self, step: int, err: BaseException) -> None:
        """Resume serving after a failed write; never hides `err` (an abort failure is only logged)."""
        self.weights_torn = True
        self.optimizer.zero_grad(set_to_none=True)
        try:
            self._updates.abort(f"optimizer step {step} failed: {type(err).__name__}: {err}")
        except (grpc.RpcError, RuntimeError) as abort_err:  # the stream may be the thing that broke
            log.error("abort after a failed step also failed", step=step, error=str(abort_err))

    def _committed(self, batch, step, lr, tokens, mean_loss, grad_norm, t0, compute_s) -> pb.StreamProgressResponse:
        finish = functools.partial(self._record_commit, batch, step, lr, tokens, mean_loss, grad_norm, t0, compute_s)
        failpoint("commit")
        try:
            ack = self._updates.commit(step)
        except grpc.RpcError as err:
            # The write finished in memory: commit it once serving is back (the same or a restarted engine).
            self.pending_commit = PendingCommit(step, finish)
            raise InferenceUnavailable(f"commit of step {step} failed: {err.code().name}: {err.details()}") from None
        return finish(ack)

    def _record_commit(self, batch, step, lr, tokens, mean_loss, grad_norm, t0, compute_s, ack):
        self.optimizer.zero_grad(set_to_none=True)
        self.counters.step = step
        self._advance_schedule()
        self.counters.weights_version = ack.weights_version
        self.counters.last_loss = mean_loss
        # Last: a status that shows these examples trained also shows the step and version that trained them.
        self.store.consume(len(batch))
        seconds = time.perf_counter() - t0
        paused = proto_time.seconds_of(ack, "paused_duration", "paused_seconds")
        self.last_tokens_per_second = tokens / seconds
        log.info("step", step=step, loss=round(mean_loss, 4), tokens=tokens, grad_norm=round(grad_norm, 4),
                 lr=lr, weights_version=ack.weights_version, compute_s=round(compute_s, 3),
                 update_s=round(seconds - compute_s, 3), paused_s=round(paused, 3))
        if self.config.memory_report:
            log.info("memory", step=step, **memory_report(self.model, self.optimizer, self._device))
        return self._event(
            pb.PROGRESS_KIND_STEP, loss=mean_loss, tokens=tokens, grad_norm=grad_norm, learning_rate=lr,
            paused_seconds=paused, paused_duration=proto_time.duration(paused), step_seconds=seconds,
            step_duration=proto_time.duration(seconds), tokens_per_second=tokens / seconds,
        )

    def _event(self, kind: int, **fields) -> pb.StreamProgressResponse:
        return pb.StreamProgressResponse(
            kind=kind, step=self.counters.step, weights_version=self.counters.weights_version,
            pending_examples=self.store.pending, **fields,
        )

    # ---- checkpoints ----

    def save_checkpoint(self, path: str | Path | None = None) -> str:
        """Writes a checkpoint of the committed state to `path` (default: step-numbered in the state dir)."""
        with self._step_lock:
            step = self.counters.step
            target = Path(path) if path else checkpoint_dir_for(self.state_dir, step)
            self._write_checkpoint(target)
            if not path:
                self.last_checkpoint = str(target)
                self._prune_checkpoints()
        log.info("checkpoint written", path=str(target), step=step)
        self._publish(self._event(pb.PROGRESS_KIND_CHECKPOINT, message=str(target)))
        return str(target)

    def interrupt_checkpoint(self) -> None:
        """Cut a checkpoint being written short (a second SIGTERM): its temporary directory is removed."""
        self._checkpoint_interrupted.set()

    def _write_checkpoint(self, target: Path) -> None:
        state = {
            "counters": dataclasses.asdict(self.counters), "cursor": self.store.cursor,
            "examples_total": self.store.total, "served_model": self.model_dir, "time": time.time(),
        }
        write_checkpoint(target, self.model, self.optimizer, self._checkpoint_tokenizer(), state,
                         should_stop=self._checkpoint_interrupted.is_set)

    def _checkpoint_tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
            except (OSError, ValueError) as err:
                log.warning("checkpoints carry no tokenizer: the served model's cannot be loaded",
                            model=self.model_dir, error=str(err))
                self._tokenizer = False
        return self._tokenizer or None

    def _prune_checkpoints(self) -> None:
        prune_checkpoints(self.state_dir, self.config.keep_checkpoints)

"""The trainer's link to its inference side: notices it gone, restarted or taken over, and recovers.

A thread asks GetExportStatus every `interval_s` (and at once when a step's update call fails):
  connected    the inference side answers with this trainer's instance and session: steps run.
  unreachable  no answer: health NOT_SERVING, steps hold, submitted examples are still stored; retried.
  restarted    another instance answers (or this session ended): re-attach, re-point every parameter at
               the new engine's memory, write the trainer's state into it and commit; connected again.
  lease lost   another trainer took the writer lease: permanent, until this trainer is restarted with
               --take-over.
What a restarted engine gets: the trainer's own weights (its last commit, plus a step whose write
finished but whose commit failed, committed now) when its old memory is still readable (CPU shared
memory outlives the engine process); otherwise the newest checkpoint (weights, optimizer state and data
cursor: the examples after it are trained again), or the served model's files when there is none.
The same write-and-commit makes the served weights consistent when a trainer starts (`make_consistent`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import grpc
import structlog

from trainer_side.attach import AttachedWeights, AttachError
from trainer_side.checkpoints import latest_checkpoint
from trainer_side.hf_model import BindError, SharedModel, rebind_shared_model
from trainer_side.loop import TrainingLoop
from trainer_side.restore import load_weights_into
from weightshare.v1 import weight_export_service_pb2 as export_pb

log = structlog.get_logger(__name__)
STATUS_TIMEOUT_S = 5.0


def _taken_over(event: export_pb.ExportEvent) -> bool:
    """Whether `event` reports a writer-lease take-over (by its kind; by the deprecated string from a server
    that predates ExportEventKind)."""
    if event.event_kind != export_pb.EXPORT_EVENT_KIND_UNSPECIFIED:
        return event.event_kind == export_pb.EXPORT_EVENT_KIND_WRITER_TAKEN_OVER
    return event.kind == "writer_taken_over"


def write_and_commit(loop: TrainingLoop, weights: AttachedWeights, source: Path | None, step: int):
    """One update on `weights`: copy `source`'s safetensors into the model (None: nothing), then commit."""
    with weights.update_stream() as updates:
        updates.begin(step=step)
        try:
            if source is not None:
                load_weights_into(loop.model, source)
        except BaseException as err:
            updates.abort(f"restoring {source} failed: {type(err).__name__}: {err}")
            raise
        return updates.commit(step=step)


def make_consistent(loop: TrainingLoop, weights: AttachedWeights, checkpoint: Path | None, state_dir: Path) -> None:
    """At trainer start: write the checkpoint's weights into vLLM when the served ones are not what it saved.

    Served version ahead (steps after the checkpoint were lost with the trainer), behind (vLLM restarted
    from its original weights) or torn (an update aborted mid-write): the checkpoint's weights, optimizer
    state and cursor are one consistent state, so they win; the examples after the cursor are trained
    again. Torn weights with no checkpoint go back to the served model's own files.
    """
    status = weights.stub.GetExportStatus(export_pb.GetExportStatusRequest(), metadata=weights.metadata)
    served = status.identity.weights_version
    saved = loop.counters.weights_version if checkpoint is not None else None
    if checkpoint is not None and (status.weights_torn or served != saved):
        source, why = checkpoint, (f"served weights are torn (step {status.torn_step})" if status.weights_torn
                                   else f"served weights version {served} is not the checkpoint's {saved}")
    elif checkpoint is None and status.weights_torn:
        source, why = Path(weights.identity.model), f"served weights are torn (step {status.torn_step})"
    else:
        loop.counters.weights_version = served
        return
    # Examples the previous run trained after this checkpoint: the restore undoes them, so they train again.
    replayed = max(0, loop.store.trained_by_previous_run - loop.store.cursor)
    log.warning("restoring the served weights", source=str(source), why=why, examples_to_train_again=replayed)
    ack = write_and_commit(loop, weights, source, loop.counters.step)
    loop.store.rewind(loop.store.cursor)  # records what the served weights now hold
    loop.counters.weights_version = ack.weights_version
    log.info("served weights restored", source=str(source), weights_version=ack.weights_version,
             examples_to_train_again=replayed)


class InferenceLink:
    """Owns the trainer's attachment; tells listeners whether the inference side is usable and why not."""

    def __init__(
        self, weights: AttachedWeights, shared: SharedModel, loop: TrainingLoop, state_dir: Path,
        attach_again: Callable[[], AttachedWeights], interval_s: float = 1.0,
    ):
        self.weights = weights
        self._shared = shared
        self._loop = loop
        self._state_dir = state_dir
        self._attach_again = attach_again
        self._interval_s = interval_s
        self.connected = True
        self.problem = ""
        self.permanent = False  # the lease was taken over: no recovery without a restart
        self._unpublished = False  # weights were written into the engine but not committed yet
        self._listeners: list[Callable[[bool, str], None]] = []
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="inference-link", daemon=True)
        loop.on_inference_lost = lambda why: self._wake.set()

    def open_updates(self):
        """An UpdateWeights stream on the current attachment (the loop's `open_updates`)."""
        return self.weights.update_stream()

    def add_listener(self, listener: Callable[[bool, str], None]) -> None:
        """`listener(connected, problem)` is called from the link's thread on every change."""
        self._listeners.append(listener)

    def start(self) -> None:
        self._thread.start()

    def stop_watching(self) -> None:
        """Ends the watcher thread (the attachment itself is closed by its owner)."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()

    def _set(self, connected: bool, problem: str) -> None:
        # The loop's flag follows every check (the loop clears it on its own when a call fails).
        (self._loop.inference_ready.set if connected else self._loop.inference_ready.clear)()
        if (connected, problem) == (self.connected, self.problem):
            return
        self.connected, self.problem = connected, problem
        if connected:
            log.info("inference side usable: training continues", address=self.weights.address)
        else:
            log.warning("inference side not usable", problem=problem)
        for listener in self._listeners:
            listener(connected, problem)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._interval_s)
            self._wake.clear()
            if self._stop.is_set() or self.permanent:
                continue
            try:
                self._check()
            except Exception as err:
                log.exception("recovery attempt failed; retrying")
                self._set(False, f"recovery failed ({type(err).__name__}: {err}); retrying")

    def _check(self) -> None:
        address = self.weights.address
        try:
            status = self.weights.stub.GetExportStatus(
                export_pb.GetExportStatusRequest(), metadata=self.weights.metadata, timeout=STATUS_TIMEOUT_S
            )
        except grpc.RpcError as err:
            self._set(False, f"inference side {address} does not answer ({err.code().name}): steps hold and "
                      "submitted examples are stored; the trainer re-attaches by itself once `weightshare serve` "
                      "is back")
            return
        session = self.weights.session_id
        if status.identity.instance_id != self.weights.identity.instance_id:
            self._recover("the inference side restarted")
        elif not any(t.session_id == session for t in status.trainers):
            taken = [e.message for e in status.events if _taken_over(e) and session in e.message]
            if taken:
                self.permanent = True
                self._set(False, f"writer lease lost ({taken[-1]}): this trainer no longer trains; restart it "
                          "with --take-over to take the model back")
            else:
                self._recover("this trainer's session ended on the inference side")
        elif self._loop.pending_commit is not None or self._loop.weights_torn or self._unpublished:
            self._recover_in_place()
        else:
            self._set(True, "")

    def _recover_in_place(self) -> None:
        """Same engine: commit a step whose commit failed, or restore after a write that failed half-way."""
        with self._loop.step_lock:
            self._publish_state(self.weights, own_weights_readable=True)
        self._set(True, "")

    def _recover(self, why: str) -> None:
        self._set(False, f"{why}: re-attaching")
        old = self.weights
        try:
            new = self._attach_again()
        except AttachError as err:
            self._set(False, f"{why}; re-attaching failed, retrying: {err}")
            return
        try:
            if (new.identity.model, new.identity.architecture) != (old.identity.model, old.identity.architecture):
                self.permanent = True
                self._set(False, f"{why} serving another model ({new.identity.model}, was {old.identity.model}): "
                          "restart the trainer for it")
                new.close()
                return
            # Shared memory outlives the engine; CUDA memory of a dead exporter cannot be trusted.
            readable = all(t.device.type == "cpu" for t in old.storages.values())
            with self._loop.step_lock:
                rebind_shared_model(self._shared, new, copy_values=readable and not self._loop.weights_torn)
                self.weights = new
                self._publish_state(new, own_weights_readable=readable)
        except (BindError, grpc.RpcError, OSError, ValueError):
            if self.weights is not new:
                new.close()
            raise
        old.close(detach=False)  # its session died with the old instance
        log.info("re-attached to the restarted inference side", instance=new.identity.instance_id,
                 weights_version=self._loop.counters.weights_version, step=self._loop.counters.step)
        self._set(True, "")

    def _publish_state(self, weights: AttachedWeights, own_weights_readable: bool) -> None:
        """Commits the trainer's own weights when they are intact, else its newest checkpoint (step lock held)."""
        loop = self._loop
        self._unpublished = True  # until the commit below lands
        if own_weights_readable and not loop.weights_torn:
            pending = loop.pending_commit
            step = pending.step if pending is not None else loop.counters.step
            ack = write_and_commit(loop, weights, None, step)
            self._unpublished = False
            if pending is not None:
                loop.finish_pending(ack)
                log.info("pending step committed", step=step, weights_version=ack.weights_version)
            loop.counters.weights_version = ack.weights_version
            return
        checkpoint = latest_checkpoint(self._state_dir)
        source = checkpoint if checkpoint is not None else Path(weights.identity.model)
        replayed = loop.store.cursor
        loop.reset_to(checkpoint)
        replayed -= loop.store.cursor
        try:
            ack = write_and_commit(loop, weights, source, loop.counters.step)
        except BaseException:
            loop.weights_torn = True  # the model holds part of `source`: restore again next time
            raise
        self._unpublished = False
        loop.counters.weights_version = ack.weights_version
        log.warning("served weights restored from " + ("the newest checkpoint" if checkpoint else "the model files"),
                    source=str(source), examples_to_train_again=replayed, weights_version=ack.weights_version)

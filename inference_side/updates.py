"""The update protocol's state machine: begin (pause), commit (new version), abort; one update at a time.

`engine` is vLLM's engine client (`AsyncLLM`, the object behind the OpenAI server); it is paused,
resumed and its prefix cache reset through `weightshare/vllm_compat.py`, which knows those methods'
arguments in each vLLM version.

- Strict mode: begin pauses keeping requests (queued and running requests freeze at a step boundary
  and continue later, none fail) and keeps the KV cache; commit bumps the version, resets the prefix
  cache preempting running requests (so no KV computed with old weights is reused: they recompute),
  then resumes; abort resumes with the version and cache unchanged.
- Concurrent mode: no pause; commit bumps the version and resets the prefix cache when it can.
Liveness, not step length, decides when to give up: the trainer sends heartbeats while it works, and
a watchdog aborts an update only after `max_pause_seconds` of silence; a broken trainer stream aborts
its update at once, so a dead trainer never leaves vLLM paused.

States: IDLE --begin--> OPEN --commit--> IDLE (version +1, weights trusted)
                        OPEN --abort / silence / stream broken / shutdown--> IDLE (version unchanged)
An abort after begin may follow partial writes: unless the trainer's AbortUpdate says
`weights_untouched`, the weights are flagged torn (status, responses, an event) and the prefix cache is
invalidated; the flag stays until a commit publishes a consistent set again. Each update has its own
id, so the late cleanup of an old stream never aborts a newer update of the same trainer.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
import uuid
from dataclasses import dataclass, field

import grpc
import structlog

from inference_side.metrics import PAUSE_SECONDS
from weightshare import proto_time, vllm_compat
from weightshare.status import StatusError
from weightshare.v1 import update_mode_pb2
from weightshare.v1 import weight_export_service_pb2 as pb

log = structlog.get_logger(__name__)
DEFAULT_MAX_PAUSE_SECONDS = 30.0


class UpdateError(StatusError):
    """A request that does not fit the protocol's state: `code`, `reason` (weightshare/status.py) and message
    to answer with."""


@dataclass
class _Update:
    session_id: str
    step: int
    began_at: float
    paused: bool
    update_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    last_heard: float = 0.0  # monotonic time of the trainer's last message about this update
    watchdog: asyncio.Task | None = None


@dataclass
class UpdateStats:
    weights_version: int = 0
    begun: int = 0
    commits: int = 0
    aborts: int = 0
    total_paused_seconds: float = 0.0
    weights_torn: bool = False
    torn_step: int = 0
    events: collections.deque = field(default_factory=lambda: collections.deque(maxlen=100))


def max_pause_of(begin: pb.BeginUpdate) -> tuple[float, str]:
    """(seconds, field) of a BeginUpdate's silence limit: max_pause_duration when set, else the deprecated
    max_pause_seconds. A malformed Duration is refused here, naming the field; the value's range is
    checked by `UpdateCoordinator.begin`."""
    if not begin.HasField("max_pause_duration"):
        return begin.max_pause_seconds, "begin.max_pause_seconds"  # the deprecated field, still honoured
    field = "begin.max_pause_duration"
    problem = proto_time.duration_problem(begin.max_pause_duration)
    if problem:
        raise UpdateError(
            grpc.StatusCode.INVALID_ARGUMENT, "MAX_PAUSE_SECONDS_INVALID",
            f"{field} {proto_time.shown(begin.max_pause_duration)} is not a valid Duration: {problem}",
            {"field": field},
        )
    return proto_time.seconds(begin.max_pause_duration), field


def event_kind_name(kind: int) -> str:
    """The string of the deprecated `ExportEvent.kind`: "pause_timeout" for EXPORT_EVENT_KIND_PAUSE_TIMEOUT."""
    return pb.ExportEventKind.Name(kind).removeprefix("EXPORT_EVENT_KIND_").lower()


def event(kind: int, message: str, unix_time: float) -> pb.ExportEvent:
    """An ExportEvent with both its typed fields and the deprecated ones they replace filled."""
    return pb.ExportEvent(
        unix_time=unix_time, time=proto_time.timestamp(unix_time), kind=event_kind_name(kind), event_kind=kind,
        message=message,
    )


class UpdateCoordinator:
    def __init__(self, engine, mode: int = update_mode_pb2.UPDATE_MODE_STRICT):
        if mode not in (update_mode_pb2.UPDATE_MODE_STRICT, update_mode_pb2.UPDATE_MODE_CONCURRENT):
            raise ValueError(f"update mode {mode} is neither STRICT nor CONCURRENT")
        self._engine = engine
        self.mode = mode
        self.stats = UpdateStats()
        self._update: _Update | None = None
        self._lock = asyncio.Lock()  # serializes begin/commit/abort against each other and the watchdog

    @property
    def paused(self) -> bool:
        return self._update is not None and self._update.paused

    @property
    def in_progress(self) -> bool:
        return self._update is not None

    @property
    def current_update_id(self) -> str:
        return self._update.update_id if self._update is not None else ""

    def record_event(self, kind: int, message: str) -> None:
        """Keep an ExportEvent of `kind` (an ExportEventKind) for GetExportStatus, and log it."""
        self.stats.events.append(event(kind, message, time.time()))
        log.warning("update event", kind=event_kind_name(kind), message=message)

    async def begin(
        self, session_id: str, step: int, max_pause_seconds: float, field: str = "begin.max_pause_seconds"
    ) -> pb.UpdateWeightsResponse:
        """Open an update (pausing serving in strict mode). `field` names where `max_pause_seconds` came from,
        for the refusal of a bad value (see `max_pause_of`)."""
        if not (math.isfinite(max_pause_seconds) and max_pause_seconds >= 0):
            # NaN would never time out (and spin the watchdog); inf would let a stalled trainer pause forever.
            raise UpdateError(
                grpc.StatusCode.INVALID_ARGUMENT, "MAX_PAUSE_SECONDS_INVALID",
                f"{field} {max_pause_seconds:g} must be a finite number of seconds >= 0 (0: the server's "
                "default)", {"field": field},
            )
        async with self._lock:
            if self._update is not None:
                owner = "this session" if self._update.session_id == session_id else "another trainer"
                raise UpdateError(
                    grpc.StatusCode.FAILED_PRECONDITION, "UPDATE_ALREADY_OPEN",
                    f"an update (step {self._update.step}) begun by {owner} is still open: commit or abort it",
                )
            started = time.monotonic()
            strict = self.mode == update_mode_pb2.UPDATE_MODE_STRICT
            if strict:
                # Freeze in-flight requests at a step boundary; they resume on resume_generation.
                await vllm_compat.pause_keeping_requests(self._engine)
            now = time.monotonic()
            self.stats.begun += 1
            self._update = _Update(session_id, step, now, paused=strict, last_heard=now)
            if strict:
                limit = max_pause_seconds or DEFAULT_MAX_PAUSE_SECONDS
                self._update.watchdog = asyncio.create_task(self._watchdog(self._update, limit))
            wait = (now - started) if strict else 0.0
            return pb.UpdateWeightsResponse(
                phase=pb.UPDATE_PHASE_BEGUN, weights_version=self.stats.weights_version, step=step,
                pause_wait_seconds=wait, pause_wait_duration=proto_time.duration(wait), mode=self.mode,
                weights_torn=self.stats.weights_torn,
            )

    async def heartbeat(self, session_id: str, step: int) -> None:
        """The trainer is still working on its open update: the watchdog's silence clock restarts.

        A heartbeat for no open update of this trainer (it crossed a commit, or the update was already
        aborted) is ignored: the trainer learns of an abort from its next commit.
        """
        async with self._lock:
            update = self._update
            if update is not None and update.session_id == session_id and update.step == step:
                update.last_heard = time.monotonic()

    async def commit(self, session_id: str, step: int) -> pb.UpdateWeightsResponse:
        async with self._lock:
            update = self._owned_update(session_id, "commit")
            self.stats.weights_version += 1
            self.stats.commits += 1
            if self.stats.weights_torn:
                self.record_event(pb.EXPORT_EVENT_KIND_WEIGHTS_CONSISTENT, f"version {self.stats.weights_version} committed over "
                                  f"the torn weights of step {self.stats.torn_step}")
            self.stats.weights_torn = False
            strict = self.mode == update_mode_pb2.UPDATE_MODE_STRICT
            reset = await vllm_compat.reset_prefix_cache(self._engine, preempt_running=strict)
            if not reset:
                self.record_event(
                    pb.EXPORT_EVENT_KIND_PREFIX_CACHE_NOT_RESET,
                    f"version {self.stats.weights_version}: blocks in use, cached prefixes may predate it",
                )
            paused_seconds = await self._finish(update)
            log.info("update committed", version=self.stats.weights_version, step=step, paused_s=paused_seconds)
            return pb.UpdateWeightsResponse(
                phase=pb.UPDATE_PHASE_COMMITTED, weights_version=self.stats.weights_version, step=step,
                paused_seconds=paused_seconds, paused_duration=proto_time.duration(paused_seconds), mode=self.mode,
                weights_torn=False,
            )

    async def abort(self, session_id: str, reason: str, weights_untouched: bool = False) -> pb.UpdateWeightsResponse:
        async with self._lock:
            update = self._owned_update(session_id, "abort")
            return await self._abort_locked(update, None, reason or "aborted by trainer", written=not weights_untouched)

    async def abandon(self, session_id: str, why: str, update_id: str = "") -> bool:
        """The trainer's stream ended: abort its open update (only `update_id`, when given). True if aborted."""
        async with self._lock:
            update = self._update
            if update is None or update.session_id != session_id:
                return False
            if update_id and update.update_id != update_id:
                return False  # a newer update of this trainer, begun on another stream
            kind = pb.EXPORT_EVENT_KIND_STREAM_BROKEN_WHILE_PAUSED if update.paused else pb.EXPORT_EVENT_KIND_STREAM_BROKEN
            await self._abort_locked(update, kind, why)
            return True

    async def shutdown(self) -> None:
        async with self._lock:
            if self._update is not None:
                await self._abort_locked(self._update, pb.EXPORT_EVENT_KIND_SERVER_SHUTDOWN, "inference side shutting down")

    def _owned_update(self, session_id: str, action: str) -> _Update:
        if self._update is None:
            raise UpdateError(grpc.StatusCode.FAILED_PRECONDITION, "UPDATE_NOT_OPEN",
                              f"{action} without an open update: send begin first")
        if self._update.session_id != session_id:
            raise UpdateError(grpc.StatusCode.FAILED_PRECONDITION, "UPDATE_OWNED_BY_OTHER_TRAINER",
                              f"{action}: the open update belongs to another trainer")
        return self._update

    async def _abort_locked(
        self, update: _Update, kind: int | None, reason: str, written: bool = True
    ) -> pb.UpdateWeightsResponse:
        """Abort `update`; `kind` is the ExportEventKind of a server-side abort (None: the trainer's own)."""
        self.stats.aborts += 1
        if written:
            # Writes may have begun: never serve them silently. Cached prefixes computed before the
            # abort no longer match the weights either way; drop them while still paused.
            self.stats.weights_torn, self.stats.torn_step = True, update.step
            await vllm_compat.reset_prefix_cache(self._engine, preempt_running=update.paused)
            why = "trainer_abort" if kind is None else event_kind_name(kind)
            self.record_event(pb.EXPORT_EVENT_KIND_WEIGHTS_MAY_BE_TORN, f"update of step {update.step} aborted "
                              f"({why}): served weights may mix old and new values until the next commit")
        paused_seconds = await self._finish(update)
        if kind is not None:
            self.record_event(kind, f"update of step {update.step} aborted after {paused_seconds:.3f}s: {reason}")
        return pb.UpdateWeightsResponse(
            phase=pb.UPDATE_PHASE_ABORTED, weights_version=self.stats.weights_version, step=update.step,
            paused_seconds=paused_seconds, paused_duration=proto_time.duration(paused_seconds), mode=self.mode,
            weights_torn=self.stats.weights_torn,
        )

    async def _finish(self, update: _Update) -> float:
        """Resume serving (strict) and close the update; returns how long serving was paused."""
        self._update = None
        if update.watchdog is not None and update.watchdog is not asyncio.current_task():
            update.watchdog.cancel()
        if not update.paused:
            return 0.0
        await vllm_compat.resume_generation(self._engine)
        paused_seconds = time.monotonic() - update.began_at
        self.stats.total_paused_seconds += paused_seconds
        PAUSE_SECONDS.observe(paused_seconds)
        return paused_seconds

    async def _watchdog(self, update: _Update, limit: float) -> None:
        """Abort `update` once the trainer has been silent for `limit` seconds (heartbeats restart it)."""
        while True:
            await asyncio.sleep(max(0.0, update.last_heard + limit - time.monotonic()))
            async with self._lock:
                if self._update is not update:
                    return
                silent = time.monotonic() - update.last_heard
                if silent >= limit:
                    await self._abort_locked(
                        update, pb.EXPORT_EVENT_KIND_PAUSE_TIMEOUT, f"no word from the trainer for {silent:.1f}s (limit {limit:.1f}s)"
                    )
                    return

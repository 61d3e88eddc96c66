"""WeightExportService: validates every request, answers from the workers' exports and the coordinator.

Every refusal is a gRPC status with a stable reason in a google.rpc.ErrorInfo (weightshare/status.py).

Runs in the process that holds vLLM's engine client (the OpenAI server's process, or an `LLM`
caller). Layout and identity come from each worker through `collective_rpc("weightshare_describe")`
once at start; handles through `collective_rpc("weightshare_export_handles")` on first request.
"""

from __future__ import annotations

import asyncio
import collections
import time
import uuid
from dataclasses import dataclass

import grpc
import structlog

from inference_side.updates import UpdateCoordinator, UpdateError, max_pause_of
from weightshare import CONTRACT_VERSION, proto_time, shm
from weightshare.grpc_util import shown
from weightshare.status import abort, abort_with
from weightshare.v1 import weight_export_service_pb2 as pb
from weightshare.v1 import weight_export_service_pb2_grpc as pb_grpc

log = structlog.get_logger(__name__)
DEFAULT_HANDLE_BATCH = 64
MAX_HANDLE_BATCH = 4096
MAX_TRAINER_NAME = 200


@dataclass
class _Session:
    session_id: str
    trainer_name: str
    pid: int
    attached_at: float
    read_only: bool = False
    start_ticks: int | None = None  # the process's start time, so a reused pid does not look alive

    def process_alive(self) -> bool:
        ticks = _start_ticks(self.pid)
        return ticks not in (None, -1) and (self.start_ticks is None or ticks == self.start_ticks)

    def describe(self, now: float) -> str:
        return (f"trainer {self.trainer_name!r} (pid {self.pid}, session {self.session_id}, attached "
                f"{now - self.attached_at:.0f} s ago)")


def _start_ticks(pid: int) -> int | None:
    """Start time of a live process (clock ticks since boot); -1 for a zombie, None if there is none."""
    try:
        stat = open(f"/proc/{pid}/stat").read()  # noqa: SIM115 (one read of a tiny proc file)
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()  # the name in parentheses may contain spaces
    return -1 if fields[0] in ("Z", "X") else int(fields[19])


class WeightExportServicer(pb_grpc.WeightExportServiceServicer):
    def __init__(self, engine, coordinator: UpdateCoordinator, describes: list[dict[str, bytes]]):
        self._engine = engine
        self._coordinator = coordinator
        self._infos = [pb.GetModelInfoResponse.FromString(d["info"]) for d in describes]
        self._layouts = [pb.GetLayoutResponse.FromString(d["layout"]) for d in describes]
        self._handles: list[pb.StreamHandlesResponse] | None = None
        self._handles_lock = asyncio.Lock()
        self._sessions: dict[str, _Session] = {}
        self.sessions = self._sessions  # read by the metrics collector
        # Sessions ended by a take-over -> who took over, so the loser hears why (bounded).
        self._taken_over: collections.OrderedDict[str, str] = collections.OrderedDict()
        self.instance_id = self._infos[0].identity.instance_id
        self.host_id = shm.host_id()

    # -- validation helpers -------------------------------------------------------------------
    async def _check_rank(self, tp_rank: int, context: grpc.aio.ServicerContext) -> None:
        if tp_rank >= len(self._infos):
            await abort_with(
                context, grpc.StatusCode.INVALID_ARGUMENT, "TP_RANK_OUT_OF_RANGE",
                f"tp_rank {tp_rank} is out of range: this engine has tp_size {len(self._infos)}",
                {"field": "tp_rank"},
            )

    async def _check_session(self, session_id: str, context: grpc.aio.ServicerContext) -> _Session:
        if not session_id:
            await abort_with(context, grpc.StatusCode.INVALID_ARGUMENT, "SESSION_ID_MISSING",
                             "session_id is empty: call AttachTrainer first", {"field": "session_id"})
        session = self._sessions.get(session_id)
        if session is None and session_id in self._taken_over:
            await abort_with(
                context, grpc.StatusCode.FAILED_PRECONDITION, "WRITER_LEASE_LOST",
                f"session_id {shown(session_id)} lost the writer lease: {self._taken_over[session_id]} took over; "
                "this trainer no longer writes these weights (attach with take_over to take them back)",
            )
        if session is None:
            await abort_with(
                context, grpc.StatusCode.NOT_FOUND, "SESSION_NOT_ATTACHED",
                f"session_id {shown(session_id)} is not attached (detached, or the inference side restarted: "
                f"instance {self.instance_id}); call AttachTrainer again",
            )
        return session

    def _identity(self, tp_rank: int = 0):
        identity = type(self._infos[tp_rank].identity)()
        identity.CopyFrom(self._infos[tp_rank].identity)
        identity.weights_version = self._coordinator.stats.weights_version
        return identity

    def _prune_dead_sessions(self) -> None:
        for session in list(self._sessions.values()):
            if session.pid and not session.process_alive():
                del self._sessions[session.session_id]
                self._coordinator.record_event(
                    pb.EXPORT_EVENT_KIND_TRAINER_GONE, f"trainer {session.trainer_name!r} (pid {session.pid}) exited without detaching"
                )

    # -- RPCs ---------------------------------------------------------------------------------
    async def GetModelInfo(self, request, context):
        await self._check_rank(request.tp_rank, context)
        return pb.GetModelInfoResponse(
            contract_version=CONTRACT_VERSION, identity=self._identity(request.tp_rank),
            update_mode=self._coordinator.mode,
        )

    async def GetLayout(self, request, context):
        await self._check_rank(request.tp_rank, context)
        return self._layouts[request.tp_rank]

    async def StreamHandles(self, request, context):
        await self._check_rank(request.tp_rank, context)
        await self._check_session(request.session_id, context)
        if request.batch_size > MAX_HANDLE_BATCH:
            await abort_with(
                context, grpc.StatusCode.INVALID_ARGUMENT, "BATCH_SIZE_TOO_LARGE",
                f"batch_size {request.batch_size} exceeds {MAX_HANDLE_BATCH}; use 0 for the default",
                {"field": "batch_size"},
            )
        handles = (await self._all_handles(context))[request.tp_rank]
        batch = request.batch_size or DEFAULT_HANDLE_BATCH
        sent_storages: set[int] = set()
        storages = {s.index: s for s in handles.storages}
        views = list(handles.views)
        for start in range(0, max(len(views), 1), batch):
            chunk = views[start : start + batch]
            needed = sorted({v.storage_index for v in chunk} - sent_storages)
            sent_storages.update(needed)
            yield pb.StreamHandlesResponse(
                storages=[storages[i] for i in needed], views=chunk,
                total_views=len(views), instance_id=self.instance_id,
            )

    async def _all_handles(self, context) -> list[pb.StreamHandlesResponse]:
        async with self._handles_lock:
            if self._handles is None:
                try:
                    blobs = await self._engine.collective_rpc("weightshare_export_handles")
                except Exception as exc:  # noqa: BLE001 - any worker failure; its message says what to change
                    await abort_with(context, grpc.StatusCode.FAILED_PRECONDITION, "EXPORT_FAILED",
                                     f"export failed: {exc}")
                self._handles = [pb.StreamHandlesResponse.FromString(b) for b in blobs]
            return self._handles

    async def AttachTrainer(self, request, context):
        if not request.trainer_name:
            await abort_with(context, grpc.StatusCode.INVALID_ARGUMENT, "TRAINER_NAME_MISSING",
                             "trainer_name is empty: name the trainer", {"field": "trainer_name"})
        if len(request.trainer_name) > MAX_TRAINER_NAME:
            await abort_with(
                context, grpc.StatusCode.INVALID_ARGUMENT, "TRAINER_NAME_TOO_LONG",
                f"trainer_name {shown(request.trainer_name)} is longer than {MAX_TRAINER_NAME} characters",
                {"field": "trainer_name"},
            )
        if request.host_id != self.host_id:
            await abort_with(
                context, grpc.StatusCode.FAILED_PRECONDITION, "HOST_MISMATCH",
                f"host_id {shown(request.host_id)} is not this host ({self.host_id}): weight handles only open "
                "on the machine that serves the model", {"field": "host_id"},
            )
        if request.expected_instance_id and request.expected_instance_id != self.instance_id:
            await abort_with(
                context, grpc.StatusCode.FAILED_PRECONDITION, "INSTANCE_CHANGED",
                f"expected_instance_id {shown(request.expected_instance_id)} is stale: the inference side restarted "
                f"(now {self.instance_id}); drop old handles and attach afresh", {"field": "expected_instance_id"},
            )
        if request.read_only and request.take_over:
            await abort_with(
                context, grpc.StatusCode.INVALID_ARGUMENT, "READ_ONLY_WITH_TAKE_OVER",
                "read_only and take_over are both set: a reader takes no lease", {"field": "take_over"},
            )
        self._prune_dead_sessions()
        session = _Session(uuid.uuid4().hex, request.trainer_name, request.pid, time.monotonic(), request.read_only,
                           _start_ticks(request.pid) if request.pid else None)
        if not session.read_only:
            await self._acquire_writer_lease(session, request.take_over, context)
        self._sessions[session.session_id] = session
        log.info("trainer attached", trainer=request.trainer_name, pid=request.pid, session=session.session_id,
                 read_only=session.read_only)
        return pb.AttachTrainerResponse(session_id=session.session_id, identity=self._identity())

    async def _acquire_writer_lease(self, session: _Session, take_over: bool, context) -> None:
        """One writer per served model: refuse a second one naming the holder, or end the holder's session."""
        holder = next((s for s in self._sessions.values() if not s.read_only), None)
        if holder is None:
            return
        now = time.monotonic()
        if not take_over:
            await abort_with(
                context, grpc.StatusCode.FAILED_PRECONDITION, "WRITER_LEASE_HELD",
                f"{holder.describe(now)} holds the writer lease of this model: stop it first, attach read_only to "
                "only read, or take over (`weightshare train --take-over`, AttachTrainerRequest.take_over), which "
                "ends its session",
            )
        await self._coordinator.abandon(holder.session_id, f"writer lease taken over by {session.trainer_name!r}")
        del self._sessions[holder.session_id]
        self._taken_over[holder.session_id] = session.describe(now)
        while len(self._taken_over) > 100:
            self._taken_over.popitem(last=False)
        self._coordinator.record_event(
            pb.EXPORT_EVENT_KIND_WRITER_TAKEN_OVER, f"{session.describe(now)} took the writer lease from {holder.describe(now)}"
        )

    async def DetachTrainer(self, request, context):
        session = await self._check_session(request.session_id, context)
        await self._coordinator.abandon(session.session_id, "trainer detached with an update open")
        del self._sessions[session.session_id]
        log.info("trainer detached", trainer=session.trainer_name, session=session.session_id)
        return pb.DetachTrainerResponse(remaining_trainers=len(self._sessions))

    async def UpdateWeights(self, request_iterator, context):
        session_id, begun_id = "", ""
        try:
            async for request in request_iterator:
                if session_id and request.session_id != session_id:
                    await abort_with(
                        context, grpc.StatusCode.INVALID_ARGUMENT, "SESSION_ID_CHANGED",
                        f"session_id {shown(request.session_id)} differs from this stream's {session_id!r}",
                        {"field": "session_id"},
                    )
                session = await self._check_session(request.session_id, context)
                if session.read_only:
                    await abort_with(
                        context, grpc.StatusCode.PERMISSION_DENIED, "SESSION_READ_ONLY",
                        f"session_id {session.session_id!r} attached read_only: attach without it to write",
                    )
                session_id = request.session_id
                response = await self._apply(request, context)
                if request.WhichOneof("action") == "begin":
                    begun_id = self._coordinator.current_update_id  # only this stream's update is its to abandon
                if response is not None:  # heartbeats are not acknowledged
                    yield response
        finally:
            # Runs on clean end, on error and on cancellation (peer gone): never leave vLLM paused.
            if begun_id:
                await asyncio.shield(self._coordinator.abandon(session_id, "update stream ended", begun_id))

    async def _apply(self, request, context) -> pb.UpdateWeightsResponse | None:
        action = request.WhichOneof("action")
        try:
            if action == "begin":
                max_pause_seconds, field = max_pause_of(request.begin)
                return await self._coordinator.begin(request.session_id, request.begin.step, max_pause_seconds, field)
            if action == "commit":
                return await self._coordinator.commit(request.session_id, request.commit.step)
            if action == "abort":
                return await self._coordinator.abort(
                    request.session_id, request.abort.reason, request.abort.weights_untouched
                )
            if action == "heartbeat":
                await self._coordinator.heartbeat(request.session_id, request.heartbeat.step)
                return None
        except UpdateError as err:
            await abort(context, err)
        await abort_with(
            context, grpc.StatusCode.INVALID_ARGUMENT, "UPDATE_ACTION_MISSING",
            "UpdateWeightsRequest.action is not set: send begin, commit or abort", {"field": "action"},
        )

    async def GetExportStatus(self, request, context):
        self._prune_dead_sessions()
        now = time.monotonic()
        stats = self._coordinator.stats
        return pb.GetExportStatusResponse(
            identity=self._identity(), paused=self._coordinator.paused,
            update_in_progress=self._coordinator.in_progress, update_mode=self._coordinator.mode,
            trainers=[
                pb.AttachedTrainer(
                    session_id=s.session_id, trainer_name=s.trainer_name, pid=s.pid,
                    attached_seconds=now - s.attached_at, attached_duration=proto_time.duration(now - s.attached_at),
                    read_only=s.read_only,
                )
                for s in self._sessions.values()
            ],
            events=list(stats.events), commits=stats.commits, aborts=stats.aborts,
            total_paused_seconds=stats.total_paused_seconds,
            total_paused_duration=proto_time.duration(stats.total_paused_seconds), weights_torn=stats.weights_torn,
            torn_step=stats.torn_step,
        )

"""TrainerService (grpc.aio): submit examples, start/stop training, stream progress, status, checkpoints.

The servicer validates at the boundary (INVALID_ARGUMENT naming the field and value, FAILED_PRECONDITION
when the trainer's state forbids the call, RESOURCE_EXHAUSTED for requests or queues over their bounds;
each with a stable reason in a google.rpc.ErrorInfo, weightshare/status.py) and hands the work to
`TrainingLoop` and `ExampleStore`, whose blocking calls (fsync, joining the loop, writing checkpoints)
run in threads so the event loop keeps serving. `ProgressHub` fans progress events
out to any number of StreamProgress watchers, with a bounded history for late joiners.

Relies on grpc and the trainer's loop and data modules. Started by `weightshare train`.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import errno
import os
from dataclasses import dataclass

import grpc
import structlog

from trainer_side.data import ExampleError, Renderer
from trainer_side.inference_link import InferenceLink
from trainer_side.loop import TrainingLoop
from weightshare import grpc_util
from weightshare.grpc_util import shown
from weightshare.status import abort, abort_with
from weightshare.v1 import trainer_service_pb2 as pb
from weightshare.v1 import trainer_service_pb2_grpc as pb_grpc
from weightshare.v1 import update_mode_pb2

log = structlog.get_logger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TrainerService"].full_name
_CLOSED = None  # sentinel put in a watcher's queue when the server shuts down


@dataclass(frozen=True)
class ServiceLimits:
    """Bounds that keep one client from exhausting the trainer."""

    max_examples_per_request: int = 1024
    """SubmitExamples with more examples than this is refused with RESOURCE_EXHAUSTED."""
    max_pending_examples: int = 100_000
    """Submissions that would leave more examples pending than this are refused with RESOURCE_EXHAUSTED."""
    history_events: int = 1000
    """Progress events kept for StreamProgress(include_history=True)."""
    watcher_queue: int = 1000
    """Events buffered per watcher; a watcher that falls further behind loses the oldest."""


class ProgressHub:
    """Fans events out to asyncio watchers; `publish_threadsafe` may be called from any thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limits: ServiceLimits):
        self._loop = loop
        self._limits = limits
        self.history: collections.deque = collections.deque(maxlen=limits.history_events)
        self._watchers: set[asyncio.Queue] = set()

    def publish_threadsafe(self, event: pb.StreamProgressResponse) -> None:
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._publish, event)

    def _publish(self, event: pb.StreamProgressResponse | None) -> None:
        if event is not _CLOSED:
            self.history.append(event)
        for queue in self._watchers:
            if queue.full():  # a slow watcher loses its oldest event rather than stalling the others
                queue.get_nowait()
            queue.put_nowait(event)

    def subscribe(self, include_history: bool) -> asyncio.Queue:
        # Runs on the event loop, like _publish: history and live events neither overlap nor miss one.
        queue: asyncio.Queue = asyncio.Queue(maxsize=self._limits.watcher_queue + len(self.history))
        if include_history:
            for event in self.history:
                queue.put_nowait(event)
        self._watchers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        self._watchers.discard(queue)

    def close(self) -> None:
        self._publish(_CLOSED)


class TrainerServicer(pb_grpc.TrainerServiceServicer):
    def __init__(
        self, loop: TrainingLoop, renderer: Renderer, hub: ProgressHub, link: InferenceLink,
        server_update_mode: int, limits: ServiceLimits,
    ):
        self._loop = loop
        self._renderer = renderer
        self._hub = hub
        self._link = link
        self._server_update_mode = server_update_mode
        self._limits = limits
        # One control call (start/stop/checkpoint) at a time: they join threads and write directories.
        self._control = asyncio.Lock()
        # Rendering has its own threads, not the default executor that StopTraining and SaveCheckpoint use.
        self.render_pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="render")

    async def SubmitExamples(self, request: pb.SubmitExamplesRequest, context: grpc.aio.ServicerContext):
        count = len(request.examples)
        if count == 0:
            await abort_with(context, grpc.StatusCode.INVALID_ARGUMENT, "EXAMPLES_EMPTY",
                             "examples is empty: submit at least one", {"field": "examples"})
        if count > self._limits.max_examples_per_request:
            await abort_with(
                context, grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_EXAMPLES",
                f"{count} examples in one request; at most {self._limits.max_examples_per_request}: split it",
                {"field": "examples"},
            )
        pending = self._loop.store.pending
        if pending + count > self._limits.max_pending_examples:
            await abort_with(
                context, grpc.StatusCode.RESOURCE_EXHAUSTED, "PENDING_EXAMPLES_FULL",
                f"{pending} examples pending + {count} would exceed max_pending_examples "
                f"{self._limits.max_pending_examples}: wait for training to catch up",
            )
        try:
            ids, pending = await asyncio.get_running_loop().run_in_executor(
                self.render_pool, self._render_and_store, request.examples
            )
        except ExampleError as err:
            await abort(context, err)
        return pb.SubmitExamplesResponse(example_ids=ids, pending_examples=pending)

    def _render_and_store(self, examples) -> tuple[list[str], int]:
        rendered = [self._renderer.render(example, i) for i, example in enumerate(examples)]
        # append fsyncs before returning: an acknowledged example is never lost.
        pending = self._loop.store.append(rendered)
        return [e.example_id for e in rendered], pending

    async def StartTraining(self, request: pb.StartTrainingRequest, context: grpc.aio.ServicerContext):
        overrides = request.overrides
        mode = overrides.update_mode
        if mode not in update_mode_pb2.UpdateMode.values():
            await abort_with(
                context, grpc.StatusCode.INVALID_ARGUMENT, "UPDATE_MODE_UNKNOWN",
                f"overrides.update_mode {mode} is not a value of UpdateMode ({sorted(update_mode_pb2.UpdateMode.keys())})",
                {"field": "overrides.update_mode"},
            )
        if mode and mode != self._server_update_mode:
            await abort_with(
                context, grpc.StatusCode.FAILED_PRECONDITION, "UPDATE_MODE_MISMATCH",
                f"overrides.update_mode {update_mode_pb2.UpdateMode.Name(mode)} differs from the inference side's "
                f"{update_mode_pb2.UpdateMode.Name(self._server_update_mode)}, which decides whether serving pauses: "
                "restart `weightshare serve` with the other --update-mode", {"field": "overrides.update_mode"},
            )
        if overrides.learning_rate < 0 or overrides.learning_rate != overrides.learning_rate:
            await abort_with(
                context, grpc.StatusCode.INVALID_ARGUMENT, "LEARNING_RATE_INVALID",
                f"overrides.learning_rate {overrides.learning_rate} must be positive (or 0 for the default)",
                {"field": "overrides.learning_rate"},
            )
        if self._link.permanent:
            await abort_with(
                context, grpc.StatusCode.FAILED_PRECONDITION, "INFERENCE_LINK_LOST", self._link.problem
            )
        async with self._control:
            if self._loop.running:
                return pb.StartTrainingResponse(already_running=True, step=self._loop.counters.step)
            try:
                config = self._loop.with_overrides(overrides)
            except ValueError as err:
                await abort_with(
                    context, grpc.StatusCode.INVALID_ARGUMENT, "OVERRIDES_INVALID", f"overrides: {err}",
                    {"field": "overrides"},
                )
            already, step = self._loop.start(config)
        return pb.StartTrainingResponse(already_running=already, step=step)

    async def StopTraining(self, request: pb.StopTrainingRequest, context: grpc.aio.ServicerContext):
        async with self._control:
            step, path = await asyncio.to_thread(self._loop.stop, request.checkpoint)
        return pb.StopTrainingResponse(step=step, checkpoint_path=path)

    async def StreamProgress(self, request: pb.StreamProgressRequest, context: grpc.aio.ServicerContext):
        queue = self._hub.subscribe(request.include_history)
        try:
            while (event := await queue.get()) is not _CLOSED:
                yield event
        finally:
            self._hub.unsubscribe(queue)

    async def GetTrainingStatus(self, request: pb.GetTrainingStatusRequest, context: grpc.aio.ServicerContext):
        status = self._loop.status()
        status.inference_address = self._link.weights.address
        status.inference_connected = self._link.connected
        status.inference_problem = self._link.problem
        return status

    async def SaveCheckpoint(self, request: pb.SaveCheckpointRequest, context: grpc.aio.ServicerContext):
        path = request.path
        if "\x00" in path:
            await abort_with(context, grpc.StatusCode.INVALID_ARGUMENT, "CHECKPOINT_PATH_INVALID",
                             f"path {shown(path)} contains a NUL byte", {"field": "path"})
        if path and not os.path.isabs(path):
            await abort_with(context, grpc.StatusCode.INVALID_ARGUMENT, "CHECKPOINT_PATH_INVALID",
                             f"path {shown(path)} must be absolute", {"field": "path"})
        if path and os.path.exists(path):
            await abort_with(context, grpc.StatusCode.ALREADY_EXISTS, "CHECKPOINT_PATH_EXISTS",
                             f"path {shown(path)} exists: name a new directory", {"field": "path"})
        async with self._control:
            try:
                written = await asyncio.to_thread(self._loop.save_checkpoint, path or None)
            except OSError as err:
                full = _disk_full(err)
                await abort_with(
                    context, grpc.StatusCode.RESOURCE_EXHAUSTED if full else grpc.StatusCode.FAILED_PRECONDITION,
                    "DISK_FULL" if full else "CHECKPOINT_WRITE_FAILED",
                    f"cannot write checkpoint {shown(path) if path else 'in the state directory'}: "
                    f"{shown(str(err), 300)}"
                    + ("; nothing was left half-written: free space and call again" if full else ""),
                )
        c = self._loop.counters
        return pb.SaveCheckpointResponse(path=written, step=c.step, weights_version=c.weights_version)


_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _disk_full(err: OSError) -> bool:
    """ENOSPC and kin, also when safetensors' Rust writer reports them only in its message."""
    return err.errno in _FULL_ERRNOS or any(f"(os error {n})" in str(err) for n in _FULL_ERRNOS)


@dataclass
class TrainerServer:
    server: grpc.aio.Server
    hub: ProgressHub
    address: str
    render_pool: concurrent.futures.Executor | None = None

    async def stop(self, grace_seconds: float) -> None:
        self.hub.close()  # ends StreamProgress calls, which would otherwise hold the grace period
        await self.server.stop(grace_seconds)
        if self.render_pool is not None:  # a render still running finishes on its thread; queued ones are dropped
            self.render_pool.shutdown(wait=False, cancel_futures=True)
        log.info("trainer service stopped", address=self.address)


async def start_trainer_server(
    loop: TrainingLoop, renderer: Renderer, hub: ProgressHub, address: str, token: str | None,
    link: InferenceLink, server_update_mode: int, limits: ServiceLimits,
) -> TrainerServer:
    """Starts TrainerService with health and reflection on `address` (`loop` publishes into `hub`).

    Health follows `link`: NOT_SERVING while the inference side is unusable (GetTrainingStatus says why).
    """
    servicer = TrainerServicer(loop, renderer, hub, link, server_update_mode, limits)
    server, bound, health_servicer = await grpc_util.start_server(
        pb_grpc.add_TrainerServiceServicer_to_server, servicer, SERVICE_NAME, address, token
    )
    event_loop = asyncio.get_running_loop()

    def follow_link(connected: bool, problem: str) -> None:  # called from the link's thread
        asyncio.run_coroutine_threadsafe(grpc_util.set_health(health_servicer, [SERVICE_NAME], connected), event_loop)

    link.add_listener(follow_link)
    log.info("trainer service listening", address=bound, auth="token" if token else "none")
    return TrainerServer(server, hub, bound, servicer.render_pool)

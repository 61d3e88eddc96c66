"""Client half of the streamed update protocol: begin, heartbeats, commit, abort on one UpdateWeights stream.

Each begin, commit and abort sends one request and blocks for its acknowledgement. Between begin and
commit/abort a background thread sends a heartbeat every `heartbeat_s` seconds (not acknowledged),
so the inference side gives up on an update only when the trainer goes silent, however long its step
takes. Closing the stream (or the process dying) makes the inference side abort any open update and
resume serving.
"""

from __future__ import annotations

import math
import queue
import threading
from typing import Self

from weightshare import proto_time
from weightshare.v1 import weight_export_service_pb2 as pb
from weightshare.v1 import weight_export_service_pb2_grpc as pb_grpc

_END = object()
HEARTBEAT_SECONDS = 2.0


class UpdateStream:
    def __init__(
        self, stub: pb_grpc.WeightExportServiceStub, session_id: str, metadata: tuple = (),
        heartbeat_s: float = HEARTBEAT_SECONDS,
    ):
        self._session_id = session_id
        self._heartbeat_s = heartbeat_s
        self._interval = heartbeat_s
        self._requests: queue.Queue = queue.Queue()
        self._responses = stub.UpdateWeights(iter(self._requests.get, _END), metadata=metadata)
        self._open_step: int | None = None  # step of the open update, read by the heartbeat thread
        self._open_lock = threading.Lock()  # no heartbeat is queued after the commit or abort it precedes
        self._wake = threading.Event()
        self._heartbeats: threading.Thread | None = None

    def _send(self, **action) -> pb.UpdateWeightsResponse:
        self._requests.put(pb.UpdateWeightsRequest(session_id=self._session_id, **action))
        return next(self._responses)  # raises grpc.RpcError with the server's status on a refusal

    def _beat(self) -> None:
        while not self._wake.wait(self._interval):
            with self._open_lock:
                if self._open_step is not None:
                    self._requests.put(pb.UpdateWeightsRequest(
                        session_id=self._session_id, heartbeat=pb.HeartbeatUpdate(step=self._open_step)))

    def _close_update(self) -> None:
        with self._open_lock:
            self._open_step = None

    def begin(self, step: int, max_pause_seconds: float = 0.0) -> pb.UpdateWeightsResponse:
        """Pause serving (strict mode) at a step boundary; returns once it is safe to write.

        The limit travels as max_pause_duration and, for servers that predate it, as the deprecated
        max_pause_seconds (a value no Duration holds, NaN or infinite, only there: the server refuses it).
        """
        begin = pb.BeginUpdate(step=step, max_pause_seconds=max_pause_seconds)
        if math.isfinite(max_pause_seconds) and abs(max_pause_seconds) <= proto_time.MAX_DURATION_SECONDS:
            begin.max_pause_duration.CopyFrom(proto_time.duration(max_pause_seconds))
        response = self._send(begin=begin)
        # Several heartbeats fit in the server's silence limit, whatever the caller chose.
        self._interval = min(self._heartbeat_s, max_pause_seconds / 3) if max_pause_seconds else self._heartbeat_s
        self._open_step = step
        if self._heartbeats is None:
            self._heartbeats = threading.Thread(target=self._beat, name="update-heartbeats", daemon=True)
            self._heartbeats.start()
        return response

    def commit(self, step: int) -> pb.UpdateWeightsResponse:
        """Publish the writes: weights version +1, prefix cache reset, serving resumes."""
        self._close_update()
        return self._send(commit=pb.CommitUpdate(step=step))

    def abort(self, reason: str, weights_untouched: bool = False) -> pb.UpdateWeightsResponse:
        """Give up the update; say `weights_untouched` only if nothing was written since begin."""
        self._close_update()
        return self._send(abort=pb.AbortUpdate(reason=reason, weights_untouched=weights_untouched))

    def close(self) -> None:
        self._close_update()
        self._wake.set()
        self._requests.put(_END)
        self._responses.cancel()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

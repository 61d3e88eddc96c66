"""Client half of the streamed update protocol: begin, commit, abort on one UpdateWeights stream.

Each call sends one request and blocks for its acknowledgement. Closing the stream (or the process
dying) makes the inference side abort any open update and resume serving.
"""

from __future__ import annotations

import queue
from typing import Self

from weightshare.v1 import weight_export_service_pb2 as pb
from weightshare.v1 import weight_export_service_pb2_grpc as pb_grpc

_END = object()


class UpdateStream:
    def __init__(self, stub: pb_grpc.WeightExportServiceStub, session_id: str, metadata: tuple = ()):
        self._session_id = session_id
        self._requests: queue.Queue = queue.Queue()
        self._responses = stub.UpdateWeights(iter(self._requests.get, _END), metadata=metadata)

    def _send(self, **action) -> pb.UpdateWeightsResponse:
        self._requests.put(pb.UpdateWeightsRequest(session_id=self._session_id, **action))
        return next(self._responses)  # raises grpc.RpcError with the server's status on a refusal

    def begin(self, step: int, max_pause_seconds: float = 0.0) -> pb.UpdateWeightsResponse:
        """Pause serving (strict mode) at a step boundary; returns once it is safe to write."""
        return self._send(begin=pb.BeginUpdate(step=step, max_pause_seconds=max_pause_seconds))

    def commit(self, step: int) -> pb.UpdateWeightsResponse:
        """Publish the writes: weights version +1, prefix cache reset, serving resumes."""
        return self._send(commit=pb.CommitUpdate(step=step))

    def abort(self, reason: str) -> pb.UpdateWeightsResponse:
        return self._send(abort=pb.AbortUpdate(reason=reason))

    def close(self) -> None:
        self._requests.put(_END)
        self._responses.cancel()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

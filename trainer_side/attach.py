"""Attach to a WeightExportService: check identity and contract, pull layout and handles, open them.

Run as a library: `with attach(address) as weights: weights.hf_tensor("model.norm.weight")`.
Only the gRPC contract and the handles are used: no vLLM import, so this works from any process.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Self

import grpc
import structlog
import torch

from trainer_side.handles import HandleError, open_storage, open_views
from weightshare import CONTRACT_VERSION, grpc_util, shm
from weightshare.failpoints import failpoint
from weightshare.v1 import tensors_pb2
from weightshare.v1 import weight_export_service_pb2 as pb
from weightshare.v1 import weight_export_service_pb2_grpc as pb_grpc

log = structlog.get_logger(__name__)


class AttachError(Exception):
    """Attaching is impossible as things stand; the message says why and what to do."""


@dataclass
class AttachedWeights:
    """One rank's exported weights, opened in this process. Close it (or use `with`) to detach."""

    address: str
    channel: grpc.Channel
    stub: pb_grpc.WeightExportServiceStub
    metadata: tuple
    session_id: str
    info: pb.GetModelInfoResponse
    layout: dict[str, tensors_pb2.ParameterLayout]  # by HF name, in the exporter's order
    engine_tensors: dict[str, torch.Tensor]  # engine name -> zero-copy view
    storages: dict[int, torch.Tensor] = field(repr=False)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def identity(self) -> tensors_pb2.ModelIdentity:
        return self.info.identity

    def hf_tensor(self, hf_name: str) -> torch.Tensor:
        """This rank's shard of an HF parameter: a view when the layout is zero-copy, else a copy."""
        entry = self.layout.get(hf_name)
        if entry is None:
            raise KeyError(f"{hf_name!r} is not in the exported layout ({len(self.layout)} parameters)")
        slices = list(entry.slices)
        if not slices:
            raise ValueError(f"{hf_name} has no engine slices: {entry.not_zero_copy_reason}")
        first = slices[0]
        if all(
            s.engine_tensor == first.engine_tensor and s.dim == first.dim and s.start == prev.start + prev.length
            for prev, s in pairwise(slices)
        ):
            # One range of one engine tensor (several blocks of the global HF tensor at TP > 1, e.g. the
            # q, k and v rows of a Qwen3.5 in_proj_qkv shard): one view, never a copy.
            length = sum(s.length for s in slices)
            return self.engine_tensors[first.engine_tensor].narrow(first.dim, first.start, length)
        blocks = [self.engine_tensors[s.engine_tensor].narrow(s.dim, s.start, s.length) for s in slices]
        return torch.cat(blocks, dim=first.dim)

    def update_stream(self):
        """A new UpdateWeights stream for this session (see trainer_side.update_client)."""
        from trainer_side.update_client import UpdateStream

        return UpdateStream(self.stub, self.session_id, self.metadata)

    def close(self, detach: bool = True) -> None:
        """Detaches (unless the session is already gone, e.g. the inference side restarted) and lets go of
        the handles; memory still referenced by bound parameters stays mapped until they move."""
        try:
            if detach:
                self.stub.DetachTrainer(pb.DetachTrainerRequest(session_id=self.session_id), metadata=self.metadata)
        except grpc.RpcError as err:  # the inference side may already be gone; nothing else to release
            log.warning("detach failed", code=err.code().name, details=err.details())
        self.engine_tensors.clear()
        self.storages.clear()
        self.channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _detach_quietly(stub, attached, metadata) -> None:
    """Release a session that attach opened before failing, so it does not linger on the inference side."""
    if attached is None:
        return
    try:
        stub.DetachTrainer(pb.DetachTrainerRequest(session_id=attached.session_id), metadata=metadata)
    except grpc.RpcError as err:
        log.warning("detach after a failed attach failed", code=err.code().name, details=err.details())


def attach(
    address: str, *, token: str | None = None, trainer_name: str = "trainer", tp_rank: int = 0,
    batch_size: int = 0, expected_instance_id: str = "", read_only: bool = False, take_over: bool = False,
) -> AttachedWeights:
    """Opens this rank's served weights. A writer (the default) takes the model's writer lease, which one
    trainer holds at a time (`take_over` ends the holder's session); `read_only` sessions only read."""
    t0 = time.perf_counter()
    channel = grpc_util.open_sync_channel(address)
    stub = pb_grpc.WeightExportServiceStub(channel)
    metadata = grpc_util.call_metadata(token)
    attached = None
    try:
        info = stub.GetModelInfo(pb.GetModelInfoRequest(tp_rank=tp_rank), metadata=metadata)
        if info.contract_version != CONTRACT_VERSION:
            raise AttachError(
                f"inference side speaks contract {info.contract_version!r}, this trainer {CONTRACT_VERSION!r}: "
                "upgrade the older side"
            )
        if info.identity.host_id != shm.host_id():
            raise AttachError(
                f"inference side runs on host {info.identity.host_id}, this trainer on {shm.host_id()}: "
                "weight handles only open on the same machine"
            )
        attached = stub.AttachTrainer(
            pb.AttachTrainerRequest(
                trainer_name=trainer_name, host_id=shm.host_id(), pid=os.getpid(),
                expected_instance_id=expected_instance_id, read_only=read_only, take_over=take_over,
            ),
            metadata=metadata,
        )
        failpoint("attach")
        t_info = time.perf_counter()
        layout_response = stub.GetLayout(pb.GetLayoutRequest(tp_rank=tp_rank), metadata=metadata)
        t_layout = time.perf_counter()
        storages: dict[int, torch.Tensor] = {}
        views = []
        for batch in stub.StreamHandles(
            pb.StreamHandlesRequest(tp_rank=tp_rank, batch_size=batch_size, session_id=attached.session_id),
            metadata=metadata,
        ):
            if batch.instance_id != attached.identity.instance_id:
                raise AttachError("inference side restarted while handles streamed: attach again")
            for storage in batch.storages:
                storages[storage.index] = open_storage(storage)
            views.extend(batch.views)
        t_handles = time.perf_counter()
        engine_tensors = open_views(storages, views)
    except grpc.RpcError as err:
        _detach_quietly(stub, attached, metadata)
        channel.close()
        if err.code() == grpc.StatusCode.UNAVAILABLE:
            raise AttachError(
                f"nothing answers at {address} ({err.details()}): start the inference side first "
                f"(`weightshare serve MODEL --grpc {address}`) or pass its address (--inference)"
            ) from None
        raise AttachError(f"{address}: {err.code().name}: {err.details()}") from None
    except (AttachError, HandleError):
        _detach_quietly(stub, attached, metadata)
        channel.close()
        raise
    t_done = time.perf_counter()
    weights = AttachedWeights(
        address=address, channel=channel, stub=stub, metadata=metadata, session_id=attached.session_id,
        info=info, layout={p.hf_name: p for p in layout_response.parameters},
        engine_tensors=engine_tensors, storages=storages,
        timings={
            "info_s": t_info - t0, "layout_s": t_layout - t_info, "handles_s": t_handles - t_layout,
            "open_views_s": t_done - t_handles, "total_s": t_done - t0,
        },
    )
    log.info(
        "attached", address=address, architecture=info.identity.architecture, tensors=len(engine_tensors),
        storages=len(storages), seconds=round(t_done - t0, 4),
    )
    return weights

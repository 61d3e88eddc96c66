"""Starts WeightExportService (asyncio gRPC, health, reflection, optional bearer token) beside an engine.

`engine` is any object with vLLM's EngineClient methods used here (`collective_rpc`,
`pause_generation`, `resume_generation`, `reset_prefix_cache`): `AsyncLLM` in `weightshare serve`.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import structlog

from inference_side import metrics
from inference_side.servicer import WeightExportServicer
from inference_side.updates import UpdateCoordinator
from weightshare import grpc_util
from weightshare.v1 import update_mode_pb2
from weightshare.v1 import weight_export_service_pb2 as pb
from weightshare.v1 import weight_export_service_pb2_grpc as pb_grpc

log = structlog.get_logger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["WeightExportService"].full_name


@dataclass
class ExportServer:
    server: grpc.aio.Server
    servicer: WeightExportServicer
    coordinator: UpdateCoordinator
    address: str
    collector: metrics.ExportCollector

    async def stop(self, grace_seconds: float = 2.0) -> None:
        # Resume serving first: a trainer mid-update must never leave vLLM paused behind us.
        await self.coordinator.shutdown()
        metrics.unregister(self.collector)
        await self.server.stop(grace_seconds)
        log.info("weight export service stopped", address=self.address)


async def start_export_server(engine, address: str, token: str | None, mode: int) -> ExportServer:
    describes = await engine.collective_rpc("weightshare_describe")
    coordinator = UpdateCoordinator(engine, mode)
    servicer = WeightExportServicer(engine, coordinator, describes)
    server, bound, _health = await grpc_util.start_server(
        pb_grpc.add_WeightExportServiceServicer_to_server, servicer, SERVICE_NAME, address, token
    )
    log.info(
        "weight export service listening", address=bound, instance_id=servicer.instance_id,
        ranks=len(describes), mode=update_mode_pb2.UpdateMode.Name(mode), auth="token" if token else "none",
    )
    return ExportServer(server, servicer, coordinator, bound, metrics.register(coordinator, servicer.sessions))

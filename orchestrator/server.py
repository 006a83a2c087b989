"""The public gRPC server: DecisionService plus standard health checking and server reflection."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from orchestrator.interceptors import TracingInterceptor
from risk.v1 import decision_pb2, decision_pb2_grpc

SERVICE_NAME = decision_pb2.DESCRIPTOR.services_by_name["DecisionService"].full_name


class DecisionServer:
    """A started grpc.aio server; ``port`` is the bound port (useful when configured as 0)."""

    def __init__(self, servicer: decision_pb2_grpc.DecisionServiceServicer, host: str, port: int):
        self._server = grpc.aio.server(interceptors=[TracingInterceptor()])
        decision_pb2_grpc.add_DecisionServiceServicer_to_server(servicer, self._server)
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self._server,
        )
        self.port = self._server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"could not bind {host}:{port}")

    async def start(self) -> None:
        await self._server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace_s: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self._server.stop(grace_s)

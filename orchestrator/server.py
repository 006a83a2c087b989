"""The public gRPC server: DecisionService plus standard health checking and server reflection, over TLS (mutual
TLS as an option) with per-client bearer tokens (orchestrator/auth.py), as ``security`` settings say."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from orchestrator.auth import AccessPolicy, AuthInterceptor, RefusalLog, SecurityError
from orchestrator.interceptors import CallObserver, service_interceptors
from risk.v1 import decision_pb2, decision_pb2_grpc, model_pb2, model_pb2_grpc
from riskcascade.core.config import SecuritySettings

SERVICE_NAME = decision_pb2.DESCRIPTOR.services_by_name["DecisionService"].full_name
MODEL_SERVICE_NAME = model_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name


@dataclass(frozen=True)
class ServerMaterial:
    """What the security settings' files hold: TLS credentials (None: plaintext) and the known clients (None: no
    token checks)."""

    credentials: grpc.ServerCredentials | None
    policy: AccessPolicy | None

    @classmethod
    def load(cls, security: SecuritySettings) -> "ServerMaterial":
        """Read the files (blocking: call it off the event loop); SecurityError names a missing one."""
        credentials = None
        if security.tls:
            client_ca = security.client_ca_file or security.ca_file
            credentials = grpc.ssl_server_credentials(
                [(_read(security.tls_key_file, "tls_key_file"), _read(security.tls_cert_file, "tls_cert_file"))],
                root_certificates=_read(client_ca, "client_ca_file") if security.require_client_cert else None,
                require_client_auth=security.require_client_cert,
            )
        policy = AccessPolicy.load(security.tokens_file) if security.tokens else None
        return cls(credentials, policy)


def _read(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SecurityError(f"cannot read security.{key} {path}: {exc.strerror}") from None


class DecisionServer:
    """A started grpc.aio server; ``port`` is the bound port (useful when configured as 0)."""

    def __init__(
        self,
        servicer: decision_pb2_grpc.DecisionServiceServicer,
        host: str,
        port: int,
        security: SecuritySettings,
        material: ServerMaterial,
        on_call_end: CallObserver | None = None,
        models: model_pb2_grpc.ModelServiceServicer | None = None,
    ):
        if problem := security.exposure_problem(host):
            raise SecurityError(problem)
        auth = (
            [AuthInterceptor(material.policy, security.public_health, RefusalLog(security.refusal_log_interval_s))]
            if material.policy is not None else []
        )
        self._server = grpc.aio.server(interceptors=[*auth, *service_interceptors(on_call_end)])
        decision_pb2_grpc.add_DecisionServiceServicer_to_server(servicer, self._server)
        services = [SERVICE_NAME]
        if models is not None:  # operators' model control (admin role)
            model_pb2_grpc.add_ModelServiceServicer_to_server(models, self._server)
            services.append(MODEL_SERVICE_NAME)
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (*services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self._server,
        )
        address = f"{host}:{port}"
        if material.credentials is not None:
            self.port = self._server.add_secure_port(address, material.credentials)
        else:
            self.port = self._server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"could not bind {host}:{port}")

    @classmethod
    async def open(
        cls, servicer: decision_pb2_grpc.DecisionServiceServicer, host: str, port: int, security: SecuritySettings,
        on_call_end: CallObserver | None = None, models: model_pb2_grpc.ModelServiceServicer | None = None,
    ) -> "DecisionServer":
        """Read the TLS and token files off the event loop, then build the server (not started yet)."""
        material = await asyncio.to_thread(ServerMaterial.load, security)
        return cls(servicer, host, port, security, material, on_call_end, models)

    async def start(self) -> None:
        await self._server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace_s: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self._server.stop(grace_s)

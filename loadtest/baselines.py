"""Server-side pieces the benchmark compares the platform against (never used by the platform itself).

- ``BareGrpcServer``: a grpc.aio server with only the standard health service: the floor of one gRPC round trip.
- ``Echo``: a trivial Ray Serve deployment: the floor of one Serve handle hop.
- ``ScorerGrpcIngress``: risk.v1.DecisionService/Decide served through Ray Serve's own gRPC proxy straight in
  front of the same FastScorer deployment (band decision only: no reasoner, no persistence). This is what a
  user would build with Serve's proxy instead of our orchestrator.
"""

from __future__ import annotations

import time
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from ray import serve
from ray.serve.handle import DeploymentHandle

from loadtest.loadgen import run_bounded
from risk.v1 import decision_pb2 as pb
from riskcascade.domain import ScoreRequest


class BareGrpcServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self._server = grpc.aio.server()
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        self.port = self._server.add_insecure_port(f"{host}:{port}")

    async def start(self) -> None:
        await self._server.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)

    async def stop(self) -> None:
        await self._server.stop(None)


@serve.deployment(name="Echo")
class Echo:
    async def __call__(self, value: Any) -> Any:
        return value


@serve.deployment(name="ScorerGrpcIngress")
class ScorerGrpcIngress:
    def __init__(self, scorer_app: str, band_low: float, band_high: float):
        self._scorer = serve.get_app_handle(scorer_app)  # the platform's own scorer application
        self._band = (band_low, band_high)

    async def Decide(self, request: pb.DecideRequest) -> pb.DecideResponse:
        score = await self._scorer.score.remote(ScoreRequest(request.request_id, dict(request.event.features)))
        low, high = self._band
        action = pb.ACTION_APPROVE if score.score < low else pb.ACTION_BLOCK if score.score >= high else pb.ACTION_REVIEW
        return pb.DecideResponse(
            decision=pb.Decision(
                request_id=request.request_id,
                action=action,
                risk_score=score.score,
                decided_by=pb.STAGE_FAST_MODEL,
                model_version=score.model_version,
            )
        )


def build_echo(args: dict[str, Any]) -> serve.Application:
    return Echo.bind()


def build_scorer_grpc_ingress(args: dict[str, Any]) -> serve.Application:
    return ScorerGrpcIngress.bind(str(args["scorer_app"]), float(args["band_low"]), float(args["band_high"]))


async def handle_round_trips(handle: DeploymentHandle, n: int, concurrency: int) -> list[float]:
    """Latencies (ms) of n trivial handle calls at the given concurrency, measured in this driver."""
    latencies: list[float] = []

    async def call(i: int) -> None:
        started = time.perf_counter()
        await handle.remote(i)
        latencies.append((time.perf_counter() - started) * 1000.0)

    await run_bounded(n, concurrency, call)
    return latencies

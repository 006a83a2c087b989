"""Server-side pieces the benchmark compares the platform against (never used by the platform itself).

- ``BareGrpcServer``: a grpc.aio server with only the standard health service: the floor of one gRPC round trip.
- ``Echo``: a trivial Ray Serve deployment: the floor of one Serve handle hop.
- ``ScorerGrpcIngress``: risk.v1.DecisionService/Decide served through Ray Serve's own gRPC proxy straight in
  front of the same FastScorer deployment, doing the same work the orchestrator's fast path does: validate the
  request as the orchestrator does (against the scorer's feature names and ranges), send the scorer the whole
  event (type, entities, features, time; the graph and entity-state features need them) and apply the band. No
  reasoner, no persistence, no idempotency. This is what a user would build with Serve's proxy instead of our
  orchestrator.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from ray import serve
from ray.exceptions import RayError
from ray.serve.grpc_util import RayServegRPCContext
from ray.serve.handle import DeploymentHandle

from loadtest.loadgen import CallFailed, LoadResult, LoadRun, LoadSpec
from loadtest.machine import ProcessGroups
from orchestrator.validation import InvalidField, to_risk_event
from risk.v1 import decision_pb2 as pb
from riskcascade.core.config import ValidationSettings
from riskcascade.core.domain import ScoreRequest


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
    def __init__(self, scorer_app: str, band_low: float, band_high: float, validation: dict[str, Any] | None = None):
        self._scorer = serve.get_app_handle(scorer_app)  # the platform's own scorer application
        self._band = (band_low, band_high)
        self._limits = ValidationSettings(**(validation or {}))
        self._info: Any = None
        self._info_lock = asyncio.Lock()

    async def _scorer_info(self) -> Any:
        async with self._info_lock:
            if self._info is None:
                self._info = await self._scorer.info.remote()
        return self._info

    async def Decide(  # noqa: N802  (the gRPC method's name)
        self, request: pb.DecideRequest, grpc_context: RayServegRPCContext
    ) -> pb.DecideResponse:
        info = await self._scorer_info()
        try:
            event = to_risk_event(request, info.feature_names, ranges=info.feature_ranges, limits=self._limits)
        except InvalidField as exc:
            grpc_context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
            grpc_context.set_details(str(exc))
            return pb.DecideResponse()
        started = time.perf_counter()
        score = await self._scorer.score.remote(ScoreRequest.of(
            event.request_id, event.event_type, event.entities, event.features,
            occurred_at=event.occurred_at or datetime.now(timezone.utc),  # decided now: the arrival time, as ours
            text=event.text,
        ))
        fast_ms = (time.perf_counter() - started) * 1000.0
        low, high = self._band
        action = (pb.ACTION_APPROVE if score.score < low
                  else pb.ACTION_BLOCK if score.score >= high else pb.ACTION_REVIEW)
        return pb.DecideResponse(
            decision=pb.Decision(
                request_id=request.request_id,
                action=action,
                risk_score=score.score,
                fast_score=score.score,
                decided_by=pb.STAGE_FAST_MODEL,
                model_version=score.model_version,
                scorer_provider=score.provider,
                timings=[pb.StageTiming(stage="fast_model", duration_ms=fast_ms)],
            )
        )


def build_echo(args: dict[str, Any]) -> serve.Application:
    return Echo.bind()


def build_scorer_grpc_ingress(args: dict[str, Any]) -> serve.Application:
    return ScorerGrpcIngress.bind(str(args["scorer_app"]), float(args["band_low"]), float(args["band_high"]),
                                  dict(args.get("validation") or {}))


async def handle_round_trips(handle: DeploymentHandle, spec: LoadSpec, label: str,
                             groups: ProcessGroups | None = None) -> LoadResult:
    """Trivial handle calls measured in this driver, with the load generator's schedule and figures."""

    async def call(i: int) -> None:
        try:
            await handle.remote(i)
        except RayError as exc:
            raise CallFailed(type(exc).__name__) from None

    result = await LoadRun(spec, label, "serve handle (in-driver)", groups).unary(call)
    result.mode = "handle"
    return result

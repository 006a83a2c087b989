"""Ray Serve deployment of the fast scorer: a thin shell around FastModel.

Batching: concurrent requests are scored together through ``@serve.batch``; a request that arrives while the
replica has nothing else in flight is scored at once instead of waiting out the batch window alone (see
ArrivalGate). Batch size and wait come from ``user_config`` in deploy/serve.yaml.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from riskcascade.config import settings_from_wire
from riskcascade.domain import FastScore, ScoreRequest
from riskcascade.telemetry import configure_tracing, span
from services.scorer.arrivals import ArrivalGate
from services.scorer.fast_model import FastModel, ScorerInfo

DEFAULT_MAX_BATCH_SIZE = 64
DEFAULT_BATCH_WAIT_S = 0.002


@serve.deployment(name="FastScorer")
class FastScorer:
    def __init__(self, settings: dict[str, Any]):
        config = settings_from_wire(settings)
        configure_tracing(config.tracing, "scorer")
        self._model = FastModel(
            config.model.dir,
            threads=config.model.onnx_threads,
            reason_count=config.model.reason_count,
            prefer_gpu=config.model.prefer_gpu,
        )
        self._arrivals = ArrivalGate()

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self._score_batched.set_max_batch_size(int(user_config.get("max_batch_size", DEFAULT_MAX_BATCH_SIZE)))
        self._score_batched.set_batch_wait_timeout_s(
            float(user_config.get("batch_wait_timeout_s", DEFAULT_BATCH_WAIT_S))
        )

    async def score(self, request: ScoreRequest) -> FastScore:
        with span("scorer.score", carrier=request.trace_carrier, request_id=request.request_id) as current:
            async with self._arrivals.enter() as lone:
                current.set_attribute("scorer.batched", not lone)
                if lone:
                    return self._model.score_batch([request])[0]
                return await self._score_batched(request)

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_S)
    async def _score_batched(self, rows: list[ScoreRequest]) -> list[FastScore]:
        with span("scorer.batch", batch_size=len(rows)):
            return self._model.score_batch(rows)

    async def info(self) -> ScorerInfo:
        return self._model.info

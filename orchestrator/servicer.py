"""The risk.v1.DecisionService servicer: protobuf in, cascade, persist, protobuf out. Thin on purpose.

Every decision row records the event as decided (time stamped with the arrival time when the caller sent none).
Feedback is persisted, then fanned out to the entity state and the case memory (``FeedbackFanout``) so the next
decision sees it; if that fails the caller gets UNAVAILABLE and a retry with the same feedback_id applies it again.

Idempotency on request_id: a stored decision is replayed (``replayed=true``) when the retried request is the
same, refused with ALREADY_EXISTS when it differs; concurrent duplicates wait for the first one's answer
instead of deciding twice. Every decision is persisted before it is returned; if it cannot be persisted the
caller gets UNAVAILABLE, never an unrecorded decision.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
from collections.abc import Collection
from datetime import datetime

import grpc

from orchestrator.cascade import Cascade, StageError
from orchestrator.convert import decision_to_proto
from orchestrator.feedback import FeedbackFanout
from orchestrator.errors import ApiError, api_error, grpc_status
from orchestrator.store import DecisionRecord, DecisionStore, FeedbackRecord, StoreClosedError, utc_now
from orchestrator.validation import InvalidField, to_feedback, to_risk_event, validate_id
from risk.v1 import decision_pb2 as pb
from risk.v1 import decision_pb2_grpc as pb_grpc
from riskcascade.config import ServerSettings
from riskcascade.domain import Outcome


def fingerprint(message) -> str:
    return hashlib.sha256(message.SerializeToString(deterministic=True)).hexdigest()


class DecisionServicer(pb_grpc.DecisionServiceServicer):
    def __init__(
        self,
        cascade: Cascade,
        store: DecisionStore,
        known_features: Collection[str],
        settings: ServerSettings,
        info: pb.ServiceInfo,
        feedback: FeedbackFanout | None = None,
    ):
        self._cascade = cascade
        self._feedback = feedback
        self._store = store
        self._features = frozenset(known_features)
        self._settings = settings
        self._info = info
        self._in_flight: dict[str, asyncio.Future[DecisionRecord]] = {}

    # -- RPCs -----------------------------------------------------------------------------------------------

    async def Decide(self, request: pb.DecideRequest, context: grpc.aio.ServicerContext) -> pb.DecideResponse:
        try:
            decision = await self._decide(request, self._deadline(context))
        except (ApiError, InvalidField) as exc:
            await context.abort_with_status(grpc_status(api_error(exc)))
        return pb.DecideResponse(decision=decision)

    async def DecideBatch(
        self, request: pb.DecideBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.DecideBatchResponse:
        n = len(request.requests)
        if not 1 <= n <= self._settings.max_batch_items:
            await context.abort_with_status(grpc_status(ApiError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"requests: must hold 1 to {self._settings.max_batch_items} items, got {n}", "requests",
            )))
        deadline = self._deadline(context)
        results = await asyncio.gather(
            *(self._batch_item(item, i, deadline) for i, item in enumerate(request.requests))
        )
        return pb.DecideBatchResponse(results=results)

    async def SubmitFeedback(
        self, request: pb.SubmitFeedbackRequest, context: grpc.aio.ServicerContext
    ) -> pb.SubmitFeedbackResponse:
        try:
            fb = to_feedback(request)
            record = FeedbackRecord(
                fb.feedback_id, fb.request_id, fb.outcome.value, fb.risk_type, fb.note, utc_now().isoformat()
            )
            try:
                stored, inserted = await self._store.put_feedback(record)
            except KeyError:
                raise ApiError(grpc.StatusCode.NOT_FOUND, f"no decision with request_id {fb.request_id!r}") from None
            except (StoreClosedError, OSError) as exc:
                raise ApiError(grpc.StatusCode.UNAVAILABLE, f"feedback could not be persisted: {exc}") from exc
            if not inserted and (stored.request_id, stored.outcome, stored.risk_type, stored.note) != (
                record.request_id, record.outcome, record.risk_type, record.note
            ):
                raise ApiError(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"feedback_id {fb.feedback_id!r} was already used with different content",
                )
            await self._fan_out(stored)
        except (ApiError, InvalidField) as exc:
            await context.abort_with_status(grpc_status(api_error(exc)))
        response = pb.SubmitFeedbackResponse(feedback_id=stored.feedback_id, duplicate=not inserted)
        response.recorded_at.FromJsonString(stored.recorded_at.replace("+00:00", "Z"))
        return response

    async def GetDecision(
        self, request: pb.GetDecisionRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetDecisionResponse:
        try:
            request_id = validate_id(request.request_id, "request_id")
            stored = self._store.get_decision(request_id)
            if stored is None:
                raise ApiError(grpc.StatusCode.NOT_FOUND, f"no decision with request_id {request_id!r}")
        except (ApiError, InvalidField) as exc:
            await context.abort_with_status(grpc_status(api_error(exc)))
        return pb.GetDecisionResponse(decision=pb.Decision.FromString(stored.payload))

    async def GetServiceInfo(
        self, request: pb.GetServiceInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServiceInfo:
        return self._info

    async def _fan_out(self, feedback: FeedbackRecord) -> None:
        """Apply persisted feedback to the entity state and the case memory (again on a retry: both idempotent)."""
        if self._feedback is None:
            return
        decided = await asyncio.to_thread(self._store.get_decision, feedback.request_id)
        if decided is None or not decided.event:
            return  # decided by a version that did not record events: stored, nothing to fold
        recorded = pb.Event.FromString(decided.event)
        # validated when it was decided, against the model that decided it: its own feature names are known
        event = to_risk_event(pb.DecideRequest(request_id=decided.request_id, event=recorded), set(recorded.features))
        try:
            await self._feedback.apply(event, Outcome(feedback.outcome), feedback.risk_type,
                                       datetime.fromisoformat(feedback.recorded_at))
        except StageError as exc:
            raise ApiError(
                grpc.StatusCode.UNAVAILABLE,
                f"feedback {feedback.feedback_id!r} is recorded but not yet applied ({exc}); retry with the same "
                "feedback_id",
            ) from exc

    # -- the decision path ----------------------------------------------------------------------------------

    def _deadline(self, context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        if remaining is None:
            remaining = self._settings.default_deadline_ms / 1000.0
        return time.monotonic() + remaining

    async def _batch_item(self, item: pb.DecideRequest, index: int, deadline: float) -> pb.DecideBatchResult:
        try:
            decision = await self._decide(item, deadline, prefix=f"requests[{index}].")
            return pb.DecideBatchResult(request_id=item.request_id, decision=decision)
        except (ApiError, InvalidField) as exc:
            err = api_error(exc)
            return pb.DecideBatchResult(
                request_id=item.request_id,
                error=pb.ItemError(code=err.code.value[0], message=err.message, field=err.field),
            )

    async def _decide(self, request: pb.DecideRequest, deadline: float, prefix: str = "") -> pb.Decision:
        event = to_risk_event(request, self._features, prefix)
        request_fingerprint = fingerprint(request)
        recorded_event = pb.Event()
        recorded_event.CopyFrom(request.event)
        if event.occurred_at is None:  # decided now: the state, the record and feedback use the arrival time
            event = dataclasses.replace(event, occurred_at=utc_now())
            recorded_event.occurred_at.FromDatetime(event.occurred_at)
        stored = self._store.get_decision(event.request_id)
        if stored is None and event.request_id in self._in_flight:
            stored = await asyncio.shield(self._in_flight[event.request_id])
        if stored is not None:
            return _replay(stored, request_fingerprint)

        future: asyncio.Future[DecisionRecord] = asyncio.get_running_loop().create_future()
        self._in_flight[event.request_id] = future
        try:
            decision = await self._cascade.decide(event, deadline)
            message = decision_to_proto(decision)
            record = DecisionRecord(
                request_id=decision.request_id,
                fingerprint=request_fingerprint,
                action=decision.action.value,
                risk_score=decision.risk_score,
                decided_by=decision.decided_by.value,
                event_type=decision.event_type.value,
                degraded=decision.degraded,
                decided_at=decision.decided_at.isoformat(),
                payload=message.SerializeToString(),
                event=recorded_event.SerializeToString(),
            )
            try:
                stored, inserted = await self._store.put_decision(record)
            except (StoreClosedError, OSError) as exc:
                raise ApiError(grpc.StatusCode.UNAVAILABLE, f"decision could not be persisted: {exc}") from exc
            future.set_result(stored)
            return message if inserted else _replay(stored, request_fingerprint)
        except BaseException as exc:
            if not future.done():
                future.set_exception(exc)
                future.exception()  # mark retrieved: waiters, if any, re-raise it themselves
            raise
        finally:
            self._in_flight.pop(event.request_id, None)


def _replay(stored: DecisionRecord, request_fingerprint: str) -> pb.Decision:
    if stored.fingerprint != request_fingerprint:
        raise ApiError(
            grpc.StatusCode.ALREADY_EXISTS,
            f"request_id {stored.request_id!r} was already decided for a different request",
        )
    decision = pb.Decision.FromString(stored.payload)
    decision.replayed = True
    return decision

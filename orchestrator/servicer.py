"""The risk.v1.DecisionService servicer: protobuf in, cascade, persist, protobuf out. Thin on purpose.

Every decision row records the event as decided (time stamped with the arrival time when the caller sent none).
Feedback is persisted, then fanned out to the entity state and the case memory (``FeedbackFanout``) so the next
decision sees it; if that fails the caller gets UNAVAILABLE and a retry with the same feedback_id applies it again.

Idempotency on request_id (the rules are in risk.v1's proto): a stored complete decision is replayed
(``replayed=true``) when the retried request is the same, refused with ALREADY_EXISTS when it differs; a stored
degraded decision is decided again. Each request_id is decided by one task (a "flight") that belongs to no caller:
a caller that is cancelled or runs out of time stops waiting, the flight goes on and stores its decision, and
concurrent duplicates wait for it -- unless it has a shorter deadline than theirs and comes back degraded, then
they decide again. Every decision is persisted before it is returned; if it cannot be persisted the caller gets
UNAVAILABLE, never an unrecorded decision.

Backpressure: at most ``max_in_flight_decisions`` decisions (batch items count one each) are worked on at once;
past it a call is shed at once with RESOURCE_EXHAUSTED and a retry hint. Store reads and writes never run on the
event loop (the store's read pool and writer thread).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
from collections.abc import Collection, Mapping
from datetime import datetime

import grpc

from orchestrator.cascade import CallBudget, Cascade, StageError
from orchestrator.convert import decision_to_proto
from orchestrator.errors import ApiError, api_error, grpc_status
from orchestrator.feedback import FeedbackFanout
from orchestrator.metrics import GatewayMetrics
from orchestrator.models import ServingModel
from orchestrator.store import (
    DecisionRecord,
    DecisionStore,
    FeedbackRecord,
    StoreBusyError,
    StoreClosedError,
    StoreUnavailableError,
    shadow_json,
    utc_now,
)
from orchestrator.validation import InvalidField, to_feedback, to_risk_event, validate_id
from risk.v1 import decision_pb2 as pb
from risk.v1 import decision_pb2_grpc as pb_grpc
from riskcascade.core.config import ServerSettings, ValidationSettings
from riskcascade.core.domain import Outcome

log = logging.getLogger("riskcascade.servicer")


def fingerprint(message) -> str:
    return hashlib.sha256(message.SerializeToString(deterministic=True)).hexdigest()


def request_fingerprint_of(request: pb.DecideRequest) -> str:
    """The idempotency fingerprint: the request without ``explain``, which asks for more of the answer and does not
    change the event (unset, it is not serialized: fingerprints stored before it existed still match)."""
    if not request.explain:
        return fingerprint(request)
    event_only = pb.DecideRequest()
    event_only.CopyFrom(request)
    event_only.ClearField("explain")
    return fingerprint(event_only)


@dataclasses.dataclass
class _Flight:
    """The one running decision of a request_id, and the deadline it runs under."""

    task: asyncio.Task[tuple[pb.Decision, DecisionRecord, bool]]
    deadline: float


class DecisionServicer(pb_grpc.DecisionServiceServicer):
    def __init__(
        self,
        cascade: Cascade,
        store: DecisionStore,
        known_features: Collection[str],
        settings: ServerSettings,
        info: pb.ServiceInfo,
        feedback: FeedbackFanout | None = None,
        feature_ranges: Mapping[str, tuple[float, float]] | None = None,
        validation: ValidationSettings | None = None,
        metrics: GatewayMetrics | None = None,
    ):
        self._cascade = cascade
        self._feedback = feedback
        self._store = store
        self._features = frozenset(known_features)
        self._ranges = dict(feature_ranges or {})
        self._validation = validation or ValidationSettings()
        self._settings = settings
        self._info = info
        self._in_flight: dict[str, _Flight] = {}
        self._active = 0  # decisions being worked on (a batch counts its items)
        self._metrics = metrics

    # -- RPCs -----------------------------------------------------------------------------------------------

    async def Decide(self, request: pb.DecideRequest, context: grpc.aio.ServicerContext) -> pb.DecideResponse:
        try:
            with self._admit(1, "Decide"):
                decision = await self._decide(request, self._deadline(context))
        except (ApiError, InvalidField) as exc:
            await context.abort_with_status(grpc_status(api_error(exc)))
        return pb.DecideResponse(decision=decision)

    async def DecideBatch(
        self, request: pb.DecideBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.DecideBatchResponse:
        n = len(request.requests)
        try:
            if not 1 <= n <= self._settings.max_batch_items:
                raise ApiError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"requests: must hold 1 to {self._settings.max_batch_items} items, got {n}", "requests",
                )
            with self._admit(n, "DecideBatch"):
                deadline = self._deadline(context)
                call = CallBudget(self._cascade.max_escalations_per_call)
                results = await asyncio.gather(
                    *(self._batch_item(item, i, deadline, call) for i, item in enumerate(request.requests))
                )
        except ApiError as exc:
            await context.abort_with_status(grpc_status(exc))
        return pb.DecideBatchResponse(results=results)

    async def DecideStream(self, request_iterator, context: grpc.aio.ServicerContext):  # noqa: ANN001
        """One result per streamed request, in the order decisions finish. Items are independent events: each has
        its own deadline (the per-item deadline, capped by the call's), escalation budget and admission; at most
        ``max_stream_in_flight`` of this stream's items are decided at once, and the stream is not read further
        until one finishes, so a fast client is slowed by flow control instead of queueing without bound."""
        call_remaining = context.time_remaining()
        call_deadline = time.monotonic() + call_remaining if call_remaining is not None else float("inf")
        item_s = self._settings.stream_item_deadline_ms / 1000.0
        slots = asyncio.Semaphore(self._settings.max_stream_in_flight)
        results: asyncio.Queue[pb.DecideBatchResult | None] = asyncio.Queue()
        items: set[asyncio.Task] = set()

        async def one(item: pb.DecideRequest) -> None:
            try:
                try:
                    with self._admit(1, "DecideStream"):
                        deadline = min(time.monotonic() + item_s, call_deadline)
                        decision = await self._decide(item, deadline)
                    result = pb.DecideBatchResult(request_id=item.request_id, decision=decision)
                except (ApiError, InvalidField) as exc:
                    result = _item_error(item.request_id, api_error(exc))
                except Exception as exc:  # noqa: BLE001 - a bug in one item must not end everyone's stream
                    log.exception("stream item %r failed", item.request_id)
                    result = _item_error(item.request_id, ApiError(grpc.StatusCode.INTERNAL, f"internal error: {exc}"))
                results.put_nowait(result)
            finally:
                slots.release()

        async def read() -> None:
            async for item in request_iterator:
                await slots.acquire()
                task = asyncio.get_running_loop().create_task(one(item))
                items.add(task)
                task.add_done_callback(items.discard)
            await asyncio.gather(*items)
            results.put_nowait(None)

        reader = asyncio.get_running_loop().create_task(read())
        try:
            while (result := await _next_result(results, reader)) is not None:
                yield result
        finally:
            reader.cancel()
            for task in list(items):
                task.cancel()  # the decisions themselves run on as flights: stored, and a retry gets them

    async def SubmitFeedback(
        self, request: pb.SubmitFeedbackRequest, context: grpc.aio.ServicerContext
    ) -> pb.SubmitFeedbackResponse:
        try:
            fb = to_feedback(request, self._validation)
            record = FeedbackRecord(
                fb.feedback_id, fb.request_id, fb.outcome.value, fb.risk_type, fb.note, utc_now().isoformat()
            )
            try:
                stored, inserted = await self._store.put_feedback(record)
            except KeyError:
                raise ApiError(grpc.StatusCode.NOT_FOUND, f"no decision with request_id {fb.request_id!r}") from None
            except StoreBusyError as exc:
                raise ApiError(grpc.StatusCode.UNAVAILABLE, f"feedback not persisted: {exc}",
                               retry_after_ms=self._settings.shed_retry_after_ms) from exc
            except (StoreClosedError, StoreUnavailableError, OSError) as exc:
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
            stored = await self._read(request_id)
            if stored is None:
                raise ApiError(grpc.StatusCode.NOT_FOUND, f"no decision with request_id {request_id!r}")
        except (ApiError, InvalidField) as exc:
            await context.abort_with_status(grpc_status(api_error(exc)))
        return pb.GetDecisionResponse(decision=_stored(stored))

    async def GetServiceInfo(
        self, request: pb.GetServiceInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServiceInfo:
        return self.service_info()

    def service_info(self) -> pb.ServiceInfo:
        """The service as it runs now (a model switch changes the version, band and features)."""
        info = pb.ServiceInfo()
        info.CopyFrom(self._info)
        if self._cascade is not None:  # the live version's, which a switch changes
            live = self._cascade.models.live
            info.model_version = live.version
            info.band_low, info.band_high = live.policy.band_low, live.policy.band_high
            info.scorer_provider, info.scorer_provider_detail = live.info.provider, live.info.provider_detail
            info.ClearField("feature_names")
            info.feature_names.extend(live.info.feature_names)
        return info

    async def _fan_out(self, feedback: FeedbackRecord) -> None:
        """Apply persisted feedback to the entity state and the case memory (again on a retry: both idempotent)."""
        if self._feedback is None:
            return
        decided = await self._read(feedback.request_id)
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

    # -- admission ------------------------------------------------------------------------------------------

    @property
    def active_decisions(self) -> int:
        return self._active

    def _admit(self, n: int, method: str) -> "_Admission":
        limit = self._settings.max_in_flight_decisions
        if self._active + n > limit:
            if self._metrics is not None:
                self._metrics.observe_shed(method)
            raise ApiError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server busy: {self._active} decisions in flight (limit {limit}); retry after "
                f"{self._settings.shed_retry_after_ms} ms",
                retry_after_ms=self._settings.shed_retry_after_ms,
            )
        return _Admission(self, n)

    async def _read(self, request_id: str) -> DecisionRecord | None:
        try:
            return await self._store.aget_decision(request_id)
        except (StoreClosedError, StoreUnavailableError, OSError) as exc:
            raise ApiError(grpc.StatusCode.UNAVAILABLE, f"decision store unavailable: {exc}") from exc

    # -- the decision path ----------------------------------------------------------------------------------

    def _deadline(self, context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        if remaining is None:
            remaining = self._settings.default_deadline_ms / 1000.0
        return time.monotonic() + remaining

    async def _batch_item(
        self, item: pb.DecideRequest, index: int, deadline: float, call: CallBudget
    ) -> pb.DecideBatchResult:
        try:
            decision = await self._decide(item, deadline, prefix=f"requests[{index}].", call=call)
            return pb.DecideBatchResult(request_id=item.request_id, decision=decision)
        except (ApiError, InvalidField) as exc:
            return _item_error(item.request_id, api_error(exc))

    async def _decide(
        self, request: pb.DecideRequest, deadline: float, prefix: str = "", call: CallBudget | None = None
    ) -> pb.Decision:
        # the version this decision is validated, scored and routed for: picked once (a switch may land meanwhile)
        model = self._cascade.models.live if self._cascade is not None else None
        known, ranges = (model.feature_names, model.feature_ranges) if model is not None else (self._features,
                                                                                                  self._ranges)
        event = to_risk_event(request, known, prefix, ranges=ranges, limits=self._validation)
        request_fingerprint = request_fingerprint_of(request)
        recorded_event = pb.Event()
        recorded_event.CopyFrom(request.event)
        if event.occurred_at is None:  # decided now: the state, the record and feedback use the arrival time
            event = dataclasses.replace(event, occurred_at=utc_now())
            recorded_event.occurred_at.FromDatetime(event.occurred_at)
        request_id = event.request_id
        while True:
            stored = await self._read(request_id)
            if stored is not None:
                _check_same(stored, request_fingerprint)
                if not stored.degraded:
                    return self._replayed(stored)
            flight = self._in_flight.get(request_id)
            if flight is None:
                break
            # someone is deciding it now: its answer is ours, unless it comes back degraded while we have more time
            _, record, _ = await asyncio.shield(flight.task)
            _check_same(record, request_fingerprint)
            if not record.degraded or flight.deadline >= deadline:
                return self._replayed(record)
            # degraded under a shorter deadline than ours: decide again (loop: someone else may have started)

        task = asyncio.get_running_loop().create_task(
            self._decide_and_store(event, request_fingerprint, recorded_event, deadline, call, model,
                                   request.explain),
            name=f"decide:{request_id}",
        )
        flight = _Flight(task, deadline)
        self._in_flight[request_id] = flight
        task.add_done_callback(lambda done: self._landed(request_id, flight))
        message, record, written = await asyncio.shield(task)
        return message if written else self._replayed(record)

    def _replayed(self, stored: DecisionRecord) -> pb.Decision:
        if self._metrics is not None:
            self._metrics.observe_replay()
        return _replay(stored)

    def _landed(self, request_id: str, flight: _Flight) -> None:
        if self._in_flight.get(request_id) is flight:
            del self._in_flight[request_id]
        if not flight.task.cancelled():
            flight.task.exception()  # retrieved: an abandoned flight's error is not logged as never retrieved

    async def _decide_and_store(
        self,
        event,  # noqa: ANN001 - riskcascade.core.domain.RiskEvent
        request_fingerprint: str,
        recorded_event: pb.Event,
        deadline: float,
        call: CallBudget | None,
        model: ServingModel | None = None,
        explain: bool = False,
    ) -> tuple[pb.Decision, DecisionRecord, bool]:
        """Decide and persist one request; runs as its own task, so no caller's cancellation stops it."""
        decision = await self._cascade.decide(event, deadline, call, model, explain)
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
            shadow=shadow_json(decision.shadow),
        )
        handed = time.perf_counter()
        try:
            stored, written = await self._store.put_decision(record)
        except StoreBusyError as exc:
            raise ApiError(grpc.StatusCode.UNAVAILABLE, f"decision not persisted: {exc}",
                           retry_after_ms=self._settings.shed_retry_after_ms) from exc
        except Exception as exc:  # noqa: BLE001 - closed, disk, or any failure of the write: not acknowledged
            raise ApiError(grpc.StatusCode.UNAVAILABLE, f"decision could not be persisted: {exc}") from exc
        message.attempt = stored.attempts
        if written and self._metrics is not None:
            self._metrics.observe_decision(decision, time.perf_counter() - handed)
        return message, stored, written


class _Admission:
    def __init__(self, servicer: DecisionServicer, n: int):
        self._servicer = servicer
        self._n = n
        servicer._active += n

    def __enter__(self) -> "_Admission":
        return self

    def __exit__(self, *exc: object) -> None:
        self._servicer._active -= self._n


def _item_error(request_id: str, err: ApiError) -> pb.DecideBatchResult:
    return pb.DecideBatchResult(
        request_id=request_id, error=pb.ItemError(code=err.code.value[0], message=err.message, field=err.field)
    )


async def _next_result(
    results: asyncio.Queue[pb.DecideBatchResult | None], reader: asyncio.Task
) -> pb.DecideBatchResult | None:
    """The next finished item; None once the client has closed its side and every item is answered. A reader
    that failed (the client's stream broke) ends the call with its error."""
    getter = asyncio.ensure_future(results.get())
    try:
        await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        getter.cancel()
        raise
    if getter.done():
        return getter.result()
    getter.cancel()
    if reader.exception() is not None:
        raise reader.exception()
    return await results.get()  # the reader finished: its sentinel (or the last results) is queued


def _check_same(stored: DecisionRecord, request_fingerprint: str) -> None:
    if stored.fingerprint != request_fingerprint:
        raise ApiError(
            grpc.StatusCode.ALREADY_EXISTS,
            f"request_id {stored.request_id!r} was already decided for a different request",
        )


def _stored(stored: DecisionRecord) -> pb.Decision:
    decision = pb.Decision.FromString(stored.payload)
    decision.attempt = stored.attempts
    return decision


def _replay(stored: DecisionRecord) -> pb.Decision:
    decision = _stored(stored)
    decision.replayed = True
    return decision

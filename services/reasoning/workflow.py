"""The reasoning service's controller: a LlamaIndex workflow that hands an escalated case to task agents.

    plan ──┬─> structured_data (entity history, neighbours' outcomes) ─┐
           └─> similar_cases (behaviour + narrative)                 ─┴─> policy_search ─> reasoning ─> reflection

``plan`` writes the event's narrative and decides which agents run; the two case agents run concurrently;
``policy_search`` waits for both, because the risk types their fraud cases show decide which policies to read;
``reasoning`` asks the configured LLM backend for a verdict in the case's bounded schema and falls back to REVIEW
(recorded, never raised) on a malformed, looping, late or failed answer; ``reflection`` checks the verdict against
the evidence and the policy. Every step is a span in the caller's trace and a ``ReasoningStep`` on the verdict.

Nothing that blocks runs on the event loop: the three agents (case memory and policy queries, the text embedding,
and waiting for the case memory's engine lock, which a feedback write may hold) run in the workflow's retrieval
threads (``ReasonerSettings.retrieval_threads``), the model call in its model-call threads
(``LLMSettings.call_threads``), awaited for no longer than its timeout. The steps themselves only build small
objects, so the two case agents really run side by side and other requests' steps keep moving meanwhile.
``close()`` ends the threads.

Any finite input gives a verdict: features too large to narrate are narrated at ``NARRATABLE_MAX`` (see
case_file.py), the weighing bounds its inputs (evidence_weighing.py), and a fallback's score is the fast score
within [0, 1].
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TypeVar

from llama_index.core.llms import LLM
from workflows import Context, Workflow, step
from workflows.events import Event, StartEvent, StopEvent

from retrieval.narrative import event_narrative
from riskcascade.core.config import LLMSettings, ReasonerSettings, ReflectionSettings
from riskcascade.core.domain import (
    REASONER_FALLBACK_CODE,
    Action,
    ReasonCode,
    ReasonerVerdict,
    ReasoningRequest,
    ReasoningStep,
)
from riskcascade.core.telemetry import span
from services.reasoning.agents import PolicyAgent, SimilarCaseAgent, StructuredDataAgent, suspected_risk_types
from services.reasoning.case_file import CaseFile, EvidenceItem, narratable_features
from services.reasoning.evidence_weighing import weigh
from services.reasoning.llm.base import ModelAnswer, ask_for_json_off_loop
from services.reasoning.prompts import build_messages
from services.reasoning.reflection import reflect
from services.reasoning.schema import VerdictDraft, VerdictRejected, parse_verdict, verdict_json_schema

STEP_NAMES = ("plan", "structured_data", "similar_cases", "policy_search", "reasoning", "reflection")
T = TypeVar("T")


@dataclass(frozen=True)
class CaseReviewConfig:
    llm: LLMSettings
    reasoner: ReasonerSettings
    reflection: ReflectionSettings
    backend: str  # name recorded on the verdict
    # The prompt-injection defences, on unless switched off to measure what they prevent (tests; never served):
    quote_free_text: bool = True  # the event's free text JSON-quoted inside the case data block (prompts.py)
    reflect: bool = True  # the reflection step checks the draft against the evidence and the policy


# -- events -----------------------------------------------------------------------------------------------------


class _Planned(Event):
    request: ReasoningRequest
    narrative: str
    carrier: dict[str, str]
    deadline: float  # time.monotonic() by which the verdict must be ready
    steps: tuple[ReasoningStep, ...]


class StructuredDataTask(_Planned):
    pass


class SimilarCasesTask(_Planned):
    pass


class StructuredDataFound(Event):
    found: tuple[EvidenceItem, ...]
    step_record: ReasoningStep


class SimilarCasesFound(Event):
    found: tuple[EvidenceItem, ...]
    step_record: ReasoningStep


class CaseAssembled(Event):
    planned: StructuredDataTask
    case: CaseFile
    steps: tuple[ReasoningStep, ...]


class DraftReady(Event):
    assembled: CaseAssembled
    draft: VerdictDraft | None  # None: the answer was rejected and the verdict falls back to REVIEW
    failure: str  # why it fell back, when it did
    steps: tuple[ReasoningStep, ...]


# -- the workflow -----------------------------------------------------------------------------------------------


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000.0, 3)


class CaseReviewWorkflow(Workflow):
    def __init__(
        self,
        structured: StructuredDataAgent,
        similar: SimilarCaseAgent,
        policy: PolicyAgent,
        llm: LLM,
        config: CaseReviewConfig,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self._structured = structured
        self._similar = similar
        self._policy = policy
        self._llm = llm
        self._config = config
        self._retrieval = ThreadPoolExecutor(config.reasoner.retrieval_threads, thread_name_prefix="reasoner-retrieval")
        self._model_calls = ThreadPoolExecutor(config.llm.call_threads, thread_name_prefix="reasoner-model-call")

    def close(self) -> None:
        """End the worker threads once the calls already made have finished."""
        self._retrieval.shutdown(wait=True)
        self._model_calls.shutdown(wait=True)

    async def _retrieve(self, call: Callable[..., T], *args: object) -> T:
        """``call(*args)`` in a retrieval thread, with the caller's trace context."""
        context = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(self._retrieval, context.run, call, *args)

    async def review(self, request: ReasoningRequest, carrier: dict[str, str]) -> ReasonerVerdict:
        """Run the workflow for one case within its budget. Never raises for a model's failure."""
        deadline = time.monotonic() + request.budget_ms / 1000.0
        return await self.run(request=request, carrier=carrier, deadline=deadline)

    @step
    async def plan(self, ctx: Context, ev: StartEvent) -> StructuredDataTask | SimilarCasesTask | None:
        request: ReasoningRequest = ev.request
        started = time.perf_counter()
        with span("reasoner.plan", carrier=ev.carrier, budget_ms=request.budget_ms):
            event = request.event
            narrative = event_narrative(event.event_type, narratable_features(event.features), event.text)
            record = ReasoningStep(
                "plan",
                f"{event.event_type.value} event, fast score {request.fast_score.score:.3f}, "
                f"budget {request.budget_ms:.0f} ms: structured data and similar cases, then policy, "
                f"reasoning ({self._config.backend}), reflection",
                _ms(started),
            )
        fields = dict(request=request, narrative=narrative, carrier=ev.carrier, deadline=ev.deadline, steps=(record,))
        ctx.send_event(StructuredDataTask(**fields))
        ctx.send_event(SimilarCasesTask(**fields))
        return None

    @step
    async def structured_data(self, ev: StructuredDataTask) -> StructuredDataFound:
        started = time.perf_counter()
        with span("reasoner.structured_data", carrier=ev.carrier) as current:
            found = await self._retrieve(self._structured.run, ev.request.event)
            current.set_attribute("evidence.count", len(found.items))
        return StructuredDataFound(
            found=found.items, step_record=ReasoningStep("structured_data", found.outcome, _ms(started))
        )

    @step
    async def similar_cases(self, ev: SimilarCasesTask) -> SimilarCasesFound:
        started = time.perf_counter()
        with span("reasoner.similar_cases", carrier=ev.carrier) as current:
            found = await self._retrieve(self._similar.run, ev.request.event, ev.narrative)
            current.set_attribute("evidence.count", len(found.items))
        return SimilarCasesFound(
            found=found.items, step_record=ReasoningStep("similar_cases", found.outcome, _ms(started))
        )

    @step
    async def policy_search(
        self, ctx: Context, ev: StructuredDataTask | StructuredDataFound | SimilarCasesFound
    ) -> CaseAssembled | None:
        # The plan's task event is collected too, so this step has the request without a shared store.
        got = ctx.collect_events(ev, [StructuredDataTask, StructuredDataFound, SimilarCasesFound])
        if got is None:
            return None
        planned, structured, similar = got  # in the order asked for
        case_items = structured.found + similar.found
        started = time.perf_counter()
        with span("reasoner.policy_search", carrier=planned.carrier) as current:
            risk_types = suspected_risk_types(case_items, self._config.reasoner.max_policy_risk_types)
            found = await self._retrieve(self._policy.run, planned.narrative, risk_types)
            current.set_attribute("evidence.count", len(found.items))
        request = planned.request
        case = CaseFile(
            request_id=request.event.request_id,
            event_type=request.event.event_type.value,
            fast_score=request.fast_score.score,
            fast_reasons=tuple(r.code for r in request.fast_score.reasons),
            facts=planned.narrative,
            free_text=dict(request.event.text),
            evidence=case_items + found.items,
        )
        steps = planned.steps + (structured.step_record, similar.step_record,
                                 ReasoningStep("policy_search", found.outcome, _ms(started)))
        return CaseAssembled(planned=planned, case=case, steps=steps)

    @step
    async def reasoning(self, ev: CaseAssembled) -> DraftReady:
        cfg = self._config
        started = time.perf_counter()
        with span("reasoner.reasoning", carrier=ev.planned.carrier, backend=cfg.backend) as current:
            # The model may see a trimmed case file; reflection still weighs all the evidence found.
            shown = ev.case.for_prompt(cfg.llm.max_prompt_evidence)
            ids = shown.evidence_ids
            timeout_s = min(cfg.llm.timeout_s, max(0.0, ev.planned.deadline - time.monotonic()))
            answer: ModelAnswer = await ask_for_json_off_loop(
                self._model_calls,
                self._llm,
                build_messages(shown, cfg.llm.max_prompt_chars, cfg.quote_free_text),
                verdict_json_schema(ids),
                cfg.llm.max_output_tokens,
                timeout_s,
                cfg.backend,
            )
            draft, failure = _judge(answer, ids)
            current.set_attribute("llm.finish_reason", answer.finish_reason)
            current.set_attribute("llm.seconds", answer.seconds)
            if failure:
                current.set_attribute("reasoning.fallback", failure)
        outcome = (
            f"{cfg.backend}: {draft.action}, p={draft.fraud_probability:.3f}, confidence {draft.confidence:.2f}, "
            f"{len(draft.cited_evidence)} citations ({answer.seconds * 1000:.0f} ms)"
            if draft
            else f"{cfg.backend}: fell back to review: {failure}"
        )
        return DraftReady(
            assembled=ev, draft=draft, failure=failure,
            steps=ev.steps + (ReasoningStep("reasoning", outcome, _ms(started)),),
        )

    @step
    async def reflection(self, ev: DraftReady) -> StopEvent:
        cfg = self._config
        started = time.perf_counter()
        case, request = ev.assembled.case, ev.assembled.planned.request
        with span("reasoner.reflection", carrier=ev.assembled.planned.carrier) as current:
            weighing = weigh(case.fast_score, case.evidence, cfg.reasoner)
            if ev.draft is None:
                verdict = _fallback(case, request, ev.failure, cfg)
                note = "no draft to check (fallback)"
            elif not cfg.reflect:
                verdict = _verdict(ev.draft, Action(ev.draft.action), ev.draft.risk_type, (), case, cfg)
                note = "reflection switched off: the draft stands unchecked"
            else:
                checked = reflect(ev.draft, case, weighing, cfg.reasoner, cfg.reflection)
                verdict = _verdict(ev.draft, checked.action, checked.risk_type, checked.notes, case, cfg)
                note = "; ".join(checked.notes) or f"{ev.draft.action} stands"
            current.set_attribute("reasoner.action", verdict.action.value)
        steps = ev.steps + (ReasoningStep("reflection", note, _ms(started)),)
        return StopEvent(result=_with_steps(verdict, steps))


def _judge(answer: ModelAnswer, ids: Sequence[str]) -> tuple[VerdictDraft | None, str]:
    if answer.finish_reason == "timeout":
        return None, f"late: {answer.error or f'no complete answer within the budget ({answer.seconds:.2f} s)'}"
    if answer.finish_reason == "length":
        return None, f"looping: answer cut at the token limit after {answer.seconds:.2f} s"
    if answer.finish_reason == "error":
        return None, f"backend error: {answer.error}"
    try:
        return parse_verdict(answer.text, ids), ""
    except VerdictRejected as exc:
        return None, f"malformed: {exc}"


def _cited_first(case: CaseFile, cited: Sequence[str]) -> tuple:
    by_id = case.by_id()
    first = [by_id[i] for i in cited if i in by_id]
    rest = [item for item in case.evidence if item.id not in set(cited)]
    return tuple(item.to_evidence() for item in first + rest)


def _verdict(
    draft: VerdictDraft, action: Action, risk_type: str, notes: Sequence[str], case: CaseFile, cfg: CaseReviewConfig
) -> ReasonerVerdict:
    reasons = [ReasonCode(f"REASONER_{draft.action.upper()}", draft.rationale, round(draft.fraud_probability, 4))]
    if risk_type and risk_type != "none":
        reasons.append(ReasonCode(f"PATTERN:{risk_type}", f"evidence points at {risk_type.replace('_', ' ')}", 0.0))
    reasons += [ReasonCode("REFLECTION", note, 0.0) for note in notes]
    rationale = draft.rationale + (" | reflection: " + "; ".join(notes) if notes else "")
    return ReasonerVerdict(
        action=action,
        score=draft.fraud_probability,
        confidence=draft.confidence if action is Action(draft.action) else 0.0,
        rationale=rationale,
        reasons=tuple(reasons),
        evidence=_cited_first(case, draft.cited_evidence),
        steps=(),
        policy_version=cfg.reasoner.policy_version,
        backend=cfg.backend,
    )


def _fallback(case: CaseFile, request: ReasoningRequest, failure: str, cfg: CaseReviewConfig) -> ReasonerVerdict:
    # The fast score stands as the score: a failed model added no information, and nothing here pretends it did.
    return ReasonerVerdict(
        action=Action.REVIEW,
        score=min(max(request.fast_score.score, 0.0), 1.0),  # a probability, whatever the scorer sent
        confidence=0.0,
        rationale=f"reasoning fell back to review: {failure}",
        reasons=(ReasonCode(REASONER_FALLBACK_CODE, failure, 0.0),),
        evidence=_cited_first(case, ()),
        steps=(),
        policy_version=cfg.reasoner.policy_version,
        backend=cfg.backend,
    )


def _with_steps(verdict: ReasonerVerdict, steps: tuple[ReasoningStep, ...]) -> ReasonerVerdict:
    return replace(verdict, steps=steps)

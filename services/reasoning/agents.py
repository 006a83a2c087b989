"""Task agents of the reasoning workflow: each gathers one kind of evidence for an escalated case.

They are plain objects over the case memory and the policy library (retrieval/), so they can be tested without
the workflow; the workflow (services/reasoning/workflow.py) runs them, times them and traces them.

A past case's outcome counts from when it became known: the case agents ask the memory only for cases whose label
had arrived by the decided event's time (``decided_at``), so no evidence carries a label from the event's future.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from riskcascade.core.domain import RiskEvent
from services.reasoning.case_file import EvidenceItem, EvidenceKind, evidence_id

if TYPE_CHECKING:
    from retrieval.case_memory import CaseMemory, RetrievedCase
    from retrieval.policy_library import PolicyLibrary
    from riskcascade.core.domain import AdjudicatedCase

ACCOUNT = "account_id"


@dataclass(frozen=True)
class Findings:
    items: tuple[EvidenceItem, ...]
    outcome: str  # one line for the decision's step record


def decided_at(event: RiskEvent) -> datetime:
    """The time an event is decided as of: its ``occurred_at``, else now (UTC): a live event without a time is
    decided when it arrives. Past cases whose label arrived later are not evidence for it."""
    return event.occurred_at if event.occurred_at is not None else datetime.now(timezone.utc)


def _case_item(kind: str, case: AdjudicatedCase, similarity: float = 0.0, link: str = "") -> EvidenceItem:
    return EvidenceItem(
        id=evidence_id(kind, case.case_id),
        kind=kind,
        summary=case.summary,
        similarity=similarity,
        outcome=case.outcome,
        risk_type=case.risk_type,
        link=link,
    )


class StructuredDataAgent:
    """The entity's own history and its graph neighbours' outcomes, by payload filters on entity ids.

    History: past cases of the same account. Neighbours: cases of *other* accounts that used the same device,
    IP or payment instrument (``neighbour_links``); a case reached through several links counts once.
    Only cases whose label was known at the event's time (``decided_at``) are read: ``limit`` per entity of those.
    """

    def __init__(self, memory: CaseMemory, limit: int, neighbour_links: Sequence[str]):
        self._memory = memory
        self._limit = limit
        self._links = tuple(neighbour_links)

    def run(self, event: RiskEvent) -> Findings:
        """The account's and its neighbours' past cases, as known when ``event`` is decided: those whose label
        arrived by ``event.occurred_at`` (by now when the event has no time); the event's own case never."""
        if self._limit == 0:
            return Findings((), "disabled (retrieval.entity_history_limit = 0)")
        entities = asdict(event.entities)
        account = entities.get(ACCOUNT, "")
        exclude = (event.request_id,)
        known_by = decided_at(event)
        history = (
            self._memory.cases_with_entity(ACCOUNT, account, self._limit, exclude_case_ids=exclude, known_by=known_by)
            if account
            else []
        )
        items = [_case_item(EvidenceKind.ENTITY_HISTORY, c, link=ACCOUNT) for c in history]
        seen = {c.case_id for c in history}
        neighbours = 0
        for link in self._links:
            value = entities.get(link, "")
            if not value:
                continue
            # The account's own cases are left out inside the engine, so a busy account still gets ``limit``.
            others = self._memory.cases_with_entity(
                link, value, self._limit, exclude_case_ids=exclude, other_than_account=account or None,
                known_by=known_by,
            )
            for case in others:
                if case.case_id in seen:
                    continue
                seen.add(case.case_id)
                neighbours += 1
                items.append(_case_item(EvidenceKind.NEIGHBOUR_CASE, case, link=link))
        hist_fraud = sum(1 for i in items if i.kind == EvidenceKind.ENTITY_HISTORY and i.is_fraud)
        nb_fraud = sum(1 for i in items if i.kind == EvidenceKind.NEIGHBOUR_CASE and i.is_fraud)
        return Findings(
            tuple(items),
            f"account history {len(history)} cases ({hist_fraud} fraud); "
            f"neighbours {neighbours} cases ({nb_fraud} fraud)",
        )


class SimilarCaseAgent:
    """Past cases like this one: by behaviour (the features) and by narrative (the text).

    Only cases whose label was known at the event's time (``decided_at``) are searched: ``top_k`` of those.
    """

    def __init__(self, memory: CaseMemory, top_k: int, narrative_top_k: int):
        self._memory = memory
        self._top_k = top_k
        self._narrative_top_k = narrative_top_k

    def run(self, event: RiskEvent, narrative: str) -> Findings:
        """Cases like ``event`` whose label arrived by ``event.occurred_at`` (by now when the event has no time),
        nearest first: ``top_k`` by behaviour, then up to ``narrative_top_k`` by ``narrative`` not found already."""
        exclude = (event.request_id,)
        known_by = decided_at(event)
        behaviour: list[RetrievedCase] = self._memory.similar_cases(
            event.features, self._top_k, exclude_case_ids=exclude, known_by=known_by
        )
        items = [_case_item(EvidenceKind.SIMILAR_CASE, r.case, r.similarity) for r in behaviour]
        seen = {r.case.case_id for r in behaviour}
        by_text: list[RetrievedCase] = []
        if self._narrative_top_k:
            by_text = self._memory.similar_narratives(
                narrative, self._narrative_top_k, exclude_case_ids=exclude, known_by=known_by
            )
        for r in by_text:
            if r.case.case_id not in seen:  # a case found both ways is cited once, as a behaviour match
                seen.add(r.case.case_id)
                items.append(_case_item(EvidenceKind.NARRATIVE_CASE, r.case, r.similarity))
        fraud = sum(1 for i in items if i.is_fraud)
        return Findings(
            tuple(items),
            f"{len(behaviour)} by behaviour, {len(items) - len(behaviour)} more by narrative; {fraud} fraud",
        )


class PolicyAgent:
    """Passages of the written policy: for the risk types the case evidence points at, else for any.

    It runs in worker threads, one search at a time: the library's engine (an Edge shard, a qdrant-client) is
    used by one thread at a time, as the case memory uses its own.
    """

    def __init__(self, library: PolicyLibrary, top_k: int):
        self._library = library
        self._top_k = top_k
        self._engine = threading.Lock()

    def run(self, narrative: str, risk_types: Sequence[str]) -> Findings:
        query = narrative + (f" Suspected: {', '.join(t.replace('_', ' ') for t in risk_types)}." if risk_types else "")
        with self._engine:
            passages = self._library.search(query, self._top_k, risk_types=list(risk_types) or None)
        items = tuple(
            EvidenceItem(
                id=evidence_id(EvidenceKind.POLICY, p.chunk_id),
                kind=EvidenceKind.POLICY,
                summary=p.text,
                similarity=p.similarity,
                risk_type=p.risk_type,
                allowed_actions=tuple(p.allowed_actions),
                rule_ids=tuple(p.rule_ids),
            )
            for p in passages
        )
        scope = ", ".join(risk_types) if risk_types else "all risk types"
        return Findings(items, f"{len(items)} passages ({scope}): {', '.join(p.chunk_id for p in passages)}")


def suspected_risk_types(items: Sequence[EvidenceItem], limit: int) -> list[str]:
    """Risk types of the fraud cases found, most frequent first (ties by name), at most ``limit``."""
    counts: dict[str, int] = {}
    for item in items:
        if item.is_fraud and item.risk_type:
            counts[item.risk_type] = counts.get(item.risk_type, 0) + 1
    return sorted(counts, key=lambda t: (-counts[t], t))[:limit]

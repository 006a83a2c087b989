"""The case file: what the task agents gathered about one escalated event, as the reasoning step sees it.

Every backend gets the same case file, rendered by ``services.reasoning.prompts``. Evidence items carry the ids a
verdict may cite; free text from the event is data, never instructions (see prompts.py for how it is quoted).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from riskcascade.core.domain import Evidence, Outcome


class EvidenceKind:
    SIMILAR_CASE = "similar_case"  # past case with similar behaviour (features)
    NARRATIVE_CASE = "narrative_case"  # past case with a similar narrative (text)
    ENTITY_HISTORY = "entity_history"  # the same account's past case
    NEIGHBOUR_CASE = "neighbour_case"  # another account's case on a shared device / IP / payment instrument
    POLICY = "policy"  # a passage of the written risk policy

    CASES = (SIMILAR_CASE, NARRATIVE_CASE, ENTITY_HISTORY, NEIGHBOUR_CASE)


PROMPT_ORDER = (
    EvidenceKind.POLICY,
    EvidenceKind.ENTITY_HISTORY,
    EvidenceKind.NEIGHBOUR_CASE,
    EvidenceKind.SIMILAR_CASE,
    EvidenceKind.NARRATIVE_CASE,
)

ID_PREFIX = {
    EvidenceKind.SIMILAR_CASE: "case",
    EvidenceKind.NARRATIVE_CASE: "case",
    EvidenceKind.ENTITY_HISTORY: "history",
    EvidenceKind.NEIGHBOUR_CASE: "neighbour",
    EvidenceKind.POLICY: "policy",
}


def evidence_id(kind: str, key: str) -> str:
    return f"{ID_PREFIX[kind]}:{key}"


NARRATABLE_MAX = sys.float_info.max / 2
"""Largest feature magnitude the reasoner writes a narrative from. ``retrieval.narrative`` rounds numbers to two
significant digits, which can round up by under 5 %: past the largest double for the very largest values
(OverflowError). Below this bound every value reads as it is."""


def narratable_features(features: Mapping[str, float]) -> dict[str, float]:
    """``features`` with finite magnitudes above ``NARRATABLE_MAX`` read as ``NARRATABLE_MAX`` (sign kept); missing
    and non-finite values are left as they are (the narrative leaves them out)."""
    return {name: _narratable(value) for name, value in features.items()}


def _narratable(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return value
    return max(-NARRATABLE_MAX, min(float(value), NARRATABLE_MAX))


@dataclass(frozen=True)
class EvidenceItem:
    id: str
    kind: str
    summary: str
    similarity: float = 0.0  # cosine similarity for retrieved cases and passages; 0 for entity links
    outcome: Outcome | None = None  # None for a policy passage
    risk_type: str = ""
    link: str = ""  # for entity evidence: the shared entity field (account_id, device_id, ip, ...)
    allowed_actions: tuple[str, ...] = ()  # for a policy passage: actions its policy allows
    rule_ids: tuple[str, ...] = ()  # for a policy passage: the rules it states

    @property
    def is_fraud(self) -> bool:
        return self.outcome is Outcome.FRAUD

    def to_prompt(self) -> dict[str, Any]:
        item: dict[str, Any] = {"id": self.id, "kind": self.kind}
        if self.outcome is not None:
            item["outcome"] = self.outcome.value
        if self.risk_type:
            item["risk_type"] = self.risk_type
        if self.kind in (EvidenceKind.SIMILAR_CASE, EvidenceKind.NARRATIVE_CASE, EvidenceKind.POLICY):
            item["similarity"] = round(self.similarity, 3)
        if self.link:
            item["shared"] = self.link
        if self.allowed_actions:
            item["allowed_actions"] = list(self.allowed_actions)
        if self.rule_ids:
            item["rules"] = list(self.rule_ids)
        item["summary"] = self.summary
        return item

    def to_evidence(self) -> Evidence:
        return Evidence(
            id=self.id,
            kind=self.kind,
            similarity=round(self.similarity, 4),
            outcome=self.outcome,
            risk_type=self.risk_type,
            summary=self.summary,
        )


@dataclass(frozen=True)
class CaseFile:
    request_id: str
    event_type: str
    fast_score: float
    fast_reasons: tuple[str, ...]  # the fast model's reason codes, strongest first
    facts: str  # plain-language facts about the event (retrieval.narrative.event_narrative)
    free_text: dict[str, str]  # the event's free-text fields, as received (quoted when rendered)
    evidence: tuple[EvidenceItem, ...]

    @property
    def evidence_ids(self) -> tuple[str, ...]:
        return tuple(item.id for item in self.evidence)

    def by_id(self) -> dict[str, EvidenceItem]:
        return {item.id: item for item in self.evidence}

    def for_prompt(self, max_items: int) -> CaseFile:
        """This case file with at most ``max_items`` evidence items (0 = all), taken in turn from each kind
        (policy, history, neighbours, behaviour, narrative), each kind in retrieval order. The choice never looks
        at outcomes, so trimming cannot tilt the evidence a model sees."""
        if max_items == 0 or len(self.evidence) <= max_items:
            return self
        queues = [[i for i in self.evidence if i.kind == kind] for kind in PROMPT_ORDER]
        chosen: list[EvidenceItem] = []
        while len(chosen) < max_items and any(queues):
            for queue in queues:
                if queue and len(chosen) < max_items:
                    chosen.append(queue.pop(0))
        return replace(self, evidence=tuple(chosen))

    def cases(self) -> list[EvidenceItem]:
        return [item for item in self.evidence if item.kind in EvidenceKind.CASES]

    def policies(self) -> list[EvidenceItem]:
        return [item for item in self.evidence if item.kind == EvidenceKind.POLICY]


def item_from_prompt(data: dict[str, Any]) -> EvidenceItem:
    """Rebuild an evidence item from its prompt form (``EvidenceItem.to_prompt``'s inverse, summary aside)."""
    outcome = data.get("outcome")
    return EvidenceItem(
        id=str(data["id"]),
        kind=str(data["kind"]),
        summary=str(data.get("summary", "")),
        similarity=float(data.get("similarity", 0.0)),
        outcome=Outcome(outcome) if outcome else None,
        risk_type=str(data.get("risk_type", "")),
        link=str(data.get("shared", "")),
        allowed_actions=tuple(data.get("allowed_actions", ())),
        rule_ids=tuple(data.get("rules", ())),
    )

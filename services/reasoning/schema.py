"""The verdict a reasoning backend must produce, as a bounded JSON schema and as a pydantic model.

The schema is built per case: the evidence ids a model may cite are exactly the ones retrieved for that case (an
``enum``), and every string and list is bounded, so a constrained decoder cannot wander or loop and a citation
cannot be invented. ``parse_verdict`` validates an answer against the same bounds (a backend that ignores the
schema is still caught) and says what was wrong.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from riskcascade.core.domain import RISK_TYPES

NO_RISK_TYPE = "none"
RATIONALE_MAX_CHARS = 400
MAX_CITATIONS = 6
ACTIONS = ("approve", "review", "block")
PERCENTS = list(range(101))


class VerdictDraft(BaseModel):
    """One backend's answer for one case, before reflection."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cited_evidence: tuple[str, ...] = Field(max_length=MAX_CITATIONS)
    rationale: str = Field(min_length=1, max_length=RATIONALE_MAX_CHARS)
    risk_type: Literal[(*RISK_TYPES, NO_RISK_TYPE)]  # type: ignore[valid-type]
    action: Literal[ACTIONS]  # type: ignore[valid-type]
    fraud_probability_percent: int = Field(ge=0, le=100)
    confidence_percent: int = Field(ge=0, le=100)

    @property
    def fraud_probability(self) -> float:
        return self.fraud_probability_percent / 100.0

    @property
    def confidence(self) -> float:
        return self.confidence_percent / 100.0


def verdict_json_schema(evidence_ids: Sequence[str]) -> dict[str, Any]:
    """The JSON schema of one case's answer. Property order is generation order: citations and rationale come
    first so a language model states its grounds before its verdict."""
    ids = list(dict.fromkeys(evidence_ids))
    cited: dict[str, Any] = {"type": "array", "maxItems": min(MAX_CITATIONS, len(ids)), "uniqueItems": True}
    if ids:
        cited["items"] = {"type": "string", "enum": ids}
    else:
        cited["maxItems"] = 0
        cited["items"] = {"type": "string", "enum": ["none"]}  # an enum may not be empty; maxItems 0 forbids it
    return {
        "type": "object",
        "properties": {
            "cited_evidence": cited,
            "rationale": {"type": "string", "minLength": 1, "maxLength": RATIONALE_MAX_CHARS},
            "risk_type": {"type": "string", "enum": [*RISK_TYPES, NO_RISK_TYPE]},
            "action": {"type": "string", "enum": list(ACTIONS)},
            # Whole percents as an enum: llama.cpp's schema grammar ignores minimum/maximum, an enum it enforces.
            "fraud_probability_percent": {"type": "integer", "enum": PERCENTS},
            "confidence_percent": {"type": "integer", "enum": PERCENTS},
        },
        "required": [
            "cited_evidence", "rationale", "risk_type", "action", "fraud_probability_percent", "confidence_percent",
        ],
        "additionalProperties": False,
    }


class VerdictRejected(ValueError):
    """An answer that is not a valid verdict for this case; the message says why, for the decision record."""


def parse_verdict(text: str, evidence_ids: Sequence[str]) -> VerdictDraft:
    """Parse and validate one answer; raises VerdictRejected with the first problem found."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise VerdictRejected(f"not JSON ({exc.msg} at char {exc.pos}): {text[:80]!r}") from None
    try:
        draft = VerdictDraft.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "<root>"
        raise VerdictRejected(f"schema: {where}: {first['msg']}") from None
    allowed = set(evidence_ids)
    if unknown := [c for c in draft.cited_evidence if c not in allowed]:
        raise VerdictRejected(f"cites evidence that was not retrieved: {unknown[:3]}")
    # A repeated citation is harmless (and grammars do not enforce uniqueItems): keep the first of each.
    return draft.model_copy(update={"cited_evidence": tuple(dict.fromkeys(draft.cited_evidence))})

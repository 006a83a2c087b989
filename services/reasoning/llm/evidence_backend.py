"""The embedded default backend: the evidence-weighted reasoner as a LlamaIndex LLM.

It reads the same prompt every backend gets, takes the case data block (never the instructions or free text),
weighs the evidence (services/reasoning/evidence_weighing.py) and writes an answer in the case's schema, in
milliseconds. Its citations are the items that carried the verdict; its rationale shows the arithmetic.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    CompletionResponse,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
)
from llama_index.core.llms import CustomLLM
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from pydantic import Field

from riskcascade.core.config import ReasonerSettings
from riskcascade.core.domain import Action
from services.reasoning.case_file import EvidenceItem, EvidenceKind, item_from_prompt
from services.reasoning.evidence_weighing import Weighing, action_for, weigh
from services.reasoning.llm.base import FINISH_REASON, STOP
from services.reasoning.prompts import extract_case_data
from services.reasoning.schema import MAX_CITATIONS, NO_RISK_TYPE, RATIONALE_MAX_CHARS

BACKEND_NAME = "evidence"


class EvidenceWeightedLLM(CustomLLM):
    settings: ReasonerSettings = Field(description="weights and thresholds of the evidence rule")

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(model_name="evidence-weighted-reasoner", is_chat_model=True, num_output=-1)

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        answer = self.answer(extract_case_data(messages))
        return ChatResponse(
            message=ChatMessage(role=MessageRole.ASSISTANT, content=answer),
            additional_kwargs={FINISH_REASON: STOP},
        )

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        answer = self.answer(extract_case_data([ChatMessage(role=MessageRole.USER, content=prompt)]))
        return CompletionResponse(text=answer, additional_kwargs={FINISH_REASON: STOP})

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        yield self.complete(prompt, formatted=formatted, **kwargs)

    def answer(self, data: dict[str, Any]) -> str:
        """The verdict JSON for one case's data."""
        s = self.settings
        prior = float(data["event"]["fast_model_score"])
        items = [item_from_prompt(d) for d in data.get("evidence", [])]
        w = weigh(prior, items, s)
        action = action_for(w.posterior, s)
        policies = [i for i in items if i.kind == EvidenceKind.POLICY and (not w.risk_type or i.risk_type == w.risk_type)]
        allowed = {a.lower() for p in policies for a in p.allowed_actions}
        policy_note = ""
        if allowed and action.value not in allowed:
            policy_note = f"; policy {policies[0].id} does not allow {action.value}"
            action = Action.REVIEW
        cited = _citations(action, items, w, policies)
        return json.dumps(
            {
                "cited_evidence": cited,
                "rationale": _rationale(prior, w, action, s, policy_note)[:RATIONALE_MAX_CHARS],
                "risk_type": w.risk_type if w.risk_type and action is not Action.APPROVE else NO_RISK_TYPE,
                "action": action.value,
                "fraud_probability_percent": round(w.posterior * 100),
                "confidence_percent": round(w.confidence * 100),
            }
        )


def _citations(action: Action, items: list[EvidenceItem], w: Weighing, policies: list[EvidenceItem]) -> list[str]:
    counted = [i for i in items if i.id in w.weights]
    fraud = sorted((i for i in counted if i.is_fraud), key=lambda i: -w.weights[i.id])
    legit = sorted((i for i in counted if not i.is_fraud), key=lambda i: -w.weights[i.id])
    room = MAX_CITATIONS - (1 if policies else 0)
    if action is Action.BLOCK:
        chosen = fraud[:room]
    elif action is Action.APPROVE:
        chosen = legit[:room]
    else:
        half = room // 2
        chosen = fraud[:half] + legit[: room - min(half, len(fraud))]
    ids = [i.id for i in chosen]
    if policies:
        ids.append(policies[0].id)
    return ids[:MAX_CITATIONS]


def _rationale(prior: float, w: Weighing, action: Action, s: ReasonerSettings, policy_note: str) -> str:
    pattern = f"; pattern {w.risk_type}" if w.risk_type else ""
    return (
        f"fast score {prior:.3f} as prior (weight {s.prior_weight:g}); {w.cases_used} cases counted, "
        f"fraud weight {w.fraud_weight:.2f} vs legitimate {w.legit_weight:.2f}; posterior {w.posterior:.3f} -> "
        f"{action.value} (block >= {s.block_at:g}, approve < {s.approve_at:g}){pattern}{policy_note}"
    )

"""Reflection: check a drafted verdict against the evidence and the written policy before it leaves.

Plain rules, each recorded when it fires (all knobs in ReflectionSettings):
1. An APPROVE or BLOCK less confident than ``min_confidence`` becomes REVIEW.
2. A BLOCK must cite at least ``block_needs_fraud_evidence`` past fraud cases and name a risk type.
3. The action must be one the policy of the verdict's risk type allows (when that policy was retrieved).
4. The verdict's fraud probability and the evidence weighing's posterior must agree within ``disagreement``,
   and the action must not be the opposite of what the evidence says (APPROVE against BLOCK evidence or the
   reverse); otherwise REVIEW.
5. A risk type that no retrieved fraud case supports is revised to the one the evidence supports (the action
   is kept; rules 2–4 already ran on it).
Reflection only ever lowers an action to REVIEW; it never approves or blocks on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from riskcascade.core.config import ReasonerSettings, ReflectionSettings
from riskcascade.core.domain import Action
from services.reasoning.case_file import CaseFile
from services.reasoning.evidence_weighing import Weighing, action_for
from services.reasoning.schema import NO_RISK_TYPE, VerdictDraft


@dataclass(frozen=True)
class Reflection:
    action: Action
    risk_type: str
    notes: tuple[str, ...]  # one line per rule that fired; empty when the draft stands

    @property
    def downgraded(self) -> bool:
        return any(note.startswith("downgraded") for note in self.notes)


def reflect(
    draft: VerdictDraft,
    case: CaseFile,
    weighing: Weighing,
    reasoner: ReasonerSettings,
    settings: ReflectionSettings,
) -> Reflection:
    action = Action(draft.action)
    notes: list[str] = []

    def downgrade(why: str) -> None:
        nonlocal action
        if action is not Action.REVIEW:
            notes.append(f"downgraded {action.value} to review: {why}")
            action = Action.REVIEW

    if action is not Action.REVIEW and draft.confidence < settings.min_confidence:
        downgrade(f"confidence {draft.confidence:.2f} < {settings.min_confidence:.2f}")
    by_id = case.by_id()
    cited = [by_id[i] for i in draft.cited_evidence if i in by_id]
    if action is Action.BLOCK:
        fraud_cited = sum(1 for item in cited if item.is_fraud)
        if fraud_cited < settings.block_needs_fraud_evidence:
            downgrade(f"block cites {fraud_cited} fraud cases, policy needs {settings.block_needs_fraud_evidence}")
        elif draft.risk_type == NO_RISK_TYPE:
            downgrade("block names no risk type")
    allowed = {
        a.lower() for p in case.policies() if p.risk_type == draft.risk_type for a in p.allowed_actions
    }
    if allowed and action.value not in allowed:
        downgrade(f"the {draft.risk_type} policy does not allow {action.value}")
    gap = abs(draft.fraud_probability - weighing.posterior)
    if gap > settings.disagreement:
        downgrade(
            f"fraud probability {draft.fraud_probability:.2f} vs evidence {weighing.posterior:.2f} "
            f"(gap {gap:.2f} > {settings.disagreement:.2f})"
        )
    evidence_action = action_for(weighing.posterior, reasoner)
    if {action, evidence_action} == {Action.APPROVE, Action.BLOCK}:
        downgrade(f"the evidence says {evidence_action.value}")
    risk_type = draft.risk_type
    supported = {item.risk_type for item in case.cases() if item.is_fraud and item.risk_type}
    if risk_type != NO_RISK_TYPE and risk_type not in supported and weighing.risk_type:
        notes.append(f"revised risk type {risk_type} to {weighing.risk_type}: no retrieved fraud case is {risk_type}")
        risk_type = weighing.risk_type
    return Reflection(action, risk_type, tuple(notes))

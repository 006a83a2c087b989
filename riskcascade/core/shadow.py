"""What a candidate (a model version, an escalation band, or both) decides beside the live cascade: plain logic,
shared by the gateway's shadow mode (live traffic) and the backtest (recorded traffic).

The candidate routes its own score on its own band. Outside the band its action is the fast model's (APPROVE
below, BLOCK at or above). Inside, it would have escalated: the reasoner is not run a second time for it, so where
the live cascade also escalated the event the candidate's action is the live one (the reasoner's verdict, merged),
and otherwise it is the undecided action (REVIEW), what the platform does with an escalation nobody decided. Each
decision says which of the three it was (``action_from``), so a report can keep them apart.
"""

from __future__ import annotations

from dataclasses import replace

from riskcascade.core.config import EscalationSettings
from riskcascade.core.domain import Action, ShadowDecision
from riskcascade.core.policy import EscalationPolicy, escalation_policy

FROM_FAST_MODEL = "fast_model"  # outside the band: the candidate model decided
FROM_LIVE_REASONER = "live_reasoner"  # escalated by both: the live cascade's outcome
FROM_UNDECIDED = "undecided"  # escalated by the candidate only: the undecided action


def candidate_policy(escalation: EscalationSettings, card_low: float, card_high: float,
                     band: tuple[float | None, float | None] = (None, None)) -> EscalationPolicy:
    """A candidate's band as the platform would route it (``escalation.band_low/high`` win over the card's), then
    ``band``'s edges (either may be None) over both."""
    policy = escalation_policy(escalation, card_low, card_high)
    low, high = band
    return replace(policy, band_low=policy.band_low if low is None else low,
                   band_high=policy.band_high if high is None else high)


def candidate_action(score: float, policy: EscalationPolicy, live_escalated: bool, live_action: Action,
                     undecided: Action) -> tuple[Action, bool, str]:
    """(action, escalated, action_from) of a candidate scoring ``score`` on ``policy``'s band."""
    if score < policy.band_low:
        return Action.APPROVE, False, FROM_FAST_MODEL
    if score >= policy.band_high:
        return Action.BLOCK, False, FROM_FAST_MODEL
    if live_escalated:
        return live_action, True, FROM_LIVE_REASONER
    return undecided, True, FROM_UNDECIDED


def shadow_decision(model_version: str, policy_version: str, score: float, policy: EscalationPolicy,
                    live_escalated: bool, live_action: Action, undecided: Action) -> ShadowDecision:
    action, escalated, source = candidate_action(score, policy, live_escalated, live_action, undecided)
    return ShadowDecision(model_version, policy_version, score, policy.band_low, policy.band_high, action, escalated,
                          source)

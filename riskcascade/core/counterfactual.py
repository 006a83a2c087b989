"""Counterfactual explanations: the smallest change to an event's actionable features that flips the fast model.

Plain logic, no model: the caller passes ``score_rows``, which scores changed copies of the event's request features
through the serving path (services/scorer/fast_model.py: the same model version, the original row's entity-state
features, the anomaly score recomputed, calibration), all candidates in one call.

What may change is the model card's ``actionable`` list (``riskcascade.core.config.ActionableFeature``): a feature is
set to one of its ``set_to`` values, or lowered to one of its ``scale_to`` fractions of its value, and a scaled
feature carries its ``moves_with`` features along by the same fraction, so a derived feature never contradicts the
one it is derived from (lower the amount and the amount-to-typical ratio falls with it). A feature the event does not
carry (missing), or whose move would leave it where it is, offers no move.

"Smallest" is an order on candidates: fewest actionable features changed first, then the smallest total relative
change (a fraction f moves by 1 - f; a value set from v to w by |v - w| / |v|, or 1 from 0), then the order of the
actionable list and the values themselves, so the answer is deterministic. Candidates are enumerated by that order
and cut at ``max_rows``: a cut drops only the larger changes. The first candidate, in that order, scoring below a
target's threshold is the answer for that target; when none does, the answer says so (``found`` False) with the
lowest score reached, and never invents one.

Targets: a score at or above the band's low edge gets APPROVE (score below ``band_low``); one at or above the high
edge (BLOCK) also gets the change that leaves BLOCK (score below ``band_high``, into the band). It is the fast
model's view that flips: an escalated event's final action is the reasoner's, which a counterfactual does not model.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from riskcascade.core.config import ActionableFeature
from riskcascade.core.domain import Action, Counterfactual, FeatureChange

ScoreRows = Callable[[Sequence[Mapping[str, float]]], Sequence[float]]


@dataclass(frozen=True)
class Target:
    action: Action  # what the fast model's view becomes below the threshold
    threshold: float


@dataclass(frozen=True)
class Candidate:
    """A changed copy of the event's features, and how big the change is."""

    features: dict[str, float]
    changes: tuple[FeatureChange, ...]
    key: tuple  # the order "smallest change" is defined by (see the module docstring)


@dataclass(frozen=True)
class _Move:
    index: int  # position in the actionable list (tie-break)
    changes: tuple[FeatureChange, ...]  # the feature, then what moves with it
    relative: float


def targets_for(score: float, band_low: float, band_high: float) -> tuple[Target, ...]:
    """The flips worth searching for a fast score: none below the band (already APPROVE)."""
    if score < band_low:
        return ()
    if score >= band_high:
        return Target(Action.APPROVE, band_low), Target(Action.REVIEW, band_high)
    return (Target(Action.APPROVE, band_low),)


def servable_actionable(spec: Sequence[ActionableFeature], inputs: Sequence[str]) -> list[ActionableFeature]:
    """The entries of ``spec`` a model with request features ``inputs`` has (what training writes into its card):
    an entry whose feature the model lacks is left out, and so is a coupled feature it lacks."""
    known = set(inputs)
    return [a.model_copy(update={"moves_with": tuple(m for m in a.moves_with if m in known)})
            for a in spec if a.name in known]


def _present(features: Mapping[str, float], name: str) -> float | None:
    value = features.get(name)
    return None if value is None or math.isnan(value) else float(value)


def _moves(features: Mapping[str, float], index: int, spec: ActionableFeature) -> list[_Move]:
    value = _present(features, spec.name)
    if value is None:
        return []
    moves = []
    for to in spec.set_to:
        if to != value:
            relative = abs(value - to) / abs(value) if value else 1.0
            moves.append(_Move(index, (FeatureChange(spec.name, value, to, spec.action, spec.spoofable),), relative))
    if value > 0:  # lowering by a fraction means something for a positive value only
        for fraction in spec.scale_to:
            coupled = tuple(
                FeatureChange(name, v, v * fraction, f"moves with {spec.name}", spec.spoofable, derived=True)
                for name in spec.moves_with if (v := _present(features, name)) is not None and v * fraction != v
            )
            change = FeatureChange(spec.name, value, value * fraction, spec.action, spec.spoofable)
            moves.append(_Move(index, (change, *coupled), 1.0 - fraction))
    return moves


def candidates(features: Mapping[str, float], spec: Sequence[ActionableFeature], max_rows: int) -> list[Candidate]:
    """Every combination of allowed moves (at most one per actionable feature), smallest first, at most
    ``max_rows`` of them."""
    options = [m for m in (_moves(features, i, a) for i, a in enumerate(spec)) if m]
    out: list[Candidate] = []
    for size in range(1, len(options) + 1):
        level = []
        for chosen in itertools.combinations(options, size):
            for combo in itertools.product(*chosen):
                changed = dict(features)
                changes = tuple(c for move in combo for c in move.changes)
                changed.update({c.feature: c.to_value for c in changes})
                key = (size, sum(m.relative for m in combo),
                       tuple((m.index, m.changes[0].to_value) for m in combo))
                level.append(Candidate(changed, changes, key))
        level.sort(key=lambda c: c.key)
        out.extend(level[: max_rows - len(out)])
        if len(out) >= max_rows:
            break
    return out


def find_counterfactuals(features: Mapping[str, float], spec: Sequence[ActionableFeature], score_rows: ScoreRows,
                         score: float, band_low: float, band_high: float, max_rows: int) -> tuple[Counterfactual, ...]:
    """The smallest change reaching each target of ``score`` (see ``targets_for``), all candidates scored in one
    ``score_rows`` call; () when the score is below the band."""
    targets = targets_for(score, band_low, band_high)
    if not targets:
        return ()
    rows = candidates(features, spec, max_rows)
    scores = [float(s) for s in score_rows([c.features for c in rows])] if rows else []
    if len(scores) != len(rows):
        raise ValueError(f"score_rows returned {len(scores)} scores for {len(rows)} candidates")
    out = []
    for target in targets:
        hit = next((i for i, s in enumerate(scores) if s < target.threshold), None)
        if hit is None:
            out.append(Counterfactual(target.action, target.threshold, found=False,
                                      score=min(scores, default=score), original_score=score, candidates=len(rows)))
        else:
            out.append(Counterfactual(target.action, target.threshold, found=True, changes=rows[hit].changes,
                                      score=scores[hit], original_score=score, candidates=len(rows)))
    return tuple(out)

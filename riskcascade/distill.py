"""``riskcascade distill``: retrain the fast model with the reasoner's verdicts as soft labels, and say honestly
whether it helped.

Time protocol (a label counts from when it arrived; nothing sees a later period):

- **fit-train / fit-valid**: the period the live model was fitted on (the data set's train and valid split).
- **teach-k** (one per round): the live model (round 1) or the previous round's winner scores these events on
  their time-true features; the events inside its band are reviewed, in time order, by the reasoning service as
  served (``evaluate_cascade.review_each``: retrieval sees only labels arrived before each event). A verdict is
  known when it is given; the true label only from its arrival. The round's **cut** is its last event's time.
- **select**: where every variant is evaluated and the winner rule is applied.
- **report**: the rest, the latest events: never used to fit or to choose; the figures the report stands on.

A round-k student is fitted at cut k (``training.fit_fast_model``, its features the time-true replay the scorer
serves): train = the fit-train and teach-1..k events whose label had arrived by the cut (hard labels) plus, per
variant, taught events whose label had not, with the teacher's probability as a soft label; valid (early
stopping, calibration, band by training's own rule) = the latest ``distill.valid_share`` (by event time) of the
fitting and taught events whose label had arrived by the cut;
the select and report events are only scored. Variants (``VARIANTS``): no teacher (the baseline retrain on the
same data), the teacher's labels at full weight, down-weighted, filtered by the teacher's confidence, and sampled
where the hard-label student is least sure. Later rounds run the baseline and round 1's winning recipe.

Every model (the live one included) is then scored on select and report, its escalations reviewed, merged
(``core.merge``) and costed as the backtest costs (``backtest.decision_figures``, ``training.costs``). The winner
rule (``distill.max_ap_loss``), fixed before the run: on the select period, among variants whose cascade AP is at
most ``max_ap_loss`` below the baseline's, the lowest cost per 1,000 decisions (ties: the baseline, then variant
order). Each round's winner is published as a model version, not made live.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score

from riskcascade.backtest import decision_figures
from riskcascade.core.config import DistillSettings, Settings
from riskcascade.core.domain import FastScore, Outcome, reasoner_fell_back
from riskcascade.core.merge import MergeRules, merge
from riskcascade.core.model_card import ModelCard, load_model_card
from riskcascade.core.model_registry import ModelRegistry
from riskcascade.core.policy import Route, escalation_policy
from riskcascade.evaluate_cascade import review_each, time_true_inputs, time_true_texts
from riskcascade.modelling.datasets.format import Dataset
from riskcascade.report_paths import shown_path

HARD_ONLY, FULL, WEIGHTED, FILTERED, SAMPLED = (
    "hard_only", "teacher_full", "teacher_weighted", "teacher_filtered", "teacher_sampled")
VARIANTS = (HARD_ONLY, FULL, WEIGHTED, FILTERED, SAMPLED)
FIT_TRAIN, FIT_VALID, SELECT, REPORT = "fit-train", "fit-valid", "select", "report"
EVALUATED = (SELECT, REPORT)


def teach_period(round_: int) -> str:
    return f"teach-{round_}"


@dataclass(frozen=True, eq=False)
class Periods:
    """Each data-set row's period, and each round's teaching cut (epoch seconds)."""

    of_row: np.ndarray  # object [N]
    cuts: tuple[float, ...]
    times: np.ndarray  # float [N]: each row's event time (epoch seconds)

    def rows(self, *names: str) -> np.ndarray:
        return np.isin(self.of_row, names)


def assign_periods(times: np.ndarray, base_split: np.ndarray, teaching_shares: Sequence[float],
                   selection_share: float) -> Periods:
    """The fitting period is the base split's train and valid rows; its test rows are cut in time order into the
    teaching periods, select and report by share of events (a row at a boundary's time goes to the earlier
    period, as ``time_split`` does). ValueError when the fitting period does not end before the rest begins."""
    of_row = np.where(base_split == "train", FIT_TRAIN, np.where(base_split == "valid", FIT_VALID, "")).astype(object)
    later = np.flatnonzero(base_split == "test")
    if not len(later) or times[base_split != "test"].max() > times[later].min():
        raise ValueError("distillation needs a time-ordered split: the test events must all follow the fitting ones")
    ordered = np.sort(times[later], kind="stable")
    names = [teach_period(k + 1) for k in range(len(teaching_shares))] + [SELECT]
    ends = np.cumsum([*teaching_shares, selection_share])
    assigned = np.full(len(later), REPORT, dtype=object)
    for name, end in reversed(list(zip(names, ends))):
        assigned[times[later] <= ordered[max(round(len(ordered) * end), 1) - 1]] = name
    of_row[later] = assigned
    cuts = []
    for k in range(len(teaching_shares)):
        rows = of_row == teach_period(k + 1)
        if not rows.any() or not (of_row == REPORT).any():
            raise ValueError("a teaching or the report period holds no event: fewer shares or more events")
        cuts.append(float(times[rows].max()))
    return Periods(of_row, tuple(cuts), times)


@dataclass(frozen=True)
class TeacherLabel:
    """The reasoner's verdict on one escalated event of a teaching period: a soft label, known at review time."""

    row: int  # data-set row
    case_id: str
    probability: float  # the verdict's score
    action: str
    confidence: float
    round: int


@dataclass(frozen=True, eq=False)
class StudentData:
    split: np.ndarray  # object [N]: train / valid / test / "" (feeds the entity state only)
    targets: np.ndarray  # float [N]: a training target in [0, 1], NaN = none
    weights: np.ndarray  # float [N]
    soft: tuple[TeacherLabel, ...]  # the teacher's labels used

    def counts(self) -> dict[str, int]:
        train = self.split == "train"
        soft_rows = [t.row for t in self.soft]
        return {"hard_labels": int((train & ~np.isnan(self.targets)).sum()) - len(soft_rows),
                "soft_labels": len(soft_rows), "valid": int((self.split == "valid").sum()),
                "scored_only": int((self.split == "test").sum())}


def choose_teacher_labels(labels: Sequence[TeacherLabel], variant: str, settings: DistillSettings,
                          student_scores: dict[int, float] | None = None) -> list[TeacherLabel]:
    """The teacher's labels a variant trains on. ``student_scores`` (row -> the hard-label student's calibrated
    score) is needed by the sampled variant only."""
    if variant == HARD_ONLY:
        return []
    if variant in (FULL, WEIGHTED):
        return list(labels)
    if variant == FILTERED:
        return [t for t in labels if abs(t.probability - 0.5) >= settings.confidence_margin]
    if variant == SAMPLED:
        if student_scores is None:
            raise ValueError("the sampled variant needs the hard-label student's scores")
        keep = math.ceil(settings.sample_share * len(labels))
        return sorted(labels, key=lambda t: (abs(student_scores[t.row] - 0.5), t.row))[:keep]
    raise ValueError(f"unknown variant {variant!r}: use one of {', '.join(VARIANTS)}")


def student_data(labels: np.ndarray, label_times: np.ndarray, periods: Periods, round_: int,
                 teacher: Sequence[TeacherLabel], variant: str, settings: DistillSettings,
                 student_scores: dict[int, float] | None = None) -> StudentData:
    """A round's training data at its cut: hard labels only where they had arrived by the cut; the teacher's
    soft labels (by variant) only on taught events of rounds up to this one whose label had not; nothing of the
    select and report periods but scoring."""
    cut = periods.cuts[round_ - 1]
    taught = [teach_period(k) for k in range(1, round_ + 1)]
    known = (labels >= 0) & (label_times <= cut)
    fitting = periods.rows(FIT_TRAIN, FIT_VALID, *taught)
    split = np.full(len(labels), "", dtype=object)
    targets = np.full(len(labels), np.nan)
    weights = np.ones(len(labels))
    split[fitting] = "train"
    targets[fitting & known] = labels[fitting & known]
    # valid: the latest events, by event time, whose label had arrived by the cut. Not the live model's own valid
    # period: its legitimate labels arrive only when their dispute window closes, so by a cut soon after it only
    # fraud labels have (and calibration needs both classes). The latest arrived labels still lean to fraud,
    # which arrives sooner: the report says so.
    labelled = np.flatnonzero(fitting & known)
    latest = labelled[np.argsort(periods.times[labelled], kind="stable")]
    valid = latest[len(latest) - max(1, round(len(latest) * settings.valid_share)):]
    split[valid] = "valid"
    targets[valid] = np.nan
    split[periods.rows(*EVALUATED) & (labels >= 0)] = "test"
    unknown = [t for t in teacher if t.round <= round_ and not known[t.row]]  # an arrived outcome wins
    if any(periods.of_row[t.row] not in taught for t in unknown):
        raise ValueError("a teacher label lies outside the taught periods")
    soft = choose_teacher_labels(unknown, variant, settings, student_scores)
    for t in soft:
        targets[t.row] = t.probability
        weights[t.row] = settings.teacher_weight if variant == WEIGHTED else 1.0
    return StudentData(split, targets, weights, tuple(soft))


def pick_winner(figures: dict[str, dict[str, Any]], max_ap_loss: float) -> tuple[str, list[str]]:
    """The winner rule on each variant's select-period figures: (winner, the variants that qualified)."""
    floor = figures[HARD_ONLY]["ap_cascade"] - max_ap_loss
    qualified = [v for v in figures if figures[v]["ap_cascade"] >= floor]
    order = {v: i for i, v in enumerate(VARIANTS)}
    return min(qualified, key=lambda v: (figures[v]["cost_per_1000"], order[v])), qualified


@dataclass
class ScoredModel:
    """One model's fast scores and routes on every post-fitting event (the base split's test rows, in order)."""

    name: str
    version: str
    folder: Path
    band: tuple[float, float]
    scores: list[FastScore]
    routes: list[Any]
    figures: dict[str, dict[str, Any]] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)


class Distillation:
    """The data, the periods and the offline stages (scoring, reviewing) every model of a run goes through."""

    def __init__(self, settings: Settings, parts: dict[str, list], dataset: Dataset, progress: bool):
        self.settings, self.parts, self.dataset, self.progress = settings, parts, dataset, progress
        self.base_split = dataset.splits[0]
        self.later = np.flatnonzero(self.base_split == "test")  # data-set row of each post-fitting event
        self.events = parts["test"]
        self.periods = assign_periods(dataset.times, self.base_split, settings.distill.teaching_shares,
                                      settings.distill.selection_share)
        self.local_period = self.periods.of_row[self.later]
        self.rules = MergeRules.from_settings(settings.merge)
        self.budget_ms = settings.evaluation.review_budget_ms

    def score(self, name: str, folder: Path) -> ScoredModel:
        from services.scorer.fast_model import FastModel

        card = load_model_card(folder)
        model = FastModel(folder, threads=self.settings.model.onnx_threads,
                          reason_count=self.settings.model.reason_count, prefer_gpu=False,
                          embedding_dir=self.settings.retrieval.embedding_dir)
        x, texts = time_true_inputs(folder, self.parts, "test"), time_true_texts(self.parts, "test")
        batch = self.settings.evaluation.scoring_batch_size
        scores = [s for start in range(0, len(x), batch)
                  for s in model.score_matrix(model.model_input(x[start : start + batch],
                                                                texts[start : start + batch]))]
        band = escalation_policy(self.settings.escalation, card.thresholds.band_low, card.thresholds.band_high)
        routes = [band.route(s.score, self.budget_ms, 0) for s in scores]
        return ScoredModel(name, card.version, folder, (band.band_low, band.band_high), scores, routes)

    def escalated(self, model: ScoredModel, *periods: str) -> list[int]:
        return [i for i, r in enumerate(model.routes)
                if r.route is Route.ESCALATE and self.local_period[i] in periods]

    def teach(self, model: ScoredModel, round_: int) -> tuple[list[TeacherLabel], dict[str, Any]]:
        """The reasoner's verdicts on ``model``'s escalations in teaching period ``round_`` (fallbacks, which
        carry no opinion of the reasoner's, are left out)."""
        todo = self.escalated(model, teach_period(round_))
        reviews = review_each(self.settings, [(self.events[i], model.scores[i]) for i in todo], self.budget_ms,
                              f"teaching round {round_}", self.progress)
        labels, fallbacks = [], 0
        for i, review in zip(todo, reviews):
            v = review.verdict
            if reasoner_fell_back(v.reasons):
                fallbacks += 1
                continue
            labels.append(TeacherLabel(int(self.later[i]), self.events[i].case_id, float(v.score), v.action.value,
                                       float(v.confidence), round_))
        truth = np.array([self.dataset.labels[t.row] for t in labels])
        arrived = [self.dataset.label_times[t.row] <= self.periods.cuts[round_ - 1] for t in labels]
        summary = {
            "round": round_, "teacher_model": model.version, "events": int((self.local_period
                                                                           == teach_period(round_)).sum()),
            "escalated": len(todo), "fallbacks": fallbacks, "verdicts": len(labels),
            "label_arrived_by_cut": int(sum(arrived)),
            "teacher_ap": _ap(truth, np.array([t.probability for t in labels])),
            "fast_ap_on_reviewed": _ap(truth, np.array([model.scores[self.local_of(t.row)].score for t in labels])),
            "fraud_share": float(truth.mean()) if len(truth) else float("nan"),
        }
        return labels, summary

    def local_of(self, row: int) -> int:
        return int(np.searchsorted(self.later, row))

    def evaluate(self, model: ScoredModel) -> None:
        """Review ``model``'s escalations in select and report, merge, and fill ``model.figures`` per period."""
        todo = self.escalated(model, *EVALUATED)
        reviews = review_each(self.settings, [(self.events[i], model.scores[i]) for i in todo], self.budget_ms,
                              f"evaluating {model.name}", self.progress)
        verdicts = {i: r.verdict for i, r in zip(todo, reviews)}
        for period in EVALUATED:
            rows = np.flatnonzero(self.local_period == period)
            merged = [merge(self.rules, model.scores[i], model.routes[i], verdicts.get(i)) for i in rows]
            labels = np.array([self.events[i].label for i in rows])
            escalated = [m.escalated for m in merged]
            outcomes = [Outcome.FRAUD.value if y == 1 else Outcome.LEGITIMATE.value for y in labels]
            costed = decision_figures([m.action.value for m in merged], escalated, outcomes,
                                      self.settings.training.costs)
            in_band = np.array(escalated, dtype=bool)
            fast = np.array([model.scores[i].score for i in rows])
            cascade = np.array([m.risk_score for m in merged])
            model.figures[period] = {
                "events": len(rows), "fraud": int(labels.sum()), "escalation_share": costed["escalation_share"],
                "ap_fast": _ap(labels, fast), "ap_cascade": _ap(labels, cascade),
                "ap_fast_escalated": _ap(labels[in_band], fast[in_band]),
                "ap_cascade_escalated": _ap(labels[in_band], cascade[in_band]),
                "cost_per_1000": costed["cost_per_1000"], "fraud_caught_share": costed["fraud_caught_share"],
                "missed_fraud": costed["missed_fraud"], "false_positives": costed["false_positives"],
                "fallbacks": sum(reasoner_fell_back(verdicts[i].reasons) for i in rows if i in verdicts),
            }


def _ap(labels: np.ndarray, scores: np.ndarray) -> float:
    return float(average_precision_score(labels, scores)) if 0 < labels.sum() < len(labels) else float("nan")


def copy_model(source: Path) -> Any:
    """A ``ModelRegistry.publish`` writer that copies a written model folder (its version name kept)."""
    def write(folder: Path) -> ModelCard:
        shutil.copytree(source, folder, dirs_exist_ok=True)
        return load_model_card(folder)
    return write


def run_distillation(settings: Settings, out_dir: Path, command: str, progress: bool = True) -> dict[str, Any]:
    """The whole run: rounds of teaching, fitting and evaluating; each round's winner published (not live); the
    report written to ``out_dir`` (distill.md, distill.json, distill.png). Returns the report's figures."""
    from riskcascade.distill_report import write_report
    from riskcascade.modelling.datasets import read_split_events
    from riskcascade.modelling.datasets.synthetic_source import synthetic_dataset
    from riskcascade.modelling.training import fit_fast_model, write_model

    cfg = settings.distill
    parts = read_split_events(settings.data.dir)
    dataset = synthetic_dataset(parts)
    registry = ModelRegistry(settings.model.dir)
    if registry.live() is None and not (registry.root / "model.json").exists():
        raise FileNotFoundError(f"no live model in {settings.model.dir}: run `riskcascade train` first")
    live_dir = registry.live_dir()
    live_card = load_model_card(live_dir)
    run = Distillation(settings, parts, dataset, progress)
    fitted = {name: int(((run.base_split == name) & (dataset.labels >= 0)).sum()) for name in ("train", "valid")}
    if {k: live_card.data.get("counts", {}).get(k) for k in fitted} != fitted:
        raise ValueError(f"the live model {live_card.version} was not fitted on {settings.data.dir}'s train and valid "
                         f"events ({live_card.data.get('counts')} vs {fitted}): distil against the data it knows")
    source = {"dataset": "synthetic", "data_dir": shown_path(settings.data.dir), "distilled_from": live_card.version}
    live = run.score("live", live_dir)
    run.evaluate(live)
    teacher_model, teacher, rounds, curve = live, [], [], [live]
    recipe = None
    with tempfile.TemporaryDirectory(prefix="riskcascade-distill-") as work:
        for round_ in range(1, len(cfg.teaching_shares) + 1):
            labels, summary = run.teach(teacher_model, round_)
            teacher += labels
            variants = VARIANTS if recipe is None else tuple(dict.fromkeys((HARD_ONLY, recipe)))
            students: dict[str, ScoredModel] = {}
            for variant in variants:
                scores = None
                if variant == SAMPLED:
                    hard = students[HARD_ONLY]
                    scores = {t.row: hard.scores[run.local_of(t.row)].score for t in teacher}
                data = student_data(dataset.labels, dataset.label_times, run.periods, round_, teacher, variant,
                                    cfg, scores)
                model = fit_fast_model(dataset, data.split, settings.training, settings.data.seed,
                                       state=settings.state, drift_bins=settings.drift.bins,
                                       train_targets=data.targets, train_weights=data.weights,
                                       embedding_dir=settings.retrieval.embedding_dir)
                folder = Path(work) / f"round-{round_}-{variant}"
                write_model(model, folder, {**source, "distill_round": round_, "distill_variant": variant},
                            settings.validation.feature_range_margin)
                student = run.score(variant, folder)
                student.training = {**data.counts(), "best_iteration": model.training["best_iteration"]}
                run.evaluate(student)
                students[variant] = student
            winner, qualified = pick_winner({v: s.figures[SELECT] for v, s in students.items()}, cfg.max_ap_loss)
            card = registry.publish(copy_model(students[winner].folder), make_live=False)
            recipe = recipe or winner
            teacher_model = students[winner]
            curve.append(teacher_model)
            rounds.append({**summary, "winner": winner, "qualified": qualified, "published": card.version,
                           "students": {v: _model_row(s) for v, s in students.items()}})
    report = {
        "command": command, "data": {**source, "events": len(dataset), "seed": settings.data.seed},
        "periods": _periods_summary(run), "settings": cfg.model_dump(mode="json"),
        "band_rule": settings.training.band_rule, "target_escalation_share": settings.training.target_escalation_share,
        "costs": settings.training.costs.model_dump(), "live": _model_row(live), "rounds": rounds,
        "curve": [{"round": k, **_model_row(m)} for k, m in enumerate(curve)],
        "registry": {"dir": shown_path(settings.model.dir), "live": registry.live()},
    }
    write_report(report, out_dir)
    return report


def _model_row(m: ScoredModel) -> dict[str, Any]:
    return {"name": m.name, "version": m.version, "band": list(m.band), "training": m.training,
            "figures": m.figures}


def _periods_summary(run: Distillation) -> list[dict[str, Any]]:
    from datetime import datetime, timezone

    def iso(t: float) -> str:
        return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="minutes")

    names = [FIT_TRAIN, FIT_VALID, *(teach_period(k + 1) for k in range(len(run.periods.cuts))), *EVALUATED]
    out = []
    for name in names:
        rows = run.periods.rows(name)
        times = run.dataset.times[rows]
        out.append({"period": name, "events": int(rows.sum()), "fraud": int((run.dataset.labels[rows] == 1).sum()),
                    "from": iso(times.min()), "to": iso(times.max())})
    for k, cut in enumerate(run.periods.cuts):
        out[2 + k]["cut"] = iso(cut)
    return out

"""riskcascade distill: the point-in-time rules of the student's data, the variants, the winner rule, soft-label
training, and the whole command on a small data set (real training, index, reasoner and registry)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from riskcascade.core.config import DistillSettings, TrainingSettings
from riskcascade.distill import (
    FILTERED,
    FULL,
    HARD_ONLY,
    REPORT,
    SAMPLED,
    SELECT,
    VARIANTS,
    WEIGHTED,
    Periods,
    TeacherLabel,
    assign_periods,
    pick_winner,
    student_data,
    teach_period,
)

DAY = 86_400.0
CFG = DistillSettings()


@pytest.fixture
def timeline():
    """200 events a day apart (train 0-99, valid 100-139, test 140-199), labels arriving 3 days later, but
    faster for every third event; labels alternate fraud/legitimate."""
    n = 200
    times = np.arange(n) * DAY
    base = np.array(["train"] * 100 + ["valid"] * 40 + ["test"] * 60, dtype=object)
    labels = (np.arange(n) % 2).astype(np.int64)
    label_times = times + np.where(np.arange(n) % 3 == 0, 0.5 * DAY, 3 * DAY)
    periods = assign_periods(times, base, (0.25, 0.25), 0.25)
    return times, base, labels, label_times, periods


def teacher_on(periods: Periods, round_: int, probabilities=(0.1, 0.45, 0.9, 0.6, 0.2)) -> list[TeacherLabel]:
    rows = np.flatnonzero(periods.of_row == teach_period(round_))[-len(probabilities):]  # latest: some unlabelled
    return [TeacherLabel(int(r), f"c{r}", p, "review", 0.5, round_) for r, p in zip(rows, probabilities)]


def test_periods_follow_each_other_in_time_and_cut_at_each_teaching_period_end(timeline):
    times, base, _, _, periods = timeline
    order = [teach_period(1), teach_period(2), SELECT, REPORT]
    spans = [times[periods.rows(name)] for name in order]
    assert [len(s) for s in spans] == [15, 15, 15, 15]
    assert all(a.max() < b.min() for a, b in zip(spans, spans[1:]))
    assert times[periods.rows("fit-train", "fit-valid")].max() < spans[0].min()
    assert periods.cuts == (spans[0].max(), spans[1].max())


def test_a_split_not_ordered_by_time_is_refused(timeline):
    times, base, *_ = timeline
    with pytest.raises(ValueError, match="time-ordered"):
        assign_periods(times[::-1].copy(), base, (0.25,), 0.25)


@pytest.mark.parametrize("round_", [1, 2])
def test_only_labels_arrived_by_the_cut_are_hard_labels(timeline, round_):
    _, _, labels, label_times, periods = timeline
    data = student_data(labels, label_times, periods, round_, [], HARD_ONLY, CFG)
    cut = periods.cuts[round_ - 1]
    hard = ~np.isnan(data.targets)
    assert hard.any()
    assert np.all(label_times[hard] <= cut)
    assert np.array_equal(data.targets[hard], labels[hard])
    taught = periods.rows(*(teach_period(k) for k in range(1, round_ + 1)))
    arrived_in_time = taught & (label_times <= cut)
    valid = data.split == "valid"
    # what had arrived is used, to fit or to validate: the rule is not just "drop everything"
    assert np.all((hard | valid)[arrived_in_time])
    assert np.all(label_times[valid] <= cut) and np.all(np.isnan(data.targets[valid]))
    # valid is the latest labelled events (both classes), never the ones fitted on
    times = periods.times
    assert times[valid].min() >= times[hard].max() and set(labels[valid]) == {0, 1}
    assert valid.sum() == round((hard.sum() + valid.sum()) * CFG.valid_share)


def test_no_later_row_or_label_changes_the_students_data(timeline):
    """Everything the student may not know at the cut (labels arriving after it, every select/report row's label)
    is rewritten; the training data must not move."""
    _, _, labels, label_times, periods = timeline
    teacher = teacher_on(periods, 1)
    before = student_data(labels, label_times, periods, 1, teacher, FULL, CFG)
    cut = periods.cuts[0]
    late = label_times > cut
    labels2, label_times2 = labels.copy(), label_times.copy()
    labels2[late] = 1 - labels2[late]
    label_times2[late] += 1000 * DAY
    after = student_data(labels2, label_times2, periods, 1, teacher, FULL, CFG)
    fit = before.split == "train"
    assert np.array_equal(np.nan_to_num(before.targets[fit], nan=-1), np.nan_to_num(after.targets[fit], nan=-1))
    assert np.array_equal(before.weights, after.weights)
    assert np.array_equal(before.split, after.split)


def test_nothing_of_the_select_and_report_periods_is_a_target(timeline):
    _, _, labels, label_times, periods = timeline
    late_teacher = [TeacherLabel(int(r), "x", 0.9, "block", 1.0, 1) for r in np.flatnonzero(periods.rows(REPORT))]
    with pytest.raises(ValueError, match="outside the taught periods"):
        student_data(labels, label_times, periods, 1, late_teacher, FULL, CFG)
    data = student_data(labels, label_times, periods, 2, teacher_on(periods, 1) + teacher_on(periods, 2), FULL, CFG)
    evaluated = periods.rows(SELECT, REPORT)
    assert np.all(np.isnan(data.targets[evaluated])) and set(data.split[evaluated]) == {"test"}
    assert np.any(periods.rows(teach_period(2)) & ~np.isnan(data.targets))  # round 2 does learn from its period


def test_round_one_ignores_the_second_teaching_period(timeline):
    _, _, labels, label_times, periods = timeline
    data = student_data(labels, label_times, periods, 1, teacher_on(periods, 1) + teacher_on(periods, 2), FULL, CFG)
    second = periods.rows(teach_period(2))
    assert np.all(np.isnan(data.targets[second])) and set(data.split[second]) == {""}
    assert all(t.round == 1 for t in data.soft)


def test_soft_labels_are_the_verdicts_probabilities_where_no_label_had_arrived(timeline):
    _, _, labels, label_times, periods = timeline
    teacher = teacher_on(periods, 1)
    data = student_data(labels, label_times, periods, 1, teacher, FULL, CFG)
    cut = periods.cuts[0]
    for t in teacher:
        if label_times[t.row] <= cut:  # an arrived outcome wins over the teacher (to fit on, or to validate)
            assert t not in data.soft
            assert data.targets[t.row] == labels[t.row] or (data.split[t.row] == "valid"
                                                            and np.isnan(data.targets[t.row]))
        else:
            assert data.targets[t.row] == t.probability and t in data.soft
    assert any(label_times[t.row] <= cut for t in teacher) and data.soft


def test_each_variant_uses_the_teachers_labels_as_documented(timeline):
    _, _, labels, label_times, periods = timeline
    teacher = teacher_on(periods, 1, probabilities=(0.1, 0.45, 0.9, 0.6, 0.2, 0.52, 0.48, 0.95, 0.05, 0.55))
    unknown = [t for t in teacher if label_times[t.row] > periods.cuts[0]]
    student = {t.row: s for t, s in zip(teacher, (0.9, 0.5, 0.1, 0.45, 0.02, 0.7, 0.55, 0.3, 0.49, 0.2))}
    got = {v: student_data(labels, label_times, periods, 1, teacher, v, CFG, student) for v in VARIANTS}
    assert got[HARD_ONLY].soft == ()
    assert set(got[FULL].soft) == set(unknown) == set(got[WEIGHTED].soft)
    assert {got[WEIGHTED].weights[t.row] for t in unknown} == {CFG.teacher_weight}
    assert {got[FULL].weights[t.row] for t in unknown} == {1.0}
    assert set(got[FILTERED].soft) == {t for t in unknown if abs(t.probability - 0.5) >= CFG.confidence_margin}
    assert 0 < len(got[FILTERED].soft) < len(unknown)
    sampled = got[SAMPLED].soft
    assert len(sampled) == int(np.ceil(CFG.sample_share * len(unknown)))
    least_sure = sorted(unknown, key=lambda t: abs(student[t.row] - 0.5))[: len(sampled)]
    assert set(sampled) == set(least_sure)


def _figures(ap: float, cost: float) -> dict:
    return {"ap_cascade": ap, "cost_per_1000": cost}


def test_the_winner_is_the_cheapest_variant_within_the_ap_tolerance_of_the_baseline():
    loss = 0.005
    figures = {HARD_ONLY: _figures(0.80, 100.0), FULL: _figures(0.80 - 2 * loss, 50.0),  # cheapest, too much AP lost
               WEIGHTED: _figures(0.80 - loss / 2, 90.0), FILTERED: _figures(0.81, 95.0)}
    winner, qualified = pick_winner(figures, loss)
    assert winner == WEIGHTED and set(qualified) == {HARD_ONLY, WEIGHTED, FILTERED}
    assert pick_winner({FULL: _figures(0.80, 100.0), HARD_ONLY: _figures(0.80, 100.0)}, 0.0)[0] == HARD_ONLY
    assert pick_winner(figures, 1.0)[0] == FULL


def test_soft_labels_train_a_servable_model_that_differs_from_hard_labels(tmp_path):
    """fit_fast_model with train targets: cross-entropy on soft labels, ONNX-exportable, parity checked; the targets
    change the trees; rows marked for scoring only (test, "") never change them."""
    from riskcascade.modelling.datasets.synthetic_source import synthetic_dataset
    from riskcascade.modelling.synthetic import generate_events, split_events
    from riskcascade.modelling.training import fit_fast_model

    dataset = synthetic_dataset(split_events(generate_events(2000, 9), 9))
    split = dataset.splits[0]
    config = TrainingSettings(anomaly_trees=10, max_boost_rounds=40, min_boost_rounds=40, threads=1)
    train = split == "train"
    hard = np.where(train, dataset.labels, np.nan).astype(float)
    soft = hard.copy()
    soft[np.flatnonzero(train)[::4]] = 0.5

    def trees(targets, labels=None, weights=None):
        data = dataset if labels is None else type(dataset)(**{**dataset.__dict__, "labels": labels})
        model = fit_fast_model(data, split, config, 9, train_targets=targets, train_weights=weights)
        assert '"objective": "cross_entropy"' in json.dumps(model.training["params"])
        return model.booster.model_to_string()

    base = trees(hard)
    assert "objective=binary sigmoid:1" in base
    assert trees(soft) != base
    assert trees(hard, weights=np.where(dataset.labels == 1, 3.0, 1.0)) != base
    flipped = dataset.labels.copy()
    flipped[split == "test"] = 1 - flipped[split == "test"]
    assert trees(hard, labels=flipped) == base  # the test rows' labels are only scored against


def test_a_round_winner_is_published_beside_the_live_version_and_not_made_live(tmp_path):
    from riskcascade.core.config import load_settings
    from riskcascade.core.model_registry import ModelRegistry
    from riskcascade.distill import copy_model
    from riskcascade.modelling.datasets.synthetic_source import synthetic_dataset
    from riskcascade.modelling.synthetic import generate_events, split_events
    from riskcascade.modelling.training import fit_fast_model, train_model, write_model

    dataset = synthetic_dataset(split_events(generate_events(2000, 9), 9))
    config = TrainingSettings(anomaly_trees=10, max_boost_rounds=20, min_boost_rounds=20, threads=1)
    settings = load_settings(model={"dir": str(tmp_path / "registry")}, training=config.model_dump())
    live = train_model(settings, dataset, progress=False).version
    targets = np.where(dataset.splits[0] == "train", dataset.labels, np.nan).astype(float)
    student = fit_fast_model(dataset, dataset.splits[0], config, 3, train_targets=targets)
    written = write_model(student, tmp_path / "work", {})
    registry = ModelRegistry(tmp_path / "registry")
    card = registry.publish(copy_model(tmp_path / "work"), make_live=False)
    assert card.version == written.version != live
    assert card.version in registry.names() and registry.live() == live


def test_the_report_lists_every_variant_with_its_figures_and_the_command(tmp_path):
    from riskcascade.distill_report import REPORT_FILES, write_report

    figures = {p: {"events": 10, "fraud": 2, "escalation_share": 0.1, "ap_fast": 0.5, "ap_cascade": 0.6,
                   "ap_fast_escalated": 0.4, "ap_cascade_escalated": 0.45, "cost_per_1000": 123.4,
                   "fraud_caught_share": 0.5, "missed_fraud": 1, "false_positives": 0, "fallbacks": 0}
               for p in (SELECT, REPORT)}

    def model(name, version):
        return {"name": name, "version": version, "band": [0.1, 0.9], "figures": figures,
                "training": {"hard_labels": 7, "soft_labels": 3, "valid": 2, "scored_only": 20, "best_iteration": 5}}

    round_ = {"round": 1, "teacher_model": "live-v", "events": 30, "escalated": 5, "fallbacks": 0, "verdicts": 5,
              "label_arrived_by_cut": 1, "teacher_ap": 0.7, "fast_ap_on_reviewed": 0.6, "fraud_share": 0.2,
              "winner": FULL, "qualified": list(VARIANTS), "published": "v-1",
              "students": {v: model(v, f"v-{v}") for v in VARIANTS}}
    report = {"command": "riskcascade distill --config x.yaml", "data": {"data_dir": "d", "events": 100, "seed": 7},
              "periods": [{"period": "fit-train", "events": 1, "fraud": 0, "from": "a", "to": "b"}],
              "settings": CFG.model_dump(), "band_rule": "share", "target_escalation_share": 0.12,
              "costs": {"review": 1.0}, "live": model("live", "live-v"), "rounds": [round_],
              "curve": [{"round": 0, **model("live", "live-v")}, {"round": 1, **model(FULL, "v-1")}],
              "registry": {"dir": "r", "live": "live-v"}}
    files = write_report(report, tmp_path)
    assert [f.name for f in files] == list(REPORT_FILES) and all(f.stat().st_size for f in files)
    text = files[0].read_text()
    assert "`riskcascade distill --config x.yaml`" in text and "**(winner)**" in text
    for variant in VARIANTS:
        assert text.count(f"| `{variant}`") == 2  # on select and on report
    assert text.count("123.4") == 2 * (len(VARIANTS) + 1) + 2  # every model row on both periods, and the curve
    assert json.loads(files[1].read_text())["rounds"][0]["winner"] == FULL

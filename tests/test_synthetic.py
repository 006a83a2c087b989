"""The synthetic event generator: determinism, labels, features, CSV round trip and validation.

Label arrival times, point-in-time graph features and the time split are tested in ``test_synthetic_time``.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import re
from datetime import timedelta
from pathlib import Path

import pytest

from riskcascade.core.domain import RISK_TYPES, EventType, Outcome
from riskcascade.modelling.synthetic import (
    CSV_COLUMNS,
    FEATURE_DESCRIPTIONS,
    FEATURE_NAMES,
    LabelledEvent,
    generate_events,
    read_events_csv,
    to_adjudicated_case,
    write_events_csv,
)

N_EVENTS = 3000
SEED = 11


@pytest.fixture(scope="module")
def events() -> list[LabelledEvent]:
    return generate_events(N_EVENTS, SEED)


def test_same_seed_gives_the_same_events_and_csv_and_another_seed_does_not(events, tmp_path):
    again = generate_events(N_EVENTS, SEED)
    assert again == events
    first, second = write_events_csv(tmp_path / "a.csv", events), write_events_csv(tmp_path / "b.csv", again)
    assert first.read_bytes() == second.read_bytes()
    assert generate_events(N_EVENTS, SEED + 1) != events


def test_fraud_rate_and_every_risk_type(events):
    fraud_rate = sum(e.label for e in events) / len(events)
    assert 0.08 <= fraud_rate <= 0.12
    assert {e.risk_type for e in events if e.label} == set(RISK_TYPES)
    assert all(e.risk_type == "" for e in events if not e.label)


def test_features_are_named_described_and_finite(events):
    assert 15 <= len(FEATURE_NAMES) <= 22
    assert set(FEATURE_DESCRIPTIONS) == set(FEATURE_NAMES)
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*", name) for name in FEATURE_NAMES)
    for e in events:
        assert list(e.features) == list(FEATURE_NAMES)
        assert all(math.isfinite(v) for v in e.features.values())


def test_events_are_in_time_order_with_unique_ids(events):
    times = [e.occurred_at for e in events]
    assert times == sorted(times)
    assert all(t.tzinfo is not None and e.features["hour_of_day"] == t.hour for t, e in zip(times, events))
    assert len({e.case_id for e in events}) == len(events)


def test_review_length_is_the_length_of_the_review_note(events):
    reviews = [e for e in events if e.event_type is EventType.REVIEW]
    assert reviews
    assert all(e.features["review_length"] == len(e.note) > 0 for e in reviews)
    assert all(e.features["review_length"] == 0 for e in events if e.event_type is not EventType.REVIEW)


def test_signals_overlap_between_fraud_and_legitimate_events(events):
    """Each classic signal also shows up on legitimate events, and some fraud avoids it: nothing is a giveaway."""
    for name, fires in {
        "new_device": lambda v: v == 1,
        "device_account_count": lambda v: v >= 4,
        "ip_account_count": lambda v: v >= 10,
        "failed_logins_24h": lambda v: v >= 2,
        "clicks_per_session": lambda v: v >= 40,
    }.items():
        legit_firing = sum(fires(e.features[name]) for e in events if not e.label)
        fraud_silent = sum(not fires(e.features[name]) for e in events if e.label)
        assert legit_firing > 0 and fraud_silent > 0, name


def test_csv_round_trip_is_exact(events, tmp_path):
    path = write_events_csv(tmp_path / "events.csv", events)
    with path.open() as f:
        assert next(csv.reader(f)) == list(CSV_COLUMNS)
    assert CSV_COLUMNS[-1] == "label_known_at"
    back = read_events_csv(path)
    assert back == events
    assert all(b.label_known_at == e.label_known_at is not None for b, e in zip(back, events))


def test_csv_refuses_to_write_an_event_without_label_arrival(events, tmp_path):
    unknown = dataclasses.replace(events[0], label_known_at=None)
    with pytest.raises(ValueError, match=f"{unknown.case_id}.* no label_known_at"):
        write_events_csv(tmp_path / "events.csv", [unknown])


def _rewrite(path: Path, edit) -> None:
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    edit(rows)
    with path.open("w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)


def test_csv_missing_column_is_named(events, tmp_path):
    path = write_events_csv(tmp_path / "events.csv", events[:5])
    column = CSV_COLUMNS.index("device_account_count")
    _rewrite(path, lambda rows: [row.pop(column) for row in rows])
    with pytest.raises(ValueError, match="missing column 'device_account_count'"):
        read_events_csv(path)


@pytest.mark.parametrize(
    ("column", "row", "value"),
    [
        ("amount", 2, "twelve"),
        ("session_seconds", 4, ""),
        ("clicks_per_session", 1, "inf"),
        ("label", 3, "2"),
        ("event_type", 5, "refund"),
        ("occurred_at", 2, "yesterday"),
        ("label_known_at", 3, "next week"),
        ("label_known_at", 4, "2025-01-20T10:00:00"),
        ("case_id", 1, ""),
    ],
)
def test_csv_bad_value_names_column_and_data_row(events, tmp_path, column, row, value):
    path = write_events_csv(tmp_path / "events.csv", events[:5])

    def edit(rows):
        rows[row][CSV_COLUMNS.index(column)] = value  # rows[0] is the header, so rows[row] is data row `row`

    _rewrite(path, edit)
    with pytest.raises(ValueError, match=rf"data row {row}: bad value .* in column '{column}'"):
        read_events_csv(path)


def test_csv_label_known_before_the_event_names_column_and_data_row(events, tmp_path):
    path = write_events_csv(tmp_path / "events.csv", events[:5])
    occurred, known = CSV_COLUMNS.index("occurred_at"), CSV_COLUMNS.index("label_known_at")
    early = (events[1].occurred_at - timedelta(seconds=1)).isoformat()

    def edit(rows):
        rows[2][known] = early

    _rewrite(path, edit)
    with pytest.raises(ValueError, match=r"data row 2: bad value .* in column 'label_known_at': is before occurred_at"):
        read_events_csv(path)

    def same_moment(rows):
        rows[2][known] = rows[2][occurred]

    _rewrite(path, same_moment)  # a label known at the moment of the event is odd but not impossible
    assert read_events_csv(path)[1].label_known_at == events[1].occurred_at


def test_csv_label_and_risk_type_must_agree(events, tmp_path):
    path = write_events_csv(tmp_path / "events.csv", events[:5])
    label, risk = CSV_COLUMNS.index("label"), CSV_COLUMNS.index("risk_type")

    def edit(rows):
        rows[1][label], rows[1][risk] = "1", ""

    _rewrite(path, edit)
    with pytest.raises(ValueError, match="data row 1: .* column 'risk_type'"):
        read_events_csv(path)


def test_adjudicated_case_carries_outcome_and_a_plain_summary(events):
    fraud = next(e for e in events if e.label)
    legit = next(e for e in events if not e.label)
    case = to_adjudicated_case(fraud)
    assert case.case_id == fraud.case_id and case.outcome is Outcome.FRAUD
    assert case.risk_type == fraud.risk_type and case.features == fraud.features
    assert case.occurred_at == fraud.occurred_at < case.label_known_at == fraud.label_known_at
    assert case.summary.endswith(f"; fraud ({fraud.risk_type})")
    assert "-day-old account" in case.summary and "\n" not in case.summary
    legit_case = to_adjudicated_case(legit)
    assert legit_case.outcome is Outcome.LEGITIMATE and legit_case.summary.endswith("; legitimate")

"""Population stability against the training reference (riskcascade/core/drift.py): bins, PSI, the sliding window."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from riskcascade.core.drift import BinnedColumn, DriftReference, DriftWindow, psi
from riskcascade.core.model_registry import live_model_dir

FLOOR = 1e-4


def reference(rng: np.random.Generator, n: int = 20_000) -> tuple[DriftReference, np.ndarray, np.ndarray]:
    matrix = np.column_stack([rng.normal(100, 20, n), rng.integers(0, 3, n).astype(float), rng.exponential(5, n)])
    matrix[rng.random(n) < 0.05, 2] = np.nan
    scores = rng.beta(1, 8, n)
    return DriftReference.fit(["amount", "new_device", "gap_h"], matrix, scores, bins=10, source="test"), matrix, scores


def test_reference_bins_hold_the_deciles_and_the_missing_share():
    ref, matrix, _ = reference(np.random.default_rng(1))
    amount, flag, gap = ref.features
    assert len(amount.edges) == 9 and sum(amount.shares) == pytest.approx(1.0)
    assert max(amount.shares[:-1]) < 0.11 and amount.shares[-1] == 0.0  # deciles; nothing missing
    assert len(flag.edges) == 3 and sum(s > 0 for s in flag.shares) == 3  # three values: edges deduplicated
    assert gap.shares[-1] == pytest.approx(np.isnan(matrix[:, 2]).mean())
    assert BinnedColumn("x", (1.0, 2.0), ()).bin_of(np.array([0.5, 1.0, 1.5, 2.0, 9.0, np.nan])).tolist() == [
        0, 1, 1, 2, 2, 3]


def test_psi_is_near_zero_on_the_same_population_and_large_on_a_shifted_one():
    rng = np.random.default_rng(2)
    ref, _, _ = reference(rng)
    _, same, same_scores = reference(np.random.default_rng(3), 5000)
    window = DriftWindow(ref, 5000)
    window.add(same, same_scores)
    assert max(window.feature_psi(FLOOR).values()) < 0.02 and window.score_psi(FLOOR) < 0.02

    shifted, shifted_scores = same.copy(), same_scores ** 0.5  # scores moved up, amounts up by a standard deviation
    shifted[:, 0] += 20
    window.add(shifted, shifted_scores)  # replaces every event of the window
    by_feature = window.feature_psi(FLOOR)
    assert by_feature["amount"] > 0.25 and window.score_psi(FLOOR) > 0.25
    assert by_feature["new_device"] < 0.02  # an unchanged column stays stable
    assert window.events == 5000 and window.seen == 10_000


def test_the_window_bins_exactly_as_the_reference_was_binned():
    """The reference's own rows, through the window: every bin share is the reference's, so every PSI is 0."""
    ref, matrix, scores = reference(np.random.default_rng(5), 3000)
    window = DriftWindow(ref, len(matrix))
    window.add(matrix, scores)
    assert max(window.feature_psi(FLOOR).values()) < 1e-12 and window.score_psi(FLOOR) < 1e-12


def test_psi_of_shares_against_counts():
    assert psi(np.array([0.5, 0.5]), np.array([50, 50]), FLOOR) == 0.0
    expected = (0.2 - 0.5) * np.log(0.2 / 0.5) + (0.8 - 0.5) * np.log(0.8 / 0.5)
    assert psi(np.array([0.5, 0.5]), np.array([20, 80]), FLOOR) == pytest.approx(expected)
    assert np.isfinite(psi(np.array([1.0, 0.0]), np.array([0, 10]), FLOOR))  # an empty bin is floored
    assert psi(np.array([0.5, 0.5]), np.array([0, 0]), FLOOR) == 0.0  # no live events yet


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=12), st.integers(1, 50))
def test_the_window_counts_exactly_the_last_events(batches, size):
    rng = np.random.default_rng(sum(batches) + size)
    ref, _, _ = reference(rng, 2000)
    window = DriftWindow(ref, size)
    rows, scores = [], []
    for n in batches:
        _, m, s = reference(rng, n) if n else (None, np.zeros((0, 3)), np.zeros(0))
        window.add(m, s)
        rows.append(m)
        scores.append(s)
    last = np.vstack(rows)[-size:]
    last_scores = np.concatenate(scores)[-size:]
    fresh = DriftWindow(ref, max(len(last), 1))
    fresh.add(last, last_scores)
    assert window.events == len(last)
    assert window.feature_psi(FLOOR) == pytest.approx(fresh.feature_psi(FLOOR))
    assert window.score_psi(FLOOR) == pytest.approx(fresh.score_psi(FLOOR))


def test_reference_round_trips_through_its_file(tmp_path):
    ref, _, _ = reference(np.random.default_rng(4))
    ref.save(tmp_path)
    assert DriftReference.load(tmp_path) == ref
    assert DriftReference.load(tmp_path / "elsewhere") is None


@pytest.mark.slow
def test_drift_report_flags_a_shifted_population_and_not_the_held_out_one(platform, tmp_path):
    """`riskcascade drift` on the session platform's model: its own test split is near the reference, the same
    events with amounts tripled are flagged on amount (and only where it follows), with command and time range."""
    import dataclasses
    import json

    from click.testing import CliRunner

    from riskcascade.cli import main
    from riskcascade.modelling.synthetic import read_events_csv, write_events_csv

    reference = DriftReference.load(live_model_dir(platform.workdir / "model"))
    card = json.loads((live_model_dir(platform.workdir / "model") / "model.json").read_text())
    assert reference is not None and reference.names == card["model_features"]  # training wrote it

    events = read_events_csv(platform.workdir / "data" / "test.csv")
    shifted = [dataclasses.replace(e, case_id=f"shifted-{e.case_id}",
                                   features={**e.features, "amount": e.features["amount"] * 3})
               for e in events]
    write_events_csv(tmp_path / "shifted.csv", shifted)
    runner = CliRunner()
    reports = {}
    for name, args in (("held-out", ["--split", "test"]), ("shifted", ["--events", str(tmp_path / "shifted.csv")])):
        out = tmp_path / name
        result = runner.invoke(main, ["drift", "--config", str(platform.config_path), *args, "--out", str(out)])
        assert result.exit_code == 0, result.output
        reports[name] = json.loads((out / "drift.json").read_text())
        assert (out / "drift.md").read_text().startswith("# Drift of") and (out / "drift.png").stat().st_size > 0
    held, moved = ({f["name"]: f for f in reports[n]["features"]} for n in ("held-out", "shifted"))
    assert held["amount"]["psi"] < 0.1 and moved["amount"]["status"] == "shifted"
    assert moved["amount"]["psi"] > held["amount"]["psi"] + 0.25
    assert reports["shifted"]["n_events"] == len(events) and reports["shifted"]["from"] <= reports["shifted"]["to"]
    assert 0.0 <= reports["held-out"]["escalation_share"]["live"] <= 1.0
    assert runner.invoke(main, ["drift", "--config", str(platform.config_path)]).exit_code != 0  # say which events

    # the band the platform routes by: configured edges win over the model card's
    import yaml

    config = yaml.safe_load(platform.config_path.read_text())
    config["escalation"] = {**config.get("escalation", {}), "band_low": 0.0, "band_high": 1.0}
    (tmp_path / "wide.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "wide"
    result = runner.invoke(main, ["drift", "--config", str(tmp_path / "wide.yaml"), "--split", "test", "--out", str(out)])
    assert result.exit_code == 0, result.output
    wide = json.loads((out / "drift.json").read_text())["escalation_share"]
    assert wide["band"] == [0.0, 1.0] and wide["live"] == 1.0

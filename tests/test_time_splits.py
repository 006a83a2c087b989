"""Splits chosen when a data set brings none: by time for timed data (train on the past, test on the latest), else
stratified; fixed split columns always win. ``choose_split`` names what it chose, for reports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from riskcascade.modelling.datasets.format import Dataset, DatasetSpec, dataset_from_frame
from riskcascade.modelling.datasets.splits import SplitChoice, choose_split, time_split

SHARES = (0.15, 0.15)
PART_ORDER = {"train": 0, "valid": 1, "test": 2}


def timed_dataset(n: int = 40, split_column: bool = False, time_column: bool = True, unlabelled: int = 0) -> Dataset:
    """``n`` rows one hour apart, given in reverse time order; labels alternate fraud / legitimate, the first
    ``unlabelled`` rows (the latest events) have none."""
    hours = np.arange(n)[::-1]
    labels = np.where(np.arange(n) % 2 == 0, "1", "0").astype(object)
    labels[:unlabelled] = ""
    frame = pd.DataFrame({
        "id": [f"e{i}" for i in range(n)],
        "label": labels,
        "x": np.arange(n, dtype=float),
        "at": [f"2025-01-{1 + h // 24:02d}T{h % 24:02d}:00:00+00:00" for h in hours],
    })
    spec: dict = {"name": "timed", "table": Path("t.csv"), "numeric_features": ["x"]}
    if time_column:
        spec["time_column"] = "at"
    if split_column:
        frame["split"] = np.resize(["train", "train", "valid", "test"], n)
        frame.loc[frame.index[-4:], "split"] = ["valid", "valid", "test", "test"]  # both labels in each part
        spec["split_columns"] = ["split"]
    return dataset_from_frame(DatasetSpec.model_validate(spec), frame)


def assert_time_ordered(times: np.ndarray, parts: np.ndarray) -> None:
    """No row of a later part is earlier than (or as early as) a row of an earlier part."""
    rank = np.array([PART_ORDER[p] for p in parts])
    for earlier, later in ((0, 1), (1, 2), (0, 2)):
        if np.any(rank == earlier) and np.any(rank == later):
            assert times[rank == earlier].max() < times[rank == later].min()


# ---------------------------------------------------------------------------------------------------------------
# time_split


def test_time_split_puts_the_earliest_rows_in_train_and_the_latest_in_test():
    times = np.arange(100, dtype=float)[::-1] * 60  # newest first: order of rows must not matter
    parts = time_split(times, 0.15, 0.15)
    assert (parts == "train").sum() == 70 and (parts == "valid").sum() == 15 and (parts == "test").sum() == 15
    assert set(times[parts == "test"]) == set(np.arange(85, 100) * 60.0)
    assert set(times[parts == "train"]) == set(np.arange(70) * 60.0)
    assert_time_ordered(times, parts)


def test_time_split_ties_go_to_the_earlier_part():
    # 10 rows, 60/20/20: by count train ends after the 6th row in time order, but the 6th and 7th share a time
    times = np.array([9, 0, 1, 2, 3, 5, 4, 5, 7, 8], dtype=float)
    parts = time_split(times, 0.2, 0.2)
    by_time = parts[np.argsort(times, kind="stable")]
    assert list(by_time) == ["train"] * 7 + ["valid"] + ["test"] * 2  # both 5s in train; valid keeps what is left
    assert_time_ordered(times, parts)
    all_same = time_split(np.full(20, 5.0), 0.2, 0.2)
    assert set(all_same) == {"train"}  # one instant cannot be split without putting a row before its equal


def test_time_split_rejects_bad_shares_like_stratified_split():
    for valid, test in ((0, 0.2), (0.5, 0.5), (0.2, 1.0), (float("nan"), 0.2)):
        with pytest.raises(ValueError, match="valid_share and test_share"):
            time_split(np.arange(10.0), valid, test)


def test_time_split_rejects_missing_times():
    with pytest.raises(ValueError, match="finite"):
        time_split(np.array([1.0, np.nan, 3.0]), 0.2, 0.2)


@settings(max_examples=200, deadline=None)
@given(
    times=st.lists(st.integers(0, 30), min_size=1, max_size=200),
    valid_share=st.floats(0.01, 0.45), test_share=st.floats(0.01, 0.45),
)
def test_time_split_never_puts_a_later_part_before_an_earlier_one(times, valid_share, test_share):
    times = np.array(times, dtype=float)
    parts = time_split(times, valid_share, test_share)
    assert parts.shape == times.shape and set(parts) <= set(PART_ORDER)
    assert_time_ordered(times, parts)
    if len(np.unique(times)) == len(times):  # without ties the shares are met as stratified_split meets them
        assert (parts == "valid").sum() == round(len(times) * valid_share)
        assert (parts == "test").sum() == round(len(times) * test_share)


# ---------------------------------------------------------------------------------------------------------------
# choose_split


def test_auto_splits_timed_data_by_time():
    data = timed_dataset()
    choice = choose_split(data, 0, "auto", *SHARES, seed=7)
    assert isinstance(choice, SplitChoice)
    assert choice.protocol == "time" and choice.name == "time 70/15/15"
    np.testing.assert_array_equal(choice.split, time_split(data.times, *SHARES))
    assert_time_ordered(data.times, choice.split)
    again = choose_split(data, 0, "auto", *SHARES, seed=8)
    np.testing.assert_array_equal(choice.split, again.split)  # a time split does not depend on the seed


def test_auto_splits_data_without_times_stratified():
    data = timed_dataset(time_column=False)
    choice = choose_split(data, 0, "auto", *SHARES, seed=7)
    assert choice.protocol == "stratified" and choice.name == "stratified seed 7"
    other = choose_split(data, 0, "stratified", *SHARES, seed=8)
    assert other.name == "stratified seed 8" and not np.array_equal(choice.split, other.split)


def test_stratified_rule_on_timed_data_is_stratified():
    data = timed_dataset()
    choice = choose_split(data, 0, "stratified", *SHARES, seed=3)
    assert choice.protocol == "stratified"
    with pytest.raises(AssertionError):
        assert_time_ordered(data.times, choice.split)  # a random split mixes past and future


def test_time_rule_without_a_time_column_is_refused():
    with pytest.raises(ValueError, match="needs a time_column"):
        choose_split(timed_dataset(time_column=False), 0, "time", *SHARES, seed=7)


def test_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="unknown split rule 'random'"):
        choose_split(timed_dataset(), 0, "random", *SHARES, seed=7)


@pytest.mark.parametrize("rule", ["auto", "time", "stratified"])
def test_a_fixed_split_column_wins_over_every_rule(rule):
    data = timed_dataset(split_column=True)
    choice = choose_split(data, 0, rule, *SHARES, seed=7)
    assert choice.protocol == "fixed" and choice.name == "split"
    np.testing.assert_array_equal(choice.split, data.splits[0])
    with pytest.raises(ValueError, match="no split 1"):
        choose_split(data, 1, rule, *SHARES, seed=7)


def test_stratified_split_sends_unlabelled_rows_to_train():
    data = timed_dataset(n=60, unlabelled=10)
    choice = choose_split(data, 0, "stratified", *SHARES, seed=7)
    assert np.all(choice.split[~data.labelled] == "train")
    labelled_parts = choice.split[data.labelled]
    assert (labelled_parts == "valid").sum() == (labelled_parts == "test").sum() == 8  # 15% of 25 per label, x2


def test_time_split_with_a_part_lacking_a_label_is_refused():
    # the latest 10 rows have no label: the test part (latest 15% = 6 rows) has nothing to score
    with pytest.raises(ValueError, match="time 70/15/15 split: the test part needs both"):
        choose_split(timed_dataset(n=40, unlabelled=10), 0, "auto", *SHARES, seed=7)

"""How rows are split into train / valid / test when a data set brings no fixed split of its own.

Data with event times is split by time (train on the past, validate on what came next, test on the latest): a
random split of timed data lets the model learn from events after the ones it is tested on, which production
never can. Data without times (a static graph) is split at random, stratified by label. ``choose_split`` picks
the split one training run uses and says which protocol that was, for reports.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from riskcascade.modelling.datasets.format import SPLIT_NAMES, Dataset, _split_usable

SPLIT_RULES = ("auto", "time", "stratified")
PROTOCOLS = ("time", "stratified", "fixed")


def _check_shares(valid_share: float, test_share: float) -> None:
    if not (0 < valid_share < 1 and 0 < test_share < 1 and valid_share + test_share < 1):
        raise ValueError("valid_share and test_share must be in (0, 1) and sum to less than 1")


def stratified_split(labels: np.ndarray, seed: int, valid_share: float, test_share: float) -> np.ndarray:
    """Per row "train" / "valid" / "test", drawn separately within each label so every part keeps the fraud rate.

    Unlabelled rows (label -1, ``format.UNLABELLED``) are not drawn: they go to train, where they feed features and
    state but no loss, and the valid and test parts keep only rows that can be scored against a label.
    """
    _check_shares(valid_share, test_share)
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    part = np.zeros(len(labels), dtype=np.int64)  # index into SPLIT_NAMES; 0 = train, unlabelled rows included
    for label in (0, 1):
        idx = rng.permutation(np.flatnonzero(labels == label))
        n_valid, n_test = round(len(idx) * valid_share), round(len(idx) * test_share)
        part[idx[:n_valid]] = 1
        part[idx[n_valid : n_valid + n_test]] = 2
    return np.array(SPLIT_NAMES, dtype=object)[part]


def time_split(times: np.ndarray, valid_share: float, test_share: float) -> np.ndarray:
    """Per row "train" / "valid" / "test" by time: the earliest ``1 - valid - test`` share of rows is train, the
    next ``valid_share`` valid, the latest ``test_share`` test.

    The boundaries are times, not row counts: every row at a boundary's time goes to the earlier part, so no
    part holds a row earlier than a row of the part before it, and the shares are met as closely as ties allow.
    """
    _check_shares(valid_share, test_share)
    times = np.asarray(times, dtype=np.float64)
    if times.ndim != 1 or not np.all(np.isfinite(times)):
        raise ValueError("times must be a 1-d array of finite epoch seconds")
    ordered = np.sort(times, kind="stable")
    n = len(times)
    n_test, n_valid = round(n * test_share), round(n * valid_share)
    train_end, valid_end = n - n_valid - n_test, n - n_test  # rows before these positions, in time order
    last_train = ordered[train_end - 1] if train_end > 0 else -np.inf
    last_valid = ordered[valid_end - 1] if valid_end > 0 else -np.inf
    part = np.where(times <= last_train, 0, np.where(times <= last_valid, 1, 2))
    return np.array(SPLIT_NAMES, dtype=object)[part]


@dataclass(frozen=True, eq=False)  # eq would compare arrays element-wise
class SplitChoice:
    """The split one training run uses, and what to call it in a report."""

    split: np.ndarray  # object [N] of "train" / "valid" / "test"
    protocol: str  # one of PROTOCOLS: "time", "stratified" or "fixed" (the data set's own split column)
    name: str  # the split column's name for a fixed split, else e.g. "time 70/15/15" or "stratified seed 7"


def choose_split(
    dataset: Dataset, index: int, rule: str, valid_share: float, test_share: float, seed: int
) -> SplitChoice:
    """The data set's fixed split column ``index`` when it has split columns; else a split by ``rule``.

    ``rule``: "auto" splits by time when the data set has a time column and stratified otherwise; "time" requires
    a time column; "stratified" draws with ``seed`` over the labelled rows (unlabelled rows go to train). ``index``
    and ``seed`` only matter for fixed and stratified splits: a time split is the same every time. A chosen split
    whose valid or test part lacks a labelled fraud or legitimate row is refused (ValueError).
    """
    if rule not in SPLIT_RULES:
        raise ValueError(f"unknown split rule {rule!r}: use one of {', '.join(SPLIT_RULES)}")
    if dataset.splits:
        if not 0 <= index < len(dataset.splits):
            count = len(dataset.splits)
            raise ValueError(f"{dataset.spec.name} has {count} split column(s); there is no split {index}")
        return SplitChoice(dataset.splits[index], "fixed", dataset.spec.split_columns[index])
    if rule == "time" and dataset.times is None:
        raise ValueError(f"split rule 'time' needs a time_column; data set {dataset.spec.name!r} has none")
    if rule == "time" or (rule == "auto" and dataset.times is not None):
        choice = SplitChoice(
            time_split(dataset.times, valid_share, test_share), "time", f"time {_shares(valid_share, test_share)}"
        )
    else:
        choice = SplitChoice(
            stratified_split(dataset.labels, seed, valid_share, test_share), "stratified", f"stratified seed {seed}"
        )
    _split_usable(choice.split, dataset.labels, f"{dataset.spec.name}: {choice.name} split")
    return choice


def _shares(valid_share: float, test_share: float) -> str:
    """The train / valid / test shares in percent, e.g. 70/15/15."""
    percent = [100 * (1 - valid_share - test_share), 100 * valid_share, 100 * test_share]
    return "/".join(f"{p:.0f}" if abs(p - round(p)) < 1e-9 else f"{p:g}" for p in percent)


def is_time_ordered(dataset: Dataset, split: np.ndarray) -> bool:
    """True when ``split`` puts every train row no later than every valid row, and those no later than every test
    row (a time split, or a fixed split column made by time); False without times or with an empty part."""
    if dataset.times is None:
        return False
    parts = [dataset.times[split == name] for name in SPLIT_NAMES]
    if any(len(p) == 0 for p in parts):
        return False
    return bool(parts[0].max() <= parts[1].min() and parts[1].max() <= parts[2].min())

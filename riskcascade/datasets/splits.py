"""Stratified random splits, for data sets that bring no fixed split of their own."""

from __future__ import annotations

import numpy as np

from riskcascade.datasets.format import SPLIT_NAMES


def stratified_split(labels: np.ndarray, seed: int, valid_share: float, test_share: float) -> np.ndarray:
    """Per row "train" / "valid" / "test", drawn separately within each label so every part keeps the fraud rate."""
    if not (0 < valid_share < 1 and 0 < test_share < 1 and valid_share + test_share < 1):
        raise ValueError("valid_share and test_share must be in (0, 1) and sum to less than 1")
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    part = np.zeros(len(labels), dtype=np.int64)  # index into SPLIT_NAMES
    for label in (0, 1):
        idx = rng.permutation(np.flatnonzero(labels == label))
        n_valid, n_test = round(len(idx) * valid_share), round(len(idx) * test_share)
        part[idx[:n_valid]] = 1
        part[idx[n_valid : n_valid + n_test]] = 2
    return np.array(SPLIT_NAMES, dtype=object)[part]

"""Evaluation measures for the fast model that scikit-learn does not provide in the form we report.

Recall at a fixed false-positive rate is how fraud teams read a model: "block 1% of good customers, catch how much
fraud?". Expected calibration error says whether a score of 0.3 really means three in ten, which the escalation
band and the reasoner's prior both rely on.
"""

from __future__ import annotations

import numpy as np

DEFAULT_ECE_BINS = 10


def threshold_at_fpr(scores: np.ndarray, labels: np.ndarray, fpr: float) -> float:
    """The lowest threshold t such that at most ``fpr`` of legitimate events have score >= t.

    Ties are kept on the safe side: a threshold never splits legitimate events with equal scores, so the false
    positive rate at t may be below ``fpr`` but never above it.
    """
    legit = np.sort(np.asarray(scores, dtype=np.float64)[np.asarray(labels) == 0])[::-1]
    if len(legit) == 0:
        raise ValueError("threshold_at_fpr needs legitimate events")
    allowed = int(np.floor(fpr * len(legit)))  # legitimate events that may score at or above t
    if allowed >= len(legit):
        return float(-np.inf)
    return float(np.nextafter(legit[allowed], np.inf))


def recall_at_fpr(scores: np.ndarray, labels: np.ndarray, fpr: float) -> float:
    """Share of fraud events scoring at or above ``threshold_at_fpr``."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    fraud = scores[labels == 1]
    if len(fraud) == 0:
        raise ValueError("recall_at_fpr needs fraud events")
    return float(np.mean(fraud >= threshold_at_fpr(scores, labels, fpr)))


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = DEFAULT_ECE_BINS) -> float:
    """Weighted mean |observed fraud rate - mean predicted probability| over equal-width probability bins."""
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    which = np.minimum((p * bins).astype(np.int64), bins - 1)
    predicted = np.bincount(which, weights=p, minlength=bins)
    observed = np.bincount(which, weights=y, minlength=bins)
    return float(np.sum(np.abs(observed - predicted)) / len(p))

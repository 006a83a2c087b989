"""Probability calibration for the fast model (plain numpy; used by training and by the scorer).

Platt scaling on the log-odds: calibrated = sigmoid(a * logit(p) + b). Two numbers, fitted on validation data,
stored in the model card and applied after onnxruntime, so the ONNX graph stays the unmodified booster that the
parity check compares against LightGBM.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_EPS = 1e-7


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p / (1 - p))


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))


@dataclass(frozen=True)
class PlattCalibrator:
    a: float = 1.0
    b: float = 0.0

    def apply(self, p: np.ndarray) -> np.ndarray:
        """Calibrated probabilities for raw model probabilities ``p``."""
        return sigmoid(self.a * logit(p) + self.b)

    @classmethod
    def fit(cls, p: np.ndarray, y: np.ndarray, iterations: int = 100) -> "PlattCalibrator":
        """Fit by Newton's method on the log-loss of sigmoid(a*logit(p)+b) against labels y (0/1)."""
        x = logit(p)
        y = np.asarray(y, dtype=np.float64)
        if y.min() == y.max():
            raise ValueError("calibration needs both classes in the validation labels")
        a, b = 1.0, 0.0
        for _ in range(iterations):
            q = sigmoid(a * x + b)
            w = q * (1 - q) + 1e-12
            grad = np.array([np.sum((q - y) * x), np.sum(q - y)])
            hess = np.array([[np.sum(w * x * x), np.sum(w * x)], [np.sum(w * x), np.sum(w)]])
            hess += np.eye(2) * 1e-9
            step = np.linalg.solve(hess, grad)
            a, b = a - step[0], b - step[1]
            if np.max(np.abs(step)) < 1e-10:
                break
        return cls(a=float(a), b=float(b))

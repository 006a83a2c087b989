"""Probability calibration for the fast model (plain numpy; used by training and by the scorer).

Platt scaling on the log-odds: calibrated = sigmoid(a * logit(p) + b). Two numbers, fitted on validation data,
stored in the model card and applied after onnxruntime, so the ONNX graph stays the unmodified booster that the
parity check compares against LightGBM.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize

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
        """Fit a and b by minimising the log-loss of sigmoid(a*logit(p)+b) against labels y (0/1), L-BFGS.

        The targets are Platt's smoothed ones, (N+ + 1) / (N+ + 2) for fraud and 1 / (N- + 2) for legitimate: when
        validation separates the classes perfectly (a small validation period) plain 0/1 targets send the slope
        to infinity and every confident score to exactly 1.0, which erases the ranking at the top."""
        x = logit(p)
        y = np.asarray(y, dtype=np.float64)
        if y.min() == y.max():
            raise ValueError("calibration needs both classes in the validation labels")
        positives, negatives = float(y.sum()), float(len(y) - y.sum())
        t = np.where(y > 0.5, (positives + 1) / (positives + 2), 1 / (negatives + 2))

        def loss(params: np.ndarray) -> tuple[float, np.ndarray]:
            z = params[0] * x + params[1]
            # log(1 + e^z) - t z, stable for any z; its gradient is (sigmoid(z) - t) [x, 1]
            value = np.sum(np.logaddexp(0.0, z) - t * z)
            residual = sigmoid(z) - t
            return float(value), np.array([np.sum(residual * x), np.sum(residual)])

        fitted = minimize(loss, np.array([1.0, 0.0]), jac=True, method="L-BFGS-B", options={"maxiter": iterations})
        a, b = fitted.x
        return cls(a=float(a), b=float(b))

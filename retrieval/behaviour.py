"""Behaviour vectors: an event's features standardised by the model card's training scaling.

A case is found again by how similar its behaviour is to a new event's. Vectors built with one model card's scaling
are only comparable with queries encoded by the same scaling: rebuild the index when the card changes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from riskcascade.core.model_card import ModelCard


class BehaviourEncoder:
    """Features → behaviour vector: z-scores by the training scaling, in the model's feature order.

    A missing or NaN feature encodes as 0 (its training mean); z-scores are clipped to ±``clip`` so one extreme
    value cannot dominate the cosine; a feature whose training standard deviation is 0 (or not finite) encodes
    as 0 (it carried no variation to compare). Features not in the model are ignored.
    """

    clip = 8.0

    def __init__(self, feature_names: Sequence[str], mean: Sequence[float], std: Sequence[float]):
        if not (len(feature_names) == len(mean) == len(std)):
            raise ValueError(
                f"feature scaling does not match the features: {len(feature_names)} names, "
                f"{len(mean)} means, {len(std)} standard deviations"
            )
        if len(set(feature_names)) != len(feature_names):
            raise ValueError("feature names must be unique")
        if not feature_names:
            raise ValueError("a behaviour vector needs at least one feature")
        self._names = tuple(feature_names)
        self._mean = np.asarray(mean, dtype=np.float64)
        std_arr = np.asarray(std, dtype=np.float64)
        self._informative = np.isfinite(std_arr) & (std_arr > 0) & np.isfinite(self._mean)
        self._std = np.where(self._informative, std_arr, 1.0)
        self._mean = np.where(self._informative, self._mean, 0.0)

    @classmethod
    def from_model_card(cls, card: ModelCard) -> BehaviourEncoder:
        scaling = card.feature_scaling
        return cls(card.feature_names, scaling.mean, scaling.std)

    @property
    def dimension(self) -> int:
        return len(self._names)

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self._names

    def encode(self, features: Mapping[str, float]) -> list[float]:
        return self.encode_many([features])[0].tolist()

    def encode_many(self, rows: Sequence[Mapping[str, float]]) -> np.ndarray:
        """One vector per row, as a (rows, dimension) float64 array."""
        raw = np.array(
            [[_as_float(row.get(name)) for name in self._names] for row in rows], dtype=np.float64
        ).reshape(len(rows), self.dimension)
        z = (raw - self._mean) / self._std
        z = np.where(np.isnan(z) | ~self._informative, 0.0, z)
        return np.clip(z, -self.clip, self.clip)


def _as_float(value: Any) -> float:
    return math.nan if value is None else float(value)

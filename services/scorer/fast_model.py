"""The fast model: an ONNX gradient-boosted model plus calibration and reason codes. No Ray here.

onnxruntime computes the raw probability; the model card's Platt calibration turns it into the calibrated
score the escalation band is defined on; LightGBM's own TreeSHAP (``pred_contrib``) on the same booster gives
per-feature contributions, of which the strongest become reason codes in plain words.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import lightgbm as lgb  # noqa: E402
import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

from riskcascade.domain import FastScore, ReasonCode  # noqa: E402
from riskcascade.model_card import BOOSTER_FILE, ONNX_FILE, ModelCard, load_model_card  # noqa: E402
from services.scorer.gpu_probe import choose_providers  # noqa: E402

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScorerInfo:
    """What the scorer tells callers about itself (health/info, validation, escalation band)."""

    model_version: str
    feature_names: tuple[str, ...]
    band_low: float
    band_high: float
    provider: str  # the provider the session actually runs on
    provider_detail: str  # why (the GPU probe's line)


class FastModel:
    def __init__(self, model_dir: Path, threads: int = 1, reason_count: int = 3, prefer_gpu: bool = True):
        model_dir = Path(model_dir)
        self.card: ModelCard = load_model_card(model_dir)
        self._features = tuple(self.card.feature_names)
        self._calibrator = self.card.calibration.calibrator()
        self._reason_count = reason_count
        providers, probe = choose_providers(prefer_gpu)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Spinning worker threads starve everything else on a small shared machine.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(
            str(model_dir / ONNX_FILE), sess_options=options, providers=providers
        )
        self._input = self.card.onnx.input
        self._output = self.card.onnx.output
        self._booster = lgb.Booster(model_file=str(model_dir / BOOSTER_FILE))
        self.info = ScorerInfo(
            model_version=self.card.version,
            feature_names=self._features,
            band_low=self.card.thresholds.band_low,
            band_high=self.card.thresholds.band_high,
            provider=self._session.get_providers()[0],
            provider_detail=probe.detail,
        )
        log.info("fast model %s on %s (%s)", self.card.version, self.info.provider, probe.detail)

    def matrix(self, rows: list[dict[str, float]]) -> np.ndarray:
        """Rows of named features as a float32 matrix in model order; absent features are NaN (missing)."""
        out = np.full((len(rows), len(self._features)), np.nan, dtype=np.float32)
        for i, row in enumerate(rows):
            for j, name in enumerate(self._features):
                value = row.get(name)
                if value is not None:
                    out[i, j] = value
        return out

    def score_batch(self, rows: list[dict[str, float]]) -> list[FastScore]:
        x = self.matrix(rows)
        raw = self._session.run([self._output], {self._input: x})[0][:, 1].astype(np.float64)
        calibrated = self._calibrator.apply(raw)
        reasons = self._reasons(x) if self._reason_count else [()] * len(rows)
        return [
            FastScore(
                score=float(calibrated[i]),
                raw_score=float(raw[i]),
                reasons=reasons[i],
                model_version=self.card.version,
                provider=self.info.provider,
            )
            for i in range(len(rows))
        ]

    def _reasons(self, x: np.ndarray) -> list[tuple[ReasonCode, ...]]:
        contrib = self._booster.predict(x, pred_contrib=True, num_threads=1)[:, :-1]  # last column: bias
        out = []
        for i in range(x.shape[0]):
            order = np.argsort(-np.abs(contrib[i]))[: self._reason_count]
            out.append(tuple(self._reason(j, float(x[i, j]), float(contrib[i, j])) for j in order))
        return out

    def _reason(self, j: int, value: float, weight: float) -> ReasonCode:
        name = self._features[j]
        description = self.card.feature_descriptions.get(name, name)
        shown = "missing" if math.isnan(value) else f"{value:g}"
        direction = "raises" if weight > 0 else "lowers"
        return ReasonCode(
            code=f"{'RISK_UP' if weight > 0 else 'RISK_DOWN'}:{name}",
            description=f"{description} ({name}={shown}) {direction} risk",
            weight=round(weight, 4),
        )

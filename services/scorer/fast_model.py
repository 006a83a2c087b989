"""The fast model: an ONNX gradient-boosted model plus calibration and reason codes. No Ray here.

onnxruntime computes the raw probability; the model card's Platt calibration turns it into the calibrated
score the escalation band is defined on; LightGBM's own TreeSHAP (``pred_contrib``) on the same booster gives
per-feature contributions, of which the strongest become reason codes in plain words.

A time-true model (``FeatureLayout.state``) takes its entity features from the live entity state: scoring a batch
computes each event's features as of its time and folds the event in (``EntityState.step``), so the next event of
the same account, device or IP sees it. The state is the caller's (the Serve deployment opens it from settings);
without one, an empty in-memory state is used.

A version with a text model (``ModelCard.text_model``) also reads each request's free text: MiniLM on the CPU and the
version's logistic head (``riskcascade.modelling.text_model.TextRiskScorer``: each distinct field text of a batch
encoded once, recent ones' embeddings remembered) give the ``text_risk`` column after the anomaly score.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Mapping, Sequence

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import lightgbm as lgb  # noqa: E402
import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

from riskcascade.core.config import ModelSettings, RetrievalSettings  # noqa: E402
from riskcascade.core.counterfactual import find_counterfactuals  # noqa: E402
from riskcascade.core.domain import (  # noqa: E402
    EVENT_TYPE_ATTRIBUTE,
    Counterfactual,
    Entities,
    FastScore,
    ReasonCode,
    ScoreRequest,
    ScorerInfo,
)
from riskcascade.core.drift import DriftReference, DriftWindow  # noqa: E402
from riskcascade.core.entity_state import EmbeddedEntityState, EntityState, StateEvent  # noqa: E402
from riskcascade.core.features import FeatureLayout  # noqa: E402
from riskcascade.core.model_card import BOOSTER_FILE, ONNX_FILE, ModelCard, load_model_card  # noqa: E402
from riskcascade.modelling.anomaly import AnomalyScorer  # noqa: E402
from riskcascade.modelling.text_model import TextHead, TextRiskScorer  # noqa: E402
from services.scorer.explain import TreeShapExplainer  # noqa: E402
from services.scorer.gpu_probe import choose_providers  # noqa: E402

log = logging.getLogger(__name__)

REASONS_ALL = "all"  # every scored row gets per-feature reason codes
REASONS_AT_RISK = "at_risk"  # only rows at or above the band's low edge; approvals get BELOW_BAND_CODE
BELOW_BAND_CODE = "SCORE_BELOW_BAND"


class FastModel:
    def __init__(self, model_dir: Path, threads: int = 1, reason_count: int = 3, prefer_gpu: bool = True,
                 state: EntityState | None = None, reported_state_features: Sequence[str] = (),
                 reasons_for: str = REASONS_ALL, drift_window: int = 0,
                 counterfactual_max_rows: int = ModelSettings().counterfactual_max_rows,
                 embedding_dir: Path = RetrievalSettings().embedding_dir,
                 text_cache_entries: int = ModelSettings().text_cache_entries,
                 text_batch_size: int = ModelSettings().text_batch_size):
        model_dir = Path(model_dir)
        self.card: ModelCard = load_model_card(model_dir)
        self._layout = FeatureLayout.load(model_dir)
        _check_servable(self.card, self._layout)
        self.state: EntityState | None = None
        if self._layout.state is not None:
            self.state = state if state is not None else EmbeddedEntityState(self._layout.state)
            if self.state.layout != self._layout.state:
                raise ValueError(f"the entity state's layout {self.state.layout} is not the model's "
                                 f"{self._layout.state}")
            aggregated = self._layout.aggregated
            self._state_values = [self.card.feature_names.index(a) for a in aggregated]
        self._inputs = tuple(self.card.feature_names)
        self._model_features = tuple(self.card.model_features)
        names = list(self._model_features)
        self._reported = [(n, names.index(n)) for n in reported_state_features if n in names and self.state]
        self._calibrator = self.card.calibration.calibrator()
        self._reason_count = reason_count
        self._counterfactual_max_rows = counterfactual_max_rows
        if reasons_for not in (REASONS_ALL, REASONS_AT_RISK):
            raise ValueError(f"reasons_for must be {REASONS_ALL!r} or {REASONS_AT_RISK!r}, not {reasons_for!r}")
        # rows scored below this get the band summary instead of per-feature attributions (see _reasons)
        self._attribute_from = self.card.thresholds.band_low if reasons_for == REASONS_AT_RISK else -math.inf
        providers, probe = choose_providers(prefer_gpu)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Spinning worker threads starve everything else on a small shared machine.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(
            str(model_dir / ONNX_FILE), sess_options=options, providers=providers
        )
        # The forest is ~100 small trees: the CPU provider is as fast as a GPU round trip would be.
        self._anomaly = AnomalyScorer(str(model_dir / self.card.anomaly["file"]), threads) if self.card.anomaly else None
        # the text model (a version trained on free text): MiniLM on the CPU, recent field texts' embeddings remembered
        self._text = TextRiskScorer(TextHead.load(model_dir), Path(embedding_dir), threads, text_batch_size,
                                    text_cache_entries) if self.card.text_model else None
        self._input = self.card.onnx.input
        self._output = self.card.onnx.output
        self._explainer = TreeShapExplainer(lgb.Booster(model_file=str(model_dir / BOOSTER_FILE)))
        self.info = ScorerInfo(
            model_version=self.card.version,
            feature_names=self._inputs,
            band_low=self.card.thresholds.band_low,
            band_high=self.card.thresholds.band_high,
            provider=self._session.get_providers()[0],
            provider_detail=probe.detail,
            feature_ranges=declared_feature_ranges(self.card),
            target_escalation_share=self.card.metrics.get("escalation_share"),
        )
        log.info("fast model %s on %s (%s)", self.card.version, self.info.provider, probe.detail)
        # the live population, against the reference training wrote (none: a model trained before references)
        reference = DriftReference.load(model_dir) if drift_window else None
        if reference is not None and reference.names != list(self._model_features):
            raise ValueError(f"{model_dir}: the drift reference's columns are not the model's inputs")
        self.drift = DriftWindow(reference, drift_window) if reference is not None else None
        if drift_window and reference is None:
            log.warning("model %s has no drift reference (trained before it was written): no live PSI; retrain to "
                        "get one", self.card.version)
        if self._anomaly is not None:
            log.info("anomaly score: %s%s", self._anomaly.method,
                     f" ({self._anomaly.fallback_reason})" if self._anomaly.fallback_reason else "")

    def matrix(self, requests: Sequence[ScoreRequest], state_features: np.ndarray | None = None) -> np.ndarray:
        """Requests as the float32 model input: raw features (absent = NaN), categorical codes, graph aggregates
        from the entities, then the anomaly score. A time-true model folds the requests into the state here,
        unless ``state_features`` are given (another version sharing the state folded them: a shadow)."""
        raw = self._raw(requests)
        if self.state is not None and state_features is None:
            state_features = self._step(requests, raw)
        x = self._layout.transform(
            raw, [r.attributes for r in requests], [r.entities for r in requests], state_features
        )
        return self.model_input(x, [r.text for r in requests])

    def fold(self, requests: Sequence[ScoreRequest]) -> np.ndarray | None:
        """Fold the requests into the entity state, returning each one's state features as of its time (None
        for a model without state): what ``matrix`` does first, for a caller scoring them with two versions."""
        return self._step(requests, self._raw(requests)) if self.state is not None else None

    def _raw(self, requests: Sequence[ScoreRequest]) -> np.ndarray:
        nan, inputs = math.nan, self._inputs
        raw = np.array([[r.features.get(name, nan) for name in inputs] for r in requests], dtype=np.float64)
        return raw.reshape(len(requests), len(inputs))

    def _step(self, requests: Sequence[ScoreRequest], raw: np.ndarray) -> np.ndarray:
        now = time.time()
        links = self._layout.state.links  # type: ignore[union-attr]
        return self.state.step([  # type: ignore[union-attr]
            StateEvent(
                event_id=r.request_id,
                time=r.occurred_at if r.occurred_at is not None else now,
                entities={k: v for k, v in r.entities.items() if k in links and v},
                values=tuple(float(v) for v in raw[i, self._state_values]),
            )
            for i, r in enumerate(requests)
        ])

    @property
    def reads_text(self) -> bool:
        """This version has a text model: ``model_input`` needs each event's text map."""
        return self._text is not None

    def model_input(self, pre_anomaly: np.ndarray, texts: Sequence[Mapping[str, str]] | None = None) -> np.ndarray:
        """The layout's matrix (``FeatureLayout.transform`` or training's replay) as float32 model input, with the
        anomaly score and, for a version with a text model, the text model's score of each row's text map
        (``texts``, one per row: required then) appended."""
        x = pre_anomaly.astype(np.float32)
        if self._anomaly is not None:
            x = np.column_stack([x, self._anomaly.score(x)])
        if self._text is not None:
            if texts is None or len(texts) != x.shape[0]:
                raise ValueError(f"model {self.card.version} reads the events' free text: pass one text map per row")
            x = np.column_stack([x, self._text.score(texts).astype(np.float32)])
        return x

    def score_batch(self, requests: Sequence[ScoreRequest], state_features: np.ndarray | None = None,
                    live: bool = True) -> list[FastScore]:
        """Score events (a time-true model also folds them into the state, in order, unless ``state_features``
        are given); live events also enter the drift window. ``live=False`` (a shadow's view of events another
        version decides): no reason codes, no drift window."""
        x = self.matrix(requests, state_features)
        scores = self.score_matrix(x, reasons=live)
        if self.drift is not None and live:
            self.drift.add(x, np.fromiter((s.score for s in scores), dtype=np.float64, count=len(scores)))
        return scores

    def with_counterfactuals(self, requests: Sequence[ScoreRequest], state_features: np.ndarray | None,
                             scores: Sequence[FastScore]) -> list[FastScore]:
        """``scores`` (this model's of ``requests``, whose state features were ``state_features``) with the
        counterfactuals of the rows that asked for them (``ScoreRequest.counterfactual_band``); other rows as given."""
        return [
            replace(s, counterfactuals=self.counterfactuals(r, None if state_features is None else state_features[i],
                                                            s.score))
            if r.counterfactual_band is not None else s
            for i, (r, s) in enumerate(zip(requests, scores))
        ]

    def counterfactuals(self, request: ScoreRequest, state_row: np.ndarray | None, score: float
                        ) -> tuple[Counterfactual, ...]:
        """The smallest changes of the card's actionable features that bring ``score`` (this model's of ``request``)
        below the edges of ``request.counterfactual_band`` (riskcascade/core/counterfactual.py). Every candidate goes
        through the serving path in one model run: the changed request features, the original row's entity-state
        features ``state_row`` (the state as it stood before the event, never refolded: the candidates are not
        events), the anomaly score recomputed from the changed features, calibration."""
        if request.counterfactual_band is None:
            return ()
        band_low, band_high = request.counterfactual_band

        def score_rows(rows: Sequence[dict[str, float]]) -> list[float]:
            changed = [replace(request, features=row) for row in rows]
            states = None if state_row is None else np.repeat(state_row[None, :], len(rows), axis=0)
            raw = self._raw(changed)
            x = self.model_input(self._layout.transform(
                raw, [r.attributes for r in changed], [r.entities for r in changed], states),
                [r.text for r in changed])
            return [s.score for s in self.score_matrix(x, reasons=False)]

        return find_counterfactuals(request.features, self.card.actionable, score_rows, score, band_low, band_high,
                                    self._counterfactual_max_rows)

    def drift_snapshot(self, floor: float) -> tuple[dict[str, float], float, int] | None:
        """(PSI per model input, PSI of the score, events in the window), or None without a reference. Call it from
        the thread that scores (the window is not locked)."""
        if self.drift is None:
            return None
        return self.drift.feature_psi(floor), self.drift.score_psi(floor), self.drift.events

    def score_matrix(self, x: np.ndarray, reasons: bool = True) -> list[FastScore]:
        """Score rows already in the model's input layout (``matrix``'s output, or training's replay features)."""
        raw = self._session.run([self._output], {self._input: x})[0][:, 1].astype(np.float64)
        calibrated = self._calibrator.apply(raw)
        codes = self._reasons(x, calibrated) if self._reason_count and reasons else [()] * x.shape[0]
        return [
            FastScore(
                score=float(calibrated[i]),
                raw_score=float(raw[i]),
                reasons=codes[i],
                model_version=self.card.version,
                provider=self.info.provider,
                state_features={n: float(x[i, j]) for n, j in self._reported if not math.isnan(x[i, j])},
            )
            for i in range(x.shape[0])
        ]

    def _reasons(self, x: np.ndarray, calibrated: np.ndarray) -> list[tuple[ReasonCode, ...]]:
        """Per-feature TreeSHAP reason codes for the rows scored at or above ``_attribute_from`` (all rows, or
        with ``reasons_for="at_risk"`` the rows the band does not approve outright: the ones a reviewer, the
        reasoner or a blocked user reads); the other rows get one summary code naming their score and the band's
        low edge. Exact TreeSHAP is most of a row's scoring cost, so it is spent where it is read."""
        out: list[tuple[ReasonCode, ...]] = [()] * x.shape[0]
        attributed = np.flatnonzero(calibrated >= self._attribute_from)
        for i in np.flatnonzero(calibrated < self._attribute_from):
            out[i] = (self._below_band(float(calibrated[i])),)
        if attributed.size:
            rows = x[attributed]
            contrib = self._explainer.contributions(rows)
            order = np.argsort(-np.abs(contrib), axis=1)[:, : self._reason_count]
            for k, i in enumerate(attributed):
                out[i] = tuple(self._reason(j, float(rows[k, j]), float(contrib[k, j])) for j in order[k])
        return out

    def _below_band(self, score: float) -> ReasonCode:
        return ReasonCode(
            code=BELOW_BAND_CODE,
            description=f"fast score {score:.3f} is below the escalation band's low edge "
            f"{self._attribute_from:.3f}: approved without per-feature attribution",
            weight=0.0,
        )

    def _reason(self, j: int, value: float, weight: float) -> ReasonCode:
        name = self._model_features[j]
        description = self.card.feature_descriptions.get(name, name)
        shown = "missing" if math.isnan(value) else f"{value:g}"
        direction = "raises" if weight > 0 else "lowers"
        return ReasonCode(
            code=f"{'RISK_UP' if weight > 0 else 'RISK_DOWN'}:{name}",
            description=f"{description} ({name}={shown}) {direction} risk",
            weight=round(weight, 4),
        )


def declared_feature_ranges(card: ModelCard) -> dict[str, tuple[float, float]]:
    """The card's ``feature_ranges`` for its input features; a malformed entry is an unusable card."""
    declared = (card.model_extra or {}).get("feature_ranges") or {}
    ranges: dict[str, tuple[float, float]] = {}
    for name, bounds in declared.items():
        try:
            low, high = (float(b) for b in bounds)
        except (TypeError, ValueError):
            low = high = math.nan  # not a pair of numbers: refused below, naming the entry
        if name not in card.feature_names or not low <= high:
            raise ValueError(f"model {card.version}: feature_ranges[{name}] = {bounds} is not a range of an input")
        ranges[name] = (low, high)
    return ranges


def _check_servable(card: ModelCard, layout: FeatureLayout) -> None:
    """A model trained on any data set can be evaluated; serving needs inputs a RiskEvent can supply."""
    entity_fields = {f.name for f in fields(Entities)}
    problems = []
    if layout.uses_edges:
        problems.append("its graph features come from an edge list, which events do not carry")
    if set(layout.links) - entity_fields:
        problems.append(f"its links {sorted(set(layout.links) - entity_fields)} are not event entities "
                        f"({', '.join(sorted(entity_fields))})")
    if set(layout.categorical) - {EVENT_TYPE_ATTRIBUTE}:
        problems.append(f"its categorical features {sorted(set(layout.categorical) - {EVENT_TYPE_ATTRIBUTE})} "
                        f"are not event attributes ({EVENT_TYPE_ATTRIBUTE})")
    if problems:
        raise ValueError(f"model {card.version} (data set {card.data.get('dataset')}) cannot be served: "
                         + "; ".join(problems))

"""The model versions one scorer replica keeps loaded, and which one answers a request that names none. No Ray.

A platform switching versions keeps the old and the new one loaded on every replica (the orchestrator lists both
in the scorer's ``user_config``), so the calls in flight when the orchestrator switches are scored by the version
they name, and a rollback is instant. All versions of a replica share its one entity state: a request is scored
by exactly one version, which folds the event into the state once. A version whose entity-state layout differs
from the state's cannot be fed by it and is refused by name.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from riskcascade.core.domain import FastScore, ScoreRequest
from riskcascade.core.model_registry import ModelRegistry

log = logging.getLogger(__name__)


class VersionNotLoaded(LookupError):
    """A request named a version that this replica has not loaded and could not load."""


class ModelShelf:
    """Loaded FastModels by version. ``load(folder)`` builds one (the deployment passes its settings and the shared
    state). Reads are lock-free (the mapping is replaced, never changed in place); loads take a lock."""

    def __init__(self, registry: ModelRegistry, load: Callable[[Path], object], first_dir: Path):
        self._registry = registry
        self._load = load
        self._lock = threading.Lock()
        first = load(first_dir)
        self.default: str = first.card.version  # type: ignore[attr-defined]
        self._models: Mapping[str, object] = {self.default: first}

    @property
    def loaded(self) -> tuple[str, ...]:
        return tuple(self._models)

    def model(self, version: str | None = None):  # noqa: ANN201 - a FastModel
        """The model of ``version`` (None or "": the default), loading it from the registry if this replica does
        not have it yet (a replica that missed an update; logged, since it costs the call a load)."""
        version = version or self.default
        model = self._models.get(version)
        if model is None:
            with self._lock:  # a load in progress (keep) finishes first: then it is there
                if version not in self._models:
                    log.warning("model %s was asked for before it was loaded here: loading it now", version)
                    self._models = {**self._models, version: self._load_version(version)}
            model = self._models[version]
        return model

    def _load_version(self, version: str):  # noqa: ANN202 - a FastModel
        try:
            folder = self._registry.path(version)
        except LookupError as exc:
            raise VersionNotLoaded(str(exc)) from None
        model = self._load(folder)
        log.info("loaded model version %s", version)
        return model

    def keep(self, versions: Sequence[str]) -> None:
        """Load every version of ``versions`` not loaded yet, then drop the others; the first answers requests
        that name none. Blocking (file reads, ONNX sessions): call it from a thread."""
        if not versions:
            raise ValueError("keep at least one model version")
        with self._lock:
            models = dict(self._models)
            for version in versions:
                if version not in models:
                    models[version] = self._load_version(version)
            self._models = {v: models[v] for v in versions}
            self.default = versions[0]

    def score(self, requests: Sequence[ScoreRequest]) -> list[FastScore]:
        """Score each request with the version it names, in order within each version (one run per version), and
        with its shadow version too where it names one (the same rows and state features, folded once), and with
        counterfactual explanations where a request asks (FastModel.with_counterfactuals)."""
        groups: dict[tuple[str, str], list[int]] = {}
        for i, request in enumerate(requests):
            version = request.model_version or self.default
            shadow = request.shadow_version if request.shadow_version != version else ""
            groups.setdefault((version, shadow), []).append(i)
        if len(groups) == 1:
            ((version, shadow),) = groups
            return self._score_group(version, shadow, requests)
        out: list[FastScore | None] = [None] * len(requests)
        for (version, shadow), rows in groups.items():
            for i, scored in zip(rows, self._score_group(version, shadow, [requests[i] for i in rows])):
                out[i] = scored
        return out  # type: ignore[return-value]

    def _score_group(self, version: str, shadow: str, requests: Sequence[ScoreRequest]) -> list[FastScore]:
        model = self.model(version)
        explain = any(r.counterfactual_band is not None for r in requests)
        if not shadow and not explain:
            return model.score_batch(requests)
        candidate = self.model(shadow) if shadow else None  # loaded before the fold: a failed load folds nothing
        folded = model.fold(requests)  # once: the state sees each event once, whoever scores it
        scores = model.score_batch(requests, folded)
        if explain:  # the asking rows' counterfactuals, by the version that scored them, on the same state rows
            scores = model.with_counterfactuals(requests, folded, scores)
        if candidate is None:
            return scores
        shadowed = candidate.score_batch(requests, folded, live=False)
        return [replace(s, shadow_score=c.score, shadow_version=c.model_version) for s, c in zip(scores, shadowed)]

"""Population stability: how far live traffic has moved from the data the model was trained on. Plain numpy.

Training writes a ``DriftReference`` next to the model (``drift-reference.json``): for each model input and for the
calibrated score, bin edges at quantiles of the validation split (held out like live traffic, and free of the
missing values training blanks in on purpose) and the share of validation events in each bin, plus one bin for a
missing value. Serving keeps a ``DriftWindow``: the bins of the last ``drift.window_events`` scored events, counted
as they arrive. The population stability index of a column is

    PSI = sum over bins of (live share - reference share) * ln(live share / reference share)

with both shares floored at ``drift.psi_floor`` so an empty bin does not make it infinite. The usual reading, and
the default thresholds (``drift.psi_warn``, ``drift.psi_alert``): below 0.1 stable, 0.1 to 0.25 moderate, above
0.25 a shifted population. A feature with few distinct values gets fewer bins (edges are deduplicated).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REFERENCE_FILE = "drift-reference.json"
SCORE = "score"  # the name the calibrated score's column goes by


@dataclass(frozen=True)
class BinnedColumn:
    """Inner bin edges of one column and the reference share of each bin (the last bin: missing values)."""

    name: str
    edges: tuple[float, ...]
    shares: tuple[float, ...]  # len(edges) + 2: below the first edge, ..., above the last, missing

    @classmethod
    def fit(cls, name: str, values: np.ndarray, bins: int) -> "BinnedColumn":
        values = np.asarray(values, dtype=np.float64)
        present = values[~np.isnan(values)]
        if len(present):
            quantiles = np.quantile(present, np.linspace(0.0, 1.0, bins + 1)[1:-1])
            edges = tuple(float(e) for e in np.unique(quantiles))
        else:
            edges = ()
        column = cls(name, edges, ())
        counts = np.bincount(column.bin_of(values), minlength=column.n_bins)
        return cls(name, edges, tuple(float(c) for c in counts / max(len(values), 1)))

    @property
    def n_bins(self) -> int:
        return len(self.edges) + 2

    def bin_of(self, values: np.ndarray) -> np.ndarray:
        """The bin of each value (int64): values equal to an edge fall in the bin above it; NaN in the last."""
        values = np.asarray(values, dtype=np.float64)[:, None]
        return _bins(values, np.asarray(self.edges, dtype=np.float64)[None, :], np.array([self.n_bins - 1]))[:, 0]


def _bins(values: np.ndarray, edges: np.ndarray, missing: np.ndarray) -> np.ndarray:
    """Bins of ``values`` [n, k], column j against its inner edges ``edges[j]`` (padded with +inf) and its missing
    bin ``missing[j]``: the count of edges at or below the value, so a value equal to an edge falls in the bin
    above it; NaN in the missing bin. The one binning rule of the reference and of the live window."""
    bins = (values[:, :, None] >= edges[None, :, :]).sum(axis=2)
    return np.where(np.isnan(values), missing[None, :], bins)


def psi(reference_shares: np.ndarray, live_counts: np.ndarray, floor: float) -> float:
    """Population stability index of live bin counts against reference bin shares (see the module docstring)."""
    total = live_counts.sum()
    if total == 0:
        return 0.0
    expected = np.maximum(np.asarray(reference_shares, dtype=np.float64), floor)
    actual = np.maximum(live_counts / total, floor)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


@dataclass(frozen=True)
class DriftReference:
    """The reference of every model input, in the model's input order, and of the calibrated score."""

    features: tuple[BinnedColumn, ...]
    score: BinnedColumn
    source: str  # which rows it was fitted on, for reports

    @classmethod
    def fit(cls, names: list[str], matrix: np.ndarray, scores: np.ndarray, bins: int, source: str
            ) -> "DriftReference":
        features = tuple(BinnedColumn.fit(name, matrix[:, j], bins) for j, name in enumerate(names))
        return cls(features, BinnedColumn.fit(SCORE, scores, bins), source)

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.features]

    def save(self, folder: Path) -> Path:
        path = Path(folder) / REFERENCE_FILE
        body = {"source": self.source, "score": _column_json(self.score),
                "features": [_column_json(f) for f in self.features]}
        path.write_text(json.dumps(body, indent=1))
        return path

    @classmethod
    def load(cls, folder: Path) -> "DriftReference | None":
        """The model's reference, or None for a model trained before references were written."""
        path = Path(folder) / REFERENCE_FILE
        if not path.exists():
            return None
        body = json.loads(path.read_text())
        return cls(tuple(_column(f) for f in body["features"]), _column(body["score"]), body["source"])


def _column_json(column: BinnedColumn) -> dict:
    return {"name": column.name, "edges": list(column.edges), "shares": list(column.shares)}


def _column(body: dict) -> BinnedColumn:
    return BinnedColumn(body["name"], tuple(body["edges"]), tuple(body["shares"]))


class DriftWindow:
    """The bins of the last ``size`` events, per column, with their counts kept as events come and go.

    Not thread-safe: the scorer updates it from its one worker thread. Memory: ``size`` x (columns + 1) bytes of
    bin indices (int8 when every column has fewer than 128 bins, as with the default 10) plus the counts.
    """

    def __init__(self, reference: DriftReference, size: int):
        if size < 1:
            raise ValueError("a drift window holds at least one event")
        self.reference = reference
        self.size = size
        self._columns = (*reference.features, reference.score)
        widest = max(c.n_bins for c in self._columns)
        self._widest = widest
        self._bins = np.zeros((size, len(self._columns)), dtype=np.int8 if widest < 128 else np.int16)
        self._counts = np.zeros((len(self._columns), widest), dtype=np.int64)
        # every column's inner edges in one matrix, padded with +inf (never reached), so a batch is binned by one
        # comparison instead of a searchsorted per column; the missing bin of each column
        self._edges = np.full((len(self._columns), widest - 2), np.inf)
        for j, column in enumerate(self._columns):
            self._edges[j, : len(column.edges)] = column.edges
        self._missing = np.array([c.n_bins - 1 for c in self._columns])
        self._next = 0  # ring position of the next event
        self.seen = 0  # events added since start

    @property
    def events(self) -> int:
        """Events in the window now."""
        return min(self.seen, self.size)

    def add(self, matrix: np.ndarray, scores: np.ndarray) -> None:
        """Add a batch: its model input rows (in the reference's column order) and calibrated scores."""
        matrix = np.asarray(matrix)
        if matrix.shape[1] != len(self.reference.features):
            raise ValueError(f"drift window expects {len(self.reference.features)} columns, got {matrix.shape[1]}")
        if len(matrix) > self.size:  # only the newest rows can stay
            matrix, scores = matrix[-self.size:], np.asarray(scores)[-self.size:]
        n = len(matrix)
        if n == 0:
            return
        values = np.column_stack([np.asarray(matrix, dtype=np.float64), np.asarray(scores, dtype=np.float64)])
        new = _bins(values, self._edges, self._missing)
        slots = (self._next + np.arange(n)) % self.size
        filled = slots < self.seen  # slots that hold an older event, which leaves the window
        if filled.any():
            self._counts -= self._tally(self._bins[slots[filled]])
        self._counts += self._tally(new)
        self._bins[slots] = new
        self._next = int((self._next + n) % self.size)
        self.seen += n

    def _tally(self, bins: np.ndarray) -> np.ndarray:
        """Counts per (column, bin) of a block of bin indices."""
        flat = (np.arange(bins.shape[1])[None, :] * self._widest + bins).ravel()
        return np.bincount(flat, minlength=self._counts.size).reshape(self._counts.shape)

    def feature_psi(self, floor: float) -> dict[str, float]:
        return {c.name: psi(np.asarray(c.shares), self._counts[j, : c.n_bins], floor)
                for j, c in enumerate(self.reference.features)}

    def score_psi(self, floor: float) -> float:
        score = self.reference.score
        return psi(np.asarray(score.shares), self._counts[-1, : score.n_bins], floor)

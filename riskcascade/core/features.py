"""The model's input layout: raw numeric features, categorical codes, entity features (before the anomaly score).

``FeatureLayout`` is fitted on a data set (``riskcascade.modelling.layout_fitting``) and saved next to the model
(``features.json``, plus ``graph.npz`` for the transductive protocol); the scorer loads it to turn a request (numeric
features, categorical attributes, entity per link) into exactly the columns training used.

The entity features come in one of two protocols, chosen by the data:

- **time-true** (the data set has a time column): the live entity state's features (``riskcascade.core.entity_state``),
  built at training by replaying the data set's events and label arrivals in time order
  (``riskcascade.core.state_replay``) and served from the live state, so each event sees only what happened before it;
- **transductive** (a static graph, no time column): neighbour aggregates over every row of the data set
  (``riskcascade.core.graph_features``), served from the frozen training rows. Such a model's quality is measured on a
  graph that includes the test rows; the report says so.

A categorical feature becomes one 0/1 column per value of its vocabulary (from the training split, sorted, so
columns are stable): a value training never saw is all zeros, a missing one all NaN. One-hot
rather than LightGBM's categorical splits because the fast exact TreeSHAP of the reason codes
(``services/scorer/explain.py``) covers numerical splits only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from riskcascade.core.entity_state import StateLayout
from riskcascade.core.graph_features import GraphHistory

TIME_TRUE = "time-true"
TRANSDUCTIVE = "transductive"

LAYOUT_FILE = "features.json"
GRAPH_FILE = "graph.npz"


@dataclass
class FeatureLayout:
    numeric: list[str]  # what callers send, in order
    categorical: dict[str, list[str]]  # name -> vocabulary (code = index)
    links: list[str]
    aggregated: list[str]
    graph: list[str]  # derived graph feature names, in order
    descriptions: dict[str, str] = field(default_factory=dict)
    history: GraphHistory | None = None  # transductive: the training rows; None: no links, an edge list, or state
    uses_edges: bool = False
    state: StateLayout | None = None  # time-true: the live entity state the graph columns are served from

    @property
    def protocol(self) -> str:
        return TIME_TRUE if self.state is not None else TRANSDUCTIVE

    @property
    def names(self) -> list[str]:
        """Every column of the pre-anomaly matrix, in order."""
        return [*self.numeric, *self.one_hot_names, *self.graph]

    @property
    def one_hot_names(self) -> list[str]:
        return [f"{name}={value}" for name, vocabulary in self.categorical.items() for value in vocabulary]

    def codes(self, columns: Sequence[np.ndarray], n: int) -> np.ndarray:
        """One-hot columns of the categorical features: unseen value = all 0, missing ("") = all NaN."""
        blocks = []
        for name, values in zip(self.categorical, columns):
            vocabulary = np.array(self.categorical[name], dtype=object)
            block = (np.asarray(values, dtype=object)[:, None] == vocabulary[None, :]).astype(np.float64)
            block[np.asarray(values, dtype=object) == ""] = np.nan
            blocks.append(block)
        return np.column_stack(blocks) if blocks else np.zeros((n, 0))

    def transform(
        self, numeric: np.ndarray, attributes: Sequence[Mapping[str, str]], entities: Sequence[Mapping[str, str]],
        state_features: np.ndarray | None = None,
    ) -> np.ndarray:
        """Rows of new events as the pre-anomaly matrix (float64); the serving path of ``fit_layout``. A time-true
        layout takes the entity columns from ``state_features`` (the live state's ``step`` for these events)."""
        n = len(numeric)
        codes = self.codes([np.array([a.get(c, "") for a in attributes], dtype=object) for c in self.categorical], n)
        if self.state is not None:
            if state_features is None or state_features.shape != (n, len(self.graph)):
                raise ValueError(f"a time-true layout needs state features [{n}, {len(self.graph)}]")
            return np.column_stack([numeric, codes, state_features])
        if self.graph and self.history is None:
            raise ValueError("this model's graph features come from an edge list and cannot be served")
        graph = np.zeros((n, 0))
        if self.history is not None:
            aggregated_idx = [self.numeric.index(a) for a in self.aggregated]
            graph = self.history.features(entities, numeric[:, aggregated_idx])
        return np.column_stack([numeric, codes, graph])

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        body = {
            "numeric": self.numeric, "categorical": self.categorical, "links": self.links,
            "aggregated": self.aggregated, "graph": self.graph, "descriptions": self.descriptions,
            "uses_edges": self.uses_edges, "state": self.state.to_json() if self.state else None,
        }
        (folder / LAYOUT_FILE).write_text(json.dumps(body, indent=1))
        if self.history is not None:
            self.history.save(folder / GRAPH_FILE)
        else:
            (folder / GRAPH_FILE).unlink(missing_ok=True)

    @classmethod
    def load(cls, folder: Path) -> "FeatureLayout":
        folder = Path(folder)
        body = json.loads((folder / LAYOUT_FILE).read_text())
        state = StateLayout.from_json(body.pop("state")) if body.get("state") else None
        body.pop("state", None)
        history = None
        if state is None and (folder / GRAPH_FILE).exists():
            history = GraphHistory.load(folder / GRAPH_FILE)
        return cls(**body, history=history, state=state)


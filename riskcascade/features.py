"""The model's input layout: raw numeric features, categorical codes, graph aggregates (before the anomaly score).

``FeatureLayout`` is fitted on a data set and saved next to the model (``features.json`` + ``graph.npz``); the
scorer loads it to turn a request (numeric features, categorical attributes, entity per link) into exactly the
columns training used. A categorical feature becomes one 0/1 column per value of its vocabulary (from the training
split, sorted, so columns are stable): a value training never saw is all zeros, a missing one all NaN. One-hot
rather than LightGBM's categorical splits because the fast exact TreeSHAP of the reason codes
(``services/scorer/explain.py``) covers numerical splits only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from riskcascade.datasets.format import Dataset
from riskcascade.graph_features import GraphHistory, build_graph_features, describe_graph_feature

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
    history: GraphHistory | None = None  # None: no links, or an edge list (not servable)
    uses_edges: bool = False

    @property
    def names(self) -> list[str]:
        """Every column of the pre-anomaly matrix, in order."""
        return [*self.numeric, *self.one_hot_names, *self.graph]

    @property
    def one_hot_names(self) -> list[str]:
        return [f"{name}={value}" for name, vocabulary in self.categorical.items() for value in vocabulary]

    @classmethod
    def fit(
        cls, dataset: Dataset, train_rows: np.ndarray, graph_features: bool = True
    ) -> tuple["FeatureLayout", np.ndarray]:
        """The layout and the float64 matrix of every row of ``dataset`` (graph over all rows: transductive);
        without ``graph_features`` the links and edges are ignored."""
        spec = dataset.spec
        links = dict(dataset.links) if graph_features else {}
        edges = dataset.edges if graph_features else None
        vocabularies = {
            name: sorted({v for v in values[train_rows] if v}) for name, values in dataset.categorical.items()
        }
        aggregated_idx = [spec.numeric_features.index(a) for a in spec.aggregated]
        graph = build_graph_features(links, dataset.numeric[:, aggregated_idx], spec.aggregated, edges)
        layout = cls(
            numeric=list(spec.numeric_features),
            categorical=vocabularies,
            links=list(links),
            aggregated=list(spec.aggregated),
            graph=graph.names,
            history=graph.history if links else None,
            uses_edges=edges is not None,
        )
        layout.descriptions = {
            **{n: spec.feature_descriptions.get(n, n) for n in spec.numeric_features},
            **{f"{c}={v}": f"{spec.feature_descriptions.get(c, c)} is {v}" for c, vs in vocabularies.items() for v in vs},
            **{n: describe_graph_feature(n, spec.feature_descriptions) for n in graph.names},
        }
        matrix = np.column_stack(
            [dataset.numeric, layout._codes([dataset.categorical[c] for c in layout.categorical], len(dataset)), graph.values]
        )
        return layout, matrix

    def _codes(self, columns: Sequence[np.ndarray], n: int) -> np.ndarray:
        """One-hot columns of the categorical features: unseen value = all 0, missing ("") = all NaN."""
        blocks = []
        for name, values in zip(self.categorical, columns):
            vocabulary = np.array(self.categorical[name], dtype=object)
            block = (np.asarray(values, dtype=object)[:, None] == vocabulary[None, :]).astype(np.float64)
            block[np.asarray(values, dtype=object) == ""] = np.nan
            blocks.append(block)
        return np.column_stack(blocks) if blocks else np.zeros((n, 0))

    def transform(
        self, numeric: np.ndarray, attributes: Sequence[Mapping[str, str]], entities: Sequence[Mapping[str, str]]
    ) -> np.ndarray:
        """Rows of new events as the pre-anomaly matrix (float64); the serving path of ``fit``."""
        n = len(numeric)
        codes = self._codes([np.array([a.get(c, "") for a in attributes], dtype=object) for c in self.categorical], n)
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
            "uses_edges": self.uses_edges,
        }
        (folder / LAYOUT_FILE).write_text(json.dumps(body, indent=1))
        if self.history is not None:
            self.history.save(folder / GRAPH_FILE)

    @classmethod
    def load(cls, folder: Path) -> "FeatureLayout":
        folder = Path(folder)
        body = json.loads((folder / LAYOUT_FILE).read_text())
        history = GraphHistory.load(folder / GRAPH_FILE) if (folder / GRAPH_FILE).exists() else None
        return cls(**body, history=history)

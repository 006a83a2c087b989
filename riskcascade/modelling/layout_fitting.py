"""Fitting a ``FeatureLayout`` on a data set: the training side of ``riskcascade.core.features``.

The core module holds what serving needs (the layout, ``transform``, save and load); fitting needs the data set
format, which belongs to modelling. ``fit_layout`` returns the same columns, in the same order, that the layout's
``transform`` produces for a live event: the entity columns of a time-true layout are built by replaying the data
set's events and label arrivals through the serving state code (``riskcascade.core.state_replay``).
"""

from __future__ import annotations

import numpy as np

from riskcascade.core.config import StateSettings
from riskcascade.core.entity_state import StateLayout, describe_state_feature
from riskcascade.core.features import FeatureLayout
from riskcascade.core.graph_features import build_graph_features, describe_graph_feature
from riskcascade.core.state_replay import Timeline, replay_features
from riskcascade.modelling.datasets.format import Dataset


def fit_layout(
    dataset: Dataset, train_rows: np.ndarray, graph_features: bool = True,
    state_settings: StateSettings | None = None,
) -> tuple[FeatureLayout, np.ndarray]:
    """The layout and the float64 matrix of every row of ``dataset``; without ``graph_features`` the links and
    edges are ignored. With a time column the entity features are the state's (windows from
    ``state_settings``), by replay (time-true); without one, neighbour aggregates over all rows (transductive)."""
    spec = dataset.spec
    links = dict(dataset.links) if graph_features else {}
    edges = dataset.edges if graph_features else None
    state_settings = state_settings or StateSettings()
    vocabularies = {
        name: sorted({v for v in values[train_rows] if v}) for name, values in dataset.categorical.items()
    }
    aggregated_idx = [spec.numeric_features.index(a) for a in spec.aggregated]
    state = None
    if links and dataset.times is not None and edges is None:
        state = StateLayout(tuple(links), tuple(spec.aggregated), tuple(state_settings.windows_s),
                            state_settings.retention_s)
        graph_names = state.names
        graph_values = replay_features(state, timeline_of(dataset))
        history = None
    else:
        graph = build_graph_features(links, dataset.numeric[:, aggregated_idx], spec.aggregated, edges)
        graph_names, graph_values = graph.names, graph.values
        history = graph.history if links else None
    layout = FeatureLayout(
        numeric=list(spec.numeric_features),
        categorical=vocabularies,
        links=list(links),
        aggregated=list(spec.aggregated),
        graph=graph_names,
        history=history,
        uses_edges=edges is not None,
        state=state,
    )
    describe = (lambda n: describe_state_feature(n, spec.feature_descriptions)) if state else (
        lambda n: describe_graph_feature(n, spec.feature_descriptions))
    layout.descriptions = {
        **{n: spec.feature_descriptions.get(n, n) for n in spec.numeric_features},
        **{f"{c}={v}": f"{spec.feature_descriptions.get(c, c)} is {v}" for c, vs in vocabularies.items() for v in vs},
        **{n: describe(n) for n in graph_names},
    }
    matrix = np.column_stack(
        [dataset.numeric, layout.codes([dataset.categorical[c] for c in layout.categorical], len(dataset)),
         graph_values]
    )
    return layout, matrix


def timeline_of(dataset: Dataset) -> Timeline:
    """The data set's events and label arrivals (it must have a time column)."""
    if dataset.times is None or dataset.label_times is None:
        raise ValueError(f"data set {dataset.spec.name} has no time column")
    spec = dataset.spec
    aggregated_idx = [spec.numeric_features.index(a) for a in spec.aggregated]
    return Timeline(
        ids=dataset.ids, times=dataset.times, entities=dataset.links, values=dataset.numeric[:, aggregated_idx],
        labels=dataset.labels, label_times=dataset.label_times,
    )

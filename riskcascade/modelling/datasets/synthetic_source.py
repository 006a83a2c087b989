"""Our synthetic e-commerce generator as a data set in the documented format.

The mechanisms of the five fraud patterns and their legitimate look-alikes are documented in
``riskcascade.modelling.synthetic``; ``risk_type`` labels each fraud row with its pattern. The split column is the
generator's own time split (train on the past, valid next, test last; the same seed gives the same train/valid/test CSV
files the case memory is built from). ``occurred_at`` is the event time and ``label_known_at`` when its label arrived.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from riskcascade.modelling.datasets.format import Dataset, DatasetSpec, dataset_from_frame
from riskcascade.modelling.synthetic import (
    CSV_COLUMNS,
    ENTITY_COLUMNS,
    FEATURE_DESCRIPTIONS,
    FEATURE_NAMES,
    LabelledEvent,
)

SPLIT_COLUMN = "split"
EVENT_TYPE = "event_type"
# Neighbour aggregates of these (per entity link): what a device's, IP's or seller's other events look like.
AGGREGATED = ("amount", "account_age_days", "failed_logins_24h", "clicks_per_session")
DESCRIPTIONS = {**FEATURE_DESCRIPTIONS, EVENT_TYPE: "Type of event (order, login, payout, ...)"}


def synthetic_spec() -> DatasetSpec:
    return DatasetSpec(
        name="synthetic",
        table=Path("events.csv"),
        id_column="case_id",
        numeric_features=list(FEATURE_NAMES),
        categorical_features=[EVENT_TYPE],
        feature_descriptions=DESCRIPTIONS,
        links=list(ENTITY_COLUMNS),
        aggregate_features=list(AGGREGATED),
        split_columns=[SPLIT_COLUMN],
        risk_type_column="risk_type",
        time_column="occurred_at",
        label_time_column="label_known_at",
    )


def synthetic_dataset(parts: dict[str, list[LabelledEvent]]) -> Dataset:
    """The generator's train/valid/test events as one data set with a split column."""
    rows = []
    for split, events in parts.items():
        for e in events:
            row = {
                "case_id": e.case_id,
                EVENT_TYPE: e.event_type.value,
                **{c: getattr(e.entities, c) for c in ENTITY_COLUMNS},
                "occurred_at": e.occurred_at.isoformat(),
                **e.features,
                "note": e.note,
                "message": e.message,
                "label": str(e.label),
                "risk_type": e.risk_type,
                "label_known_at": e.label_known_at.isoformat() if e.label_known_at is not None else "",
                SPLIT_COLUMN: split,
            }
            rows.append(row)
    table = pd.DataFrame(rows, columns=[*CSV_COLUMNS, SPLIT_COLUMN])
    for name in FEATURE_NAMES:
        table[name] = table[name].astype(np.float64)
    return dataset_from_frame(synthetic_spec(), table, source="synthetic generator")

"""The documented input format for training and evaluation: a table plus a small YAML descriptor.

A data set is a table of events or entities, one row each, in CSV or Parquet, and a descriptor (``dataset.yaml``)
that says what each column is. Nothing is guessed: every column the model uses is named in the descriptor, and a
file that does not match it is refused with the file, the column and the row.

.. code-block:: yaml

    name: my-shop                 # free text, shown in reports
    table: events.csv             # .csv or .parquet, relative to this file
    id_column: event_id           # unique per row, non-empty
    label_column: label           # values listed in fraud_labels / legit_labels, nothing else
    fraud_labels: ["1"]           # compared as text: ["-1"] for YelpChi's spam label
    legit_labels: ["0"]
    numeric_features: [amount, account_age_days]   # numbers; empty cell or "nan" = missing
    categorical_features: [event_type]             # text; empty = missing
    feature_descriptions: {amount: "Order value"}  # plain words for reason codes (optional)
    links: [account_id, device_id, ip]  # optional entity columns: rows sharing a value are neighbours
    edges: edges.csv              # optional edge list with columns src,dst holding ids of this table
    aggregate_features: [amount]  # numeric features whose neighbour mean/max are computed (default: all)
    split_columns: [split]        # optional fixed splits: each column holds train / valid / test per row;
                                  # several columns = several splits, reported as mean ± std
    risk_type_column: risk_type   # optional: fraud subtype per row (empty for legitimate), for per-type recall

Without ``split_columns`` the evaluator draws one stratified split (``SplitSettings``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SPLIT_NAMES = ("train", "valid", "test")
EDGE_COLUMNS = ("src", "dst")
TABLE_SUFFIXES = (".csv", ".parquet")


class DatasetFormatError(ValueError):
    """The descriptor or the table does not match the documented format; the message names what and where."""


class DatasetSpec(BaseModel):
    """The descriptor: what each column of the table is (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    table: Path
    id_column: str = "id"
    label_column: str = "label"
    fraud_labels: list[str] = Field(default_factory=lambda: ["1"], min_length=1)
    legit_labels: list[str] = Field(default_factory=lambda: ["0"], min_length=1)
    numeric_features: list[str] = Field(default_factory=list)
    categorical_features: list[str] = Field(default_factory=list)
    feature_descriptions: dict[str, str] = Field(default_factory=dict)
    links: list[str] = Field(default_factory=list)
    edges: Path | None = None
    aggregate_features: list[str] | None = None
    split_columns: list[str] = Field(default_factory=list)
    risk_type_column: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "DatasetSpec":
        if not self.numeric_features and not self.categorical_features:
            raise ValueError("numeric_features and categorical_features are both empty: name the model's inputs")
        overlap = set(self.fraud_labels) & set(self.legit_labels)
        if overlap:
            raise ValueError(f"label value(s) {sorted(overlap)} are in both fraud_labels and legit_labels")
        named = [self.id_column, self.label_column, *self.numeric_features, *self.categorical_features,
                 *self.links, *self.split_columns, *([self.risk_type_column] if self.risk_type_column else [])]
        seen: set[str] = set()
        for column in named:
            if column in seen:
                raise ValueError(f"column {column!r} is given more than one role")
            seen.add(column)
        unknown = set(self.aggregate_features or []) - set(self.numeric_features)
        if unknown:
            raise ValueError(f"aggregate_features {sorted(unknown)} are not in numeric_features")
        return self

    @property
    def aggregated(self) -> list[str]:
        return list(self.numeric_features if self.aggregate_features is None else self.aggregate_features)


@dataclass
class Dataset:
    """A validated data set in memory: one row per event, columns typed by role."""

    spec: DatasetSpec
    ids: np.ndarray  # str [N]
    labels: np.ndarray  # int64 [N], 1 fraud
    numeric: np.ndarray  # float64 [N, len(numeric_features)], NaN = missing
    categorical: dict[str, np.ndarray]  # name -> object [N] of str, "" = missing
    links: dict[str, np.ndarray]  # name -> object [N] of str, "" = no entity
    edges: np.ndarray | None = None  # int64 [E, 2] row indices
    splits: list[np.ndarray] = field(default_factory=list)  # each object [N] of "train"/"valid"/"test"
    risk_types: np.ndarray | None = None  # object [N] of str
    extra: pd.DataFrame | None = None  # columns no role names (text notes, timestamps): carried, not modelled

    def __len__(self) -> int:
        return len(self.ids)


def read_spec(path: str | Path) -> tuple[DatasetSpec, Path]:
    """The descriptor at ``path`` and the folder relative paths in it are resolved against."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetFormatError(f"{path}: no such data set descriptor") from None
    except yaml.YAMLError as exc:
        raise DatasetFormatError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise DatasetFormatError(f"{path}: a descriptor is a YAML mapping (see riskcascade.datasets.format)")
    try:
        return DatasetSpec.model_validate(raw), path.parent
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'descriptor'}: {e['msg']}" for e in exc.errors())
        raise DatasetFormatError(f"{path}: {problems}") from None


def load_dataset(path: str | Path) -> Dataset:
    """Read and validate the descriptor at ``path`` and its table (and edge list)."""
    spec, base = read_spec(path)
    table_path = spec.table if spec.table.is_absolute() else base / spec.table
    table = read_table(table_path)
    edges, edges_path = None, None
    if spec.edges is not None:
        edges_path = spec.edges if spec.edges.is_absolute() else base / spec.edges
        edges = read_table(edges_path)
    return dataset_from_frame(spec, table, edges, source=str(table_path), edges_source=str(edges_path))


def read_table(path: Path) -> pd.DataFrame:
    """A CSV or Parquet file as a frame of text cells (CSV) or typed columns (Parquet); nothing inferred for CSV."""
    if path.suffix not in TABLE_SUFFIXES:
        raise DatasetFormatError(f"{path}: tables are {' or '.join(TABLE_SUFFIXES)} files")
    if not path.exists():
        raise DatasetFormatError(f"{path}: no such file")
    try:
        if path.suffix == ".csv":
            return pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
        return pd.read_parquet(path)
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise DatasetFormatError(f"{path}: cannot be read: {exc}") from None


def dataset_from_frame(
    spec: DatasetSpec, table: pd.DataFrame, edges: pd.DataFrame | None = None, source: str = "table",
    edges_source: str = "edge list",
) -> Dataset:
    """Validate ``table`` against ``spec`` cell by cell. Row numbers in errors are 1-based data rows."""
    cells = _Cells(table, source)
    ids = cells.text(spec.id_column, required=True)
    _unique_ids(ids, source, spec.id_column)
    labels = cells.label(spec.label_column, spec.fraud_labels, spec.legit_labels)
    numeric = np.column_stack([cells.number(c) for c in spec.numeric_features]) if spec.numeric_features else (
        np.zeros((len(table), 0))
    )
    splits = [cells.split(c) for c in spec.split_columns]
    risk_types = cells.text(spec.risk_type_column) if spec.risk_type_column else None
    if risk_types is not None:
        _risk_types_match_labels(risk_types, labels, source, spec.risk_type_column)
    roles = {spec.id_column, spec.label_column, *spec.numeric_features, *spec.categorical_features,
             *spec.links, *spec.split_columns, *([spec.risk_type_column] if spec.risk_type_column else [])}
    dataset = Dataset(
        spec=spec,
        ids=ids,
        labels=labels,
        numeric=numeric,
        categorical={c: cells.text(c) for c in spec.categorical_features},
        links={c: cells.text(c) for c in spec.links},
        edges=None if edges is None else _edge_rows(edges, ids, edges_source),
        splits=splits,
        risk_types=risk_types,
        extra=table[[c for c in table.columns if c not in roles]].copy(),
    )
    for i, split in enumerate(splits):
        _split_usable(split, labels, f"{source}: split column {spec.split_columns[i]!r}")
    return dataset


class _Cells:
    """Typed access to named columns of a table, with errors naming file, column and row."""

    def __init__(self, table: pd.DataFrame, source: str) -> None:
        self._table, self._source = table, source

    def column(self, name: str) -> pd.Series:
        if name not in self._table.columns:
            shown = ", ".join(map(str, self._table.columns[:30]))
            raise DatasetFormatError(f"{self._source}: missing column {name!r} (columns: {shown})")
        return self._table[name]

    def fail(self, column: str, row: int, value: Any, why: str) -> DatasetFormatError:
        return DatasetFormatError(f"{self._source}: row {row + 1}, column {column!r}: {value!r} {why}")

    def text(self, name: str, required: bool = False) -> np.ndarray:
        series = self.column(name)
        values = np.array(["" if _is_missing(v) else str(v) for v in series], dtype=object)
        if required:
            empty = np.flatnonzero(values == "")
            if len(empty):
                raise self.fail(name, int(empty[0]), series.iloc[empty[0]], "is empty; every row needs one")
        return values

    def number(self, name: str) -> np.ndarray:
        series = self.column(name)
        if pd.api.types.is_numeric_dtype(series.dtype) and not pd.api.types.is_bool_dtype(series.dtype):
            values = series.to_numpy(dtype=np.float64, na_value=np.nan)
        else:
            values = np.empty(len(series))
            for row, cell in enumerate(series):
                values[row] = self._parse_number(name, row, cell)
        bad = np.flatnonzero(np.isinf(values))
        if len(bad):
            raise self.fail(name, int(bad[0]), values[bad[0]], "is infinite; numbers must be finite or missing")
        return values

    def _parse_number(self, name: str, row: int, cell: Any) -> float:
        if _is_missing(cell):
            return math.nan
        try:
            return float(cell)
        except (TypeError, ValueError):
            raise self.fail(name, row, cell, "is not a number (leave the cell empty for a missing value)") from None

    def label(self, name: str, fraud: list[str], legit: list[str]) -> np.ndarray:
        text = self.text(name)
        is_fraud, is_legit = np.isin(text, fraud), np.isin(text, legit)
        bad = np.flatnonzero(~(is_fraud | is_legit))
        if len(bad):
            raise self.fail(name, int(bad[0]), text[bad[0]], f"is not a label (fraud: {fraud}, legit: {legit})")
        return is_fraud.astype(np.int64)

    def split(self, name: str) -> np.ndarray:
        text = self.text(name)
        bad = np.flatnonzero(~np.isin(text, SPLIT_NAMES))
        if len(bad):
            raise self.fail(name, int(bad[0]), text[bad[0]], f"is not one of {', '.join(SPLIT_NAMES)}")
        return text


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in ("", "nan")


def _unique_ids(ids: np.ndarray, source: str, column: str) -> None:
    _, first, counts = np.unique(ids, return_index=True, return_counts=True)
    if np.any(counts > 1):
        value = ids[first[np.argmax(counts > 1)]]
        rows = np.flatnonzero(ids == value)[:2] + 1
        raise DatasetFormatError(f"{source}: column {column!r}: id {value!r} is on rows {rows[0]} and {rows[1]}")


def _risk_types_match_labels(risk_types: np.ndarray, labels: np.ndarray, source: str, column: str) -> None:
    legit_typed = np.flatnonzero((labels == 0) & (risk_types != ""))
    if len(legit_typed):
        row = int(legit_typed[0])
        raise DatasetFormatError(
            f"{source}: row {row + 1}, column {column!r}: {risk_types[row]!r} on a legitimate row (must be empty)"
        )
    untyped = np.flatnonzero((labels == 1) & (risk_types == ""))
    if len(untyped):
        raise DatasetFormatError(f"{source}: row {int(untyped[0]) + 1}, column {column!r}: empty on a fraud row")


def _edge_rows(edges: pd.DataFrame, ids: np.ndarray, source: str) -> np.ndarray:
    cells = _Cells(edges, f"{source} (edge list)")
    index = {value: i for i, value in enumerate(ids)}
    out = np.empty((len(edges), 2), dtype=np.int64)
    for k, column in enumerate(EDGE_COLUMNS):
        for row, value in enumerate(cells.text(column, required=True)):
            if value not in index:
                raise cells.fail(column, row, value, "is not an id of the table")
            out[row, k] = index[value]
    return out


def _split_usable(split: np.ndarray, labels: np.ndarray, where: str) -> None:
    for name in SPLIT_NAMES:
        part = labels[split == name]
        if len(np.unique(part)) < 2:
            raise DatasetFormatError(f"{where}: the {name} part needs both fraud and legitimate rows")


def write_dataset(dataset: Dataset, folder: str | Path, table_name: str = "table.csv") -> Path:
    """Write ``dataset`` in the documented format (table + dataset.yaml); returns the descriptor's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec = dataset.spec
    frame = pd.DataFrame({spec.id_column: dataset.ids})
    frame[spec.label_column] = np.where(dataset.labels == 1, spec.fraud_labels[0], spec.legit_labels[0])
    for j, name in enumerate(spec.numeric_features):
        frame[name] = dataset.numeric[:, j]
    for name, values in {**dataset.categorical, **dataset.links}.items():
        frame[name] = values
    for name, values in zip(spec.split_columns, dataset.splits):
        frame[name] = values
    if spec.risk_type_column and dataset.risk_types is not None:
        frame[spec.risk_type_column] = dataset.risk_types
    if dataset.extra is not None:
        for column in dataset.extra.columns:
            frame[column] = dataset.extra[column].to_numpy()
    table_path = folder / table_name
    if table_path.suffix == ".parquet":
        frame.to_parquet(table_path, index=False)
    else:
        frame.to_csv(table_path, index=False, float_format="%.17g", na_rep="")
    descriptor: dict[str, Any] = spec.model_dump(mode="json", exclude_none=True)
    descriptor["table"] = table_name
    if dataset.edges is not None:
        pd.DataFrame({"src": dataset.ids[dataset.edges[:, 0]], "dst": dataset.ids[dataset.edges[:, 1]]}).to_csv(
            folder / "edges.csv", index=False
        )
        descriptor["edges"] = "edges.csv"
    path = folder / "dataset.yaml"
    path.write_text(yaml.safe_dump(descriptor, sort_keys=False), encoding="utf-8")
    return path

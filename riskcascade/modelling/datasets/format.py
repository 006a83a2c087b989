"""The documented input format for training and evaluation: a table plus a small YAML descriptor.

A data set is a table of events or entities, one row each, in CSV or Parquet, and a descriptor (``dataset.yaml``)
that says what each column is. Nothing is guessed: every column the model uses is named in the descriptor, and a
file that does not match it is refused with the file, the column and the row.

.. code-block:: yaml

    name: my-shop                 # free text, shown in reports
    table: events.csv             # .csv or .parquet, relative to this file
    id_column: event_id           # unique per row, non-empty
    label_column: label           # values listed in fraud_labels / legit_labels; empty = not labelled (yet)
    fraud_labels: ["1"]           # compared as text: ["-1"] for YelpChi's spam label
    legit_labels: ["0"]
    numeric_features: [amount, account_age_days]   # numbers; empty cell or "nan" = missing
    categorical_features: [event_type]             # text; empty = missing
    feature_descriptions: {amount: "Order value"}  # plain words for reason codes (optional)
    links: [account_id, device_id, ip]  # optional entity columns: rows sharing a value are neighbours
    edges: edges.csv              # optional edge list with columns src,dst holding ids of this table
    aggregate_features: [amount]  # numeric features whose neighbour mean/max are computed (default: all)
    split_columns: [split]        # optional fixed splits: each column holds train / valid (or val) / test per
                                  # row; several columns = several splits, reported as mean ± std
    risk_type_column: risk_type   # optional: fraud subtype per row (empty for legitimate and unlabelled rows)
    time_column: occurred_at      # optional: when the event happened; every row needs one
    label_time_column: labelled_at  # optional, needs time_column: when the label became known
    label_delay_hours: 48         # optional instead, needs time_column: a label is known this long after its event

**Unlabelled rows.** An empty label cell means the row has no label (yet): it is loaded with label -1
(``Dataset.labelled`` is False there). Such rows still feed entity state and the graph, never the loss or a
metric; they carry no risk type and no label time. A non-empty value outside fraud_labels / legit_labels is refused.

**Times.** A time cell is ISO 8601 text *with* a UTC offset (``2025-01-03T10:00:00+00:00``, ``...Z``) or a
number of seconds since the epoch (a number column in Parquet, or number text in CSV). Text without an offset is
refused rather than guessed at. Loaded times are float64 epoch seconds. With ``time_column`` every row needs a time
and every labelled row gets a label time (``Dataset.label_times``, NaN on unlabelled rows):

- from ``label_time_column``: set on every labelled row, empty on every unlabelled row, never before the row's time;
- else the row's time + ``label_delay_hours`` (in hours, >= 0);
- else the row's time itself. This default is the *optimistic* one, a label known the moment its event happens,
  which no fraud team has; reports say which rule ran (``DatasetSpec.label_timing``).

Without ``split_columns`` the evaluator chooses a split (``riskcascade.modelling.datasets.splits.choose_split``): by
time when the data set has a time column, else stratified at random. Without a time column the data is a static graph
and features are built transductively; reports say which protocol ran.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SPLIT_NAMES = ("train", "valid", "test")
SPLIT_ALIASES = {"val": "valid"}  # other spellings accepted in split columns -> the name in SPLIT_NAMES
UNLABELLED = -1  # Dataset.labels of a row whose label cell is empty
SECONDS_PER_HOUR = 3600.0
TIME_FORMATS = "ISO 8601 with a UTC offset, e.g. 2025-01-03T10:00:00+00:00, or seconds since the epoch"
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
    time_column: str | None = None
    label_time_column: str | None = None
    label_delay_hours: float | None = Field(None, ge=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _consistent(self) -> "DatasetSpec":
        if not self.numeric_features and not self.categorical_features:
            raise ValueError("numeric_features and categorical_features are both empty: name the model's inputs")
        overlap = set(self.fraud_labels) & set(self.legit_labels)
        if overlap:
            raise ValueError(f"label value(s) {sorted(overlap)} are in both fraud_labels and legit_labels")
        blank = [v for v in (*self.fraud_labels, *self.legit_labels) if _is_missing(v)]
        if blank:
            raise ValueError(f"label value(s) {blank} read as an empty cell, which means 'not labelled'")
        if (self.label_time_column or self.label_delay_hours is not None) and not self.time_column:
            raise ValueError("label_time_column and label_delay_hours need time_column (the event time)")
        if self.label_time_column and self.label_delay_hours is not None:
            raise ValueError("give label_time_column or label_delay_hours, not both")
        seen: set[str] = set()
        for column in self.role_columns:
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

    @property
    def role_columns(self) -> list[str]:
        """Every column the descriptor gives a role, in descriptor order (repeats kept)."""
        optional = (self.risk_type_column, self.time_column, self.label_time_column)
        return [self.id_column, self.label_column, *self.numeric_features, *self.categorical_features,
                *self.links, *self.split_columns, *(c for c in optional if c)]

    @property
    def label_timing(self) -> str | None:
        """When labels count as known, in words for reports; None without a time column (static data)."""
        if not self.time_column:
            return None
        if self.label_time_column:
            return f"labels known from their arrival time ({self.label_time_column})"
        if self.label_delay_hours is not None:
            return f"labels known {self.label_delay_hours:g} h after their event"
        return "labels known at their event's time (no label time or delay given: optimistic)"


@dataclass
class Dataset:
    """A validated data set in memory: one row per event, columns typed by role."""

    spec: DatasetSpec
    ids: np.ndarray  # str [N]
    labels: np.ndarray  # int64 [N]: 1 fraud, 0 legitimate, UNLABELLED (-1) no label
    numeric: np.ndarray  # float64 [N, len(numeric_features)], NaN = missing
    categorical: dict[str, np.ndarray]  # name -> object [N] of str, "" = missing
    links: dict[str, np.ndarray]  # name -> object [N] of str, "" = no entity
    edges: np.ndarray | None = None  # int64 [E, 2] row indices
    splits: list[np.ndarray] = field(default_factory=list)  # each object [N] of "train"/"valid"/"test"
    risk_types: np.ndarray | None = None  # object [N] of str
    extra: pd.DataFrame | None = None  # columns no role names (text notes, timestamps): carried, not modelled
    times: np.ndarray | None = None  # float64 [N] epoch seconds of each event; None = no time column
    label_times: np.ndarray | None = None  # float64 [N] epoch seconds a label became known; NaN = unlabelled

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def labelled(self) -> np.ndarray:
        """bool [N]: rows with a label, the only ones a loss or a metric may use."""
        return self.labels >= 0


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
        raise DatasetFormatError(f"{path}: a descriptor is a YAML mapping (see riskcascade.modelling.datasets.format)")
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
    times, label_times = _event_and_label_times(cells, spec, labels)
    roles = set(spec.role_columns)
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
        times=times,
        label_times=label_times,
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
        """1 fraud, 0 legitimate, UNLABELLED for an empty cell; any other value is refused."""
        text = self.text(name)
        is_fraud, is_legit = np.isin(text, fraud), np.isin(text, legit)
        bad = np.flatnonzero(~(is_fraud | is_legit) & (text != ""))
        if len(bad):
            raise self.fail(name, int(bad[0]), text[bad[0]],
                            f"is not a label (fraud: {fraud}, legit: {legit}); leave it empty for no label")
        return np.where(is_fraud, 1, np.where(is_legit, 0, UNLABELLED)).astype(np.int64)

    def split(self, name: str) -> np.ndarray:
        text = self.text(name)
        for alias, canonical in SPLIT_ALIASES.items():
            text[text == alias] = canonical
        bad = np.flatnonzero(~np.isin(text, SPLIT_NAMES))
        if len(bad):
            names = ", ".join(SPLIT_NAMES) + "".join(f" (or {a})" for a in SPLIT_ALIASES)
            raise self.fail(name, int(bad[0]), text[bad[0]], f"is not one of {names}")
        return text

    def time(self, name: str) -> np.ndarray:
        """float64 epoch seconds per row, NaN for an empty cell; anything else that is not a time is refused."""
        series = self.column(name)
        if isinstance(series.dtype, pd.DatetimeTZDtype):
            values = np.full(len(series), np.nan)
            present = series.notna().to_numpy()
            values[present] = (series[present] - pd.Timestamp(0, tz="UTC")).dt.total_seconds().to_numpy()
        elif pd.api.types.is_datetime64_dtype(series.dtype):  # a timestamp without a zone: local to whom?
            present = np.flatnonzero(series.notna().to_numpy())
            if len(present):
                row = int(present[0])
                raise self.fail(name, row, str(series.iloc[row]), f"has no UTC offset (times are {TIME_FORMATS})")
            values = np.full(len(series), np.nan)
        elif pd.api.types.is_numeric_dtype(series.dtype) and not pd.api.types.is_bool_dtype(series.dtype):
            values = series.to_numpy(dtype=np.float64, na_value=np.nan)
        else:
            values = np.array([self._parse_time(name, row, cell) for row, cell in enumerate(series)], dtype=np.float64)
        bad = np.flatnonzero(np.isinf(values))
        if len(bad):
            raise self.fail(name, int(bad[0]), values[bad[0]], f"is not a time ({TIME_FORMATS})")
        return values

    def _parse_time(self, name: str, row: int, cell: Any) -> float:
        if _is_missing(cell):
            return math.nan
        if isinstance(cell, datetime):
            moment = cell
        else:
            text = str(cell).strip()
            try:
                return float(text)
            except ValueError:
                pass
            try:
                moment = datetime.fromisoformat(text)
            except ValueError:
                raise self.fail(name, row, cell, f"is not a time ({TIME_FORMATS})") from None
        if moment.tzinfo is None or moment.utcoffset() is None:
            raise self.fail(name, row, cell, f"has no UTC offset (times are {TIME_FORMATS})")
        return moment.timestamp()


def _is_missing(value: Any) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
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
    for label, kind in ((0, "a legitimate"), (UNLABELLED, "an unlabelled")):
        typed = np.flatnonzero((labels == label) & (risk_types != ""))
        if len(typed):
            row = int(typed[0])
            raise DatasetFormatError(
                f"{source}: row {row + 1}, column {column!r}: {risk_types[row]!r} on {kind} row (must be empty)"
            )
    untyped = np.flatnonzero((labels == 1) & (risk_types == ""))
    if len(untyped):
        raise DatasetFormatError(f"{source}: row {int(untyped[0]) + 1}, column {column!r}: empty on a fraud row")


def _event_and_label_times(
    cells: _Cells, spec: DatasetSpec, labels: np.ndarray
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The event times and label times of every row (see the module docstring), or (None, None) without times."""
    if not spec.time_column:
        return None, None
    times = cells.time(spec.time_column)
    empty = np.flatnonzero(np.isnan(times))
    if len(empty):
        row = int(empty[0])
        raise cells.fail(spec.time_column, row, cells.column(spec.time_column).iloc[row],
                         "is empty; every row needs one")
    labelled = labels != UNLABELLED
    if not spec.label_time_column:
        delay_s = (spec.label_delay_hours or 0.0) * SECONDS_PER_HOUR
        return times, np.where(labelled, times + delay_s, np.nan)
    column = spec.label_time_column
    label_times = cells.time(column)
    raw = cells.column(column)
    missing = np.flatnonzero(labelled & np.isnan(label_times))
    if len(missing):
        row = int(missing[0])
        raise cells.fail(column, row, raw.iloc[row],
                         "is empty on a labelled row (every label needs the time it arrived)")
    stray = np.flatnonzero(~labelled & ~np.isnan(label_times))
    if len(stray):
        row = int(stray[0])
        raise cells.fail(column, row, raw.iloc[row], "is set on an unlabelled row (must be empty)")
    early = np.flatnonzero(labelled & (label_times < times))
    if len(early):
        row = int(early[0])
        event = cells.column(spec.time_column).iloc[row]
        raise cells.fail(column, row, raw.iloc[row],
                         f"is before the row's {spec.time_column} {event!r} (a label cannot precede its event)")
    return times, label_times


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
    """Each part needs a fraud and a legitimate *labelled* row: unlabelled rows count for neither."""
    for name in SPLIT_NAMES:
        part = labels[(split == name) & (labels != UNLABELLED)]
        if len(np.unique(part)) < 2:
            raise DatasetFormatError(f"{where}: the {name} part needs both fraud and legitimate rows")


def write_dataset(dataset: Dataset, folder: str | Path, table_name: str = "table.csv") -> Path:
    """Write ``dataset`` in the documented format (table + dataset.yaml); returns the descriptor's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec = dataset.spec
    frame = pd.DataFrame({spec.id_column: dataset.ids})
    frame[spec.label_column] = np.select(
        [dataset.labels == 1, dataset.labels == 0], [spec.fraud_labels[0], spec.legit_labels[0]], default=""
    )
    for j, name in enumerate(spec.numeric_features):
        frame[name] = dataset.numeric[:, j]
    for name, values in {**dataset.categorical, **dataset.links}.items():
        frame[name] = values
    for name, values in zip(spec.split_columns, dataset.splits):
        frame[name] = values
    if spec.risk_type_column and dataset.risk_types is not None:
        frame[spec.risk_type_column] = dataset.risk_types
    if spec.time_column and dataset.times is not None:
        frame[spec.time_column] = _iso_times(dataset.times)
    if spec.label_time_column and dataset.label_times is not None:
        frame[spec.label_time_column] = _iso_times(dataset.label_times)
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


def _iso_times(seconds: np.ndarray) -> np.ndarray:
    """Epoch seconds as ISO 8601 UTC text ("" for NaN), microsecond precision: what ``_Cells.time`` reads back."""
    return np.array(
        ["" if math.isnan(t) else datetime.fromtimestamp(t, timezone.utc).isoformat() for t in seconds], dtype=object
    )

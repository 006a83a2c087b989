"""The documented data set format: every refusal names the file, the column and the 1-based row; every accepted
file reads into the same typed Dataset whether it is CSV or Parquet, and write_dataset / load_dataset round-trip."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from riskcascade.modelling.datasets.format import (
    Dataset,
    DatasetFormatError,
    DatasetSpec,
    dataset_from_frame,
    load_dataset,
    read_spec,
    read_table,
    write_dataset,
)
from riskcascade.modelling.datasets.splits import stratified_split
from riskcascade.modelling.datasets.synthetic_source import synthetic_dataset
from riskcascade.modelling.synthetic import generate_events, split_events

# Six events; every split part holds a fraud and a legitimate row. Row numbers in errors are these + 1.
BASE_ROWS = [
    # event_id label amount   age    event_type account_id device_id split   risk_type note
    ("e1", "1", "10.5", "3", "order", "a1", "d1", "train", "ato", "first"),
    ("e2", "0", "20", "", "login", "a1", "", "train", "", "has, a comma"),
    ("e3", "1", "nan", "5", "order", "a2", "d1", "valid", "promo_abuse", ""),
    ("e4", "0", "7", "9", "", "a3", "d2", "valid", "", "x"),
    ("e5", "1", "1e3", "1", "payout", "", "d2", "test", "ato", "y"),
    ("e6", "0", "-2.5", "100", "order", "a3", "d3", "test", "", "z"),
]
COLUMNS = ["event_id", "label", "amount", "age", "event_type", "account_id", "device_id", "split", "risk_type",
           "note"]
DESCRIPTOR = {
    "name": "shop",
    "table": "events.csv",
    "id_column": "event_id",
    "label_column": "label",
    "fraud_labels": ["1"],
    "legit_labels": ["0"],
    "numeric_features": ["amount", "age"],
    "categorical_features": ["event_type"],
    "feature_descriptions": {"amount": "Order value"},
    "links": ["account_id", "device_id"],
    "split_columns": ["split"],
    "risk_type_column": "risk_type",
}


def base_frame() -> pd.DataFrame:
    return pd.DataFrame(BASE_ROWS, columns=COLUMNS)


def write_case(
    folder: Path, frame: pd.DataFrame | None = None, edge_list: pd.DataFrame | None = None, **overrides
) -> Path:
    """A descriptor (DESCRIPTOR with ``overrides``; a value of None drops the key) and its table as text CSV."""
    frame = base_frame() if frame is None else frame
    descriptor = {**DESCRIPTOR, **overrides}
    descriptor = {k: v for k, v in descriptor.items() if v is not None}
    table = folder / descriptor["table"]
    if table.suffix == ".parquet":
        frame.to_parquet(table, index=False)
    else:
        frame.to_csv(table, index=False)
    if edge_list is not None:
        edge_list.to_csv(folder / "edges.csv", index=False)
        descriptor["edges"] = "edges.csv"
    path = folder / "dataset.yaml"
    path.write_text(yaml.safe_dump(descriptor), encoding="utf-8")
    return path


def refusal(path: Path) -> str:
    with pytest.raises(DatasetFormatError) as caught:
        load_dataset(path)
    return str(caught.value)


def assert_same_dataset(a: Dataset, b: Dataset) -> None:
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.labels.dtype == b.labels.dtype == np.int64
    np.testing.assert_array_equal(a.numeric, b.numeric)  # NaN in the same places
    assert a.numeric.dtype == b.numeric.dtype == np.float64
    assert a.categorical.keys() == b.categorical.keys()
    for name in a.categorical:
        np.testing.assert_array_equal(a.categorical[name], b.categorical[name])
    assert a.links.keys() == b.links.keys()
    for name in a.links:
        np.testing.assert_array_equal(a.links[name], b.links[name])
    assert len(a.splits) == len(b.splits)
    for x, y in zip(a.splits, b.splits):
        np.testing.assert_array_equal(x, y)
    if a.risk_types is None:
        assert b.risk_types is None
    else:
        np.testing.assert_array_equal(a.risk_types, b.risk_types)
    if a.edges is None:
        assert b.edges is None
    else:
        np.testing.assert_array_equal(a.edges, b.edges)
    for name in ("times", "label_times"):
        x, y = getattr(a, name), getattr(b, name)
        if x is None:
            assert y is None, name
        else:
            assert x.dtype == y.dtype == np.float64
            np.testing.assert_array_equal(x, y)  # NaN (unlabelled) in the same places


# ---------------------------------------------------------------------------------------------------------------
# Refusals in the table: file, column and 1-based row


def test_missing_column_names_it_and_lists_the_columns_present(tmp_path):
    path = write_case(tmp_path, base_frame().drop(columns=["age"]))
    message = refusal(path)
    assert str(tmp_path / "events.csv") in message
    assert "missing column 'age'" in message
    for present in ("event_id", "amount", "event_type", "note"):
        assert present in message


@pytest.mark.parametrize(
    ("column", "row", "value", "why"),
    [
        ("amount", 1, "12,5", "is not a number"),
        ("amount", 3, "NA", "is not a number"),  # only empty and "nan" are missing
        ("age", 4, "abc", "is not a number"),
        ("amount", 3, "inf", "is infinite"),
        ("age", 5, "-Infinity", "is infinite"),
        ("label", 2, "2", "is not a label"),
        ("label", 0, "01", "is not a label"),  # compared as text; an empty label cell is allowed (unlabelled)
        ("label", 5, "fraud", "is not a label"),
        ("event_id", 4, "", "is empty"),
        ("split", 2, "validation", "is not one of train, valid, test"),
        ("split", 0, "", "is not one of train, valid, test"),
        ("risk_type", 3, "ato", "on a legitimate row"),
        ("risk_type", 4, "", "empty on a fraud row"),
    ],
)
def test_bad_cell_names_file_row_and_column(tmp_path, column, row, value, why):
    frame = base_frame()
    frame.loc[row, column] = value
    message = refusal(write_case(tmp_path, frame))
    assert message.startswith(f"{tmp_path / 'events.csv'}: row {row + 1}, column {column!r}:"), message
    assert why in message
    if value and why != "is infinite":  # an infinite value is shown as parsed, not as written
        assert repr(value) in message


def test_the_first_bad_row_is_the_one_named(tmp_path):
    frame = base_frame()
    frame.loc[2, "amount"] = "x"
    frame.loc[4, "amount"] = "y"
    assert "row 3, column 'amount': 'x'" in refusal(write_case(tmp_path, frame))


def test_duplicate_id_names_both_rows(tmp_path):
    frame = base_frame()
    frame.loc[4, "event_id"] = "e2"
    message = refusal(write_case(tmp_path, frame))
    assert str(tmp_path / "events.csv") in message
    assert "column 'event_id'" in message
    assert "id 'e2' is on rows 2 and 5" in message


def test_split_part_without_both_classes_is_refused(tmp_path):
    frame = base_frame()
    frame.loc[2, "split"] = "train"  # valid keeps only e4, a legitimate row
    message = refusal(write_case(tmp_path, frame))
    assert str(tmp_path / "events.csv") in message
    assert "split column 'split'" in message
    assert "the valid part needs both fraud and legitimate rows" in message


def test_split_part_that_is_empty_is_refused(tmp_path):
    frame = base_frame()
    frame.loc[[4, 5], "split"] = "train"
    assert "the test part needs both" in refusal(write_case(tmp_path, frame))


def test_edge_list_with_an_unknown_id_names_row_and_column(tmp_path):
    edges = pd.DataFrame({"src": ["e1", "e3", "e5"], "dst": ["e2", "zz", "e6"]})
    message = refusal(write_case(tmp_path, edge_list=edges))
    assert "edge list" in message
    assert "row 2, column 'dst': 'zz' is not an id of the table" in message


def test_edge_list_error_names_the_edge_list_file(tmp_path):
    edges = pd.DataFrame({"src": ["e1", "e3"], "dst": ["e2", "zz"]})
    assert "edges.csv" in refusal(write_case(tmp_path, edge_list=edges))


def test_edge_list_with_wrong_headers_names_the_missing_column(tmp_path):
    edges = pd.DataFrame({"source": ["e1"], "target": ["e2"]})
    message = refusal(write_case(tmp_path, edge_list=edges))
    assert "edge list" in message and "missing column 'src'" in message


def test_edge_list_with_an_empty_id_is_refused(tmp_path):
    edges = pd.DataFrame({"src": ["e1", ""], "dst": ["e2", "e3"]})
    assert "row 2, column 'src': '' is empty" in refusal(write_case(tmp_path, edge_list=edges))


# ---------------------------------------------------------------------------------------------------------------
# Refusals in the descriptor: the file and the key


def test_unknown_descriptor_key_is_named(tmp_path):
    path = write_case(tmp_path, colour="blue")
    message = refusal(path)
    assert message.startswith(f"{path}:")
    assert "colour" in message
    with pytest.raises(DatasetFormatError, match="colour"):
        read_spec(path)


def test_misspelt_key_is_not_silently_ignored(tmp_path):
    message = refusal(write_case(tmp_path, split_columns=None, split_column=["split"]))
    assert "split_column" in message


@pytest.mark.parametrize(
    "overrides",
    [
        {"categorical_features": ["amount"]},
        {"links": ["account_id", "event_id"]},
        {"split_columns": ["split", "label"]},
        {"risk_type_column": "event_type"},
        {"numeric_features": ["amount", "age", "amount"]},
    ],
)
def test_column_with_two_roles_is_refused(tmp_path, overrides):
    path = write_case(tmp_path, **overrides)
    message = refusal(path)
    assert message.startswith(f"{path}:")
    assert "is given more than one role" in message


def test_aggregate_features_outside_numeric_features_are_refused(tmp_path):
    message = refusal(write_case(tmp_path, aggregate_features=["amount", "event_type"]))
    assert "aggregate_features ['event_type'] are not in numeric_features" in message


def test_label_in_both_lists_is_refused(tmp_path):
    message = refusal(write_case(tmp_path, fraud_labels=["1", "x"], legit_labels=["0", "x"]))
    assert "['x'] are in both fraud_labels and legit_labels" in message


def test_descriptor_without_features_is_refused(tmp_path):
    message = refusal(write_case(tmp_path, numeric_features=[], categorical_features=[]))
    assert "both empty" in message


def test_wrongly_typed_key_is_named(tmp_path):
    message = refusal(write_case(tmp_path, numeric_features="amount"))
    assert "numeric_features" in message


def test_missing_name_is_named(tmp_path):
    assert "name" in refusal(write_case(tmp_path, name=None))


@pytest.mark.parametrize("text", ["name: [unclosed\ntable: t.csv\n", "name: a\n  table: : b\n"])
def test_non_yaml_descriptor_is_refused(tmp_path, text):
    path = tmp_path / "dataset.yaml"
    path.write_text(text, encoding="utf-8")
    message = refusal(path)
    assert message.startswith(f"{path}: not valid YAML")


@pytest.mark.parametrize("text", ["- name\n- table\n", "just words\n", ""])
def test_descriptor_that_is_not_a_mapping_is_refused(tmp_path, text):
    path = tmp_path / "dataset.yaml"
    path.write_text(text, encoding="utf-8")
    assert refusal(path) == f"{path}: a descriptor is a YAML mapping (see riskcascade.modelling.datasets.format)"


def test_missing_descriptor_is_refused(tmp_path):
    assert "no such data set descriptor" in refusal(tmp_path / "nothing.yaml")


def test_missing_table_file_is_refused(tmp_path):
    path = write_case(tmp_path)
    (tmp_path / "events.csv").unlink()
    assert refusal(path) == f"{tmp_path / 'events.csv'}: no such file"


@pytest.mark.parametrize("name", ["events.xlsx", "events.txt", "events", "events.csv.gz", "events.CSV"])
def test_table_with_wrong_suffix_is_refused(tmp_path, name):
    path = write_case(tmp_path)
    descriptor = yaml.safe_load(path.read_text())
    descriptor["table"] = name
    path.write_text(yaml.safe_dump(descriptor))
    (tmp_path / name).write_text("whatever")
    assert refusal(path) == f"{tmp_path / name}: tables are .csv or .parquet files"


def test_edge_list_with_wrong_suffix_is_refused(tmp_path):
    path = write_case(tmp_path, edges="edges.tsv")
    (tmp_path / "edges.tsv").write_text("src\tdst\ne1\te2\n")
    assert refusal(path) == f"{tmp_path / 'edges.tsv'}: tables are .csv or .parquet files"


def test_corrupt_parquet_is_refused_with_the_file(tmp_path):
    path = write_case(tmp_path, table="events.parquet")
    (tmp_path / "events.parquet").write_bytes(b"not parquet at all")
    message = refusal(path)
    assert message.startswith(f"{tmp_path / 'events.parquet'}: cannot be read")


# ---------------------------------------------------------------------------------------------------------------
# Accepted files


def test_csv_reads_every_role(tmp_path):
    data = load_dataset(write_case(tmp_path))
    assert len(data) == 6
    assert data.spec.name == "shop"
    np.testing.assert_array_equal(data.ids, ["e1", "e2", "e3", "e4", "e5", "e6"])
    np.testing.assert_array_equal(data.labels, [1, 0, 1, 0, 1, 0])
    np.testing.assert_array_equal(
        data.numeric, [[10.5, 3], [20, np.nan], [np.nan, 5], [7, 9], [1000, 1], [-2.5, 100]]
    )
    np.testing.assert_array_equal(data.categorical["event_type"], ["order", "login", "order", "", "payout", "order"])
    np.testing.assert_array_equal(data.links["account_id"], ["a1", "a1", "a2", "a3", "", "a3"])
    np.testing.assert_array_equal(data.links["device_id"], ["d1", "", "d1", "d2", "d2", "d3"])
    assert len(data.splits) == 1
    np.testing.assert_array_equal(data.splits[0], ["train", "train", "valid", "valid", "test", "test"])
    np.testing.assert_array_equal(data.risk_types, ["ato", "", "promo_abuse", "", "ato", ""])
    assert data.edges is None
    assert list(data.extra.columns) == ["note"]  # no role: carried, not modelled
    assert data.extra["note"].tolist() == ["first", "has, a comma", "", "x", "y", "z"]


def test_edge_list_is_read_as_row_indices(tmp_path):
    edges = pd.DataFrame({"src": ["e1", "e6", "e3"], "dst": ["e2", "e1", "e3"]})
    data = load_dataset(write_case(tmp_path, edge_list=edges))
    np.testing.assert_array_equal(data.edges, [[0, 1], [5, 0], [2, 2]])
    assert data.edges.dtype == np.int64


def test_csv_and_parquet_give_the_same_dataset(tmp_path):
    csv_dir, parquet_dir = tmp_path / "csv", tmp_path / "parquet"
    csv_dir.mkdir()
    parquet_dir.mkdir()
    edges = pd.DataFrame({"src": ["e1", "e4"], "dst": ["e2", "e5"]})
    from_csv = load_dataset(write_case(csv_dir, edge_list=edges))
    typed = base_frame()  # Parquet as a data pipeline writes it: typed columns, None / NaN for missing
    typed["label"] = typed["label"].astype(np.int64)
    typed["amount"] = [10.5, 20.0, np.nan, 7.0, 1000.0, -2.5]
    typed["age"] = pd.array([3, None, 5, 9, 1, 100], dtype="Int64")
    typed["event_type"] = ["order", "login", "order", None, "payout", "order"]
    typed["account_id"] = ["a1", "a1", "a2", "a3", None, "a3"]
    typed["risk_type"] = ["ato", None, "promo_abuse", None, "ato", None]
    from_parquet = load_dataset(write_case(parquet_dir, typed, edge_list=edges, table="events.parquet"))
    assert_same_dataset(from_csv, from_parquet)


def test_parquet_text_columns_are_parsed_like_csv(tmp_path):
    (tmp_path / "csv").mkdir()
    (tmp_path / "parquet").mkdir()
    from_csv = load_dataset(write_case(tmp_path / "csv"))
    from_parquet = load_dataset(write_case(tmp_path / "parquet", base_frame(), table="events.parquet"))
    assert_same_dataset(from_csv, from_parquet)


@pytest.mark.parametrize("cell", ["", "nan", "NaN", "NAN", " nan ", "  "])
def test_empty_and_nan_numeric_cells_are_missing(tmp_path, cell):
    frame = base_frame()
    frame.loc[1, "amount"] = cell
    data = load_dataset(write_case(tmp_path, frame))
    assert math.isnan(data.numeric[1, 0])
    assert data.numeric[0, 0] == 10.5


@pytest.mark.parametrize(("cell", "number"), [(" 3 ", 3.0), ("1e3", 1000.0), ("-0.25", -0.25), ("+4", 4.0)])
def test_numeric_cells_are_parsed_as_python_floats(tmp_path, cell, number):
    frame = base_frame()
    frame.loc[0, "amount"] = cell
    assert load_dataset(write_case(tmp_path, frame)).numeric[0, 0] == number


def test_empty_categorical_is_empty_text(tmp_path):
    frame = base_frame()
    frame.loc[0, "event_type"] = ""
    data = load_dataset(write_case(tmp_path, frame))
    assert data.categorical["event_type"][0] == ""
    assert data.categorical["event_type"].dtype == object


def test_numeric_looking_text_keeps_its_spelling(tmp_path):
    frame = base_frame()
    frame.loc[0, "event_id"] = "007"
    frame.loc[0, "account_id"] = "00042"
    frame.loc[0, "event_type"] = "1.50"
    data = load_dataset(write_case(tmp_path, frame))
    assert data.ids[0] == "007"
    assert data.links["account_id"][0] == "00042"
    assert data.categorical["event_type"][0] == "1.50"


def test_yelpchi_style_labels(tmp_path):
    frame = base_frame()
    frame["label"] = frame["label"].map({"1": "-1", "0": "1"})
    data = load_dataset(write_case(tmp_path, frame, fraud_labels=["-1"], legit_labels=["1"]))
    np.testing.assert_array_equal(data.labels, [1, 0, 1, 0, 1, 0])
    frame.loc[3, "label"] = "0"
    message = refusal(write_case(tmp_path, frame, fraud_labels=["-1"], legit_labels=["1"]))
    assert "row 4, column 'label': '0' is not a label (fraud: ['-1'], legit: ['1'])" in message


def test_several_fraud_labels(tmp_path):
    frame = base_frame()
    frame.loc[0, "label"] = "chargeback"
    data = load_dataset(write_case(tmp_path, frame, fraud_labels=["1", "chargeback"]))
    np.testing.assert_array_equal(data.labels, [1, 0, 1, 0, 1, 0])


def test_several_split_columns_are_kept_in_order(tmp_path):
    frame = base_frame()
    frame["split_b"] = ["test", "test", "train", "train", "valid", "valid"]
    frame["split_c"] = ["valid", "valid", "test", "test", "train", "train"]
    data = load_dataset(write_case(tmp_path, frame, split_columns=["split", "split_b", "split_c"]))
    assert len(data.splits) == 3
    np.testing.assert_array_equal(data.splits[1], frame["split_b"].to_numpy())
    np.testing.assert_array_equal(data.splits[2], frame["split_c"].to_numpy())
    assert "split_b" not in data.extra.columns


def test_each_split_column_is_checked(tmp_path):
    frame = base_frame()
    frame["split_b"] = ["train", "train", "train", "train", "valid", "test"]  # valid and test lack a class
    message = refusal(write_case(tmp_path, frame, split_columns=["split", "split_b"]))
    assert "split column 'split_b'" in message


def test_optional_roles_can_be_left_out(tmp_path):
    frame = base_frame()[["event_id", "label", "amount"]]
    data = load_dataset(
        write_case(tmp_path, frame, numeric_features=["amount"], categorical_features=None, links=None,
                   split_columns=None, risk_type_column=None, feature_descriptions=None)
    )
    assert data.splits == [] and data.risk_types is None and data.links == {} and data.categorical == {}
    assert data.spec.aggregated == ["amount"]


def test_aggregated_defaults_to_all_numeric_features():
    spec = DatasetSpec(name="x", table=Path("t.csv"), numeric_features=["a", "b"])
    assert spec.aggregated == ["a", "b"]
    spec = DatasetSpec(name="x", table=Path("t.csv"), numeric_features=["a", "b"], aggregate_features=["b"])
    assert spec.aggregated == ["b"]
    assert DatasetSpec(name="x", table=Path("t.csv"), numeric_features=["a"], aggregate_features=[]).aggregated == []


def test_absolute_table_path_is_used_as_is(tmp_path):
    (tmp_path / "data").mkdir()
    base_frame().to_csv(tmp_path / "data" / "events.csv", index=False)
    (tmp_path / "spec").mkdir()
    path = tmp_path / "spec" / "dataset.yaml"
    path.write_text(yaml.safe_dump({**DESCRIPTOR, "table": str(tmp_path / "data" / "events.csv")}))
    assert len(load_dataset(path)) == 6


def test_read_table_keeps_csv_cells_as_text(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("a,b\n007,\nNA,nan\n")
    frame = read_table(path)
    assert frame["a"].tolist() == ["007", "NA"]
    assert frame["b"].tolist() == ["", "nan"]


def test_dataset_from_frame_names_its_source():
    frame = base_frame()
    frame.loc[0, "amount"] = "x"
    spec = DatasetSpec.model_validate(DESCRIPTOR)
    with pytest.raises(DatasetFormatError, match=r"^upload 7: row 1, column 'amount'"):
        dataset_from_frame(spec, frame, source="upload 7")


def test_parquet_bool_and_nullable_numbers(tmp_path):
    frame = base_frame()
    frame["age"] = [True, False, True, False, True, False]
    frame["amount"] = pd.array([1, None, 3, 4, 5, 6], dtype="Int64")
    data = load_dataset(write_case(tmp_path, frame, table="events.parquet"))
    np.testing.assert_array_equal(data.numeric[:, 1], [1, 0, 1, 0, 1, 0])
    np.testing.assert_array_equal(data.numeric[:, 0], [1, np.nan, 3, 4, 5, 6])


def test_parquet_infinite_value_is_refused(tmp_path):
    frame = base_frame()
    frame["amount"] = [1.0, 2.0, 3.0, -np.inf, 5.0, 6.0]
    message = refusal(write_case(tmp_path, frame, table="events.parquet"))
    assert message.startswith(f"{tmp_path / 'events.parquet'}: row 4, column 'amount':")
    assert "is infinite" in message


# ---------------------------------------------------------------------------------------------------------------
# Unlabelled rows, event times and label times

EVENT_TIMES = [  # one per BASE_ROWS row; the offsets differ, the instants are what is compared
    "2025-01-03T10:00:00+00:00", "2025-01-03T12:30:00+02:00", "2025-01-03T11:00:00Z",
    "2025-01-04T00:00:00.250000+00:00", "2025-01-04T08:00:00-05:00", "1735984800",
]
EVENT_EPOCH = [1735898400.0, 1735900200.0, 1735902000.0, 1735948800.25, 1735995600.0, 1735984800.0]
LABEL_TIMES = [  # every one at or after its event
    "2025-01-05T10:00:00+00:00", "2025-01-03T10:30:00Z", "2025-01-03T11:00:00+00:00",
    "2025-01-06T00:00:00+00:00", "2025-01-04T13:00:00Z", "1736000000",
]
TIMED = {"time_column": "occurred_at", "label_time_column": "labelled_at"}


def timed_frame() -> pd.DataFrame:
    frame = base_frame()
    frame["occurred_at"] = EVENT_TIMES
    frame["labelled_at"] = LABEL_TIMES
    return frame


def test_empty_label_means_unlabelled(tmp_path):
    frame = base_frame()
    twins = frame.iloc[[1, 3]].assign(event_id=["e7", "e8"])  # labelled legit rows, so every part stays usable
    frame.loc[1, "label"] = ""
    frame.loc[3, "label"] = " nan "  # what a missing value looks like in many exports
    frame = pd.concat([frame, twins], ignore_index=True)
    data = load_dataset(write_case(tmp_path, frame))
    np.testing.assert_array_equal(data.labels, [1, -1, 1, -1, 1, 0, 0, 0])
    assert data.labels.dtype == np.int64
    np.testing.assert_array_equal(data.labelled, [True, False, True, False, True, True, True, True])
    assert data.times is None and data.label_times is None


def test_split_part_counts_only_labelled_rows(tmp_path):
    frame = base_frame()
    frame.loc[3, "label"] = ""  # valid keeps e3 (fraud) and an unlabelled row: no legitimate label to score against
    message = refusal(write_case(tmp_path, frame))
    assert "split column 'split'" in message and "the valid part needs both fraud and legitimate rows" in message
    frame.loc[len(frame)] = ("e7", "0", "1", "1", "order", "a9", "d9", "valid", "", "")  # a labelled legit row
    assert len(load_dataset(write_case(tmp_path, frame))) == 7


def test_unlabelled_row_takes_no_risk_type(tmp_path):
    frame = base_frame()
    frame.loc[4, "label"] = ""  # e5 was an "ato" fraud row
    frame.loc[len(frame)] = ("e7", "1", "1", "1", "order", "a9", "d9", "test", "ato", "")  # keep test usable
    message = refusal(write_case(tmp_path, frame))
    assert message.startswith(f"{tmp_path / 'events.csv'}: row 5, column 'risk_type': 'ato' on an unlabelled row")
    frame.loc[4, "risk_type"] = ""
    data = load_dataset(write_case(tmp_path, frame))
    assert data.labels[4] == -1 and data.risk_types[4] == ""


@pytest.mark.parametrize("value", ["val", "valid"])
def test_val_is_read_as_valid(tmp_path, value):
    frame = base_frame()
    frame.loc[[2, 3], "split"] = value
    data = load_dataset(write_case(tmp_path, frame))
    np.testing.assert_array_equal(data.splits[0], ["train", "train", "valid", "valid", "test", "test"])


def test_times_are_read_as_epoch_seconds_in_utc(tmp_path):
    data = load_dataset(write_case(tmp_path, timed_frame(), **TIMED))
    assert data.times.dtype == np.float64
    np.testing.assert_array_equal(data.times, EVENT_EPOCH)
    np.testing.assert_array_equal(
        data.label_times, [1736071200.0, 1735900200.0, 1735902000.0, 1736121600.0, 1735995600.0, 1736000000.0]
    )
    assert "occurred_at" not in data.extra.columns and "labelled_at" not in data.extra.columns
    assert data.spec.label_timing == "labels known from their arrival time (labelled_at)"


def test_parquet_times_as_numbers_and_zoned_timestamps(tmp_path):
    (tmp_path / "csv").mkdir()
    (tmp_path / "parquet").mkdir()
    from_csv = load_dataset(write_case(tmp_path / "csv", timed_frame(), **TIMED))
    frame = timed_frame()
    frame["occurred_at"] = np.array(EVENT_EPOCH)  # a number column: seconds since the epoch
    frame["labelled_at"] = pd.to_datetime(LABEL_TIMES[:5] + ["2025-01-04T14:13:20+00:00"], utc=True, format="mixed")
    from_parquet = load_dataset(write_case(tmp_path / "parquet", frame, table="events.parquet", **TIMED))
    assert_same_dataset(from_csv, from_parquet)


def test_parquet_timestamps_without_a_zone_are_refused(tmp_path):
    frame = timed_frame()
    frame["occurred_at"] = pd.to_datetime(EVENT_EPOCH, unit="s")  # naive: UTC or local time? not guessed
    message = refusal(write_case(tmp_path, frame, table="events.parquet", **TIMED))
    assert message.startswith(f"{tmp_path / 'events.parquet'}: row 1, column 'occurred_at':")
    assert "has no UTC offset" in message


@pytest.mark.parametrize(
    ("column", "row", "value", "why"),
    [
        ("occurred_at", 2, "2025-01-03T11:00:00", "has no UTC offset"),
        ("occurred_at", 0, "2025-01-03", "has no UTC offset"),
        ("occurred_at", 3, "", "is empty; every row needs one"),
        ("occurred_at", 4, "nan", "is empty; every row needs one"),
        ("occurred_at", 1, "yesterday", "is not a time"),
        ("occurred_at", 5, "03/01/2025 10:00 +00:00", "is not a time"),
        ("occurred_at", 5, "inf", "is not a time"),
        ("labelled_at", 0, "2025-01-03T09:59:59+00:00", "is before the row's occurred_at"),
        ("labelled_at", 4, "", "is empty on a labelled row"),
        ("labelled_at", 1, "2025-01-05", "has no UTC offset"),
    ],
)
def test_bad_time_cell_names_file_row_and_column(tmp_path, column, row, value, why):
    frame = timed_frame()
    frame.loc[row, column] = value
    message = refusal(write_case(tmp_path, frame, **TIMED))
    assert message.startswith(f"{tmp_path / 'events.csv'}: row {row + 1}, column {column!r}:"), message
    assert why in message
    if value and value != "inf":
        assert repr(value) in message


def test_label_time_on_an_unlabelled_row_is_refused(tmp_path):
    frame = timed_frame()
    frame.loc[len(frame)] = ("e7", "", "1", "1", "order", "a9", "d9", "train", "", "", "2025-01-03T10:00:00Z",
                             "2025-01-04T10:00:00Z")
    message = refusal(write_case(tmp_path, frame, **TIMED))
    assert "row 7, column 'labelled_at': '2025-01-04T10:00:00Z' is set on an unlabelled row" in message
    frame.loc[6, "labelled_at"] = ""
    data = load_dataset(write_case(tmp_path, frame, **TIMED))
    assert data.labels[6] == -1 and np.isnan(data.label_times[6]) and data.times[6] == 1735898400.0


def test_a_label_may_arrive_at_its_event_time(tmp_path):
    frame = timed_frame()
    frame.loc[0, "labelled_at"] = "2025-01-03T11:00:00+01:00"  # the same instant as the event, written otherwise
    assert load_dataset(write_case(tmp_path, frame, **TIMED)).label_times[0] == EVENT_EPOCH[0]


@pytest.mark.parametrize(("delay", "timing"), [(48, "labels known 48 h after their event"),
                                               (0.5, "labels known 0.5 h after their event")])
def test_label_delay_hours_shifts_label_times(tmp_path, delay, timing):
    frame = timed_frame().drop(columns=["labelled_at"])
    frame.loc[len(frame)] = ("e7", "", "1", "1", "order", "a9", "d9", "train", "", "", "2025-01-03T10:00:00Z")
    data = load_dataset(write_case(tmp_path, frame, time_column="occurred_at", label_delay_hours=delay))
    np.testing.assert_array_equal(data.label_times[:6], np.array(EVENT_EPOCH) + delay * 3600)
    assert np.isnan(data.label_times[6])  # unlabelled: no label time
    assert data.spec.label_timing == timing


def test_without_label_time_or_delay_labels_count_from_the_event(tmp_path):
    frame = timed_frame().drop(columns=["labelled_at"])
    data = load_dataset(write_case(tmp_path, frame, time_column="occurred_at"))
    np.testing.assert_array_equal(data.label_times, data.times)
    assert "optimistic" in data.spec.label_timing
    assert load_dataset(write_case(tmp_path, base_frame())).spec.label_timing is None


@pytest.mark.parametrize(
    ("overrides", "why"),
    [
        ({"label_time_column": "labelled_at"}, "need time_column"),
        ({"label_delay_hours": 24}, "need time_column"),
        ({**TIMED, "label_delay_hours": 24}, "not both"),
        ({"time_column": "occurred_at", "label_delay_hours": -1}, "label_delay_hours: Input should be greater than"),
        ({"time_column": "occurred_at", "label_delay_hours": float("inf")}, "label_delay_hours: Input should be a fin"),
        ({"time_column": "amount"}, "'amount' is given more than one role"),
        ({"time_column": "occurred_at", "label_time_column": "occurred_at"}, "is given more than one role"),
        ({**TIMED, "split_columns": ["split", "labelled_at"]}, "'labelled_at' is given more than one role"),
        ({"legit_labels": ["0", ""]}, "means 'not labelled'"),
    ],
)
def test_inconsistent_time_roles_are_refused(tmp_path, overrides, why):
    path = write_case(tmp_path, timed_frame(), **overrides)
    message = refusal(path)
    assert message.startswith(f"{path}:")
    assert why in message


# ---------------------------------------------------------------------------------------------------------------
# write_dataset then load_dataset


def awkward_dataset() -> Dataset:
    """Every role, with values that a careless writer would lose: NaN, tiny and non-terminating floats, empty
    text, text that looks numeric, commas and quotes."""
    spec = DatasetSpec.model_validate(
        {**DESCRIPTOR, "table": "ignored.csv", "fraud_labels": ["-1", "spam"], "legit_labels": ["1"],
         "aggregate_features": ["amount"], "split_columns": ["split", "split_b"]}
    )
    frame = pd.DataFrame(
        {
            "event_id": ["007", "b,1", 'q"2', "x 3", "e5", "e6"],
            "label": ["-1", "1", "spam", "1", "-1", "1"],
            "amount": [0.1, 1 / 3, 1e-300, np.nan, -2.5e17, 12345.678901234567],
            "age": [np.nan, 0.0, -0.0, 3.0, 1.5, 2 ** 0.5],
            "event_type": ["order", "", "0.10", "login, fast", "", "payout"],
            "account_id": ["a1", "a1", "", "001", "a2", "a2"],
            "device_id": ["", "", "d1", "d1", "d2", ""],
            "split": ["train", "train", "valid", "valid", "test", "test"],
            "split_b": ["test", "test", "train", "train", "valid", "valid"],
            "risk_type": ["ato", "", "promo", "", "ato", ""],
            "note": ["a", "b", "", "d", "e", "f"],
        }
    )
    return dataset_from_frame(spec, frame, pd.DataFrame({"src": ["007", "e5"], "dst": ["b,1", "e6"]}))


@pytest.mark.parametrize("table_name", ["table.csv", "table.parquet"])
def test_write_then_load_round_trips(tmp_path, table_name):
    original = awkward_dataset()
    path = write_dataset(original, tmp_path / "out", table_name=table_name)
    assert path == tmp_path / "out" / "dataset.yaml"
    assert (tmp_path / "out" / table_name).exists() and (tmp_path / "out" / "edges.csv").exists()
    again = load_dataset(path)
    assert_same_dataset(original, again)
    assert again.spec.model_dump(exclude={"table", "edges"}) == original.spec.model_dump(exclude={"table", "edges"})
    assert again.spec.table == Path(table_name)
    assert again.extra["note"].tolist() == original.extra["note"].tolist()


def test_written_descriptor_is_plain_yaml_a_user_can_read(tmp_path):
    path = write_dataset(awkward_dataset(), tmp_path)
    descriptor = yaml.safe_load(path.read_text())
    assert descriptor["table"] == "table.csv"
    assert descriptor["edges"] == "edges.csv"
    assert descriptor["id_column"] == "event_id"
    assert "risk_type_column" in descriptor


def test_round_trip_without_optional_roles(tmp_path):
    spec = DatasetSpec(name="min", table=Path("t.csv"), numeric_features=["x"])
    original = dataset_from_frame(spec, pd.DataFrame({"id": ["a", "b"], "label": ["1", "0"], "x": ["", "2"]}))
    again = load_dataset(write_dataset(original, tmp_path))
    assert_same_dataset(original, again)
    assert not (tmp_path / "edges.csv").exists()
    assert "edges" not in yaml.safe_load((tmp_path / "dataset.yaml").read_text())


@pytest.fixture(scope="module")
def synthetic():
    return synthetic_dataset(split_events(generate_events(2000, 7), 7))


def timed_awkward_frame() -> pd.DataFrame:
    """Times with offsets and fractions of a second, label times, and two unlabelled rows."""
    frame = timed_frame()
    frame.loc[len(frame)] = ("e7", "", "", "", "", "", "", "train", "", "", "2024-12-31T23:59:59.999999-08:00", "")
    frame.loc[len(frame)] = ("e8", "", "3", "", "", "a1", "", "test", "", "", "1735984800.5", "")
    return frame


@pytest.mark.parametrize("table_name", ["table.csv", "table.parquet"])
@pytest.mark.parametrize("timing", ["label_time_column", "label_delay_hours"])
def test_times_and_unlabelled_rows_round_trip(tmp_path, table_name, timing):
    frame = timed_awkward_frame()
    if timing == "label_time_column":
        spec = DatasetSpec.model_validate({**DESCRIPTOR, **TIMED})
    else:
        spec = DatasetSpec.model_validate({**DESCRIPTOR, "time_column": "occurred_at", "label_delay_hours": 36})
        frame = frame.drop(columns=["labelled_at"])
    original = dataset_from_frame(spec, frame)
    again = load_dataset(write_dataset(original, tmp_path, table_name=table_name))
    assert_same_dataset(original, again)
    assert again.spec == original.spec.model_copy(update={"table": Path(table_name)})
    np.testing.assert_array_equal(again.labels[-2:], [-1, -1])
    assert np.all(np.isnan(again.label_times[-2:]))
    written = read_table(tmp_path / table_name)
    assert written["label"].tolist()[-2:] == ["", ""]
    assert written["occurred_at"].tolist()[0] == "2025-01-03T10:00:00+00:00"  # ISO 8601 in UTC
    assert ("labelled_at" in written.columns) == (timing == "label_time_column")


def test_synthetic_dataset_is_a_valid_dataset(synthetic):
    assert len(synthetic) == 2000
    assert 0 < synthetic.labels.sum() < 2000
    assert set(synthetic.splits[0]) == {"train", "valid", "test"}
    fraud = synthetic.labels == 1
    assert np.all(synthetic.risk_types[fraud] != "") and np.all(synthetic.risk_types[~fraud] == "")
    assert set(synthetic.extra.columns) == {"note", "message"}  # occurred_at / label_known_at are the time roles now
    assert synthetic.times is not None and np.all(np.isfinite(synthetic.times))
    labelled = synthetic.labelled
    assert np.all(synthetic.label_times[labelled] >= synthetic.times[labelled])


@pytest.mark.parametrize("table_name", ["events.csv", "events.parquet"])
def test_synthetic_dataset_round_trips(tmp_path, synthetic, table_name):
    again = load_dataset(write_dataset(synthetic, tmp_path, table_name=table_name))
    assert_same_dataset(synthetic, again)
    assert again.spec.aggregated == synthetic.spec.aggregated
    assert again.spec.feature_descriptions == synthetic.spec.feature_descriptions
    for column in synthetic.extra.columns:
        assert again.extra[column].astype(str).tolist() == synthetic.extra[column].astype(str).tolist()


# ---------------------------------------------------------------------------------------------------------------
# stratified_split


@settings(max_examples=200, deadline=None)
@given(
    n_fraud=st.integers(2, 300), n_legit=st.integers(2, 3000), seed=st.integers(0, 2 ** 32 - 1),
    valid_share=st.floats(0.01, 0.45), test_share=st.floats(0.01, 0.45),
)
def test_each_part_keeps_the_fraud_rate_within_one_row(n_fraud, n_legit, seed, valid_share, test_share):
    labels = np.random.default_rng(seed).permutation(np.r_[np.ones(n_fraud, int), np.zeros(n_legit, int)])
    parts = stratified_split(labels, seed, valid_share, test_share)
    assert parts.shape == labels.shape and set(parts) <= {"train", "valid", "test"}
    rate = labels.mean()
    for name in ("train", "valid", "test"):
        part = labels[parts == name]
        assert abs(part.sum() - rate * len(part)) <= 1, (name, part.sum(), rate * len(part))
    # and each part has about its share of the rows
    assert abs((parts == "valid").sum() - valid_share * len(labels)) <= 1
    assert abs((parts == "test").sum() - test_share * len(labels)) <= 1


def test_split_is_deterministic_per_seed():
    labels = np.r_[np.ones(50, int), np.zeros(950, int)]
    a = stratified_split(labels, 3, 0.15, 0.15)
    np.testing.assert_array_equal(a, stratified_split(labels, 3, 0.15, 0.15))
    assert not np.array_equal(a, stratified_split(labels, 4, 0.15, 0.15))


def test_split_counts_on_an_exact_case():
    labels = np.r_[np.ones(20, int), np.zeros(80, int)]
    parts = stratified_split(labels, 0, 0.25, 0.25)
    for name, size in (("train", 50), ("valid", 25), ("test", 25)):
        assert (parts == name).sum() == size
        assert labels[parts == name].sum() == size // 5


@pytest.mark.parametrize(("valid", "test"), [(0, 0.2), (0.2, 0), (1, 0.1), (0.5, 0.5), (0.7, 0.4), (-0.1, 0.2),
                                             (0.2, 1.0), (float("nan"), 0.2)])
def test_split_rejects_bad_shares(valid, test):
    with pytest.raises(ValueError, match="valid_share and test_share"):
        stratified_split(np.array([0, 1, 0, 1]), 0, valid, test)

"""Neighbour aggregates: each feature against values worked out by hand on a six-row example and against a
loop-by-loop reference on random tables; and serving (GraphHistory) against training on the same rows."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from riskcascade.core.graph_features import (
    LINK_STATS,
    GraphHistory,
    build_graph_features,
    describe_graph_feature,
    graph_feature_names,
)

NAN = math.nan

# Six rows, two links, two aggregated values. Groups:
#   device: d1 = rows {0, 1, 4}, d2 = rows {2, 5}, none = row 3
#   ip:     i1 = rows {0, 2, 3}, i2 = row {1}, i3 = row {5}, none = row 4
DEVICE = ["d1", "d1", "d2", "", "d1", "d2"]
IP = ["i1", "i2", "i1", "i1", "", "i3"]
A = [1.0, 2.0, 3.0, 4.0, NAN, 6.0]
B = [10.0, NAN, 30.0, 40.0, 50.0, 60.0]
AGGREGATED = ["a", "b"]


def tiny_links() -> dict[str, np.ndarray]:
    return {"device": np.array(DEVICE, dtype=object), "ip": np.array(IP, dtype=object)}


def tiny_values() -> np.ndarray:
    return np.column_stack([A, B])


def as_dict(names: list[str], row: np.ndarray) -> dict[str, float]:
    assert len(names) == len(row)
    return dict(zip(names, row.tolist()))


def assert_features(actual: dict[str, float], expected: dict[str, float]) -> None:
    for name, value in expected.items():
        got = actual[name]
        if math.isnan(value):
            assert math.isnan(got), (name, got)
        else:
            assert got == pytest.approx(value, abs=1e-12), (name, got, value)


@pytest.fixture(scope="module")
def tiny():
    return build_graph_features(tiny_links(), tiny_values(), AGGREGATED)


# ---------------------------------------------------------------------------------------------------------------
# Names


def test_names_in_documented_order():
    names = graph_feature_names(["device", "ip"], ["a"], edges=True)
    per_value = ["a", "device.degree", "ip.degree"]
    expected = []
    for link in ("device", "ip"):
        expected.append(f"{link}.degree")
        expected += [f"{link}.{stat}.{v}" for stat in ("mean", "max", "min", "std") for v in per_value]
    expected += ["device>ip.mean.a", "ip>device.mean.a", "links.shared", "links.neighbours"]
    expected += ["edges.degree", "edges.mean.a", "edges.max.a", "edges.min.a", "edges.std.a"]
    expected += ["edges>edges.mean.a", "edges>device.mean.a", "device>edges.mean.a", "edges>ip.mean.a",
                 "ip>edges.mean.a"]
    assert names == expected
    assert len(set(names)) == len(names)


def test_names_without_links_or_edges():
    assert graph_feature_names([], ["a"], edges=False) == []
    assert graph_feature_names([], ["a"], edges=True) == ["edges.degree", "edges.mean.a", "edges.max.a",
                                                          "edges.min.a", "edges.std.a", "edges>edges.mean.a"]
    assert "links.shared" in graph_feature_names(["device"], ["a"], edges=False)
    assert not any(">" in n for n in graph_feature_names(["device"], ["a", "b"], edges=False))


def test_built_names_match_graph_feature_names(tiny):
    assert tiny.names == graph_feature_names(["device", "ip"], AGGREGATED, edges=False)
    assert tiny.values.shape == (6, len(tiny.names))
    assert tiny.history is not None and tiny.history.names == tiny.names
    assert tiny.history.links == ["device", "ip"] and tiny.history.aggregated == AGGREGATED


# ---------------------------------------------------------------------------------------------------------------
# Values worked out by hand


def test_row_with_both_entities(tiny):
    third = 1 / 3
    assert_features(as_dict(tiny.names, tiny.values[0]), {
        "device.degree": 2,  # rows 1 and 4; itself excluded
        "ip.degree": 2,  # rows 2 and 3
        # device d1 = rows {0, 1, 4}, itself included; a[4] is NaN and skipped
        "device.mean.a": 1.5, "device.max.a": 2, "device.min.a": 1, "device.std.a": 0.5,
        "device.mean.b": 30, "device.max.b": 50, "device.min.b": 10, "device.std.b": 20,  # b[1] NaN
        "device.mean.device.degree": 2, "device.std.device.degree": 0,
        # ip degrees of rows 0, 1, 4 are 2, 0, 0 (row 4 has no ip: degree 0, a value, not missing)
        "device.mean.ip.degree": 2 * third, "device.max.ip.degree": 2, "device.min.ip.degree": 0,
        "device.std.ip.degree": math.sqrt(4 / 3 - 4 / 9),  # population std
        # ip i1 = rows {0, 2, 3}: a = 1, 3, 4
        "ip.mean.a": 8 * third, "ip.max.a": 4, "ip.min.a": 1, "ip.std.a": math.sqrt(14) / 3,
        "ip.mean.b": 80 * third, "ip.max.b": 40, "ip.min.b": 10,
        "ip.mean.device.degree": 1,  # device degrees 2, 1, 0
        "ip.mean.ip.degree": 2,
        # 2-hop: over rows s in device d1 {0, 1, 4}, mean of ip.mean.a(s) = 8/3, 2, NaN (row 4 has no ip)
        "device>ip.mean.a": (8 * third + 2) / 2,
        # ip.mean.b(s) = 80/3, NaN (row 1 is alone on i2 with b missing), NaN
        "device>ip.mean.b": 80 * third,
        # over rows s in ip i1 {0, 2, 3}, mean of device.mean.a(s) = 1.5, 4.5 (d2: 3 and 6), NaN (no device)
        "ip>device.mean.a": 3.0,
        "ip>device.mean.b": (30 + 45) / 2,
        "links.shared": 2, "links.neighbours": 4,
    })


def test_row_without_a_device(tiny):
    features = as_dict(tiny.names, tiny.values[3])
    assert features["device.degree"] == 0
    for name, value in features.items():
        if name.startswith("device.") and name != "device.degree" or name.startswith("device>"):
            assert math.isnan(value), name
    assert_features(features, {
        "ip.degree": 2, "ip.mean.a": 8 / 3, "ip.std.a": math.sqrt(14) / 3,
        "ip>device.mean.a": 3.0,  # same ip group as row 0, so the same 2-hop mean
        "links.shared": 1, "links.neighbours": 2,
    })


def test_row_without_an_ip_and_with_a_missing_value(tiny):
    features = as_dict(tiny.names, tiny.values[4])
    assert_features(features, {
        "device.degree": 2, "ip.degree": 0,
        "device.mean.a": 1.5, "device.std.a": 0.5,  # its own a is NaN: skipped, the group's still count
        "device.mean.b": 30, "device.max.b": 50,
        "device>ip.mean.a": 7 / 3,
        "ip.mean.a": NAN, "ip.max.b": NAN, "ip.std.a": NAN, "ip.mean.ip.degree": NAN, "ip>device.mean.a": NAN,
        "links.shared": 1, "links.neighbours": 2,
    })


def test_row_alone_on_its_entity(tiny):
    assert_features(as_dict(tiny.names, tiny.values[1]), {
        "ip.degree": 0,
        "ip.mean.a": 2, "ip.max.a": 2, "ip.min.a": 2, "ip.std.a": 0,  # the row's own value
        "ip.mean.b": NAN, "ip.max.b": NAN, "ip.min.b": NAN, "ip.std.b": NAN,  # its own value is missing
        "ip.mean.ip.degree": 0, "ip.mean.device.degree": 2,
        "ip>device.mean.a": 1.5,  # over {row 1}: its device.mean.a
        "device>ip.mean.a": 7 / 3,
        "links.shared": 1, "links.neighbours": 2,
    })
    assert_features(as_dict(tiny.names, tiny.values[5]), {
        "device.degree": 1, "device.mean.a": 4.5, "device.max.a": 6, "device.min.a": 3, "device.std.a": 1.5,
        "device.mean.b": 45, "device.std.b": 15,
        "ip.degree": 0, "ip.mean.a": 6, "ip.std.a": 0,
        # device d2 = rows {2, 5}: ip.mean.a of row 2 (i1) = 8/3, of row 5 (i3) = 6
        "device>ip.mean.a": (8 / 3 + 6) / 2,
        "links.shared": 1, "links.neighbours": 1,
    })


def test_edge_features_by_hand():
    ids_edges = np.array([[0, 1], [1, 0], [2, 2], [3, 5], [0, 3]])  # a duplicate pair and a self-loop
    built = build_graph_features(tiny_links(), tiny_values(), AGGREGATED, edges=ids_edges)
    assert built.history is None  # edge features need the live graph: not servable
    assert built.names == graph_feature_names(["device", "ip"], AGGREGATED, edges=True)
    degree = built.values[:, built.names.index("edges.degree")]
    np.testing.assert_array_equal(degree, [2, 1, 0, 2, 0, 1])
    rows = [as_dict(built.names, r) for r in built.values]
    # row 0: neighbours 1 and 3, itself excluded: a = 2, 4; b = NaN, 40
    assert_features(rows[0], {"edges.mean.a": 3, "edges.max.a": 4, "edges.min.a": 2, "edges.std.a": 1,
                              "edges.mean.b": 40, "edges.std.b": 0})
    assert_features(rows[1], {"edges.mean.a": 1, "edges.mean.b": 10, "edges.std.a": 0})
    # row 2's only edge is to itself: no neighbours
    assert_features(rows[2], {"edges.mean.a": NAN, "edges.max.a": NAN, "edges.min.a": NAN, "edges.std.a": NAN})
    # row 3: neighbours 0 and 5
    assert_features(rows[3], {"edges.mean.a": 3.5, "edges.max.a": 6, "edges.std.a": 2.5, "edges.mean.b": 35})
    assert_features(rows[5], {"edges.mean.a": 4, "edges.mean.b": 40})
    # the link features are the same with or without an edge list
    plain = build_graph_features(tiny_links(), tiny_values(), AGGREGATED)
    np.testing.assert_array_equal(built.values[:, : len(plain.names)], plain.values)


def test_edges_only_without_links():
    built = build_graph_features({}, np.array([[1.0], [5.0], [NAN]]), ["a"], edges=np.array([[0, 1], [2, 1]]))
    assert built.names == ["edges.degree", "edges.mean.a", "edges.max.a", "edges.min.a", "edges.std.a",
                           "edges>edges.mean.a"]
    np.testing.assert_array_equal(built.values[:, 0], [1, 2, 1])
    np.testing.assert_array_equal(built.values[:, 1], [5, 1, 5])  # row 1: a of rows 0 and 2 (NaN skipped)


def test_no_aggregated_features_keeps_degree_aggregates():
    built = build_graph_features(tiny_links(), np.zeros((6, 0)), [])
    assert built.names == graph_feature_names(["device", "ip"], [], edges=False)
    features = as_dict(built.names, built.values[0])
    assert features["device.mean.ip.degree"] == pytest.approx(2 / 3)


def test_link_with_no_entity_at_all():
    built = build_graph_features({"device": np.array(["", ""], dtype=object)}, np.array([[1.0], [2.0]]), ["a"])
    features = as_dict(built.names, built.values[0])
    assert features["device.degree"] == 0 and math.isnan(features["device.mean.a"])


# ---------------------------------------------------------------------------------------------------------------
# A loop-by-loop reference, written from the module docstring


def reference(links: dict[str, list[str]], values: np.ndarray, names: list[str],
              edges: np.ndarray | None = None) -> dict[str, np.ndarray]:
    n = len(values)
    link_names = list(links)

    def group(m: str, r: int) -> list[int]:
        return [s for s in range(n) if links[m][r] != "" and links[m][s] == links[m][r]]

    def summary(xs: list[float]) -> list[float]:
        xs = [x for x in xs if not math.isnan(x)]
        if not xs:
            return [NAN] * 4
        mean = sum(xs) / len(xs)
        return [mean, max(xs), min(xs), math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs))]

    out: dict[str, np.ndarray] = {}
    degree = {m: np.array([len(group(m, r)) - 1 if links[m][r] else 0 for r in range(n)], float) for m in link_names}
    columns = {a: values[:, j] for j, a in enumerate(names)} | {f"{m}.degree": degree[m] for m in link_names}
    for m in link_names:
        out[f"{m}.degree"] = degree[m]
        for value_name, column in columns.items():
            stats = np.array([summary([column[s] for s in group(m, r)]) if links[m][r] else [NAN] * 4
                              for r in range(n)])
            for k, stat in enumerate(LINK_STATS):
                out[f"{m}.{stat}.{value_name}"] = stats[:, k]
    for m in link_names:
        for other in link_names:
            if other == m:
                continue
            for a in names:
                out[f"{m}>{other}.mean.{a}"] = np.array(
                    [summary([out[f"{other}.mean.{a}"][s] for s in group(m, r)])[0] if links[m][r] else NAN
                     for r in range(n)])
    if link_names:
        out["links.shared"] = sum((degree[m] > 0).astype(float) for m in link_names)
        out["links.neighbours"] = sum(degree[m] for m in link_names)
    if edges is not None:
        neighbours = [sorted({int(d) for s, d in edges if s == r and d != r}
                             | {int(s) for s, d in edges if d == r and s != r}) for r in range(n)]
        out["edges.degree"] = np.array([len(x) for x in neighbours], float)
        for j, a in enumerate(names):
            stats = np.array([summary([values[s, j] for s in x]) for x in neighbours])
            for k, stat in enumerate(LINK_STATS):
                out[f"edges.{stat}.{a}"] = stats[:, k]
        for a in names:  # 2-hop: the neighbours' own means, through the edge list and across links
            out[f"edges>edges.mean.{a}"] = np.array([summary([out[f"edges.mean.{a}"][s] for s in x])[0]
                                                     for x in neighbours])
            for m in link_names:
                out[f"edges>{m}.mean.{a}"] = np.array([summary([out[f"{m}.mean.{a}"][s] for s in x])[0]
                                                       for x in neighbours])
                out[f"{m}>edges.mean.{a}"] = np.array(
                    [summary([out[f"edges.mean.{a}"][s] for s in group(m, r)])[0] if links[m][r] else NAN
                     for r in range(n)])
    return out


def test_reference_agrees_on_the_hand_example(tiny):
    expected = reference({"device": DEVICE, "ip": IP}, tiny_values(), AGGREGATED)
    assert set(expected) == set(tiny.names)
    for j, name in enumerate(tiny.names):
        np.testing.assert_allclose(tiny.values[:, j], expected[name], atol=1e-12, err_msg=name)


# Values on a coarse grid keep variances exact, so that "std 0" is 0 in both the module and the reference.
cell = st.one_of(st.just(NAN), st.sampled_from([-3.0, -0.5, 0.0, 1.0, 2.5, 4.0, 10.0]))


@st.composite
def tables(draw, min_rows=1, max_rows=10):
    n = draw(st.integers(min_rows, max_rows))
    device = draw(st.lists(st.sampled_from(["", "d1", "d2", "d3"]), min_size=n, max_size=n))
    ip = draw(st.lists(st.sampled_from(["", "i1", "i2"]), min_size=n, max_size=n))
    width = draw(st.integers(1, 2))
    values = np.array(draw(st.lists(st.lists(cell, min_size=width, max_size=width), min_size=n, max_size=n)))
    return {"device": device, "ip": ip}, values, [f"v{j}" for j in range(width)]


@settings(max_examples=150, deadline=None)
@given(tables(), st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9)), max_size=12), st.booleans())
def test_matches_reference_on_random_tables(table, pairs, with_edges):
    links, values, names = table
    assume(all(any(links[m]) for m in links))  # see test_link_with_no_entity_at_all
    n = len(values)
    edges = np.array([(s % n, d % n) for s, d in pairs], dtype=np.int64).reshape(-1, 2) if with_edges else None
    built = build_graph_features({m: np.array(v, dtype=object) for m, v in links.items()}, values, names, edges)
    expected = reference(links, values, names, edges)
    assert set(expected) == set(built.names)
    for j, name in enumerate(built.names):
        np.testing.assert_allclose(built.values[:, j], expected[name], atol=1e-9, err_msg=name)


# ---------------------------------------------------------------------------------------------------------------
# Serving: a new event against the history of the rows before it


def is_two_hop(name: str) -> bool:
    return ">" in name


def is_neighbour_degree_stat(name: str) -> bool:
    """``L.<stat>.M.degree``: an aggregate of the neighbours' own degrees."""
    parts = name.split(".")
    return len(parts) == 4 and parts[1] in LINK_STATS and parts[3] == "degree"


def serve_last(links: dict[str, list[str]], values: np.ndarray, names: list[str]):
    """(features of the last row built on all rows, features served for it from the other rows' history)."""
    n = len(values)
    arrays = {m: np.array(v, dtype=object) for m, v in links.items()}
    full = build_graph_features(arrays, values, names)
    history = build_graph_features({m: v[: n - 1] for m, v in arrays.items()}, values[: n - 1], names).history
    served = history.features([{m: links[m][n - 1] for m in links}], values[n - 1 :])
    assert served.shape == (1, len(full.names))
    return as_dict(full.names, full.values[n - 1]), as_dict(history.names, served[0])


def assert_same(full: dict[str, float], served: dict[str, float], names) -> None:
    for name in names:
        np.testing.assert_allclose(served[name], full[name], atol=1e-9, err_msg=name)


# Row 6 joins device d2 (rows 2, 5: ips i1, i3) and ip i2 (row 1: device d1): no earlier row shares both.
NEW_DEVICE, NEW_IP, NEW_VALUES = "d2", "i2", [5.0, NAN]


def seven_rows():
    links = {"device": [*DEVICE, NEW_DEVICE], "ip": [*IP, NEW_IP]}
    return links, np.vstack([tiny_values(), NEW_VALUES])


def test_served_event_matches_training_on_own_value_aggregates():
    full, served = serve_last(*seven_rows(), AGGREGATED)
    same = [n for n in full if not is_two_hop(n) and not is_neighbour_degree_stat(n)]
    assert "device.degree" in same and "device.std.a" in same and "links.neighbours" in same
    assert_same(full, served, same)
    assert served["device.degree"] == 2 and served["ip.degree"] == 1
    assert served["device.mean.a"] == pytest.approx((3 + 6 + 5) / 3)


def test_served_two_hop_matches_when_no_neighbour_shares_the_other_entity():
    full, served = serve_last(*seven_rows(), AGGREGATED)
    assert_same(full, served, [n for n in full if is_two_hop(n)])


def _cross_link_degree(name):
    """``L.stat.M.degree`` with M != L: whether a member also shares the new event's M entity is not stored."""
    head, _, rest = name.partition(".")
    return rest.endswith(".degree") and rest.count(".") == 2 and rest.split(".")[1] != head


def test_served_event_matches_training_on_every_non_two_hop_feature():
    full, served = serve_last(*seven_rows(), AGGREGATED)
    compared = [n for n in full if not is_two_hop(n) and not _cross_link_degree(n)]
    assert any(n.endswith(".device.degree") and n.startswith("device.") for n in compared)
    assert_same(full, served, compared)


def test_served_two_hop_uses_the_history_neighbour_means():
    """Documented approximation: when a neighbour shares the other link with the new event too, the served 2-hop
    mean uses that neighbour's mean as the history has it (the new event does not update it)."""
    links = {"device": [*DEVICE, "d1"], "ip": [*IP, "i1"]}  # row 0 shares both d1 and i1 with the new row
    values = np.vstack([tiny_values(), [7.0, 70.0]])
    full, served = serve_last(links, values, AGGREGATED)
    history_ip_mean_a = {0: 8 / 3, 1: 2.0}  # rows of d1 with an ip, in the history; row 4 has none
    own_ip_mean_a = (1 + 3 + 4 + 7) / 4  # the new row joins i1
    expected = (sum(history_ip_mean_a.values()) + own_ip_mean_a) / 3
    assert served["device>ip.mean.a"] == pytest.approx(expected)
    assert full["device>ip.mean.a"] != pytest.approx(expected)  # training sees row 0's updated i1 mean


def test_unseen_entity_aggregates_are_the_events_own_values():
    history = build_graph_features(tiny_links(), tiny_values(), AGGREGATED).history
    served = as_dict(history.names, history.features([{"device": "d9", "ip": ""}], np.array([[5.0, NAN]]))[0])
    assert served["device.degree"] == 0 and served["ip.degree"] == 0
    assert_features(served, {
        "device.mean.a": 5, "device.max.a": 5, "device.min.a": 5, "device.std.a": 0,
        "device.mean.b": NAN, "device.max.b": NAN, "device.std.b": NAN,
        "device.mean.device.degree": 0, "device.std.device.degree": 0, "device.mean.ip.degree": 0,
        "device>ip.mean.a": NAN,  # its own ip.mean is missing
        "links.shared": 0, "links.neighbours": 0,
    })
    for name, value in served.items():
        if name.startswith("ip.") and name != "ip.degree" or name.startswith("ip>"):
            assert math.isnan(value), name


def test_unseen_entity_matches_a_training_row_alone_on_it():
    links = {"device": [*DEVICE, "d9"], "ip": [*IP, "i9"]}
    full, served = serve_last(links, np.vstack([tiny_values(), [5.0, 8.0]]), AGGREGATED)
    assert_same(full, served, list(full))  # no neighbours: every feature, degree stats and 2-hop included
    assert served["device>ip.mean.a"] == 5 and served["ip.std.b"] == 0


@pytest.mark.parametrize("row", [{"device": "", "ip": "i1"}, {"ip": "i1"}, {"device": None, "ip": "i1"}])
def test_empty_or_absent_entity_gives_missing_aggregates(row):
    history = build_graph_features(tiny_links(), tiny_values(), AGGREGATED).history
    served = as_dict(history.names, history.features([row], np.array([[5.0, 1.0]]))[0])
    assert served["device.degree"] == 0
    for name, value in served.items():
        if name.startswith("device.") and name != "device.degree" or name.startswith("device>"):
            assert math.isnan(value), name
    assert served["ip.degree"] == 3
    assert served["ip.mean.a"] == pytest.approx((1 + 3 + 4 + 5) / 4)
    assert served["links.shared"] == 1 and served["links.neighbours"] == 3


def test_several_events_are_served_independently():
    history = build_graph_features(tiny_links(), tiny_values(), AGGREGATED).history
    rows = [{"device": "d1", "ip": "i1"}, {"device": "d9", "ip": ""}, {"device": "d1", "ip": "i1"}]
    values = np.array([[1.0, 2.0], [3.0, 4.0], [1.0, 2.0]])
    batch = history.features(rows, values)
    for i in range(3):
        np.testing.assert_array_equal(batch[i], history.features([rows[i]], values[i : i + 1])[0])
    np.testing.assert_array_equal(batch[0], batch[2])  # the first does not join the history for the third


def test_history_save_and_load_round_trip(tmp_path):
    history = build_graph_features(tiny_links(), tiny_values(), AGGREGATED).history
    path = tmp_path / "graph_history.npz"
    history.save(path)
    loaded = GraphHistory.load(path)
    assert loaded.links == history.links and loaded.aggregated == history.aggregated
    assert loaded.names == history.names
    rows = [{"device": "d1", "ip": "i1"}, {"device": "d2", "ip": "i9"}, {"device": "", "ip": ""}, {"ip": "i2"}]
    values = np.array([[1.0, NAN], [7.5, 2.0], [NAN, NAN], [0.0, -1.0]])
    np.testing.assert_array_equal(loaded.features(rows, values), history.features(rows, values))


@settings(max_examples=200, deadline=None)
@given(tables(min_rows=2))
def test_serving_matches_training_on_random_tables(table):
    links, values, names = table
    assume(all(any(v[:-1]) for v in links.values()))  # see test_link_with_no_entity_at_all
    full, served = serve_last(links, values, names)
    assert_same(full, served, [n for n in full if not is_two_hop(n) and not is_neighbour_degree_stat(n)])
    last = len(values) - 1
    shares_both = any(links["device"][s] == links["device"][last] != "" and links["ip"][s] == links["ip"][last] != ""
                      for s in range(last))
    if not shares_both:
        assert_same(full, served, [n for n in full if is_two_hop(n)])


# ---------------------------------------------------------------------------------------------------------------
# Descriptions for reason codes


def test_every_feature_has_a_description():
    descriptions = {"a": "Order value", "b": "Account age in days"}
    for name in graph_feature_names(["device", "ip"], AGGREGATED, edges=True):
        text = describe_graph_feature(name, descriptions)
        assert text and text[0].isupper() and "None" not in text, name


def test_descriptions_are_distinct():
    """A reason code must tell one feature from another: no two features share a description."""
    names = graph_feature_names(["device", "ip"], AGGREGATED, edges=True)
    texts = [describe_graph_feature(n, {"a": "Order value", "b": "Account age"}) for n in names]
    assert len(set(texts)) == len(texts)


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("device.degree", ["device"]),
        ("device.mean.a", ["order value", "device"]),  # the description, lower-cased mid-sentence
        ("ip.std.b", ["b", "ip"]),  # no description: the feature's own name
        ("device.max.ip.degree", ["ip", "device"]),
        ("device>ip.mean.a", ["device", "ip", "order value"]),
        ("edges.min.a", ["edge-list", "order value"]),
        ("links.shared", ["shares"]),
        ("links.neighbours", ["any of this event's entities"]),
    ],
)
def test_descriptions_name_what_they_aggregate(name, words):
    text = describe_graph_feature(name, {"a": "Order value"})
    for word in words:
        assert word in text, (name, text)


def test_edge_degree_description_speaks_of_edge_list_neighbours():
    assert "edge-list" in describe_graph_feature("edges.degree", {})

"""The compiled isolation forest gives the ONNX session's scores bit for bit, and falls back when it should.

onnxruntime's Log gives the last ``n % 4`` rows of an n-row call a value computed by scalar ``logf`` (its SIMD
blocks cover the rest), which can differ from the SIMD value in the last bit; the compiled path gives every row
the SIMD value. So the comparisons with onnxruntime use calls of a multiple of 8 rows (see
riskcascade/modelling/anomaly.py).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnx import helper

from riskcascade.modelling import anomaly
from riskcascade.modelling.anomaly import (
    METHOD_COMPILED,
    METHOD_ONNXRUNTIME,
    AnomalyScorer,
    CompiledForest,
    UnsupportedGraph,
    compile_forest,
    export_anomaly_onnx,
    fit_anomaly_model,
    probe_rows,
)

FEATURES = 7
TREES = 25


def bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)


# Groups of identical rows end in leaves of exactly that many samples, and for each of these sizes n,
# onnxruntime's SIMD and scalar Log of n - 1 differ in the last bit: the leaf tables must come from its SIMD blocks.
DUPLICATES = (8, 38, 48, 50)


@pytest.fixture(scope="module")
def train() -> np.ndarray:
    """256 rows (all of them in every tree's sample), with NaNs, ties, an all-missing column and duplicates."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, FEATURES)) * np.array([1, 10, 0.01, 1e3, 1, 1, 1])
    x[:, 4] = rng.integers(0, 3, len(x))  # repeated values: ties on the thresholds
    x[rng.random(x.shape) < 0.1] = np.nan
    x[:, 6] = np.nan  # an all-missing column: kept, imputed with 0
    x[:sum(DUPLICATES)] = np.repeat(x[:len(DUPLICATES)], DUPLICATES, axis=0)
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def onnx_bytes(train) -> bytes:
    return export_anomaly_onnx(fit_anomaly_model(train, TREES, seed=3), FEATURES)


@pytest.fixture(scope="module")
def scorer(onnx_bytes) -> AnomalyScorer:
    scorer = AnomalyScorer(onnx_bytes)
    assert scorer.method == METHOD_COMPILED, scorer.fallback_reason  # else score() vs score_onnx() proves nothing
    return scorer


@pytest.fixture(scope="module")
def forest(onnx_bytes) -> CompiledForest:
    return compile_forest(onnx.load_from_string(onnx_bytes))


def hard_rows(forest: CompiledForest, n: int = 800) -> np.ndarray:
    """Split thresholds (exact and one float32 step either side), NaN, infinities, huge, tiny and signed zeros."""
    x = probe_rows(forest, n, seed=11)
    rng = np.random.default_rng(12)
    u = rng.random(x.shape)
    x[u < 0.03] = np.inf
    x[(u >= 0.03) & (u < 0.06)] = -np.inf
    x[(u >= 0.06) & (u < 0.08)] = 1e-45
    x[(u >= 0.08) & (u < 0.10)] = -0.0
    x[(u >= 0.10) & (u < 0.12)] = 3.4e38
    x[(u >= 0.12) & (u < 0.25)] = np.nan
    return x


def test_fitted_forest_takes_the_compiled_path(scorer):
    assert scorer.method == METHOD_COMPILED and scorer.fallback_reason is None


def test_compiled_equals_onnx_session_bitwise_on_training_rows(scorer, train):
    assert len(train) % 8 == 0
    np.testing.assert_array_equal(bits(scorer.score(train)), bits(scorer.score_onnx(train)))


def test_compiled_equals_onnx_session_bitwise_on_nan_and_extreme_rows(scorer, forest):
    x = hard_rows(forest)
    assert np.isnan(x).any() and np.isinf(x).any()
    np.testing.assert_array_equal(bits(scorer.score(x)), bits(scorer.score_onnx(x)))
    everything_missing = np.full((16, FEATURES), np.nan, np.float32)  # all imputed with the medians
    np.testing.assert_array_equal(bits(scorer.score(everything_missing)), bits(scorer.score_onnx(everything_missing)))


def test_single_rows_and_batches_agree(scorer, forest):
    x = hard_rows(forest, 200)
    batch = scorer.score(x)
    assert batch.dtype == np.float32 and batch.shape == (len(x),)
    np.testing.assert_array_equal(bits(np.concatenate([scorer.score(row[None]) for row in x])), bits(batch))
    np.testing.assert_array_equal(bits(np.concatenate([scorer.score(x[i:i + 7]) for i in range(0, len(x), 7)])),
                                  bits(batch))
    # onnxruntime agrees with a single row up to its scalar-logf last bit (see the module docstring)
    np.testing.assert_allclose(scorer.score_onnx(x[:1]), batch[:1], rtol=0, atol=1e-6)
    assert scorer.score(x[:0]).shape == (0,)


def test_float64_input_and_a_model_file(scorer, forest, onnx_bytes, tmp_path):
    path = tmp_path / "anomaly.onnx"
    path.write_bytes(onnx_bytes)
    from_file = AnomalyScorer(str(path))
    x = hard_rows(forest, 40)
    assert from_file.method == METHOD_COMPILED
    np.testing.assert_array_equal(bits(from_file.score(x.astype(np.float64))), bits(scorer.score_onnx(x)))
    with pytest.raises(ValueError):
        scorer.score(x[:, :-1])


def test_compiled_path_can_be_turned_off(onnx_bytes, forest):
    plain = AnomalyScorer(onnx_bytes, compiled=False)
    assert plain.method == METHOD_ONNXRUNTIME and "disabled" in plain.fallback_reason
    x = hard_rows(forest, 8)
    np.testing.assert_array_equal(bits(plain.score(x)), bits(plain.score_onnx(x)))


def a_tree_with_an_equality_split(onnx_bytes: bytes) -> bytes:
    model = onnx.load_from_string(onnx_bytes)
    tree = next(n for n in model.graph.node if n.op_type == "TreeEnsembleRegressor")
    modes = next(a for a in tree.attribute if a.name == "nodes_modes")
    modes.strings[0] = b"BRANCH_EQ"
    return model.SerializeToString()


def not_a_forest() -> bytes:
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["features", "axes"], ["scores"], keepdims=1)], "sum",
        [helper.make_tensor_value_info("features", onnx.TensorProto.FLOAT, [None, FEATURES])],
        [helper.make_tensor_value_info("scores", onnx.TensorProto.FLOAT, [None, 1])],
        [helper.make_tensor("axes", onnx.TensorProto.INT64, [1], [1])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=8).SerializeToString()


@pytest.mark.parametrize("graph", ["not-a-forest", "equality-split"])
def test_graph_not_understood_falls_back_to_onnxruntime(graph, onnx_bytes, forest, caplog):
    model = not_a_forest() if graph == "not-a-forest" else a_tree_with_an_equality_split(onnx_bytes)
    with pytest.raises(UnsupportedGraph):
        compile_forest(onnx.load_from_string(model))
    with caplog.at_level(logging.WARNING, logger=anomaly.__name__):
        fallback = AnomalyScorer(model)
    assert fallback.method == METHOD_ONNXRUNTIME and "not understood" in fallback.fallback_reason
    assert any("onnxruntime" in r.getMessage() and "not understood" in r.getMessage() for r in caplog.records)
    x = hard_rows(forest, 16)
    np.testing.assert_array_equal(bits(fallback.score(x)), bits(fallback.score_onnx(x)))


def test_disagreement_at_load_falls_back(onnx_bytes, monkeypatch, caplog):
    real = anomaly._leaf_terms

    def first_tree_off(*args):
        tables = real(*args)
        tables[0] = tables[0] + np.float32(0.25)  # every leaf of the first tree: a row always reaches one
        return tables

    monkeypatch.setattr(anomaly, "_leaf_terms", first_tree_off)
    with caplog.at_level(logging.WARNING, logger=anomaly.__name__):
        fallback = AnomalyScorer(onnx_bytes)
    assert fallback.method == METHOD_ONNXRUNTIME and "disagrees" in fallback.fallback_reason
    assert any("disagrees" in r.getMessage() for r in caplog.records)

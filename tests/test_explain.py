"""TreeShapExplainer gives LightGBM's own pred_contrib values (to 1e-9), on the fast path and on the fallback."""

from __future__ import annotations

import threading

import lightgbm as lgb
import numpy as np
import pytest

from services.scorer import explain
from services.scorer.explain import (
    METHOD_LIGHTGBM,
    METHOD_QUADRATURE,
    TreeShapExplainer,
    UnsupportedModel,
    build_tables,
    quadrature_kernel,
)

ATOL = 1e-9
FEATURES = 8


def train(params: dict, rounds: int = 25, features: int = FEATURES, rows: int = 3000, seed: int = 0,
          categorical: list[int] | None = None, valid: bool = False) -> lgb.Booster:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, features))
    x[:, 1] = rng.integers(0, 3, rows)  # small integers: exact zeros for the zero-as-missing models
    x[rng.random(x.shape) < 0.08] = np.nan
    signal = np.nan_to_num(x[:, 0]) * 1.5 - np.nan_to_num(x[:, 2]) + np.isnan(x[:, 1]) + np.nan_to_num(x[:, 1])
    y = (signal + rng.normal(size=rows) > 0.5).astype(int)
    base = {"objective": "binary", "num_leaves": 15, "min_data_in_leaf": 5, "verbose": -1, "num_threads": 1,
            "seed": seed}
    train_set = lgb.Dataset(x, y, categorical_feature=categorical or "auto")
    if not valid:
        return lgb.train(base | params, train_set, num_boost_round=rounds)
    # Labels unrelated to the features: the validation loss stops improving within a few rounds.
    valid_set = lgb.Dataset(x[:500], rng.permutation(y[:500]), reference=train_set)
    # keep_training_booster: the booster keeps the rounds after the best one, which predict() then ignores.
    return lgb.train(base | params, train_set, num_boost_round=rounds, valid_sets=[valid_set],
                     callbacks=[lgb.early_stopping(3, verbose=False)], keep_training_booster=True)


BOOSTERS = {
    "nan-missing": lambda: train({}),
    "zero-as-missing": lambda: train({"zero_as_missing": True}),
    "no-missing-handling": lambda: train({"use_missing": False}),
    # Few features, deep trees: the same feature splits several times on one path.
    "repeated-features": lambda: train({"num_leaves": 63, "max_depth": -1}, features=3, rounds=15),
    "regression": lambda: train({"objective": "regression"}),
}


@pytest.fixture(scope="module", params=sorted(BOOSTERS))
def booster(request) -> lgb.Booster:
    return BOOSTERS[request.param]()


def rows(booster: lgb.Booster, n: int, seed: int = 1) -> np.ndarray:
    """Random rows with NaNs, exact zeros, tiny values and values on split thresholds, as float32."""
    rng = np.random.default_rng(seed)
    f = booster.num_feature()
    x = rng.normal(size=(n, f)) * 2
    x[rng.random(x.shape) < 0.15] = np.nan
    x[rng.random(x.shape) < 0.1] = 0.0
    x[rng.random(x.shape) < 0.03] = 1e-40  # below LightGBM's zero threshold
    trees = booster.dump_model()["tree_info"]
    for i in range(n):
        node = trees[i % len(trees)]["tree_structure"]
        if "split_feature" in node and i % 3 == 0:
            x[i, node["split_feature"]] = node["threshold"]
    return x.astype(np.float32)


def reference(booster: lgb.Booster, x: np.ndarray) -> np.ndarray:
    return booster.predict(x, pred_contrib=True, num_threads=1)


def test_tables_kernel_matches_pred_contrib_without_numba(booster):
    """The algorithm itself, run as plain Python: holds in CI whether or not numba is installed."""
    x = rows(booster, 12)
    tables = build_tables(booster)
    out = np.zeros((x.shape[0], booster.num_feature()))
    quadrature_kernel(x, *tables.kernel_args(), out)
    np.testing.assert_allclose(out, reference(booster, x)[:, :-1], rtol=0, atol=ATOL)


@pytest.mark.parametrize("batch", [1, 7, 200])
def test_contributions_match_pred_contrib(booster, batch):
    explainer = TreeShapExplainer(booster)
    x = rows(booster, batch)
    got = explainer.contributions(x)
    want = reference(booster, x)
    assert got.shape == (batch, booster.num_feature()) and got.dtype == np.float64
    np.testing.assert_allclose(got, want[:, :-1], rtol=0, atol=ATOL)
    assert explainer.bias == want[0, -1]


def test_contributions_add_up_to_the_raw_score(booster):
    explainer = TreeShapExplainer(booster)
    x = rows(booster, 50)
    raw = booster.predict(x, raw_score=True)
    np.testing.assert_allclose(explainer.contributions(x).sum(axis=1) + explainer.bias, raw, rtol=0, atol=ATOL)


def test_float64_rows_match_pred_contrib_on_float64(booster):
    explainer = TreeShapExplainer(booster)
    x = rows(booster, 20).astype(np.float64) + 1e-9  # values float32 cannot hold
    np.testing.assert_allclose(explainer.contributions(x), reference(booster, x)[:, :-1], rtol=0, atol=ATOL)


def test_fast_path_is_used_when_numba_is_installed(booster):
    pytest.importorskip("numba")
    explainer = TreeShapExplainer(booster)
    assert explainer.method == METHOD_QUADRATURE and explainer.fallback_reason is None


def test_early_stopped_booster_explains_the_trees_predict_uses():
    booster = train({"learning_rate": 0.5}, rounds=200, valid=True)
    assert 0 < booster.best_iteration < booster.current_iteration()
    x = rows(booster, 30)
    np.testing.assert_allclose(TreeShapExplainer(booster).contributions(x), reference(booster, x)[:, :-1],
                               rtol=0, atol=ATOL)


def test_single_leaf_trees_add_only_to_the_bias():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 4))
    booster = lgb.train({"objective": "regression", "verbose": -1}, lgb.Dataset(x, np.full(200, 2.5)),
                        num_boost_round=5)
    explainer = TreeShapExplainer(booster)
    got = explainer.contributions(x[:10].astype(np.float32))
    assert np.all(got == 0.0)
    assert explainer.bias == pytest.approx(2.5)


def test_categorical_model_falls_back_to_pred_contrib():
    booster = train({}, categorical=[1])
    with pytest.raises(UnsupportedModel, match="categorical"):
        build_tables(booster)
    explainer = TreeShapExplainer(booster)
    assert explainer.method == METHOD_LIGHTGBM
    if explain._compile_kernel()[0] is not None:  # without numba the reason given is the missing numba
        assert "categorical" in explainer.fallback_reason
    x = rows(booster, 40)
    x[:, 1] = np.where(np.isnan(x[:, 1]), np.nan, np.abs(np.round(x[:, 1])) % 3)
    np.testing.assert_allclose(explainer.contributions(x), reference(booster, x)[:, :-1], rtol=0, atol=ATOL)


def test_fallback_without_numba(monkeypatch):
    booster = train({})
    monkeypatch.setattr(explain, "_compile_kernel", lambda: (None, "numba is not installed"))
    explainer = TreeShapExplainer(booster)
    assert (explainer.method, explainer.fallback_reason) == (METHOD_LIGHTGBM, "numba is not installed")
    for batch in (1, 64):
        x = rows(booster, batch)
        np.testing.assert_allclose(explainer.contributions(x), reference(booster, x)[:, :-1], rtol=0, atol=ATOL)


def test_fallback_by_configuration():
    booster = train({})
    explainer = TreeShapExplainer(booster, use_quadrature=False)
    assert explainer.method == METHOD_LIGHTGBM
    x = rows(booster, 5)
    np.testing.assert_allclose(explainer.contributions(x), reference(booster, x)[:, :-1], rtol=0, atol=ATOL)


def test_concurrent_calls_give_the_serial_answers():
    booster = train({})
    explainer = TreeShapExplainer(booster)
    batches = [rows(booster, n, seed=n) for n in (1, 3, 17, 64, 5, 40, 2, 9)]
    serial = [explainer.contributions(x) for x in batches]
    results: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        for _ in range(5):
            results[i] = explainer.contributions(batches[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, want in enumerate(serial):
        np.testing.assert_array_equal(results[i], want)


def test_bad_input_is_rejected_with_the_expected_shape():
    booster = train({})
    explainer = TreeShapExplainer(booster)
    with pytest.raises(ValueError, match=r"\(rows, 8\)"):
        explainer.contributions(np.zeros((2, 7), dtype=np.float32))
    with pytest.raises(TypeError, match="int64"):
        explainer.contributions(np.zeros((2, 8), dtype=np.int64))
    assert explainer.contributions(np.zeros((0, 8), dtype=np.float32)).shape == (0, 8)


def test_multiclass_is_rejected():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 4))
    booster = lgb.train({"objective": "multiclass", "num_class": 3, "verbose": -1},
                        lgb.Dataset(x, rng.integers(0, 3, 300)), num_boost_round=3)
    with pytest.raises(ValueError, match="single-output"):
        TreeShapExplainer(booster)

"""The reason-code benchmark: ways to get exact TreeSHAP contributions, next to LightGBM's pred_contrib.

    python -m loadtest.reasons --model-dir var/model
    python -m loadtest.reasons --synthetic 60x255x300 [--save-synthetic FILE]   # features x leaves x trees
    python -m loadtest.reasons --model-file FILE

Every method runs on the same rows, interleaved round-robin within each batch size so that a busy shared
machine slows them alike; figures are microseconds per row (batch time / batch size), p50 and p99 over the
repetitions. Each method's output is checked against the baseline (max |difference|). Methods:

- pred_contrib f32 (baseline): ``booster.predict(x, pred_contrib=True, num_threads=1)``, as the scorer does;
- pred_contrib f64 / 2 threads: the same on a float64 copy / with ``num_threads=2``;
- fast single-row C API: ``LGBM_BoosterPredictForMatSingleRowFast`` (contrib type) through ctypes, one call a
  row: what is left of the cost once per-call overhead (parameter parsing, predictor set-up) is gone;
- shap TreeExplainer: shap's public API (it hands LightGBM models to pred_contrib), and shap's own C++
  TreeSHAP forced by treating the parsed model as shap's internal one; run when shap is installed;
- TreeShapExplainer: services/scorer/explain.py (exact quadrature TreeSHAP compiled by numba, or its fallback);
- raw score, no reasons: ``booster.predict(raw_score=True)``, for scale.

Results go to loadtest/results/reasons-<UTC time>.json and .md.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import lightgbm as lgb
import numpy as np
from lightgbm import basic as lgb_basic

from riskcascade.core.model_card import BOOSTER_FILE
from services.scorer.explain import TreeShapExplainer

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "loadtest" / "results"
BASELINE = "pred_contrib f32 (baseline)"
SYNTHETIC_ROWS = 20_000
MISSING_SHARE = 0.1
C_API_PREDICT_CONTRIB = 3  # lightgbm/basic.py _C_API_PREDICT_CONTRIB


@dataclass
class Figure:
    method: str
    batch: int
    repetitions: int
    p50_us_per_row: float
    p99_us_per_row: float
    max_abs_diff: float | None  # against the baseline, on the same rows; None for methods of another kind


class FastSingleRow:
    """LightGBM's fast single-row prediction for contributions, one C call a row (not thread-safe)."""

    def __init__(self, booster: lgb.Booster):
        self.n_features = booster.num_feature()
        self._handle = ctypes.c_void_p()
        lgb_basic._safe_call(lgb_basic._LIB.LGBM_BoosterPredictForMatSingleRowFastInit(
            booster._handle, ctypes.c_int(C_API_PREDICT_CONTRIB), ctypes.c_int(0), ctypes.c_int(-1),
            ctypes.c_int(lgb_basic._C_API_DTYPE_FLOAT32), ctypes.c_int32(self.n_features),
            lgb_basic._c_str("num_threads=1"), ctypes.byref(self._handle)))
        self._out_len = ctypes.c_int64(0)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        out = np.empty((x.shape[0], self.n_features + 1))
        for i in range(x.shape[0]):
            row = x[i]
            lgb_basic._safe_call(lgb_basic._LIB.LGBM_BoosterPredictForMatSingleRowFast(
                self._handle, row.ctypes.data_as(ctypes.c_void_p), ctypes.byref(self._out_len),
                out[i].ctypes.data_as(ctypes.POINTER(ctypes.c_double))))
        return out[:, :-1]

    def __del__(self) -> None:
        if self._handle:
            lgb_basic._LIB.LGBM_FastConfigFree(self._handle)


def shap_methods(booster: lgb.Booster) -> tuple[dict[str, Callable[[np.ndarray], np.ndarray]], str]:
    """shap's TreeExplainer two ways, or nothing and why."""
    try:
        import shap
    except ImportError:
        return {}, "shap not installed"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        public = shap.TreeExplainer(booster)
        own = shap.TreeExplainer(booster)
    own.model.model_type = "internal"  # skip shap's hand-off to pred_contrib: run shap's C++ TreeSHAP

    def run_public(x: np.ndarray) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return public.shap_values(x)

    def run_own(x: np.ndarray) -> np.ndarray:
        return own.shap_values(x.astype(np.float64), check_additivity=False)

    return {f"shap {shap.__version__} TreeExplainer": run_public,
            f"shap {shap.__version__} C++ TreeSHAP (forced)": run_own}, f"shap {shap.__version__}"


def methods(booster: lgb.Booster) -> tuple[dict[str, Callable[[np.ndarray], np.ndarray]], dict[str, str]]:
    started = time.perf_counter()
    explainer = TreeShapExplainer(booster)
    explainer_s = time.perf_counter() - started
    fast = FastSingleRow(booster)
    found: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        BASELINE: lambda x: booster.predict(x, pred_contrib=True, num_threads=1)[:, :-1],
        "pred_contrib f64": lambda x: booster.predict(x.astype(np.float64), pred_contrib=True, num_threads=1)[:, :-1],
        "pred_contrib 2 threads": lambda x: booster.predict(x, pred_contrib=True, num_threads=2)[:, :-1],
        "fast single-row C API": fast,
    }
    shap_found, shap_note = shap_methods(booster)
    found |= shap_found
    found[f"TreeShapExplainer ({explainer.method})"] = explainer.contributions
    found["raw score, no reasons"] = lambda x: booster.predict(x, raw_score=True, num_threads=1)
    notes = {
        "explainer": explainer.method + (f" ({explainer.fallback_reason})" if explainer.fallback_reason else ""),
        "explainer_start_s": f"{explainer_s:.2f} (tables + numba compile or cache load)",
        "shap": shap_note,
    }
    return found, notes


def sample_rows(booster: lgb.Booster, n: int, seed: int) -> np.ndarray:
    """Rows spread over each feature's training range (the model's feature_infos), some missing, float32."""
    rng = np.random.default_rng(seed)
    infos = booster.dump_model()["feature_infos"]
    x = np.empty((n, booster.num_feature()), dtype=np.float32)
    for j, name in enumerate(booster.feature_name()):
        info = infos.get(name, {})
        low, high = info.get("min_value", 0.0), info.get("max_value", 1.0)
        x[:, j] = rng.uniform(low, high, n) if high > low else low
    x[rng.random(x.shape) < MISSING_SHARE] = np.nan
    return x


def synthetic_booster(spec: str, seed: int) -> lgb.Booster:
    """A booster of the given size (FEATURESxLEAVESxTREES) trained on random data."""
    features, leaves, trees = (int(v) for v in spec.lower().split("x"))
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(SYNTHETIC_ROWS, features))
    x[rng.random(x.shape) < 0.05] = np.nan
    signal = np.nansum(x[:, : min(10, features)] * rng.normal(size=min(10, features)), axis=1)
    y = (signal + rng.normal(size=SYNTHETIC_ROWS) > 0).astype(int)
    params = {"objective": "binary", "num_leaves": leaves, "min_data_in_leaf": 5, "verbose": -1,
              "num_threads": os.cpu_count() or 1, "seed": seed}
    return lgb.train(params, lgb.Dataset(x, y), num_boost_round=trees)


def describe(booster: lgb.Booster) -> dict:
    trees = booster.dump_model()["tree_info"]

    def depth(node: dict) -> int:
        return 0 if "leaf_index" in node else 1 + max(depth(node["left_child"]), depth(node["right_child"]))

    depths = [depth(t["tree_structure"]) for t in trees]
    return {"trees": len(trees), "features": booster.num_feature(),
            "max_leaves": max(t["num_leaves"] for t in trees), "max_depth": max(depths),
            "mean_depth": round(float(np.mean(depths)), 1)}


def measure(found: dict[str, Callable[[np.ndarray], np.ndarray]], x: np.ndarray, batch: int,
            repetitions: int) -> list[Figure]:
    """Interleaved timing of every method on the same batches."""
    batches = [np.ascontiguousarray(x[(i * batch) % (len(x) - batch + 1):][:batch]) for i in range(repetitions)]
    reference = found[BASELINE](batches[0])
    diffs = {}
    for name, fn in found.items():
        out = fn(batches[0])  # also the warm-up
        diffs[name] = float(np.max(np.abs(out - reference))) if out.shape == reference.shape else None
    seconds: dict[str, list[float]] = {name: [] for name in found}
    for b in batches:
        for name, fn in found.items():
            started = time.perf_counter()
            fn(b)
            seconds[name].append(time.perf_counter() - started)
    return [
        Figure(method=name, batch=batch, repetitions=repetitions,
               p50_us_per_row=round(float(np.percentile(s, 50)) / batch * 1e6, 1),
               p99_us_per_row=round(float(np.percentile(s, 99)) / batch * 1e6, 1),
               max_abs_diff=diffs[name])
        for name, s in seconds.items()
    ]


def markdown(report: dict) -> str:
    batches = report["batch_sizes"]
    model = report["model"]
    lines = [
        f"# Reason codes: exact TreeSHAP, {report['started_at']}",
        "",
        f"Machine: {report['machine']}. Model: {report['model_source']} ({model['trees']} trees, "
        f"{model['features']} features, up to {model['max_leaves']} leaves, depth {model['mean_depth']} mean / "
        f"{model['max_depth']} max). Microseconds per row, p50 / p99, all methods measured interleaved in this "
        f"run; 'vs base' is the baseline's p50 over the method's p50; 'max |diff|' is against the baseline.",
        "",
        "| method | " + " | ".join(f"batch {b}" for b in batches) + " | vs base (" + ", ".join(
            str(b) for b in batches) + ") | max \\|diff\\| |",
        "|---|" + "---|" * (len(batches) + 2),
    ]
    figures = {(f["method"], f["batch"]): f for f in report["figures"]}
    for name in dict.fromkeys(f["method"] for f in report["figures"]):
        cells, ratios, diffs = [], [], []
        for b in batches:
            f, base = figures[(name, b)], figures[(BASELINE, b)]
            cells.append(f"{f['p50_us_per_row']:,.1f} / {f['p99_us_per_row']:,.1f}")
            ratios.append(f"{base['p50_us_per_row'] / f['p50_us_per_row']:.2f}x")
            if f["max_abs_diff"] is not None:
                diffs.append(f["max_abs_diff"])
        diff = f"{max(diffs):.1e}" if diffs else "n/a"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {', '.join(ratios)} | {diff} |")
    lines += ["", "Repetitions per batch size: " + ", ".join(
        f"{b}: {figures[(BASELINE, b)]['repetitions']}" for b in batches) + ".", ""]
    lines += [f"- {k}: {v}" for k, v in report["notes"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-dir", type=Path, help=f"a model directory (reads its {BOOSTER_FILE})")
    source.add_argument("--model-file", type=Path, help="a LightGBM text model")
    source.add_argument("--synthetic", metavar="FxLxT", help="train features x leaves x trees on random data")
    parser.add_argument("--save-synthetic", type=Path, help="write the synthetic booster here for later runs")
    parser.add_argument("--batch-sizes", default="1,8,64", help="comma-separated batch sizes")
    parser.add_argument("--rows", type=int, default=400, help="rows timed per method and batch size")
    parser.add_argument("--min-repetitions", type=int, default=10, help="at least this many batches per size")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if min(batch_sizes) < 1 or args.rows < 1:
        parser.error("batch sizes and --rows must be at least 1")

    started = datetime.now(timezone.utc)
    if args.synthetic:
        t0 = time.perf_counter()
        booster = synthetic_booster(args.synthetic, args.seed)
        source_text = f"synthetic {args.synthetic} (features x leaves x trees), trained on {SYNTHETIC_ROWS} " \
                      f"random rows in {time.perf_counter() - t0:.0f} s"
        if args.save_synthetic:
            booster.save_model(str(args.save_synthetic))
    else:
        path = args.model_file or args.model_dir / BOOSTER_FILE
        booster = lgb.Booster(model_file=str(path))
        source_text = str(path)
    print(f"model: {source_text}", flush=True)
    found, notes = methods(booster)
    x = sample_rows(booster, max(2048, max(batch_sizes) * 4), args.seed)
    figures: list[Figure] = []
    for batch in batch_sizes:
        repetitions = max(args.min_repetitions, args.rows // batch)
        print(f"batch {batch}: {repetitions} repetitions of {len(found)} methods", flush=True)
        figures += measure(found, x, batch, repetitions)
    report = {
        "started_at": started.isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} CPUs, {os.uname().machine}, Python {sys.version.split()[0]}, "
                   f"load average {os.getloadavg()[0]:.1f} at the end",
        "model_source": source_text, "model": describe(booster), "batch_sizes": batch_sizes,
        "notes": notes | {"lightgbm": lgb.__version__, "numpy": np.__version__},
        "figures": [asdict(f) for f in figures],
    }
    text = markdown(report)
    print(text)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"reasons-{started.strftime('%Y%m%dT%H%M%SZ')}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    stem.with_suffix(".md").write_text(text)
    print(f"results: {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

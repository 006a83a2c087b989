"""The unsupervised half of the hybrid model: an isolation-forest anomaly score, fed to the booster as a feature.

An isolation forest needs no labels, so it can flag a kind of abuse the labels have not seen yet; the booster
learns how much to trust it. It is fitted on the training split (missing values imputed with the training
median), exported to ONNX with skl2onnx, and the feature is computed *by that ONNX model* for training too: the
booster then learns on exactly the values the scorer will compute, so the model-level ONNX parity check (to 1e-5)
is not at the mercy of float32 rounding in the forest. The forest's own ONNX-vs-scikit-learn difference is
reported in the model card.
"""

from __future__ import annotations

import os

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
from skl2onnx import convert_sklearn  # noqa: E402
from skl2onnx.common.data_types import FloatTensorType  # noqa: E402
from sklearn.ensemble import IsolationForest  # noqa: E402
from sklearn.impute import SimpleImputer  # noqa: E402
from sklearn.pipeline import Pipeline, make_pipeline  # noqa: E402

ANOMALY_FEATURE = "anomaly_score"
ANOMALY_DESCRIPTION = "How unusual the event looks to an isolation forest trained without labels"
ANOMALY_FILE = "anomaly.onnx"
ONNX_INPUT = "features"
ONNX_OUTPUT = "scores"  # decision_function: negative = anomalous
ONNX_OPSETS = {"": 15, "ai.onnx.ml": 3}
GRAPH_NAME = "riskcascade_anomaly"


def fit_anomaly_model(x_train: np.ndarray, trees: int, seed: int) -> Pipeline:
    # An all-missing column has no median; keep_empty_features keeps the column count the ONNX input expects.
    imputer = SimpleImputer(strategy="median", keep_empty_features=True)
    return make_pipeline(imputer, IsolationForest(n_estimators=trees, random_state=seed, n_jobs=1)).fit(x_train)


def export_anomaly_onnx(model: Pipeline, n_features: int) -> bytes:
    onnx_model = convert_sklearn(
        model, initial_types=[(ONNX_INPUT, FloatTensorType([None, n_features]))], target_opset=ONNX_OPSETS,
        name=GRAPH_NAME,  # skl2onnx would name the graph with a random uuid: same model, different bytes
    )
    return onnx_model.SerializeToString()


class AnomalyScorer:
    """The exported forest: higher score = more anomalous (the negated decision function)."""

    def __init__(self, onnx_model: bytes | str, threads: int = 1) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(onnx_model, sess_options=options, providers=["CPUExecutionProvider"])

    def score(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        return -self._session.run([ONNX_OUTPUT], {ONNX_INPUT: x})[0].reshape(-1).astype(np.float32)


def sklearn_parity(model: Pipeline, scorer: AnomalyScorer, x: np.ndarray) -> float:
    """Max |ONNX score - scikit-learn score| over ``x`` (reported, not enforced: see the module docstring)."""
    x = np.asarray(x, dtype=np.float32)
    return float(np.max(np.abs(scorer.score(x).astype(np.float64) + model.decision_function(x))))

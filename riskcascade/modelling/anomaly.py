"""The unsupervised half of the hybrid model: an isolation-forest anomaly score, fed to the booster as a feature.

An isolation forest needs no labels, so it can flag a kind of abuse the labels have not seen yet; the booster
learns how much to trust it. It is fitted on the training split (missing values imputed with the training
median), exported to ONNX with skl2onnx, and the feature is computed *from that ONNX model* for training too: the
booster then learns on exactly the values the scorer will compute, so the model-level ONNX parity check (to 1e-5)
is not at the mercy of float32 rounding in the forest. The forest's own ONNX-vs-scikit-learn difference is
reported in the model card.

Scoring path. skl2onnx writes the forest as ~27 ONNX nodes per tree (TreeEnsembleRegressor, two LabelEncoders,
the average-path-length arithmetic) joined by one Sum; onnxruntime's per-node dispatch makes every call cost
~1 ms, a single event's whole budget on the serving fast path. ``compile_forest`` therefore reads the graph at
load and evaluates the same function natively (numba, a few us a row): each row walks the trees with the graph's
own float32 thresholds (after the graph's NaN imputation), takes each reached leaf's Sum term from a table, adds
the terms in float32 in the Sum's input order, and applies the graph's tail (Div, Neg, Pow by libm's ``powf``
as onnxruntime calls it, Neg, Add) in float32. A leaf's term depends on the leaf alone, so its table is computed
*by onnxruntime itself*, running the graph's own per-tree nodes on every leaf once at load: the rounding of
every per-tree op (Log included) is onnxruntime's. The result is bit-identical to the ONNX session's.

One onnxruntime quirk defines "the ONNX session's" value. Its Log kernel (Eigen, one thread) computes the first
``4 * (n // 4)`` elements of an n-row call with 4-wide SIMD and the last ``n % 4`` with scalar ``logf``, which
differ in the last bit for some arguments (log(7), log(37), ...): onnxruntime gives a row a value that can
depend, by ~6e-8, on its position in the call, and a single row always takes the scalar path (3 rows of the
60,000 of var/data, none changing a calibrated score). The compiled path gives every row the SIMD value,
whatever the batch: training's one big call and the serving path's single rows and micro-batches agree bit for
bit, and with onnxruntime on calls of a multiple of 4 rows.

A graph the compiled path does not recognise, a missing numba, or a disagreement with onnxruntime on the probe
rows at load (tolerance: none, bit-identical or fall back) leaves ``AnomalyScorer`` on the plain onnxruntime
session, with a log line saying why; ``method`` and ``fallback_reason`` say which path answers, and
``compiled=False`` selects the session outright.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import helper, numpy_helper  # noqa: E402
from skl2onnx import convert_sklearn  # noqa: E402
from skl2onnx.common.data_types import FloatTensorType  # noqa: E402
from sklearn.ensemble import IsolationForest  # noqa: E402
from sklearn.impute import SimpleImputer  # noqa: E402
from sklearn.pipeline import Pipeline, make_pipeline  # noqa: E402

log = logging.getLogger(__name__)

ANOMALY_FEATURE = "anomaly_score"
ANOMALY_DESCRIPTION = "How unusual the event looks to an isolation forest trained without labels"
ANOMALY_FILE = "anomaly.onnx"
ONNX_INPUT = "features"
ONNX_OUTPUT = "scores"  # decision_function: negative = anomalous
ONNX_OPSETS = {"": 15, "ai.onnx.ml": 3}
GRAPH_NAME = "riskcascade_anomaly"

METHOD_COMPILED = "compiled-forest"
METHOD_ONNXRUNTIME = "onnxruntime"
PROBE_ROWS = 64  # rows compared at load; a multiple of onnxruntime's SIMD width (see the module docstring)


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
    """The exported forest: higher score = more anomalous (the negated decision function).

    ``compiled=False`` keeps the plain onnxruntime session (the fallback, selectable). Thread safety: the
    compiled tables are only read after construction, each call allocates its own output, and the kernel
    releases the GIL."""

    def __init__(self, onnx_model: bytes | str, threads: int = 1, *, compiled: bool = True) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(onnx_model, sess_options=options, providers=["CPUExecutionProvider"])
        self._forest: CompiledForest | None = None
        self._kernel = None
        self.fallback_reason: str | None = None
        if not compiled:
            self.fallback_reason = "compiled forest disabled by configuration"
            log.info("anomaly forest scored by onnxruntime (%s)", self.fallback_reason)
        else:
            self._try_compile(onnx_model)
            if self.fallback_reason:
                log.warning("anomaly forest scored by onnxruntime (%s)", self.fallback_reason)
        self.method: str = METHOD_COMPILED if self._forest is not None else METHOD_ONNXRUNTIME

    def _try_compile(self, onnx_model: bytes | str) -> None:
        """Take the compiled path, or set ``fallback_reason``: no numba, a graph not understood, or a probe row
        on which the two paths are not bit-identical."""
        kernel, self.fallback_reason = _compile_kernel()
        if kernel is None:
            return
        try:
            model = onnx.load_from_string(onnx_model) if isinstance(onnx_model, bytes) else onnx.load(onnx_model)
            forest = compile_forest(model)
        except UnsupportedGraph as exc:
            self.fallback_reason = f"graph not understood: {exc}"
            return
        except Exception as exc:  # noqa: BLE001 - any surprise in a graph means: not understood, fall back
            self.fallback_reason = f"graph not understood: {type(exc).__name__}: {exc}"
            return
        try:
            probe = probe_rows(forest)
            expected, got = self.score_onnx(probe), _run_kernel(kernel, forest, probe)
        except Exception as exc:  # noqa: BLE001 - e.g. an input not named ONNX_INPUT: score() raises as before
            self.fallback_reason = f"probe rows not scored: {type(exc).__name__}: {exc}"
            return
        if not np.array_equal(expected.view(np.uint32), got.view(np.uint32)):
            worst = float(np.nanmax(np.abs(expected.astype(np.float64) - got)))
            self.fallback_reason = (f"compiled forest disagrees with onnxruntime on {int((expected != got).sum())} "
                                    f"of {len(probe)} probe rows (max |diff| {worst:.3g}; tolerance: bit-identical)")
            return
        self._forest, self._kernel = forest, kernel

    def score(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self._forest is None:
            return self.score_onnx(x)
        if x.ndim != 2 or x.shape[1] != self._forest.n_features:
            raise ValueError(f"expected rows of {self._forest.n_features} features, got shape {x.shape}")
        return _run_kernel(self._kernel, self._forest, x)

    def score_onnx(self, x: np.ndarray) -> np.ndarray:
        """The score by the plain onnxruntime session (what ``score`` answers with on the fallback)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        return -self._session.run([ONNX_OUTPUT], {ONNX_INPUT: x})[0].reshape(-1).astype(np.float32)


def sklearn_parity(model: Pipeline, scorer: AnomalyScorer, x: np.ndarray) -> float:
    """Max |ONNX score - scikit-learn score| over ``x`` (reported, not enforced: see the module docstring)."""
    x = np.asarray(x, dtype=np.float32)
    return float(np.max(np.abs(scorer.score(x).astype(np.float64) + model.decision_function(x))))


# --- the compiled path -------------------------------------------------------------------------------------------

class UnsupportedGraph(ValueError):
    """The ONNX graph is not an isolation forest the compiled path understands; the scorer falls back."""


_LEAF = -1
_ML = "ai.onnx.ml"
# Ops allowed between a tree's leaf output and its Sum term: row-wise, no reductions, constants of one element.
_TERM_OPS = {
    "Cast", "LabelEncoder", "Reshape", "Identity", "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual",
    "Not", "And", "Or", "Where", "Add", "Sub", "Mul", "Div", "Max", "Min", "Neg", "Abs", "Log", "Exp", "Sqrt",
}
_TERM_TABLE_ROWS = 64  # leaf tables are computed in batches of a multiple of this (onnxruntime's SIMD blocks)


@dataclass(frozen=True)
class CompiledForest:
    """The forest as flat tables over the nodes of all trees, globally numbered. A split sends a row to
    ``children[i, 0]`` when its (imputed) value is <= ``thresholds[i]`` (BRANCH_LEQ; NaN goes right, as in
    onnxruntime), else to ``children[i, 1]``. A leaf is its own two children, so ``depth`` steps from any root
    end on the row's leaf without testing for leaves; a leaf's Sum term is ``terms[i]``."""

    n_features: int
    imputed: np.ndarray  # float32 (n_features,): what a NaN input becomes (NaN: no imputation)
    columns: np.ndarray  # int32 (n_nodes,): the input column a split reads (0 for a leaf)
    children: np.ndarray  # int32 (n_nodes, 2)
    thresholds: np.ndarray  # float32 (n_nodes,)
    terms: np.ndarray  # float32 (n_nodes,): a leaf's term of the Sum, as onnxruntime computes it
    roots: np.ndarray  # int32 (n_trees,), in the Sum's input order
    depth: int  # the deepest leaf's depth
    tail: np.ndarray  # float32 [divisor, Pow base, offset]: score = -(-(base ** -(sum / divisor)) + offset)


_powf = None  # libm's powf inside the compiled kernel (bound by _compile_kernel)


def forest_kernel(x, imputed, columns, children, thresholds, terms, roots, depth, tail, out):
    """Score the rows of ``x`` into ``out``. Compiled by numba only (``_powf`` is bound by ``_compile_kernel``).

    Walks four trees at a time, with no data-dependent branch: their walks overlap in the CPU."""
    divisor, base, offset = tail[0], tail[1], tail[2]
    n_trees = roots.shape[0]
    row = np.empty(x.shape[1], dtype=np.float32)
    leaves = np.empty(n_trees, dtype=np.int32)
    for r in range(x.shape[0]):
        for c in range(x.shape[1]):  # the graph's Imputer
            v = x[r, c]
            row[c] = imputed[c] if math.isnan(v) else v
        t = 0
        while t + 4 <= n_trees:
            a, b, c, d = roots[t], roots[t + 1], roots[t + 2], roots[t + 3]
            for _ in range(depth):
                a = children[a, 0 if row[columns[a]] <= thresholds[a] else 1]
                b = children[b, 0 if row[columns[b]] <= thresholds[b] else 1]
                c = children[c, 0 if row[columns[c]] <= thresholds[c] else 1]
                d = children[d, 0 if row[columns[d]] <= thresholds[d] else 1]
            leaves[t], leaves[t + 1], leaves[t + 2], leaves[t + 3] = a, b, c, d
            t += 4
        while t < n_trees:
            a = roots[t]
            for _ in range(depth):
                a = children[a, 0 if row[columns[a]] <= thresholds[a] else 1]
            leaves[t] = a
            t += 1
        total = terms[leaves[0]]
        for t in range(1, n_trees):  # the Sum, input by input, in float32
            total = total + terms[leaves[t]]
        out[r] = -(-_powf(base, -(total / divisor)) + offset)


@functools.cache
def _compile_kernel():
    """The numba-compiled kernel (one per process), or None with the reason when numba is not installed."""
    global _powf
    try:
        import numba
        from numba import types
    except ImportError:
        return None, "numba is not installed"
    # onnxruntime's Pow calls libm's powf (numpy's float32 power, SIMD, rounds differently for ~1 in 5 arguments).
    # An external function is bound by name, so numba can still cache the kernel.
    _powf = types.ExternalFunction("powf", types.float32(types.float32, types.float32))
    return numba.njit(cache=True, nogil=True)(forest_kernel), None


def _run_kernel(kernel, forest: CompiledForest, x: np.ndarray) -> np.ndarray:
    out = np.empty(x.shape[0], dtype=np.float32)
    kernel(x, forest.imputed, forest.columns, forest.children, forest.thresholds, forest.terms, forest.roots,
           forest.depth, forest.tail, out)
    return out


def compile_forest(model: onnx.ModelProto) -> CompiledForest:
    """The tables of an skl2onnx isolation forest, or UnsupportedGraph saying what is not understood.

    The graph must be: one float input [N, F] -> optional Imputer (NaN -> value) -> per tree an optional Gather of
    columns -> a single-tree TreeEnsembleRegressor -> row-wise ops with one-element constants (the term, depending
    on that tree's leaf alone) -> Sum of the terms -> Div -> Neg -> Pow(base, .) -> Neg -> Add -> ``scores``."""
    graph = _Graph(model)
    n_features = graph.input_width()

    # The tail, from the output back to the Sum: scores = Add(Neg(Pow(base, Neg(Div(Sum(terms), divisor)))), offset)
    negated, offset = graph.split_scalar(graph.node_of(ONNX_OUTPUT, "Add"))
    power = graph.node_of(graph.node_of(negated, "Neg").input[0], "Pow")
    base = graph.scalar(power.input[0])
    div = graph.node_of(graph.node_of(power.input[1], "Neg").input[0], "Div")
    divisor = graph.scalar(div.input[1])
    terms = list(graph.node_of(div.input[0], "Sum").input)
    if not terms or len(set(terms)) != len(terms):
        raise UnsupportedGraph("the Sum's terms are not distinct tensors")

    chains = [graph.term_chain(term) for term in terms]
    if len({tree.output[0] for tree, _ in chains}) != len(chains):
        raise UnsupportedGraph("two Sum terms read the same tree")
    sources = [graph.tree_source(tree) for tree, _ in chains]
    if len({source for source, _ in sources}) != 1:
        raise UnsupportedGraph("the trees read different tensors")
    imputed = graph.imputation(sources[0][0], n_features)
    trees = [_Tree.parse(tree, columns) for (tree, _), (_, columns) in zip(chains, sources)]
    tables = _leaf_terms(model, graph, terms, chains, trees)

    sizes = [len(tree.columns) for tree in trees]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    leaf_terms = np.zeros(sum(sizes), dtype=np.float32)
    for tree, start, table in zip(trees, starts, tables):
        leaf_terms[start + tree.leaves] = table
    return CompiledForest(
        n_features=n_features, imputed=imputed,
        columns=np.concatenate([np.maximum(tree.columns, 0) for tree in trees]).astype(np.int32),
        children=np.concatenate([tree.children + start for tree, start in zip(trees, starts)]).astype(np.int32),
        thresholds=np.concatenate([tree.thresholds for tree in trees]).astype(np.float32), terms=leaf_terms,
        roots=starts.astype(np.int32), depth=max(tree.depth for tree in trees),
        tail=np.array([divisor, base, offset], dtype=np.float32),
    )


@dataclass(frozen=True)
class _Tree:
    """One single-tree TreeEnsembleRegressor, nodes in attribute order (the first is the root, as onnxruntime
    takes it). Only BRANCH_LEQ splits without missing-value tracking (what skl2onnx writes for scikit-learn trees).
    ``children`` are local node indices (a leaf is its own), ``leaves`` the leaf indices and ``outputs`` what the
    node outputs for a row that ends in each of them."""

    columns: np.ndarray  # graph-input column of a split, -1 for a leaf
    children: np.ndarray  # (n, 2): the child when value <= threshold, the child otherwise
    thresholds: np.ndarray  # float32
    depth: int
    leaves: np.ndarray
    outputs: np.ndarray  # float32

    @classmethod
    def parse(cls, node: onnx.NodeProto, columns_of_input: np.ndarray) -> _Tree:
        a = {attr.name: helper.get_attribute_value(attr) for attr in node.attribute}
        known = {
            "n_targets", "nodes_falsenodeids", "nodes_featureids", "nodes_hitrates", "nodes_missing_value_tracks_true",
            "nodes_modes", "nodes_nodeids", "nodes_treeids", "nodes_truenodeids", "nodes_values", "post_transform",
            "target_ids", "target_nodeids", "target_treeids", "target_weights", "aggregate_function", "base_values",
        }
        if set(a) - known:
            raise UnsupportedGraph(f"tree {node.name!r} has attributes {sorted(set(a) - known)}")
        if a.get("n_targets", 1) != 1 or a.get("post_transform", b"NONE") != b"NONE" \
                or a.get("aggregate_function", b"SUM") != b"SUM":
            raise UnsupportedGraph(f"tree {node.name!r} is not a one-target SUM regressor without post_transform")
        base_values = list(a.get("base_values", []))
        if len(base_values) > 1:
            raise UnsupportedGraph(f"tree {node.name!r} has {len(base_values)} base values")
        tree_ids, node_ids = list(a["nodes_treeids"]), list(a["nodes_nodeids"])
        n = len(node_ids)
        if n == 0 or len(set(tree_ids)) != 1:
            raise UnsupportedGraph(f"node {node.name!r} does not hold exactly one tree")
        for key in ("nodes_featureids", "nodes_modes", "nodes_values", "nodes_truenodeids", "nodes_falsenodeids"):
            if len(a[key]) != n:
                raise UnsupportedGraph(f"tree {node.name!r}: {key} has {len(a[key])} entries for {n} nodes")
        index = {node_id: i for i, node_id in enumerate(node_ids)}
        if len(index) != n:
            raise UnsupportedGraph(f"tree {node.name!r} repeats a node id")
        if any(a.get("nodes_missing_value_tracks_true", [])):
            raise UnsupportedGraph(f"tree {node.name!r} sends missing values to the true branch")
        columns, children = np.full(n, _LEAF, np.int64), np.repeat(np.arange(n, dtype=np.int64)[:, None], 2, axis=1)
        for i, mode in enumerate(a["nodes_modes"]):
            if mode == b"LEAF":
                continue
            if mode != b"BRANCH_LEQ":
                raise UnsupportedGraph(f"tree {node.name!r} has a {mode.decode()} node")
            feature = a["nodes_featureids"][i]
            if not 0 <= feature < len(columns_of_input):
                raise UnsupportedGraph(f"tree {node.name!r} splits on feature {feature} of {len(columns_of_input)}")
            if a["nodes_truenodeids"][i] not in index or a["nodes_falsenodeids"][i] not in index:
                raise UnsupportedGraph(f"tree {node.name!r} node {node_ids[i]} has a child that is not a node")
            columns[i] = columns_of_input[feature]
            children[i] = index[a["nodes_truenodeids"][i]], index[a["nodes_falsenodeids"][i]]
        # A proper tree rooted at the first node: every other node is the child of exactly one split, no cycles.
        seen, todo, depth = np.zeros(n, bool), [(0, 0)], 0
        while todo:
            i, level = todo.pop()
            if seen[i]:
                raise UnsupportedGraph(f"tree {node.name!r} is not a tree (node {node_ids[i]} reached twice)")
            seen[i], depth = True, max(depth, level)
            if columns[i] != _LEAF:
                todo += [(int(children[i, 0]), level + 1), (int(children[i, 1]), level + 1)]
        if not seen.all():
            raise UnsupportedGraph(f"tree {node.name!r} has nodes unreachable from its first node")
        # Leaf outputs as onnxruntime sums them: 0, plus each weight of the leaf, plus the base value.
        weights = {i: [] for i in np.flatnonzero(columns == _LEAF)}
        for tree_id, node_id, target, weight in zip(a["target_treeids"], a["target_nodeids"], a["target_ids"],
                                                    a["target_weights"]):
            if tree_id != tree_ids[0] or target != 0 or index.get(node_id) not in weights:
                raise UnsupportedGraph(f"tree {node.name!r} has a weight that is not on one of its leaves")
            weights[index[node_id]].append(np.float32(weight))
        leaves = np.array(sorted(weights), dtype=np.int64)
        base, outputs = np.float32(base_values[0] if base_values else 0.0), []
        for i in leaves:
            if len(weights[i]) != 1:
                raise UnsupportedGraph(f"tree {node.name!r} leaf {node_ids[i]} has {len(weights[i])} weights")
            outputs.append((np.float32(0.0) + weights[i][0]) + base)
        thresholds = np.array(a["nodes_values"], dtype=np.float32)
        return cls(columns, children, thresholds, depth, leaves, np.array(outputs, dtype=np.float32))


class _Graph:
    """Look-ups over one ONNX graph for ``compile_forest``."""

    def __init__(self, model: onnx.ModelProto):
        self.graph = model.graph
        self.constants: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in self.graph.initializer}
        self.producers: dict[str, tuple[int, onnx.NodeProto]] = {}
        for position, node in enumerate(self.graph.node):
            for output in node.output:
                self.producers[output] = (position, node)
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                attrs = {a.name: a for a in node.attribute}
                if "value" not in attrs:
                    raise UnsupportedGraph(f"Constant {node.name!r} is not a tensor")
                self.constants[node.output[0]] = numpy_helper.to_array(attrs["value"].t)
        inputs = [i for i in self.graph.input if i.name not in self.constants]
        if len(inputs) != 1:
            raise UnsupportedGraph(f"the graph has {len(inputs)} inputs")
        self.input = inputs[0]

    def input_width(self) -> int:
        tensor = self.input.type.tensor_type
        dims = tensor.shape.dim
        if tensor.elem_type != onnx.TensorProto.FLOAT or len(dims) != 2 or not dims[1].HasField("dim_value"):
            raise UnsupportedGraph("the input is not a float tensor [N, F] with a fixed F")
        return int(dims[1].dim_value)

    def node_of(self, tensor: str, op_type: str, domain: str = "") -> onnx.NodeProto:
        _, node = self.producers.get(tensor, (None, None))
        if node is None or node.op_type != op_type or (node.domain or "") not in ({"", "ai.onnx"} if not domain
                                                                                 else {domain}):
            raise UnsupportedGraph(f"{tensor!r} is not the output of {op_type}")
        return node

    def scalar(self, tensor: str) -> np.float32:
        value = self.constants.get(tensor)
        if value is None or value.dtype != np.float32 or value.size != 1:
            raise UnsupportedGraph(f"{tensor!r} is not a one-element float32 constant")
        return np.float32(value.reshape(()))

    def split_scalar(self, node: onnx.NodeProto) -> tuple[str, np.float32]:
        """(the variable input, the constant) of a two-input node whose one input is a float32 scalar."""
        if len(node.input) != 2:
            raise UnsupportedGraph(f"{node.op_type} {node.name!r} does not have two inputs")
        left, right = node.input
        return (left, self.scalar(right)) if right in self.constants else (right, self.scalar(left))

    def term_chain(self, term: str) -> tuple[onnx.NodeProto, list[int]]:
        """The one tree a Sum term depends on, and the positions of the nodes between them (row-wise ops whose
        other inputs are one-element constants, or a Reshape to [-1, 1])."""
        trees, positions, todo, seen = [], set(), [term], set()
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            position, node = self.producers.get(name, (None, None))
            if name in self.constants:
                if node is not None:
                    positions.add(position)
                continue
            if node is None:
                raise UnsupportedGraph(f"the Sum term {term!r} reads {name!r}, not only a tree's output")
            if node.op_type == "TreeEnsembleRegressor" and node.domain == _ML:
                trees.append(node)
                continue
            if node.op_type not in _TERM_OPS or (node.domain or "") not in ("", "ai.onnx", _ML) \
                    or (node.op_type == "LabelEncoder") != (node.domain == _ML):
                raise UnsupportedGraph(f"the Sum term {term!r} goes through {node.op_type} {node.name!r}")
            positions.add(position)
            for k, operand in enumerate(node.input):
                if operand in self.constants:
                    value = self.constants[operand]
                    reshape_shape = node.op_type == "Reshape" and k == 1
                    if (reshape_shape and value.tolist() not in ([-1, 1], [-1])) or (not reshape_shape
                                                                                   and value.size != 1):
                        raise UnsupportedGraph(f"{node.op_type} {node.name!r} has a constant that is not row-wise")
                if operand:
                    todo.append(operand)
        if len(trees) != 1:
            raise UnsupportedGraph(f"the Sum term {term!r} depends on {len(trees)} trees")
        return trees[0], sorted(positions)

    def tree_source(self, tree: onnx.NodeProto) -> tuple[str, np.ndarray]:
        """(the tensor a tree's columns come from, the column of that tensor for each tree feature)."""
        name = tree.input[0]
        _, node = self.producers.get(name, (None, None))
        if node is None or node.op_type != "Gather":
            return name, np.arange(self._width_of(name))
        axis = {a.name: helper.get_attribute_value(a) for a in node.attribute}.get("axis", 0)
        indices = self.constants.get(node.input[1])
        width = self._width_of(node.input[0])
        if axis != 1 or indices is None or indices.ndim != 1 or indices.dtype.kind not in "iu" \
                or not np.all((indices >= -width) & (indices < width)):
            raise UnsupportedGraph(f"Gather {node.name!r} is not a selection of columns")
        return node.input[0], np.where(indices < 0, indices + width, indices).astype(np.int64)

    def _width_of(self, tensor: str) -> int:
        if tensor == self.input.name:
            return self.input_width()
        self.node_of(tensor, "Imputer", _ML)  # the only other tensor a tree may read
        return self.input_width()

    def imputation(self, tensor: str, n_features: int) -> np.ndarray:
        """What a NaN input becomes on its way to the trees (float32 per column; NaN: it stays NaN)."""
        if tensor == self.input.name:
            return np.full(n_features, np.nan, dtype=np.float32)
        imputer = self.node_of(tensor, "Imputer", _ML)
        a = {attr.name: helper.get_attribute_value(attr) for attr in imputer.attribute}
        values = np.array(a.get("imputed_value_floats", []), dtype=np.float32)
        if imputer.input[0] != self.input.name or not math.isnan(a.get("replaced_value_float", 0.0)) \
                or "imputed_value_int64s" in a or len(values) not in (1, n_features):
            raise UnsupportedGraph(f"Imputer {imputer.name!r} does not replace NaN in the input with floats")
        return np.ascontiguousarray(np.broadcast_to(values, (n_features,)), dtype=np.float32)


def _leaf_terms(model: onnx.ModelProto, graph: _Graph, terms: list[str],
                chains: list[tuple[onnx.NodeProto, list[int]]], trees: list[_Tree]) -> list[np.ndarray]:
    """Each leaf's Sum term, computed by onnxruntime from the graph's own nodes between a tree and the Sum: the
    tree's output becomes the input, fed with the tree's leaf outputs in one call of a multiple of
    ``_TERM_TABLE_ROWS`` rows (all in onnxruntime's SIMD blocks, like the rows of a large batch). One small
    session per tree: onnxruntime takes longer to load one graph of all of them than 100 small ones."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    tables = []
    for term, (tree_node, chain), tree in zip(terms, chains, trees):
        nodes = [graph.graph.node[p] for p in chain]
        used = {name for node in nodes for name in node.input}
        initializers = [t for t in graph.graph.initializer if t.name in used]
        inputs = [helper.make_tensor_value_info(tree_node.output[0], onnx.TensorProto.FLOAT, [None, 1])]
        outputs = [helper.make_tensor_value_info(term, onnx.TensorProto.FLOAT, None)]
        sub = helper.make_model(helper.make_graph(nodes, "leaf_terms", inputs, outputs, initializers),
                                opset_imports=list(model.opset_import), ir_version=model.ir_version)
        session = ort.InferenceSession(sub.SerializeToString(), sess_options=options,
                                       providers=["CPUExecutionProvider"])
        rows = -(-len(tree.outputs) // _TERM_TABLE_ROWS) * _TERM_TABLE_ROWS
        result = session.run([term], {tree_node.output[0]: np.resize(tree.outputs, rows).reshape(rows, 1)})[0]
        if result.dtype != np.float32 or result.shape not in ((rows, 1), (rows,)):
            raise UnsupportedGraph(f"the Sum term {term!r} is not one float32 per row")
        tables.append(result.reshape(rows)[:len(tree.outputs)].copy())
    return tables


def probe_rows(forest: CompiledForest, n: int = PROBE_ROWS, seed: int = 0) -> np.ndarray:
    """Rows that exercise the forest: NaN, zeros, the imputed values, infinities, huge values, and split thresholds
    (exactly, and one float32 step either side), mixed with noise."""
    rng = np.random.default_rng(seed)
    f = forest.n_features
    x = (rng.normal(size=(n, f)) * rng.choice([0.1, 1.0, 10.0, 1e3], size=(n, 1))).astype(np.float32)
    splits = forest.children[:, 0] != np.arange(len(forest.children))  # a leaf is its own child
    columns, thresholds = forest.columns[splits], forest.thresholds[splits]
    for r in range(n):
        pick = rng.random(len(columns)) < 0.5
        side = rng.choice(np.array([-np.inf, np.nan, np.inf], dtype=np.float32), size=int(pick.sum()))
        values = np.where(np.isnan(side), thresholds[pick], np.nextafter(thresholds[pick], side))
        x[r, columns[pick]] = values
    x[rng.random(x.shape) < 0.1] = np.nan
    specials = [np.nan, 0.0, np.inf, -np.inf, 3e38, -3e38]
    for r, value in enumerate(specials[: n]):
        x[r] = value
    if n > len(specials):
        x[len(specials)] = forest.imputed
    return x

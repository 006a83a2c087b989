"""Exact TreeSHAP contributions of a LightGBM booster, faster than ``booster.predict(pred_contrib=True)``.

Reason codes need every feature's path-dependent TreeSHAP value for every scored row. LightGBM's own
``pred_contrib`` spends almost all of its time in the per-row TreeSHAP recursion (O(leaves x depth^2) per
tree), not in call overhead, so a faster call path does not help; a cheaper algorithm does.

The fast path here computes the same values another way. For one leaf with value v, whose path splits on the
features j with zero fraction z_j (share of training rows down that path) and one fraction o_j (1 if the row
follows every split on j, else 0), the Shapley weight sum TreeSHAP evaluates is an integral:

    phi_i += v * (o_i - z_i) * integral_0^1 prod_{j != i} (z_j * (1 - t) + o_j * t) dt

The integrand is a polynomial of degree < d (d = distinct features on the path), so Gauss-Legendre quadrature
with ceil(d / 2) nodes gives it exactly. Products are shared between leaves by walking each tree once in
pre-order, and the per-feature terms are attributed edge by edge (a repeated feature telescopes against its
previous split on the same path), so one tree costs O(nodes x depth / 2) instead of O(leaves x depth^2). The
result equals ``pred_contrib`` up to floating-point rounding (~1e-13 on 255-leaf trees); tests hold it to 1e-9.

The kernel is compiled with numba when numba is importable; otherwise, and for models the tables do not cover
(categorical splits, linear trees, random-forest averaging, a split with an empty child), the explainer
answers with ``booster.predict(pred_contrib=True)`` and says why in ``fallback_reason``.

Thread safety (one replica, any number of threads): the tables are built once and only read afterwards; each
call allocates its own scratch and output, and the compiled kernel releases the GIL, so concurrent calls run
in parallel and give the serial answers. The fallback is ``booster.predict`` with ``num_threads=1``, as the
scorer called it before. The booster must not be retrained or freed while the explainer is in use.

numba caches the compiled kernel in ``__pycache__`` beside this module, or in the user's cache directory where
that is read-only (``NUMBA_CACHE_DIR`` overrides both); without a usable cache each process compiles it in the
constructor (~2 s on 2 cores), never on a request.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, fields

import lightgbm as lgb
import numpy as np

log = logging.getLogger(__name__)

# LightGBM treats |x| <= kZeroThreshold as zero (include/LightGBM/meta.h: a double set from the float 1e-35f,
# which is a little above the double 1e-35) and encodes a split's missing-value handling in decision_type:
# bit 0 categorical, bit 1 default-left, bits 2-3 missing type.
_ZERO_THRESHOLD = float(np.float32(1e-35))
_CATEGORICAL_MASK = 1
_DEFAULT_LEFT_MASK = 2
_MISSING_NONE, _MISSING_ZERO, _MISSING_NAN = 0, 1, 2

METHOD_QUADRATURE = "quadrature"
METHOD_LIGHTGBM = "lightgbm-pred-contrib"


class UnsupportedModel(ValueError):
    """The booster has a feature the quadrature tables do not cover; the explainer falls back."""


@dataclass(frozen=True)
class QuadratureTables:
    """Every non-trivial tree of the booster, nodes in pre-order, trees concatenated.

    Node k of a tree (index ``tree_start[t] + k``) reached from its parent through one edge; the edge's
    feature, its combined zero fraction and the previous split on the same feature along the path are
    properties of that child node. Single-leaf trees add only to the bias and are left out.
    """

    tree_start: np.ndarray  # int64 (trees + 1): first node of each tree
    tree_nodes: np.ndarray  # int64 (trees,): quadrature nodes used for the tree
    parent: np.ndarray  # int32: parent node within the tree (-1 for the root)
    is_left: np.ndarray  # int8: 1 if the node is its parent's left child
    edge_feature: np.ndarray  # int32: feature the parent splits on (-1 for the root)
    zero_fraction: np.ndarray  # float64: product of zero fractions of this feature's splits down to here
    previous: np.ndarray  # int32: node below the previous split on the same feature on the path, or -1
    previous_zero_fraction: np.ndarray  # float64: zero_fraction at ``previous`` (1.0 if none)
    split_feature: np.ndarray  # int32: feature this node splits on (-1 for a leaf)
    threshold: np.ndarray  # float64: split threshold (x <= threshold goes left)
    default_left: np.ndarray  # int8: where missing values go
    missing_type: np.ndarray  # int8: _MISSING_NONE / _ZERO / _NAN
    leaf_value: np.ndarray  # float64: leaf output (0 for internal nodes)
    gauss_t: np.ndarray  # float64 (max_nodes + 1, max_nodes): Gauss-Legendre nodes on [0, 1], row m for m nodes
    gauss_w: np.ndarray  # float64, same shape: the matching weights
    max_tree_nodes: int
    max_quadrature_nodes: int

    def kernel_args(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self))


def _model_trees(booster: lgb.Booster) -> tuple[dict[str, str], list[dict[str, str]]]:
    """Header fields and per-tree fields of the model text (the trees ``booster.predict`` uses by default)."""
    header: dict[str, str] = {}
    trees: list[dict[str, str]] = []
    current = header
    for line in booster.model_to_string().splitlines():
        if line.startswith("Tree="):
            current = {}
            trees.append(current)
        elif line.startswith("end of trees"):
            break
        elif "=" in line:
            key, value = line.split("=", 1)
            current[key] = value
        elif line.strip() and current is header:
            header[line.strip()] = ""  # flags such as "average_output"
    return header, trees


def build_tables(booster: lgb.Booster) -> QuadratureTables:
    """Quadrature tables for ``booster``; raises UnsupportedModel naming what is not covered."""
    header, trees = _model_trees(booster)
    if int(header.get("num_tree_per_iteration", "1")) != 1:
        raise UnsupportedModel("more than one tree per iteration (multiclass)")
    if "average_output" in header:
        raise UnsupportedModel("random-forest averaging (average_output)")
    cols: dict[str, list] = {name: [] for name in (
        "parent", "is_left", "edge_feature", "zero_fraction", "previous", "previous_zero_fraction",
        "split_feature", "threshold", "default_left", "missing_type", "leaf_value")}
    tree_start, tree_nodes = [0], []
    for index, tree in enumerate(trees):
        leaves = int(tree["num_leaves"])
        if leaves == 1:
            continue
        if int(tree.get("num_cat", "0")) > 0:
            raise UnsupportedModel(f"tree {index} has categorical splits")
        if int(tree.get("is_linear", "0")):
            raise UnsupportedModel(f"tree {index} is a linear tree")
        depth = _add_tree(tree, index, cols)
        tree_start.append(len(cols["parent"]))
        tree_nodes.append(max(1, (depth + 1) // 2))
    max_nodes = max(tree_nodes, default=1)
    gauss_t = np.zeros((max_nodes + 1, max_nodes))
    gauss_w = np.zeros((max_nodes + 1, max_nodes))
    for m in range(1, max_nodes + 1):
        x, w = np.polynomial.legendre.leggauss(m)
        gauss_t[m, :m], gauss_w[m, :m] = (x + 1) / 2, w / 2
    ints = {"parent", "edge_feature", "previous", "split_feature"}
    flags = {"is_left", "default_left", "missing_type"}
    arrays = {
        name: np.array(values, dtype=np.int32 if name in ints else np.int8 if name in flags else np.float64)
        for name, values in cols.items()
    }
    starts = np.array(tree_start, dtype=np.int64)
    return QuadratureTables(
        tree_start=starts, tree_nodes=np.array(tree_nodes, dtype=np.int64), **arrays,
        gauss_t=gauss_t, gauss_w=gauss_w,
        max_tree_nodes=int(np.diff(starts).max(initial=1)), max_quadrature_nodes=max_nodes,
    )


def _add_tree(tree: dict[str, str], index: int, cols: dict[str, list]) -> int:
    """Append one tree's nodes in pre-order; returns the most distinct features on any root-to-leaf path."""
    def ints(key: str) -> list[int]:
        return [int(v) for v in tree[key].split()]

    def floats(key: str) -> list[float]:
        return [float(v) for v in tree[key].split()]

    split_feature, decision, left, right = ints("split_feature"), ints("decision_type"), ints("left_child"), \
        ints("right_child")
    threshold, leaf_value = floats("threshold"), floats("leaf_value")
    leaf_count, internal_count = floats("leaf_count"), floats("internal_count")

    def count(node: int) -> float:
        return internal_count[node] if node >= 0 else leaf_count[~node]

    base = len(cols["parent"])
    deepest = 0
    # (model node, parent position, is left child, {feature: (position of its last split, zero fraction)})
    stack: list[tuple[int, int, int, dict[int, tuple[int, float]]]] = [(0, -1, 0, {})]
    model_node_at: dict[int, int] = {}
    while stack:
        node, parent, is_left, path = stack.pop()
        position = len(cols["parent"]) - base
        if parent < 0:
            feature, previous, previous_zero, zero = -1, -1, 1.0, 1.0
        else:
            split = model_node_at[parent]
            if count(node) <= 0 or count(split) <= 0:
                raise UnsupportedModel(f"tree {index} has a split with an empty child")
            feature = split_feature[split]
            previous, previous_zero = path.get(feature, (-1, 1.0))
            zero = previous_zero * count(node) / count(split)
            path = {**path, feature: (position, zero)}
        deepest = max(deepest, len(path))
        cols["parent"].append(parent)
        cols["is_left"].append(is_left)
        cols["edge_feature"].append(feature)
        cols["zero_fraction"].append(zero)
        cols["previous"].append(previous)
        cols["previous_zero_fraction"].append(previous_zero)
        if node >= 0:
            model_node_at[position] = node
            if decision[node] & _CATEGORICAL_MASK:
                raise UnsupportedModel(f"tree {index} has categorical splits")
            cols["split_feature"].append(split_feature[node])
            cols["threshold"].append(threshold[node])
            cols["default_left"].append(1 if decision[node] & _DEFAULT_LEFT_MASK else 0)
            cols["missing_type"].append((decision[node] >> 2) & 3)
            cols["leaf_value"].append(0.0)
            stack.append((right[node], position, 0, path))
            stack.append((left[node], position, 1, path))  # popped first: pre-order, left subtree first
        else:
            cols["split_feature"].append(-1)
            cols["threshold"].append(0.0)
            cols["default_left"].append(0)
            cols["missing_type"].append(_MISSING_NONE)
            cols["leaf_value"].append(leaf_value[~node])
    return deepest


def quadrature_kernel(x, tree_start, tree_nodes, parent, is_left, edge_feature, zero_fraction, previous,
                      previous_zero_fraction, split_feature, threshold, default_left, missing_type, leaf_value,
                      gauss_t, gauss_w, max_tree_nodes, max_quadrature_nodes, out):
    """Add each row's TreeSHAP contributions to ``out`` (rows x features). Plain Python; numba compiles it.

    Trees are the outer loop so one tree's nodes stay in cache across the rows of a batch.
    """
    rows = x.shape[0]
    g = np.empty((max_tree_nodes, max_quadrature_nodes))  # product of the path's factors at each t
    h = np.empty((max_tree_nodes, max_quadrature_nodes))  # sum of leaf value * g over the subtree
    inv_f = np.empty((max_tree_nodes, max_quadrature_nodes))  # 1 / this feature's combined factor at the node
    ones = np.empty(max_tree_nodes, np.int8)  # combined one fraction of the edge's feature
    goes_left = np.empty(max_tree_nodes, np.int8)
    for tree in range(tree_start.shape[0] - 1):
        s = tree_start[tree]
        n = tree_start[tree + 1] - s
        m = tree_nodes[tree]
        t = gauss_t[m]
        w = gauss_w[m]
        for r in range(rows):
            for k in range(n):
                feature = split_feature[s + k]
                if feature >= 0:
                    v = np.float64(x[r, feature])
                    if math.fabs(v) <= _ZERO_THRESHOLD:
                        v = 0.0
                    kind = missing_type[s + k]
                    if kind != _MISSING_NAN and math.isnan(v):
                        v = 0.0
                    if (kind == _MISSING_ZERO and v == 0.0) or (kind == _MISSING_NAN and math.isnan(v)):
                        goes_left[k] = default_left[s + k]
                    else:
                        goes_left[k] = 1 if v <= threshold[s + k] else 0
            for j in range(m):
                g[0, j] = 1.0
                h[0, j] = 0.0
            ones[0] = 1
            for k in range(1, n):
                p = parent[s + k]
                prev = previous[s + k]
                o = 1 if goes_left[p] == is_left[s + k] else 0
                if prev >= 0:
                    o = o & ones[prev]
                ones[k] = o
                z = zero_fraction[s + k]
                for j in range(m):
                    fk = z * (1.0 - t[j]) + o * t[j]
                    inv_f[k, j] = 1.0 / fk
                    g[k, j] = g[p, j] * fk
                if prev >= 0:
                    for j in range(m):
                        g[k, j] *= inv_f[prev, j]
                value = leaf_value[s + k]
                for j in range(m):
                    h[k, j] = value * g[k, j] if split_feature[s + k] < 0 else 0.0
            for k in range(n - 1, 0, -1):
                p = parent[s + k]
                for j in range(m):
                    h[p, j] += h[k, j]
                prev = previous[s + k]
                if prev >= 0 and ones[prev] == 0:
                    continue  # the feature already disagreed higher up: this split changes nothing
                z = zero_fraction[s + k]
                o = ones[k]
                acc = 0.0
                if prev >= 0:
                    zp = previous_zero_fraction[s + k]
                    for j in range(m):
                        acc += w[j] * h[k, j] * ((o - z) * inv_f[k, j] - (1.0 - zp) * inv_f[prev, j])
                else:
                    for j in range(m):
                        acc += w[j] * h[k, j] * (o - z) * inv_f[k, j]
                out[r, edge_feature[s + k]] += acc


@functools.cache
def _compile_kernel():
    """The numba-compiled kernel (one per process), or None with the reason when numba is not installed."""
    try:
        import numba
    except ImportError:
        return None, "numba is not installed"
    return numba.njit(cache=True, nogil=True)(quadrature_kernel), None


class TreeShapExplainer:
    """Per-feature TreeSHAP contributions of a single-output LightGBM booster, without the bias column.

    ``method`` says which path answers (``quadrature`` or ``lightgbm-pred-contrib``) and ``fallback_reason``
    why it is not the fast one; both belong in the scorer's health/info.
    """

    def __init__(self, booster: lgb.Booster, *, use_quadrature: bool = True):
        if booster.num_model_per_iteration() != 1:
            raise ValueError("TreeShapExplainer explains single-output boosters only (binary or regression)")
        self._booster = booster
        self.n_features: int = booster.num_feature()
        self._kernel = None
        self._tables: QuadratureTables | None = None
        self.fallback_reason: str | None = None
        if not use_quadrature:
            self.fallback_reason = "quadrature disabled by configuration"
        else:
            kernel, self.fallback_reason = _compile_kernel()
            if kernel is not None:
                try:
                    self._tables = build_tables(booster)
                    self._kernel = kernel
                except UnsupportedModel as exc:
                    self.fallback_reason = f"model not covered: {exc}"
        self.method: str = METHOD_QUADRATURE if self._kernel is not None else METHOD_LIGHTGBM
        # The bias (expected raw score) does not depend on the row: take LightGBM's own figure once.
        probe = np.zeros((1, self.n_features), dtype=np.float32)
        self.bias: float = float(booster.predict(probe, pred_contrib=True, num_threads=1)[0, -1])
        if self._kernel is not None:
            self.contributions(probe)  # compile (or load numba's cache) now, not on the first request
        if self.fallback_reason:
            log.info("TreeSHAP via %s (%s)", self.method, self.fallback_reason)

    def contributions(self, x: np.ndarray) -> np.ndarray:
        """TreeSHAP values, float64 (rows x features); ``row.sum() + bias`` is the raw score.

        ``x`` is float32 (as the scorer builds it; float64 is also accepted and compiled on first use), NaN
        meaning missing, one column per model feature in model order.
        """
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"expected a (rows, {self.n_features}) matrix, got shape {x.shape}")
        if x.dtype != np.float32 and x.dtype != np.float64:
            raise TypeError(f"expected float32 or float64 features, got {x.dtype}")
        x = np.ascontiguousarray(x)
        if x.shape[0] == 0:
            return np.zeros((0, self.n_features), dtype=np.float64)
        if self._kernel is None:
            return self._booster.predict(x, pred_contrib=True, num_threads=1)[:, :-1]
        out = np.zeros((x.shape[0], self.n_features), dtype=np.float64)
        self._kernel(x, *self._tables.kernel_args(), out)
        return out

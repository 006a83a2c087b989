"""Measure the case memory on synthetic cases: indexing time and query latency, per backend.

    python -m retrieval.benchmark [--cases 50000] [--dim 20] [--local-cases 2000] [--queries 200] [--out FILE]

Prints figures (nothing is asserted) beside two baselines measured in the same run: exact cosine top-k in numpy
over the same vectors, and a bare ``EdgeShard.query`` without LlamaIndex. ``--out`` also writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import qdrant_edge as qe

from retrieval.case_memory import VECTOR_NAME, BehaviourEncoder, CaseMemory, open_case_memory
from riskcascade.core.config import RetrievalSettings
from riskcascade.core.domain import RISK_TYPES, AdjudicatedCase, Entities, EventType, Outcome


def synthetic_cases(n: int, dim: int, seed: int) -> tuple[list[AdjudicatedCase], list[str]]:
    rng = np.random.default_rng(seed)
    names = [f"feature_{i:02d}" for i in range(dim)]
    x = rng.lognormal(mean=0.0, sigma=1.0, size=(n, dim)) * np.linspace(1, 50, dim)
    event_types = list(EventType)
    at = datetime(2024, 1, 1, tzinfo=timezone.utc)
    cases = [
        AdjudicatedCase(
            case_id=f"bench-{seed}-{i}",
            event_type=event_types[i % len(event_types)],
            features=dict(zip(names, x[i].tolist())),
            outcome=Outcome.FRAUD if i % 9 == 0 else Outcome.LEGITIMATE,
            risk_type=RISK_TYPES[i % len(RISK_TYPES)] if i % 9 == 0 else "",
            entities=Entities(account_id=f"acct-{i % 5000}", device_id=f"dev-{i % 3000}"),
            occurred_at=at,
            summary=f"synthetic case {i}",
        )
        for i in range(n)
    ]
    return cases, names


def percentiles_ms(fn: Callable[[int], object], n: int) -> dict[str, float]:
    fn(0)  # warm-up
    samples = []
    for i in range(n):
        start = time.perf_counter_ns()
        fn(i)
        samples.append((time.perf_counter_ns() - start) / 1e6)
    return {"p50_ms": float(np.percentile(samples, 50)), "p95_ms": float(np.percentile(samples, 95))}


def query_figures(memory: CaseMemory, queries: list[AdjudicatedCase], n: int) -> dict[str, dict[str, float]]:
    return {
        "similar_cases top10": percentiles_ms(lambda i: memory.similar_cases(queries[i].features, 10), n),
        "similar_cases top10 + event_type + exclude": percentiles_ms(
            lambda i: memory.similar_cases(
                queries[i].features, 10, exclude_case_ids=[f"bench-1-{i}"], event_type=queries[i].event_type
            ),
            n,
        ),
        # The synthetic features have no names the narrative knows, so narratives are short; the cost measured is
        # the query's embedding plus a 384-d search.
        "similar_narratives top5 (query embedded)": percentiles_ms(
            lambda i: memory.similar_narratives(f"Order {i}. Note: \"bench {i}\"", 5), n
        ),
        "cases_with_entity account_id 20": percentiles_ms(
            lambda i: memory.cases_with_entity("account_id", f"acct-{i % 5000}", 20), n
        ),
    }


def run(n_cases: int, dim: int, n_local: int, n_queries: int, batch_size: int, root: Path) -> dict:
    cases, names = synthetic_cases(n_cases, dim, seed=1)
    queries, _ = synthetic_cases(n_queries, dim, seed=2)
    x = np.array([[c.features[f] for f in names] for c in cases])
    encoder = BehaviourEncoder(names, x.mean(axis=0), x.std(axis=0))
    results: dict = {"cases": n_cases, "dim": dim, "queries": n_queries, "batch_size": batch_size}

    # Baseline: exact cosine top-10 in numpy over the same behaviour vectors.
    vectors = encoder.encode_many([c.features for c in cases])
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    def numpy_top10(i: int) -> object:
        q = np.asarray(encoder.encode(queries[i].features))
        sims = unit @ (q / np.linalg.norm(q))
        return np.argpartition(-sims, 10)[:10]

    results["baseline numpy exact top10"] = percentiles_ms(numpy_top10, n_queries)

    edge_settings = RetrievalSettings(backend="edge", edge_path=root / "edge")
    with open_case_memory(edge_settings, encoder) as memory:
        start = time.perf_counter()
        memory.add_cases(cases, batch_size=batch_size)
        seconds = time.perf_counter() - start
        results["edge add"] = {"seconds": seconds, "cases_per_s": n_cases / seconds, "count": memory.count()}
        shard = memory.vector_store.client

        def bare_edge(i: int) -> object:
            request = qe.QueryRequest(
                limit=10,
                query=qe.Query.Nearest(encoder.encode(queries[i].features), using=VECTOR_NAME),
                with_payload=qe.PayloadSelector.Include(["_node_content", "_node_type"]),
            )
            return shard.query(request)

        results["baseline bare EdgeShard.query top10"] = percentiles_ms(bare_edge, n_queries)
        results["edge"] = query_figures(memory, queries, n_queries)
        start = time.perf_counter()
        optimized = memory.vector_store.optimize()
        results["edge optimize"] = {"seconds": time.perf_counter() - start, "optimized": optimized}
        results["edge after optimize"] = query_figures(memory, queries, n_queries)

    local_settings = RetrievalSettings(backend="qdrant", qdrant_path=root / "local")
    with open_case_memory(local_settings, encoder) as memory:
        start = time.perf_counter()
        memory.add_cases(cases[:n_local], batch_size=batch_size)
        seconds = time.perf_counter() - start
        results["local add"] = {"cases": n_local, "seconds": seconds, "cases_per_s": n_local / seconds}
        results["local"] = query_figures(memory, queries, n_queries)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=20)
    parser.add_argument("--local-cases", type=int, default=2_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--out", type=Path, default=None, help="also write the figures here as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="riskcascade-bench-") as root:
        results = run(args.cases, args.dim, args.local_cases, args.queries, args.batch_size, Path(root))
    print(json.dumps(results, indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

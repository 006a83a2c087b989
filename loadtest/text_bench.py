"""What the text model costs the fast path: the scorer's own model run, in process, with and without it, same run.

    python -m loadtest.text_bench [--model-dir DIR] [--events 2000] [--batches 1,8,32,64]

The model version must have a text model (``riskcascade train`` fits one on data with free text; the default
synthetic data has it). The held-out events (``data.dir``/test.csv, in time order) go through ``FastModel.score_batch``
(entity state, features, anomaly score, text model, ONNX, calibration, reason codes for the at-risk rows: what a
scorer replica runs per micro-batch) in batches of each size, three ways, each from an empty entity state:

- **baseline**: the same model with the events' text left out: the text model reads nothing and runs nothing, the
  rest of the path is unchanged (the same trees, with the text score missing);
- **text, cold**: a fresh scorer, so every distinct field text is encoded the first time it is met (MiniLM on the
  CPU, ``model.text_batch_size`` texts a run);
- **text, warm**: the same events again through that scorer: every field text's vector is remembered
  (``model.text_cache_entries``), as templated notes and pasted scripts are in live traffic.

It prints and writes (``loadtest/results/text-model-<UTC time>.{json,md}``) the per-batch latency p50 / p99 and the
events per second of each, the machine, and the command.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from loadtest import machine

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_EVENTS = 2000
DEFAULT_BATCHES = (1, 8, 32, 64)
WAYS = ("baseline", "text, cold", "text, warm")


def _percentiles(ms: list[float]) -> dict[str, float]:
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(np.mean(ms))}


def run(model_dir: Path | None, n_events: int, batches: tuple[int, ...], threads: int) -> dict:
    from riskcascade.core.config import load_settings
    from riskcascade.core.domain import ScoreRequest
    from riskcascade.core.entity_state import EmbeddedEntityState
    from riskcascade.core.features import FeatureLayout
    from riskcascade.core.model_registry import live_model_dir
    from riskcascade.modelling.synthetic import event_text, read_events_csv
    from riskcascade.modelling.text_model import field_texts, shared_encoder
    from riskcascade.report_paths import shown_path
    from services.scorer.fast_model import FastModel

    settings = load_settings(None)
    model_dir = model_dir or live_model_dir(settings.model.dir)
    events = sorted(read_events_csv(settings.data.dir / "test.csv"), key=lambda e: e.occurred_at)[:n_events]
    layout = FeatureLayout.load(model_dir).state

    def scorer() -> FastModel:
        return FastModel(model_dir, threads=threads, reason_count=settings.model.reason_count, prefer_gpu=False,
                         reasons_for=settings.model.reasons_for, embedding_dir=settings.retrieval.embedding_dir,
                         text_cache_entries=settings.model.text_cache_entries,
                         text_batch_size=settings.model.text_batch_size)

    def requests(with_text: bool) -> list[ScoreRequest]:
        return [ScoreRequest.of(e.case_id, e.event_type, e.entities, dict(e.features), occurred_at=e.occurred_at,
                                text=event_text(e) if with_text else {}) for e in events]

    def timed(model: FastModel, reqs: list[ScoreRequest], size: int) -> list[float]:
        model.state = EmbeddedEntityState(layout) if layout is not None else None
        ms = []
        for start in range(0, len(reqs), size):
            began = time.perf_counter()
            model.score_batch(reqs[start:start + size])
            ms.append((time.perf_counter() - began) * 1000.0)
        return ms

    probe = scorer()
    if not probe.reads_text:
        raise SystemExit(f"model {probe.card.version} has no text model: train one on data with free text")
    timed(probe, requests(True)[:256], 32)  # warm-up: onnxruntime sessions, numba kernels (not measured)
    rows = []
    plain, with_text = requests(False), requests(True)
    fields = probe.card.text_model["fields"]
    distinct = len({t for r in with_text for t in field_texts(r.text, fields)} - {""})
    for size in batches:
        baseline = timed(probe, plain, size)
        shared_encoder.cache_clear()  # versions in one process share the encoder and its cache: start this one empty
        fresh = scorer()
        cold = timed(fresh, with_text, size)
        warm = timed(fresh, with_text, size)
        for way, ms in zip(WAYS, (baseline, cold, warm)):
            rows.append({"batch": size, "way": way, "batches": len(ms),
                         "events_per_s": len(events) / (sum(ms) / 1000.0), **_percentiles(ms)})
    return {
        "model_version": probe.card.version, "model_dir": shown_path(model_dir), "events": len(events),
        "distinct_texts": distinct, "threads": threads, "rows": rows,
        "text_model": {k: probe.card.text_model.get(k) for k in ("fields", "fitted_on_labels", "distinct_texts")},
    }


def format_report(result: dict) -> str:
    lines = [
        "# What the text model costs the fast path (scorer model run, in process)",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {machine.summary_line(result['machine'])}. Model {result['model_version']}, "
        f"{result['events']:,} held-out events in time order ({result['distinct_texts']:,} distinct field texts), "
        f"{result['threads']} onnxruntime thread(s). Baseline: the same model and events with the text left out, in "
        "the same run (its scores differ, so does the number of at-risk rows whose reason codes are computed).",
        "",
        "| batch | way | p50 ms | p99 ms | events/s |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['batch']} | {r['way']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                     f"{r['events_per_s']:,.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=None, help="a model version folder (default: the live one)")
    parser.add_argument("--events", type=int, default=DEFAULT_EVENTS, help="held-out events scored per way")
    parser.add_argument("--batches", default=",".join(map(str, DEFAULT_BATCHES)), help="batch sizes, comma-separated")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (the scorer's default)")
    args = parser.parse_args(argv)
    result = run(args.model_dir, args.events, tuple(int(b) for b in args.batches.split(",")), args.threads)
    result["command"] = " ".join(["python -m loadtest.text_bench", *(shlex.quote(a) for a in (argv or sys.argv[1:]))])
    result["machine"] = machine.describe()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"text-model-{stamp}.json").write_text(json.dumps(result, indent=1))
    report = format_report(result)
    (RESULTS / f"text-model-{stamp}.md").write_text(report)
    print(report)
    print(f"wrote {RESULTS / f'text-model-{stamp}.md'}")


if __name__ == "__main__":
    main()

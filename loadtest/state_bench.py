"""The live entity state's cost per event, beside the previous implementation measured in the same run.

    python -m loadtest.state_bench [--events 60000] [--batch 64] [--redis-url URL | --no-redis]

Workload: five links, four aggregated values, windows 1 h / 24 h / 7 d / 30 d; ``--events`` events over 30 days with
a few busy shared IPs (a carrier NAT, an office, a fraud farm) and sellers of skewed activity (the busiest entities
hold well over a thousand events in 30 days), labels arriving days later. Every state folds the first 25 days in runs
of 512 (not timed), then the last 5 days in batches of ``--batch`` (timed), the labels that arrived meanwhile applied
before each batch (not timed). The timed runs go to every state in turn, run by run, so that a busy shared machine
slows them alike. States:

- previous book (baseline): ``loadtest.state_baseline.PreviousEntityBook.step``, the pure-Python feature and fold
  code as it was before the history moved into numpy arrays and a compiled kernel;
- book: ``EntityBook.step``, the feature and fold code every backend runs;
- embedded, memory / embedded, log: ``EmbeddedEntityState`` without and with its SQLite log;
- redis: ``RedisEntityState`` on a throwaway ``redis-server`` (or ``--redis-url``); round trips per batch counted.
  Without ``redis-server`` its row is left out, with a note.

Figures: microseconds per event (time of the timed batches over their events), p50 / p99 of the time of a full batch,
the share of it spent in Python's garbage collector, and whether the features equal the book's bit for bit (the
baseline's: how far apart). Then where ``EntityBook`` spends its time: features against fold, and a profile of
``features``. Results go to loadtest/results/entity-state-<UTC time>.json and .md; there is no pass/fail.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import json
import math
import os
import pstats
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from loadtest.redis_process import redis_server_binary, running_redis
from loadtest.state_baseline import PreviousEntityBook
from riskcascade.core.entity_state import (
    EmbeddedEntityState,
    EntityBook,
    EntityState,
    LabelEvent,
    StateEvent,
    StateLayout,
)
from riskcascade.core.state_replay import Timeline

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "loadtest" / "results"
DAY = 86400.0
LINKS = ("account_id", "seller_id", "device_id", "ip", "payment_instrument_id")
LAYOUT = StateLayout(LINKS, ("amount", "items", "clicks", "session_s"), (3600, 86400, 604800, 2592000), 2592000)
BUSY_IPS = 5
BUSY_SHARE = 0.08  # of events behind one of the busy shared IPs
TIMED_DAYS = 5.0
WARM_RUN = 512
BASELINE = "previous book (baseline)"
PROFILE_EVENTS = 3000


def bench_timeline(n: int, days: float = 30.0, seed: int = 7) -> Timeline:
    rng = np.random.default_rng(seed)
    start = 1_700_000_000.0
    times = start + np.sort(rng.uniform(0, days * DAY, n)).round()

    def skewed(k: int, sigma: float) -> np.ndarray:  # k entities, activity spread lognormally
        weights = rng.lognormal(0, sigma, k)
        return rng.choice(k, n, p=weights / weights.sum())

    own = np.array([f"{a}" for a in skewed(8000, 1.0)], dtype=object)

    def own_or_shared(prefix: str, shared_share: float, pool: int) -> np.ndarray:
        value = np.array([f"{prefix}-{a}" for a in own], dtype=object)
        shared = rng.random(n) < shared_share
        value[shared] = [f"{prefix}{x}" for x in rng.integers(0, pool, shared.sum())]
        return value

    ips = own_or_shared("ip", 0.3, 20_000)
    busy = rng.random(n) < BUSY_SHARE
    ips[busy] = [f"busy{x}" for x in rng.integers(0, BUSY_IPS, busy.sum())]
    labels = rng.choice([-1, 0, 1], n, p=[0.8, 0.18, 0.02])
    label_times = times + rng.exponential(5 * DAY, n).round()
    label_times[labels < 0] = np.nan
    values = np.column_stack([rng.lognormal(3.5, 1.2, n).round(2), rng.integers(1, 6, n).astype(float),
                              rng.poisson(12, n).astype(float), rng.exponential(300, n).round()])
    values[rng.random(n) < 0.05, 3] = np.nan
    return Timeline(
        ids=np.array([f"ev{i}" for i in range(n)]), times=times,
        entities={"account_id": np.array([f"acct{a}" for a in own], dtype=object),
                  "seller_id": np.array([f"seller{x}" for x in skewed(400, 1.0)], dtype=object),
                  "device_id": own_or_shared("dev", 0.1, 3000), "ip": ips,
                  "payment_instrument_id": own_or_shared("card", 0.05, 2000)},
        values=values, labels=labels, label_times=label_times,
    )


Run = tuple[str, list]  # ("event", [StateEvent]) or ("label", [LabelEvent])


def split_runs(timeline: Timeline, warm_until: float, batch: int) -> tuple[list[Run], list[Run]]:
    """(warm-up runs, timed runs) in timeline order. Warm-up runs hold up to ``WARM_RUN`` items of one kind; timed
    event runs hold ``batch`` events (a scorer batch), the labels that arrived while one filled just before it."""
    warm: list[Run] = []
    timed: list[Run] = []
    labels: list[LabelEvent] = []
    events: list[StateEvent] = []
    for kind, i in timeline.ordered(until=-math.inf):
        item = timeline.event(i, LINKS) if kind == "event" else timeline.label(i)
        if (timeline.times[i] if kind == "event" else timeline.label_times[i]) < warm_until:
            if not warm or warm[-1][0] != kind or len(warm[-1][1]) >= WARM_RUN:
                warm.append((kind, []))
            warm[-1][1].append(item)
            continue
        (events if kind == "event" else labels).append(item)
        if len(events) == batch:
            timed += [("label", labels), ("event", events)] if labels else [("event", events)]
            labels, events = [], []
    return warm, timed


class BookState(EntityState):
    """A bare book (``EntityBook`` or the baseline's) behind the state interface: no lock, no log."""

    def __init__(self, layout: StateLayout, book: EntityBook | PreviousEntityBook) -> None:
        super().__init__(layout)
        self.book = book

    def step(self, events: Sequence[StateEvent]) -> np.ndarray:
        return self.book.step(events)

    def apply_labels(self, labels: Sequence[LabelEvent]) -> int:
        return sum(self.book.fold_label(label) for label in labels)

    def event_count(self) -> int:
        return len(self.book.events)


class GcClock:
    """Seconds spent in the garbage collector, from ``gc.callbacks``."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._started = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started


class RoundTrips:
    """Counts what redis-py sends: one ``send_packed_command`` per round trip (a script call or a pipeline)."""

    def __init__(self) -> None:
        from redis.connection import AbstractConnection

        self.count = 0
        send = AbstractConnection.send_packed_command

        def counted(connection, *args, **kwargs):  # noqa: ANN001, ANN202
            self.count += 1
            return send(connection, *args, **kwargs)

        AbstractConnection.send_packed_command = counted  # type: ignore[method-assign]


def _server_script_usec(url: str) -> float:
    """Microseconds the Redis server spent in scripts so far (INFO commandstats)."""
    import redis

    with contextlib.closing(redis.Redis.from_url(url)) as server:
        return float(server.info("commandstats").get("cmdstat_evalsha", {}).get("usec", 0))


def measure(states: dict[str, EntityState], warm: list[Run], timed: list[Run], batch: int, gc_clock: GcClock,
            trips: RoundTrips | None, redis_url: str | None) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """Warm every state up, then time each timed run on every state in turn."""
    for name, state in states.items():
        started = time.perf_counter()
        for kind, items in warm:
            state.step(items) if kind == "event" else state.apply_labels(items)
        print(f"warmed up {name} in {time.perf_counter() - started:.1f} s", flush=True)
    seconds = {name: [] for name in states}
    gc_seconds = dict.fromkeys(states, 0.0)
    round_trips = []
    features: dict[str, list[np.ndarray]] = {name: [] for name in states}
    server_before = _server_script_usec(redis_url) if redis_url else 0.0
    gc.collect()  # what the set-up left behind is not collected in the first timed batch, on whichever state
    n_events = 0
    for kind, items in timed:
        if kind == "label":
            for state in states.values():
                state.apply_labels(items)
            continue
        n_events += len(items)
        for name, state in states.items():
            sent, gc_before = trips.count if trips else 0, gc_clock.seconds
            started = time.perf_counter()
            features[name].append(state.step(items))
            seconds[name].append(time.perf_counter() - started)
            gc_seconds[name] += gc_clock.seconds - gc_before
            if name == "redis" and trips:
                round_trips.append(trips.count - sent)
    figures = {}
    for name, times in seconds.items():
        full = [t for t, (_, items) in zip(times, [r for r in timed if r[0] == "event"], strict=True)
                if len(items) == batch] or times
        figures[name] = {
            "events": n_events, "batches": len(times), "us_per_event": 1e6 * sum(times) / n_events,
            "batch_p50_ms": 1e3 * float(np.median(full)), "batch_p99_ms": 1e3 * float(np.quantile(full, 0.99)),
            "gc_share": gc_seconds[name] / sum(times),
        }
    if "redis" in figures:
        figures["redis"]["round_trips_per_batch"] = sorted(set(round_trips))
        if redis_url:
            server_ms = (_server_script_usec(redis_url) - server_before) / 1e3
            figures["redis"]["server_script_ms_per_batch_incl_labels"] = server_ms / len(seconds["redis"])
    return figures, {name: np.vstack(rows) for name, rows in features.items()}


def compare_features(features: dict[str, np.ndarray]) -> dict[str, dict]:
    """Each state's features against the book's: bit-identical, or the share of values that are and how far apart
    the others are (relative difference)."""
    reference = features["book"]
    out = {}
    for name, got in features.items():
        same = got.view(np.uint64) == reference.view(np.uint64)
        differ = ~same
        scale = np.maximum(np.abs(reference[differ]), np.finfo(float).tiny)
        out[name] = {"bit_identical": bool(same.all()), "bit_identical_share": float(same.mean()),
                     "max_relative_difference": float(np.max(np.abs(got[differ] - reference[differ]) / scale))
                     if differ.any() else 0.0}
    return out


def profile_book(warm: list[Run], timed: list[Run]) -> dict:
    """Where ``EntityBook`` spends its time on the timed runs: features against fold (per event, timed apart), then
    a profile of ``features`` on the first events, and busy-IP events against the others."""
    book = EntityBook(LAYOUT)
    for kind, items in warm:
        book.step(items) if kind == "event" else [book.fold_label(x) for x in items]
    feature_s = fold_s = 0.0
    events: list[StateEvent] = []
    clock = time.perf_counter
    for kind, items in timed:
        if kind == "label":
            for label in items:
                book.fold_label(label)
            continue
        for event in items:
            a = clock()
            book.features(event)
            b = clock()
            book.fold_event(event)
            feature_s, fold_s = feature_s + b - a, fold_s + clock() - b
        events += items
    # the profile replays the first timed events against the state as it now stands: same entities, fuller windows
    sample = events[:PROFILE_EVENTS]
    profiler = cProfile.Profile()
    profiler.enable()
    for event in sample:
        book.features(event)
    profiler.disable()
    stats = pstats.Stats(profiler)
    total = stats.total_tt  # type: ignore[attr-defined]
    rows = []
    for (file, line, name), (_, calls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        if tottime / total > 0.02:
            rows.append((tottime, f"{name} ({Path(file).name}:{line}) calls={calls} self={100 * tottime / total:.0f}%"
                                  f" cum={100 * cumtime / total:.0f}%"))
    busy = [e for e in sample if e.entities.get("ip", "").startswith("busy")]
    others = [e for e in sample if not e.entities.get("ip", "").startswith("busy")]
    each = {}
    for label, group in (("busy-IP events", busy), ("other events", others)):
        started = clock()
        for event in group:
            book.features(event)
        each[label] = 1e6 * (clock() - started) / max(1, len(group))
    return {"features_us_per_event": 1e6 * feature_s / len(events), "fold_us_per_event": 1e6 * fold_s / len(events),
            "features_profile": [text for _, text in sorted(rows, reverse=True)],
            "features_us_each": each}


def markdown(report: dict) -> str:
    figures, parity = report["figures"], report["parity"]
    base = figures[BASELINE]["us_per_event"]
    lines = [
        f"# Live entity state, {report['started_at']}",
        "",
        f"Machine: {report['machine']}. {report['events']:,} events over 30 days; the last {TIMED_DAYS:.0f} days "
        f"timed in batches of {report['batch']} ({figures[BASELINE]['events']:,} events), every state in turn run by "
        f"run. Busiest entities (events in 30 days): {report['most_events_on_one_entity']}. 'vs base' is the "
        "baseline's time over the state's; 'features' compares with the book's, bit for bit.",
        "",
        "| state | us/event | batch p50 ms | batch p99 ms | GC share | round trips/batch | vs base | features |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, f in figures.items():
        p = parity[name]
        same = "identical" if p["bit_identical"] else (
            f"{p['bit_identical_share']:.1%} identical, max rel. diff {p['max_relative_difference']:.1e}")
        trips = ", ".join(map(str, f.get("round_trips_per_batch", []))) or "-"
        lines.append(f"| {name} | {f['us_per_event']:,.1f} | {f['batch_p50_ms']:.2f} | {f['batch_p99_ms']:.2f} | "
                     f"{f['gc_share']:.0%} | {trips} | {base / f['us_per_event']:.2f}x | {same} |")
    profile = report["book_profile"]
    lines += ["", f"EntityBook on the timed runs, per event: features {profile['features_us_per_event']:.1f} us, fold "
              f"{profile['fold_us_per_event']:.1f} us. Features of busy-IP events "
              f"{profile['features_us_each']['busy-IP events']:.1f} us each, others "
              f"{profile['features_us_each']['other events']:.1f} us.", "",
              "Profile of EntityBook.features (functions over 2% of its own time):", ""]
    lines += [f"- {row}" for row in profile["features_profile"]]
    lines += ["", *[f"- {note}" for note in report["notes"]], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=60_000, help="events over the 30 days")
    parser.add_argument("--batch", type=int, default=64, help="events per timed batch")
    parser.add_argument("--redis-url", default=None, help="a Redis server to use (default: start a throwaway one)")
    parser.add_argument("--no-redis", action="store_true", help="leave the Redis backend out")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.events < 100 or args.batch < 1:
        parser.error("--events must be at least 100 and --batch at least 1")

    started = datetime.now(timezone.utc)
    timeline = bench_timeline(args.events)
    warm, timed = split_runs(timeline, float(timeline.times.max()) - TIMED_DAYS * DAY, args.batch)
    import numba

    notes = [f"numpy {np.__version__}, numba {numba.__version__} (EntityBook's window_features)"]
    gc_clock = GcClock()
    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rc-state-bench-")))
        states: dict[str, EntityState] = {
            BASELINE: BookState(LAYOUT, PreviousEntityBook(LAYOUT)),
            "book": BookState(LAYOUT, EntityBook(LAYOUT)),
            "embedded, memory": EmbeddedEntityState(LAYOUT),
            "embedded, log": EmbeddedEntityState(LAYOUT, folder / "state.sqlite"),
        }
        redis_url, trips = args.redis_url, None
        if not args.no_redis:
            binary = redis_server_binary()
            if redis_url is None and binary is None:
                notes.append("redis left out: redis-server is not installed (`make redis`), and no --redis-url")
                print(notes[-1], file=sys.stderr)
            else:
                import redis

                from riskcascade.core.state_redis import RedisEntityState

                if redis_url is None:
                    redis_url = stack.enter_context(running_redis(binary))  # type: ignore[arg-type]
                trips = RoundTrips()
                states["redis"] = RedisEntityState(LAYOUT, redis_url, f"bench{int(time.time())}")
                notes.append(f"redis-py {redis.__version__}, hiredis parser: {bool(redis.utils.HIREDIS_AVAILABLE)}")
        for state in states.values():
            stack.callback(state.close)
        figures, features = measure(states, warm, timed, args.batch, gc_clock, trips,
                                    redis_url if "redis" in states else None)
        parity = compare_features(features)
    del features
    print("profiling EntityBook", flush=True)
    report = {
        "started_at": started.isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} CPUs, {os.uname().machine}, Python {sys.version.split()[0]}, "
                   f"load average {os.getloadavg()[0]:.1f} at the end",
        "events": args.events, "batch": args.batch, "layout": LAYOUT.to_json(), "busy_ips": BUSY_IPS,
        "busy_share": BUSY_SHARE,
        "most_events_on_one_entity": {link: int(np.unique(v, return_counts=True)[1].max())
                                      for link, v in timeline.entities.items()},
        "figures": figures, "parity": parity, "book_profile": profile_book(warm, timed), "notes": notes,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"entity-state-{started.strftime('%Y%m%dT%H%M%SZ')}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    print(f"results: {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

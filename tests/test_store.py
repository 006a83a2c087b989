"""The decision store on both backends, embedded SQLite and a real PostgreSQL server: durable group commit,
idempotent inserts (also between two stores on one database: two orchestrators), degraded rows decided again,
feedback integrity, retention, and a database that goes away."""

import asyncio
import random
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

import pytest

from orchestrator.store import (
    DecisionRecord,
    DecisionStore,
    FeedbackRecord,
    PostgresDecisionStore,
    SQLiteDecisionStore,
    StoreClosedError,
    StoreUnavailableError,
    open_decision_store,
    sweep_retention,
)
from riskcascade.core.config import StoreSettings
from tests.postgres_server import postgres_binaries_or_skip, postgres_server, postgres_url  # noqa: F401 - fixtures

# a store whose server is gone answers within this (a connect attempt is store.connect_timeout_s; 3x headroom)
GONE_PATIENCE_S = 60.0

Factory = Callable[..., DecisionStore]


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request) -> str:  # noqa: ANN001
    return request.param


@pytest.fixture
def make_store(backend: str, tmp_path, request) -> Factory:  # noqa: ANN001
    """Opens stores on one location of the backend under test (a SQLite file, or a fresh PostgreSQL database)."""
    if backend == "sqlite":
        path = tmp_path / "d.sqlite"
        return lambda **kw: SQLiteDecisionStore(path, **kw)
    url = request.getfixturevalue("postgres_url")
    return lambda **kw: PostgresDecisionStore(url, **kw)


def record(rid: str, fp: str = "f1", degraded: bool = False, decided_at: str = "2026-01-01T00:00:00+00:00",
           payload: bytes | None = None) -> DecisionRecord:
    return DecisionRecord(rid, fp, "approve", 0.1, "fast_model", "order", degraded, decided_at,
                          payload if payload is not None else b"x" + rid.encode())


def test_settings_choose_the_backend(tmp_path, postgres_url):  # noqa: F811
    sqlite = open_decision_store(StoreSettings(sqlite_path=tmp_path / "d.sqlite"))
    postgres = open_decision_store(StoreSettings(url=postgres_url, sqlite_path=tmp_path / "unused.sqlite"))
    try:
        assert isinstance(sqlite, SQLiteDecisionStore) and isinstance(postgres, PostgresDecisionStore)
        assert not (tmp_path / "unused.sqlite").exists()
    finally:
        sqlite.close()
        postgres.close()
    with pytest.raises(ValueError, match="store.url"):
        StoreSettings(url="mysql://somewhere/db")


def test_concurrent_writes_all_land_and_survive_reopen(make_store):
    async def write_many():
        store = make_store(max_group_commit=16)
        results = await asyncio.gather(*(store.put_decision(record(f"r{i}")) for i in range(200)))
        store.close()
        return results

    results = asyncio.run(write_many())
    assert all(inserted for _, inserted in results)
    reopened = make_store()
    try:
        assert reopened.count_decisions() == 200
        assert reopened.get_decision("r17").payload == b"xr17"
    finally:
        reopened.close()


def test_first_writer_wins(make_store):
    async def go():
        store = make_store()
        first = await store.put_decision(record("same", "fp-a"))
        second = await store.put_decision(record("same", "fp-b"))
        store.close()
        return first, second

    (a, inserted_a), (b, inserted_b) = asyncio.run(go())
    assert inserted_a and not inserted_b
    assert b.fingerprint == "fp-a"  # the stored one comes back


def test_a_degraded_decision_is_decided_again_and_a_complete_one_never(make_store):
    async def go():
        store = make_store()
        await store.put_decision(record("d", degraded=True, payload=b"fallback"))
        again, replaced = await store.put_decision(record("d", payload=b"complete"))
        late, late_written = await store.put_decision(record("d", degraded=True, payload=b"late fallback"))
        other, other_written = await store.put_decision(record("d", fp="another request", payload=b"other"))
        store.close()
        return again, replaced, late, late_written, other, other_written

    again, replaced, late, late_written, other, other_written = asyncio.run(go())
    assert replaced and again.payload == b"complete" and again.attempts == 2 and not again.degraded
    assert not late_written and late.payload == b"complete"
    assert not other_written and other.fingerprint == "f1"


def test_feedback_needs_a_decision_and_is_idempotent(make_store):
    async def go():
        store = make_store()
        fb = FeedbackRecord("fb1", "r1", "fraud", "collusion", "note", "2026-01-02T00:00:00+00:00")
        with pytest.raises(KeyError):
            await store.put_feedback(fb)
        await store.put_decision(record("r1"))
        _, first = await store.put_feedback(fb)
        stored, again = await store.put_feedback(FeedbackRecord("fb1", "r1", "legit", "", "", "2026-01-03"))
        rows = store.feedback_for("r1")
        store.close()
        return first, again, stored, rows

    first, again, stored, rows = asyncio.run(go())
    assert first and not again and stored.outcome == "fraud"  # the first one stays
    assert len(rows) == 1 and rows[0].risk_type == "collusion"


def test_closed_store_refuses_writes(make_store):
    async def go():
        store = make_store()
        store.close()
        await store.put_decision(record("late"))

    with pytest.raises(StoreClosedError):
        asyncio.run(go())


def test_concurrent_reads_share_one_query_and_each_gets_its_own_row(make_store, monkeypatch):
    queries: list[list[str]] = []
    original = DecisionStore._pooled_reads

    def counted(self, request_ids):  # noqa: ANN001, ANN202
        queries.append(list(request_ids))
        return original(self, request_ids)

    monkeypatch.setattr(DecisionStore, "_pooled_reads", counted)

    async def go():
        store = make_store(read_threads=1)
        await asyncio.gather(*(store.put_decision(record(f"r{i}")) for i in range(0, 600, 2)))
        wanted = [f"r{i}" for i in range(600)] + ["r4"]  # more than one query's parameters, and a repeat
        found = await asyncio.gather(*(store.aget_decision(rid) for rid in wanted))
        store.close()
        return wanted, found

    wanted, found = asyncio.run(go())
    for rid, row in zip(wanted, found):
        number = int(rid[1:])
        assert (row is None) == (number % 2 == 1)
        assert row is None or (row.request_id == rid and row.payload == b"x" + rid.encode())
    assert len(queries) < 10  # 601 concurrent reads took a few queries, not 601 thread hops
    assert sum(len(q) for q in queries) == len(wanted)


def test_two_stores_on_one_database_decide_each_duplicate_once(make_store):
    """Two orchestrators' stores on one database, each writing the same 300 requests (their own payloads) at once,
    in opposite orders and in group commits: every request has one stored decision, exactly one writer was told
    it wrote it, and both were handed that decision."""
    ids = [f"dup-{i}" for i in range(300)]

    async def go():
        a, b = make_store(max_group_commit=32), make_store(max_group_commit=32)
        try:
            order_b = list(reversed(ids))
            random.Random(7).shuffle(order_b[:100])
            got_a, got_b = await asyncio.gather(
                asyncio.gather(*(a.put_decision(record(i, payload=b"A")) for i in ids)),
                asyncio.gather(*(b.put_decision(record(i, payload=b"B")) for i in order_b)),
            )
            stored = await a.aget_decisions(ids)
            return dict(zip(ids, got_a)), dict(zip(order_b, got_b)), stored, a.count_decisions()
        finally:
            a.close()
            b.close()

    by_a, by_b, stored, count = asyncio.run(go())
    assert count == len(ids)
    for rid, row in zip(ids, stored):
        (seen_a, wrote_a), (seen_b, wrote_b) = by_a[rid], by_b[rid]
        assert wrote_a != wrote_b, rid  # exactly one of them wrote it
        assert seen_a.payload == seen_b.payload == row.payload, rid  # both answered with the stored decision


def test_retention_deletes_old_decisions_with_their_feedback_and_frees_their_ids(make_store):
    now = datetime(2026, 6, 1, tzinfo=timezone.utc)
    old = (now - timedelta(days=40)).isoformat()
    recent = (now - timedelta(days=1)).isoformat()
    settings = StoreSettings(retention_s=30 * 86400, retention_sweep_interval_s=3600, retention_sweep_batch=7)

    async def go():
        store = make_store(prune_batch=settings.retention_sweep_batch)
        for i in range(20):
            await store.put_decision(record(f"old-{i}", decided_at=old))
            await store.put_decision(record(f"new-{i}", decided_at=recent))
        await store.put_feedback(FeedbackRecord("fb-old", "old-3", "fraud", "", "", old))
        await store.put_feedback(FeedbackRecord("fb-new", "new-3", "fraud", "", "", recent))
        sweeper = asyncio.create_task(sweep_retention(store, settings, now=lambda: now))
        deadline = time.monotonic() + GONE_PATIENCE_S
        while store.count_decisions() > 20 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        sweeper.cancel()
        left = await store.aget_decisions([f"old-{i}" for i in range(20)] + [f"new-{i}" for i in range(20)])
        feedback = store.feedback_for("old-3"), store.feedback_for("new-3")
        with pytest.raises(KeyError):  # feedback for a pruned decision: it is unknown now
            await store.put_feedback(FeedbackRecord("fb-late", "old-4", "fraud", "", "", recent))
        reused, written = await store.put_decision(record("old-5", fp="a new request", decided_at=recent))
        store.close()
        return left, feedback, reused, written

    left, (old_feedback, new_feedback), reused, written = asyncio.run(go())
    assert all(row is None for row in left[:20]) and all(row is not None for row in left[20:])
    assert old_feedback == [] and [f.feedback_id for f in new_feedback] == ["fb-new"]
    assert written and reused.fingerprint == "a new request"  # past retention the id is no longer a key


def test_a_postgres_connection_cut_by_the_server_is_replaced(postgres_url):  # noqa: F811
    import psycopg

    async def go():
        store = PostgresDecisionStore(postgres_url, read_threads=1)
        try:
            await store.put_decision(record("before"))
            assert await store.aget_decision("before") is not None
            with psycopg.connect(postgres_url, autocommit=True) as admin:  # an administrator (or a failover) cuts it
                cut = admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                    "WHERE datname = current_database() AND pid <> pg_backend_pid()").fetchone()[0]
            written = await store.put_decision(record("after"))
            return cut, written, await store.aget_decision("before"), store.get_decision("after")
        finally:
            store.close()

    cut, (_, written), before, after = asyncio.run(go())
    assert cut >= 2  # the writer's and the readers' connections were all cut
    assert written and before is not None and after is not None


def test_a_postgres_server_that_is_gone_is_unavailable_not_empty():
    """Reads and writes against a stopped server fail with StoreUnavailableError (the gateway answers UNAVAILABLE)
    in bounded time: a missing decision is never reported for a database that could not be asked."""
    from loadtest.postgres_process import running_postgres

    binaries = postgres_binaries_or_skip()

    async def go():
        with running_postgres(binaries) as url:
            store = PostgresDecisionStore(url, connect_timeout_s=1, write_retries=1)
            await store.put_decision(record("kept"))
        started = time.monotonic()  # the server has stopped
        try:
            with pytest.raises(StoreUnavailableError):
                await store.aget_decision("kept")
            with pytest.raises(StoreUnavailableError):
                await store.put_decision(record("lost"))
            with pytest.raises(StoreUnavailableError):
                store.count_decisions()
            return time.monotonic() - started
        finally:
            store.close()

    assert asyncio.run(go()) < GONE_PATIENCE_S

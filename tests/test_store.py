"""The SQLite decision store: durable group commit, idempotent inserts, feedback integrity."""

import asyncio

import pytest

from orchestrator.store import DecisionRecord, DecisionStore, FeedbackRecord


def record(rid: str, fp: str = "f1") -> DecisionRecord:
    return DecisionRecord(rid, fp, "approve", 0.1, "fast_model", "order", False, "2026-01-01T00:00:00+00:00", b"x" + rid.encode())


def test_concurrent_writes_all_land_and_survive_reopen(tmp_path):
    path = tmp_path / "d.sqlite"

    async def write_many():
        store = DecisionStore(path, "FULL", max_group_commit=16)
        results = await asyncio.gather(*(store.put_decision(record(f"r{i}")) for i in range(200)))
        store.close()
        return results

    results = asyncio.run(write_many())
    assert all(inserted for _, inserted in results)
    reopened = DecisionStore(path)
    assert reopened.count_decisions() == 200
    assert reopened.get_decision("r17").payload == b"xr17"
    reopened.close()


def test_first_writer_wins(tmp_path):
    async def go():
        store = DecisionStore(tmp_path / "d.sqlite")
        first = await store.put_decision(record("same", "fp-a"))
        second = await store.put_decision(record("same", "fp-b"))
        store.close()
        return first, second

    (a, inserted_a), (b, inserted_b) = asyncio.run(go())
    assert inserted_a and not inserted_b
    assert b.fingerprint == "fp-a"  # the stored one comes back


def test_feedback_needs_a_decision_and_is_idempotent(tmp_path):
    async def go():
        store = DecisionStore(tmp_path / "d.sqlite")
        fb = FeedbackRecord("fb1", "r1", "fraud", "collusion", "note", "2026-01-02T00:00:00+00:00")
        with pytest.raises(KeyError):
            await store.put_feedback(fb)
        await store.put_decision(record("r1"))
        _, first = await store.put_feedback(fb)
        _, again = await store.put_feedback(fb)
        rows = store.feedback_for("r1")
        store.close()
        return first, again, rows

    first, again, rows = asyncio.run(go())
    assert first and not again and len(rows) == 1 and rows[0].risk_type == "collusion"


def test_closed_store_refuses_writes(tmp_path):
    from orchestrator.store import StoreClosedError

    async def go():
        store = DecisionStore(tmp_path / "d.sqlite")
        store.close()
        await store.put_decision(record("late"))

    with pytest.raises(StoreClosedError):
        asyncio.run(go())


def test_concurrent_reads_share_one_query_and_each_gets_its_own_row(tmp_path, monkeypatch):
    queries: list[list[str]] = []
    original = DecisionStore._pooled_reads

    def counted(self, request_ids):  # noqa: ANN001, ANN202
        queries.append(list(request_ids))
        return original(self, request_ids)

    monkeypatch.setattr(DecisionStore, "_pooled_reads", counted)

    async def go():
        store = DecisionStore(tmp_path / "d.sqlite", read_threads=1)
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

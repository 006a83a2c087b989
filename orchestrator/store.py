"""The decision and feedback store (embedded default: SQLite), durable before the caller is answered.

Writes go through one writer thread that commits whatever is queued in a single transaction (group commit):
each caller awaits its own write, so nothing is acknowledged before it is on disk, yet concurrent decisions
share one fsync instead of paying one each. The queue is bounded (a write past ``max_pending_writes`` is refused at
once with StoreBusyError) and the writer survives any failure of one batch (that batch's callers get the error,
later writes go on). Reads run in a small pool of threads, each with its own connection (WAL mode lets them run
beside the writer): the async ``aget_decision`` never touches the caller's event loop.

The decision row is the audit record: besides the answer it holds the event exactly as decided (``event``: the
request's ``risk.v1.Event``, its time stamped when the caller sent none), so feedback can reach every entity of
the event and recorded traffic can be replayed.

Idempotency: a decision row is keyed by request_id and carries a fingerprint of the request. Inserting a
request_id that exists returns the stored row instead (the first complete decision wins), so concurrent retries
across processes still agree on one decision. A degraded row (a fallback: a stage failed or time ran out) is
provisional: a later decision of the same request replaces it (``attempts`` counts them), a complete one never is.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import queue
import sqlite3
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from orchestrator.batching import MicroBatcher
from riskcascade.core.domain import ShadowDecision

# SQLite's default limit on host parameters in one statement is 32766 (999 before 3.32): stay well under both
_MAX_QUERY_PARAMETERS = 500

_SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions (
    request_id   TEXT PRIMARY KEY,
    fingerprint  TEXT NOT NULL,
    action       TEXT NOT NULL,
    risk_score   REAL NOT NULL,
    decided_by   TEXT NOT NULL,
    event_type   TEXT NOT NULL,
    degraded     INTEGER NOT NULL,
    decided_at   TEXT NOT NULL,
    payload      BLOB NOT NULL,
    event        BLOB NOT NULL DEFAULT x'',
    attempts     INTEGER NOT NULL DEFAULT 1,
    shadow       TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS feedback (
    feedback_id  TEXT PRIMARY KEY,
    request_id   TEXT NOT NULL REFERENCES decisions(request_id),
    outcome      TEXT NOT NULL,
    risk_type    TEXT NOT NULL,
    note         TEXT NOT NULL,
    recorded_at  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS feedback_by_request ON feedback(request_id);
"""


@dataclass(frozen=True)
class DecisionRecord:
    request_id: str
    fingerprint: str
    action: str
    risk_score: float
    decided_by: str
    event_type: str
    degraded: bool
    decided_at: str
    payload: bytes  # the serialized answer, returned as-is on replay
    event: bytes = b""  # the serialized risk.v1.Event as decided (time stamped); empty in rows of older versions
    attempts: int = 1  # decisions made for this request_id: more than one when degraded ones were decided again
    shadow: str = ""  # JSON of the shadow candidate's decision (ShadowDecision), recorded only; "" = no shadow


@dataclass(frozen=True)
class FeedbackRecord:
    feedback_id: str
    request_id: str
    outcome: str
    risk_type: str
    note: str
    recorded_at: str


class StoreClosedError(RuntimeError):
    pass


class StoreBusyError(RuntimeError):
    """The write queue is full: the store is not keeping up (or is stalled); refused at once, not queued."""


class DecisionStore:
    def __init__(
        self,
        path: Path,
        synchronous: str = "FULL",
        max_group_commit: int = 256,
        max_pending_writes: int = 4096,
        read_threads: int = 2,
        max_read_batch: int = 256,
    ):
        self._path = Path(path)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._synchronous = synchronous
        self._max_group = max_group_commit
        self._writes: queue.Queue[Any] = queue.Queue(maxsize=max_pending_writes)
        self._reader = self._connect()
        self._reader_lock = threading.Lock()
        self._local = threading.local()
        self._read_pool = ThreadPoolExecutor(max_workers=read_threads, thread_name_prefix="decision-store-read")
        self._reads: MicroBatcher[str, DecisionRecord | None] = MicroBatcher(
            self.aget_decisions, max_batch_size=max_read_batch, max_in_flight=read_threads
        )
        self._closed = False
        writer = self._connect()
        writer.executescript(_SCHEMA)
        columns = {row[1] for row in writer.execute("PRAGMA table_info(decisions)")}
        if "event" not in columns:  # a store written before decisions recorded their event
            writer.execute("ALTER TABLE decisions ADD COLUMN event BLOB NOT NULL DEFAULT x''")
        if "attempts" not in columns:  # a store written before degraded decisions could be decided again
            writer.execute("ALTER TABLE decisions ADD COLUMN attempts INTEGER NOT NULL DEFAULT 1")
        if "shadow" not in columns:  # a store written before shadow decisions were recorded
            writer.execute("ALTER TABLE decisions ADD COLUMN shadow TEXT NOT NULL DEFAULT ''")
        self._writer_thread = threading.Thread(
            target=self._write_loop, args=(writer,), name="decision-store-writer", daemon=True
        )
        self._writer_thread.start()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        conn.execute("PRAGMA busy_timeout=5000")
        return conn

    # -- writes ---------------------------------------------------------------------------------------------

    async def put_decision(self, record: DecisionRecord) -> tuple[DecisionRecord, bool]:
        """Persist ``record``; returns (stored record, written). Written: the row is ``record`` (new, or it replaced
        a degraded row of the same request). Not written: a complete decision (or another request's) holds the id."""
        return await self._submit(("decision", record))

    async def put_feedback(self, record: FeedbackRecord) -> tuple[FeedbackRecord, bool]:
        """Persist feedback; returns (stored record, inserted). Raises KeyError if the decision is unknown."""
        return await self._submit(("feedback", record))

    async def _submit(self, op: tuple[str, Any]) -> Any:
        if self._closed:
            raise StoreClosedError("decision store is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        try:
            self._writes.put_nowait((op, loop, future))
        except queue.Full:
            raise StoreBusyError(
                f"decision store has {self._writes.maxsize} writes waiting (max_pending_writes)"
            ) from None
        return await future

    def _write_loop(self, conn: sqlite3.Connection) -> None:
        stopping = False
        while not stopping:
            item = self._writes.get()
            if item is None:
                break
            batch = [item]
            while len(batch) < self._max_group:
                try:
                    nxt = self._writes.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    break
                batch.append(nxt)
            self._commit(conn, batch)
        conn.close()

    def _commit(self, conn: sqlite3.Connection, batch: list[Any]) -> None:
        results: list[tuple[bool, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for (kind, record), _, _ in batch:
                try:
                    results.append((True, self._apply(conn, kind, record)))
                except KeyError as exc:
                    results.append((False, exc))
            conn.execute("COMMIT")
        except Exception as exc:  # noqa: BLE001 - any failure fails this batch's writes, never the writer thread
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            results = [(False, exc)] * len(batch)
        for (_, loop, future), (ok, value) in zip(batch, results):
            loop.call_soon_threadsafe(_resolve, future, ok, value)

    @staticmethod
    def _apply(conn: sqlite3.Connection, kind: str, record: Any) -> tuple[Any, bool]:
        if kind == "decision":
            cur = conn.execute(
                "INSERT OR IGNORE INTO decisions (request_id, fingerprint, action, risk_score, decided_by, event_type,"
                " degraded, decided_at, payload, event, attempts, shadow) VALUES (?,?,?,?,?,?,?,?,?,?,1,?)",
                (record.request_id, record.fingerprint, record.action, record.risk_score, record.decided_by,
                 record.event_type, int(record.degraded), record.decided_at, record.payload, record.event,
                 record.shadow),
            )
            if cur.rowcount == 1:
                return dataclasses.replace(record, attempts=1), True
            # a degraded row of the same request is provisional: a new decision of it takes its place
            cur = conn.execute(
                "UPDATE decisions SET action=?, risk_score=?, decided_by=?, degraded=?, decided_at=?, payload=?, "
                "event=?, shadow=?, attempts=attempts+1 WHERE request_id=? AND fingerprint=? AND degraded=1",
                (record.action, record.risk_score, record.decided_by, int(record.degraded), record.decided_at,
                 record.payload, record.event, record.shadow, record.request_id, record.fingerprint),
            )
            return _select_decision(conn, record.request_id), cur.rowcount == 1
        exists = conn.execute("SELECT 1 FROM decisions WHERE request_id=?", (record.request_id,)).fetchone()
        if exists is None:
            raise KeyError(record.request_id)
        cur = conn.execute(
            "INSERT OR IGNORE INTO feedback VALUES (?,?,?,?,?,?)",
            (record.feedback_id, record.request_id, record.outcome, record.risk_type, record.note,
             record.recorded_at),
        )
        if cur.rowcount == 1:
            return record, True
        row = conn.execute("SELECT * FROM feedback WHERE feedback_id=?", (record.feedback_id,)).fetchone()
        return FeedbackRecord(*row), False

    # -- reads ----------------------------------------------------------------------------------------------

    def get_decision(self, request_id: str) -> DecisionRecord | None:
        """Blocking read, for threads and tools; an event loop uses ``aget_decision``."""
        with self._reader_lock:
            return _select_decision(self._reader, request_id)

    async def aget_decision(self, request_id: str) -> DecisionRecord | None:
        """The stored decision of ``request_id``, read in the store's read pool (never on the event loop).
        Concurrent reads share one query (``aget_decisions``): one thread hop per batch, not per read."""
        if self._closed:
            raise StoreClosedError("decision store is closed")
        return await self._reads.submit(request_id, None)

    async def aget_decisions(self, request_ids: Sequence[str], _timeout_s: float | None = None,
                             ) -> list[DecisionRecord | None]:
        """The stored decisions of ``request_ids`` (None where there is none), in order, with one query in the read
        pool (the servicer coalesces concurrent reads into it; the unused second argument is the batcher's
        timeout: a read has no limit of its own)."""
        if self._closed:
            raise StoreClosedError("decision store is closed")
        return await asyncio.get_running_loop().run_in_executor(self._read_pool, self._pooled_reads, request_ids)

    def _pooled_reads(self, request_ids: Sequence[str]) -> list[DecisionRecord | None]:
        conn = self._pooled_connection()
        found: dict[str, DecisionRecord] = {}
        unique = list(dict.fromkeys(request_ids))
        for start in range(0, len(unique), _MAX_QUERY_PARAMETERS):
            chunk = unique[start:start + _MAX_QUERY_PARAMETERS]
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM decisions WHERE request_id IN ({','.join('?' * len(chunk))})", chunk
            ).fetchall()
            found.update((row[0], _decision_from_row(row)) for row in rows)
        return [found.get(request_id) for request_id in request_ids]

    def _pooled_connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        return conn

    def feedback_for(self, request_id: str) -> list[FeedbackRecord]:
        with self._reader_lock:
            rows = self._reader.execute(
                "SELECT * FROM feedback WHERE request_id=? ORDER BY recorded_at", (request_id,)
            ).fetchall()
        return [FeedbackRecord(*row) for row in rows]

    def count_decisions(self) -> int:
        with self._reader_lock:
            return self._reader.execute("SELECT COUNT(*) FROM decisions").fetchone()[0]

    def close(self) -> None:
        """Finish queued writes, then close. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._writes.put(None)  # blocking put: the writer drains the queue, so room comes
        self._writer_thread.join()
        self._read_pool.shutdown(wait=True)
        with self._reader_lock:
            self._reader.close()


def _resolve(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.cancelled():
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


_COLUMNS = ("request_id, fingerprint, action, risk_score, decided_by, event_type, degraded, decided_at, payload, "
            "event, attempts, shadow")


def _select_decision(conn: sqlite3.Connection, request_id: str) -> DecisionRecord | None:
    row = conn.execute(f"SELECT {_COLUMNS} FROM decisions WHERE request_id=?", (request_id,)).fetchone()
    return _decision_from_row(row) if row else None


def _decision_from_row(row: tuple) -> DecisionRecord:
    return DecisionRecord(row[0], row[1], row[2], row[3], row[4], row[5], bool(row[6]), row[7], row[8], row[9],
                          row[10], row[11])


def shadow_json(shadow: ShadowDecision | None) -> str:
    """The shadow column's value: the candidate's decision as JSON, or "" without one."""
    if shadow is None:
        return ""
    return json.dumps({**dataclasses.asdict(shadow), "action": shadow.action.value}, sort_keys=True)


def utc_now() -> datetime:
    return datetime.now(timezone.utc)

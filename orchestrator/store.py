"""The decision and feedback store, durable before the caller is answered: SQLite embedded (the default) or a
PostgreSQL server shared by several orchestrators (``store.url``). One interface, two backends, one suite of tests.

Writes go through one writer thread that commits whatever is queued in a single transaction (group commit):
each caller awaits its own write, so nothing is acknowledged before it is committed, yet concurrent decisions
share one commit instead of paying one each. The queue is bounded (a write past ``max_pending_writes`` is refused at
once with StoreBusyError) and the writer survives any failure of one batch (that batch's callers get the error,
later writes go on). Reads run in a small pool of threads, each with its own connection: the async
``aget_decision`` never touches the caller's event loop. (The drivers are blocking ones, sqlite3 and psycopg 3, in
bounded threads: the same writer and readers serve both backends, on any event loop.)

The decision row is the audit record: besides the answer it holds the event exactly as decided (``event``: the
request's ``risk.v1.Event``, its time stamped when the caller sent none), so feedback can reach every entity of
the event and recorded traffic can be replayed.

Idempotency: a decision row is keyed by request_id and carries a fingerprint of the request. Inserting a
request_id that exists returns the stored row instead (the first complete decision wins), so concurrent retries
across processes, and across orchestrators sharing one PostgreSQL database, still agree on one decision. A degraded
row (a fallback: a stage failed or time ran out) is provisional: a later decision of the same request replaces it
(``attempts`` counts them), a complete one never is.

Retention (``store.retention_s``): ``prune(before)`` deletes decisions decided before a time, with their feedback,
in bounded transactions. A pruned request_id is no longer an idempotency key: it may be decided again, and feedback
for it is NOT_FOUND.

PostgreSQL specifics: the writer sorts each batch by request_id (the order of one request's writes is kept), so two
orchestrators' batches lock rows in one order; a batch the server still aborts (deadlock, serialization failure) or
whose connection broke is retried whole, up to ``store.write_retries`` times, on a fresh connection where needed
(every write is idempotent: insert-if-absent, replace-if-degraded). The schema is created under an advisory lock, so
orchestrators starting together do not race on it.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import json
import logging
import queue
import re
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.batching import MicroBatcher
from riskcascade.core.domain import ShadowDecision

if TYPE_CHECKING:
    from riskcascade.core.config import StoreSettings

log = logging.getLogger(__name__)

# SQLite's default limit on host parameters in one statement is 32766 (999 before 3.32): stay well under both
_MAX_QUERY_PARAMETERS = 500

# One schema, two dialects (the column types below). decided_at holds ISO-8601 UTC text on both backends, so times
# compare and sort the same way in each.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions (
    request_id   TEXT PRIMARY KEY,
    fingerprint  TEXT NOT NULL,
    action       TEXT NOT NULL,
    risk_score   {real} NOT NULL,
    decided_by   TEXT NOT NULL,
    event_type   TEXT NOT NULL,
    degraded     INTEGER NOT NULL,
    decided_at   TEXT NOT NULL,
    payload      {blob} NOT NULL,
    event        {blob} NOT NULL DEFAULT {empty_blob},
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
CREATE INDEX IF NOT EXISTS decisions_by_time ON decisions(decided_at);
"""
_SQLITE_SCHEMA = _SCHEMA.format(real="REAL", blob="BLOB", empty_blob="x''")
_POSTGRES_SCHEMA = _SCHEMA.format(real="DOUBLE PRECISION", blob="BYTEA", empty_blob="''")
# an arbitrary constant: the advisory lock orchestrators take while creating the schema
_SCHEMA_LOCK_KEY = 0x7269736B


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


class StoreUnavailableError(RuntimeError):
    """The database failed a read or a write (its server is gone, say): answered UNAVAILABLE, never taken
    for "not found" or "written"."""


_COLUMNS = ("request_id, fingerprint, action, risk_score, decided_by, event_type, degraded, decided_at, payload, "
            "event, attempts, shadow")
_INSERT_DECISION = (
    "INSERT INTO decisions (request_id, fingerprint, action, risk_score, decided_by, event_type, degraded, "
    "decided_at, payload, event, attempts, shadow) VALUES (?,?,?,?,?,?,?,?,?,?,1,?) ON CONFLICT (request_id) DO NOTHING"
)
# a degraded row of the same request is provisional: a new decision of it takes its place
_REPLACE_DEGRADED = (
    "UPDATE decisions SET action=?, risk_score=?, decided_by=?, degraded=?, decided_at=?, payload=?, event=?, "
    "shadow=?, attempts=attempts+1 WHERE request_id=? AND fingerprint=? AND degraded=1"
)
_INSERT_FEEDBACK = (
    "INSERT INTO feedback (feedback_id, request_id, outcome, risk_type, note, recorded_at) VALUES (?,?,?,?,?,?) "
    "ON CONFLICT (feedback_id) DO NOTHING"
)
_FEEDBACK_COLUMNS = "feedback_id, request_id, outcome, risk_type, note, recorded_at"


class DecisionStore(abc.ABC):
    """The store's interface and its thread machinery; a backend says how to connect, begin, commit and query."""

    # the backend's placeholder for one parameter (SQL below is written with "?")
    _placeholder = "?"
    # times a batch the database aborted is committed again (where ``_retryable`` says it may be)
    write_retries = 0
    # the driver's errors: a read that raises one raises StoreUnavailableError
    _errors: tuple[type[BaseException], ...] = (sqlite3.Error,)

    def __init__(self, max_group_commit: int = 256, max_pending_writes: int = 4096, read_threads: int = 2,
                 max_read_batch: int = 256, prune_batch: int = 1000):
        self._max_group = max_group_commit
        self._prune_batch = prune_batch
        self._writes: queue.Queue[Any] = queue.Queue(maxsize=max_pending_writes)
        self._connections: list[Any] = []
        self._connections_lock = threading.Lock()
        self._reader = self._open()
        self._reader_lock = threading.Lock()
        self._local = threading.local()
        self._read_pool = ThreadPoolExecutor(max_workers=read_threads, thread_name_prefix="decision-store-read")
        self._reads: MicroBatcher[str, DecisionRecord | None] = MicroBatcher(
            self.aget_decisions, max_batch_size=max_read_batch, max_in_flight=read_threads
        )
        self._closed = False
        writer = self._open()
        self._create_schema(writer)
        self._writer_thread = threading.Thread(
            target=self._write_loop, args=(writer,), name="decision-store-writer", daemon=True
        )
        self._writer_thread.start()

    # -- what a backend provides ----------------------------------------------------------------------------

    @abc.abstractmethod
    def _connect(self) -> Any:
        """A new DB-API connection, outside any transaction (autocommit: the writer opens its own)."""

    @abc.abstractmethod
    def _create_schema(self, conn: Any) -> None:
        """Create the tables, or bring an older store's up to date."""

    @abc.abstractmethod
    def _begin(self, conn: Any) -> None: ...

    def _retryable(self, exc: BaseException) -> bool:
        """Whether a failed batch may be committed again (on a fresh connection if ``_usable`` says so)."""
        return False

    def _usable(self, conn: Any) -> bool:
        return True

    @abc.abstractmethod
    def _in_list(self, column: str, values: Sequence[str]) -> tuple[str, tuple[Any, ...]]:
        """A WHERE condition ``column`` is one of ``values`` and its parameters."""

    def _sql(self, statement: str) -> str:
        return statement if self._placeholder == "?" else statement.replace("?", self._placeholder)

    def _open(self) -> Any:
        conn = self._connect()
        with self._connections_lock:
            self._connections.append(conn)
        return conn

    def _discard(self, conn: Any) -> None:
        with self._connections_lock:
            if conn in self._connections:
                self._connections.remove(conn)
        try:
            conn.close()
        except Exception:  # noqa: BLE001 - a broken connection may fail to close; it is dropped either way
            pass

    # -- writes ---------------------------------------------------------------------------------------------

    async def put_decision(self, record: DecisionRecord) -> tuple[DecisionRecord, bool]:
        """Persist ``record``; returns (stored record, written). Written: the row is ``record`` (new, or it replaced
        a degraded row of the same request). Not written: a complete decision (or another request's) holds the id."""
        return await self._submit(("decision", record))

    async def put_feedback(self, record: FeedbackRecord) -> tuple[FeedbackRecord, bool]:
        """Persist feedback; returns (stored record, inserted). Raises KeyError if the decision is unknown."""
        return await self._submit(("feedback", record))

    async def prune(self, before: datetime) -> int:
        """Delete the decisions decided before ``before`` (and their feedback); returns how many. Runs in the writer,
        ``store.retention_sweep_batch`` rows per transaction, between other writes."""
        removed = 0
        while True:
            batch = await self._submit(("prune", before.astimezone(timezone.utc).isoformat()))
            removed += batch
            if batch < self._prune_batch:
                return removed

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

    def _write_loop(self, conn: Any) -> None:
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
            conn = self._commit(conn, batch)
        self._discard(conn)

    def _commit(self, conn: Any, batch: list[Any]) -> Any:
        """Apply ``batch`` in one transaction and settle its callers; returns the connection to go on with."""
        # one lock order for every writer of a shared database; a stable sort keeps one request's writes in order
        ordered = sorted(batch, key=lambda item: _key(item[0]))
        attempt = 0
        while True:
            try:
                if not self._usable(conn):
                    self._discard(conn)
                    conn = self._open()
                results = self._apply_all(conn, [op for op, _, _ in ordered])
                break
            except Exception as exc:  # noqa: BLE001 - any failure fails this batch's writes, never the writer thread
                self._rollback(conn)
                if self._retryable(exc) and attempt < self.write_retries:
                    attempt += 1
                    continue
                failure = StoreUnavailableError(f"decision store write failed: {exc}") if isinstance(
                    exc, self._errors) else exc
                results = [(False, failure)] * len(ordered)
                break
        for (_, loop, future), (ok, value) in zip(ordered, results):
            loop.call_soon_threadsafe(_resolve, future, ok, value)
        return conn

    def _apply_all(self, conn: Any, ops: list[tuple[str, Any]]) -> list[tuple[bool, Any]]:
        results: list[tuple[bool, Any]] = []
        self._begin(conn)
        for kind, record in ops:
            try:
                results.append((True, self._apply(conn, kind, record)))
            except KeyError as exc:
                results.append((False, exc))
        conn.execute("COMMIT")
        return results

    def _rollback(self, conn: Any) -> None:
        try:
            conn.execute("ROLLBACK")
        except Exception:  # noqa: BLE001 - no transaction open, or the connection is gone: nothing to undo
            pass

    def _apply(self, conn: Any, kind: str, record: Any) -> Any:
        sql = self._sql
        if kind == "decision":
            cur = conn.execute(sql(_INSERT_DECISION), (
                record.request_id, record.fingerprint, record.action, record.risk_score, record.decided_by,
                record.event_type, int(record.degraded), record.decided_at, record.payload, record.event,
                record.shadow))
            if cur.rowcount == 1:
                return dataclasses.replace(record, attempts=1), True
            cur = conn.execute(sql(_REPLACE_DEGRADED), (
                record.action, record.risk_score, record.decided_by, int(record.degraded), record.decided_at,
                record.payload, record.event, record.shadow, record.request_id, record.fingerprint))
            return self._select_decision(conn, record.request_id), cur.rowcount == 1
        if kind == "prune":
            return self._prune(conn, record)
        exists = conn.execute(sql("SELECT 1 FROM decisions WHERE request_id=?"), (record.request_id,)).fetchone()
        if exists is None:
            raise KeyError(record.request_id)
        cur = conn.execute(sql(_INSERT_FEEDBACK), (
            record.feedback_id, record.request_id, record.outcome, record.risk_type, record.note, record.recorded_at))
        if cur.rowcount == 1:
            return record, True
        row = conn.execute(sql(f"SELECT {_FEEDBACK_COLUMNS} FROM feedback WHERE feedback_id=?"),
                           (record.feedback_id,)).fetchone()
        return FeedbackRecord(*row), False

    def _prune(self, conn: Any, before: str) -> int:
        sql = self._sql
        ids = [row[0] for row in conn.execute(
            sql("SELECT request_id FROM decisions WHERE decided_at < ? ORDER BY request_id LIMIT ?"),
            (before, self._prune_batch)).fetchall()]
        if not ids:
            return 0
        condition, params = self._in_list("request_id", ids)
        conn.execute(f"DELETE FROM feedback WHERE {condition}", params)
        return conn.execute(f"DELETE FROM decisions WHERE {condition}", params).rowcount

    # -- reads ----------------------------------------------------------------------------------------------

    def get_decision(self, request_id: str) -> DecisionRecord | None:
        """Blocking read, for threads and tools; an event loop uses ``aget_decision``."""
        return self._blocking_read(lambda conn: self._select_decision(conn, request_id))

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
        unique = list(dict.fromkeys(request_ids))

        def query(conn: Any) -> dict[str, DecisionRecord]:
            found: dict[str, DecisionRecord] = {}
            for start in range(0, len(unique), _MAX_QUERY_PARAMETERS):
                condition, params = self._in_list("request_id", unique[start:start + _MAX_QUERY_PARAMETERS])
                rows = conn.execute(f"SELECT {_COLUMNS} FROM decisions WHERE {condition}", params).fetchall()
                found.update((row[0], _decision_from_row(row)) for row in rows)
            return found

        found = self._read(getattr(self._local, "conn", None), lambda conn: setattr(self._local, "conn", conn), query)
        return [found.get(request_id) for request_id in request_ids]

    def _blocking_read(self, query: Callable[[Any], Any]) -> Any:
        with self._reader_lock:
            return self._read(self._reader, lambda conn: setattr(self, "_reader", conn), query)

    def _read(self, conn: Any, keep: Callable[[Any], None], query: Callable[[Any], Any]) -> Any:
        """``query`` on ``conn`` (kept with ``keep``), on a new connection where it is missing or broken; a
        connection the server cut since its last use (a restart, a failover) is replaced once and the query asked
        again. A database that still fails raises StoreUnavailableError."""
        for attempt in range(2):
            try:
                if conn is None or not self._usable(conn):
                    if conn is not None:
                        self._discard(conn)
                    conn = self._open()
                    keep(conn)
                return query(conn)
            except self._errors as exc:
                if attempt == 0 and conn is not None and not self._usable(conn):
                    continue
                raise StoreUnavailableError(f"decision store read failed: {exc}") from exc
        raise AssertionError("unreachable")

    def _select_decision(self, conn: Any, request_id: str) -> DecisionRecord | None:
        row = conn.execute(self._sql(f"SELECT {_COLUMNS} FROM decisions WHERE request_id=?"),
                           (request_id,)).fetchone()
        return _decision_from_row(row) if row else None

    def feedback_for(self, request_id: str) -> list[FeedbackRecord]:
        rows = self._blocking_read(lambda conn: conn.execute(
            self._sql(f"SELECT {_FEEDBACK_COLUMNS} FROM feedback WHERE request_id=? ORDER BY recorded_at"),
            (request_id,)).fetchall())
        return [FeedbackRecord(*row) for row in rows]

    def count_decisions(self) -> int:
        return self._blocking_read(lambda conn: conn.execute("SELECT COUNT(*) FROM decisions").fetchone()[0])

    def close(self) -> None:
        """Finish queued writes, then close every connection. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._writes.put(None)  # blocking put: the writer drains the queue, so room comes
        self._writer_thread.join()
        self._read_pool.shutdown(wait=True)
        with self._reader_lock, self._connections_lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - closing what is already broken
                pass


class SQLiteDecisionStore(DecisionStore):
    """The embedded default: one SQLite file in WAL mode (readers run beside the writer)."""

    def __init__(self, path: Path, synchronous: str = "FULL", max_group_commit: int = 256,
                 max_pending_writes: int = 4096, read_threads: int = 2, max_read_batch: int = 256,
                 prune_batch: int = 1000):
        self._path = Path(path)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._synchronous = synchronous
        super().__init__(max_group_commit, max_pending_writes, read_threads, max_read_batch, prune_batch)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        conn.execute("PRAGMA busy_timeout=5000")
        return conn

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        conn.executescript(_SQLITE_SCHEMA)
        columns = {row[1] for row in conn.execute("PRAGMA table_info(decisions)")}
        if "event" not in columns:  # a store written before decisions recorded their event
            conn.execute("ALTER TABLE decisions ADD COLUMN event BLOB NOT NULL DEFAULT x''")
        if "attempts" not in columns:  # a store written before degraded decisions could be decided again
            conn.execute("ALTER TABLE decisions ADD COLUMN attempts INTEGER NOT NULL DEFAULT 1")
        if "shadow" not in columns:  # a store written before shadow decisions were recorded
            conn.execute("ALTER TABLE decisions ADD COLUMN shadow TEXT NOT NULL DEFAULT ''")

    def _begin(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")

    def _in_list(self, column: str, values: Sequence[str]) -> tuple[str, tuple[Any, ...]]:
        return f"{column} IN ({','.join('?' * len(values))})", tuple(values)


class PostgresDecisionStore(DecisionStore):
    """A PostgreSQL server (psycopg 3), shared by every orchestrator that names its URL."""

    _placeholder = "%s"

    def __init__(self, url: str, connect_timeout_s: float = 5.0, write_retries: int = 3,
                 max_group_commit: int = 256, max_pending_writes: int = 4096, read_threads: int = 2,
                 max_read_batch: int = 256, prune_batch: int = 1000):
        import psycopg  # only where PostgreSQL is configured

        self._psycopg = psycopg
        self._errors = (psycopg.Error,)
        self._url = url
        self._connect_timeout_s = connect_timeout_s
        self.write_retries = write_retries
        super().__init__(max_group_commit, max_pending_writes, read_threads, max_read_batch, prune_batch)

    def _connect(self) -> Any:
        return self._psycopg.connect(self._url, autocommit=True, connect_timeout=max(1, round(
            self._connect_timeout_s)))

    def _create_schema(self, conn: Any) -> None:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_KEY,))
            for statement in _statements(_POSTGRES_SCHEMA):
                conn.execute(statement)

    def _begin(self, conn: Any) -> None:
        conn.execute("BEGIN")

    def _retryable(self, exc: BaseException) -> bool:
        errors = self._psycopg.errors
        return isinstance(exc, (errors.DeadlockDetected, errors.SerializationFailure, self._psycopg.OperationalError))

    def _usable(self, conn: Any) -> bool:
        return not (conn.closed or conn.broken)

    def _in_list(self, column: str, values: Sequence[str]) -> tuple[str, tuple[Any, ...]]:
        return f"{column} = ANY(%s)", (list(values),)


def open_decision_store(settings: StoreSettings) -> DecisionStore:
    """The store ``settings`` name: PostgreSQL at ``store.url``, else SQLite at ``store.sqlite_path``."""
    common = dict(max_group_commit=settings.max_group_commit, max_pending_writes=settings.max_pending_writes,
                  read_threads=settings.read_threads, max_read_batch=settings.max_read_batch,
                  prune_batch=settings.retention_sweep_batch)
    if settings.url:
        return PostgresDecisionStore(settings.url, settings.connect_timeout_s, settings.write_retries, **common)
    return SQLiteDecisionStore(settings.sqlite_path, settings.synchronous, **common)


async def sweep_retention(store: DecisionStore, settings: StoreSettings,
                          now: Callable[[], datetime] | None = None) -> None:
    """Every ``retention_sweep_interval_s``, delete what was decided more than ``retention_s`` ago (until cancelled).
    A failed sweep is logged and tried again at the next interval."""
    clock = now or utc_now
    while True:
        try:
            removed = await store.prune(clock() - timedelta(seconds=settings.retention_s))
            if removed:
                log.info("store retention: deleted %d decisions older than %.0f s", removed, settings.retention_s)
        except (StoreClosedError, asyncio.CancelledError):
            raise
        except Exception as exc:  # noqa: BLE001 - a database hiccup delays the sweep, never stops the gateway
            log.warning("store retention sweep failed (next in %.0f s): %s", settings.retention_sweep_interval_s, exc)
        await asyncio.sleep(settings.retention_sweep_interval_s)


def is_database_url(location: str | Path) -> bool:
    """Whether a store location is a PostgreSQL URL (else it is a SQLite file)."""
    return isinstance(location, str) and location.startswith(("postgresql://", "postgres://"))


def store_location(settings: StoreSettings) -> str | Path:
    """Where ``settings`` keep decisions: ``store.url``, else ``store.sqlite_path``."""
    return settings.url or settings.sqlite_path


def shown_location(location: str | Path) -> str:
    """A store location fit for logs and reports: a URL's password is masked."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", str(location))


def connect_read_only(location: str | Path) -> Any:
    """A DB-API connection that can only read the store at ``location`` (tools: backtests, reports); the writers
    are never touched. Raises FileNotFoundError for a SQLite file that does not exist."""
    if is_database_url(location):
        import psycopg

        return psycopg.connect(str(location), options="-c default_transaction_read_only=on")
    if not Path(location).is_file():
        raise FileNotFoundError(f"no decision store at {location}")
    return sqlite3.connect(f"{Path(location).resolve().as_uri()}?mode=ro", uri=True)


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def _key(op: tuple[str, Any]) -> str:
    kind, record = op
    return "" if kind == "prune" else record.request_id


def _resolve(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.cancelled():
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


def _decision_from_row(row: tuple) -> DecisionRecord:
    return DecisionRecord(row[0], row[1], row[2], row[3], row[4], row[5], bool(row[6]), row[7], bytes(row[8]),
                          bytes(row[9]), row[10], row[11])


def shadow_json(shadow: ShadowDecision | None) -> str:
    """The shadow column's value: the candidate's decision as JSON, or "" without one."""
    if shadow is None:
        return ""
    return json.dumps({**dataclasses.asdict(shadow), "action": shadow.action.value}, sort_keys=True)


def utc_now() -> datetime:
    return datetime.now(timezone.utc)

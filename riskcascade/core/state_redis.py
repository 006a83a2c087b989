"""The live entity state in Redis, shared by several scorer replicas; features identical to the embedded backend.

Each call loads the records it needs into a fresh ``EntityBook`` and runs the same feature and fold code as
``EmbeddedEntityState``, then writes back what the fold changed. Times and values are stored so that they come
back as the same doubles (``repr(float)`` in hashes, packed doubles in history members), and an entity's events come
back in the order the book holds them, so the floating-point sums are bit-identical.

Round trips: ``step`` reads in one ``EVALSHA`` of a read script (which of the batch's event ids the registry holds;
per entity its hashes, its history since the batch's earliest time minus the longest window, as nothing older can
enter a window, and the one event before that, for the idle time of a late event) and writes in one ``EVALSHA`` of
a write script. Both run atomically on the server, and the read returns a few strings per entity rather than one
reply element per field or event, which is what a client pays for. ``apply_labels`` takes three: the labelled
events and whether they were labelled before, the records of the accounts of fraud labels (their counterparts get
``fraud_accounts``), the write; two when no label is a fraud label.

Keys (``P`` = ``key_prefix``; an entity ``{link}:{value}`` comes last, so values may hold ``:``):

- ``P:layout`` (string): the layout JSON; a prefix written for another layout is refused, as the embedded log is.
- ``P:events`` (hash): event id -> ``StateEvent`` JSON. Labels find their entities through it and it is the
  duplicate gate; ``event_count`` is its length.
- ``P:labels`` (hash): event id -> ``1`` (fraud) / ``0``: the events whose label was folded (the first label of an
  event counts, as ``EntityBook.labelled``).
- ``P:h:{link}:{value}`` (sorted set): the entity's per-event history, scored by time. Member = 4-byte big-endian
  tie index (its rank among the entity's events at the same instant, so ties come back in fold order) + packed
  little-endian doubles (time, aggregated values) + an 8-byte digest of the event id: fixed length, so that a whole
  history decodes in one ``numpy.frombuffer``. Trimmed at each write to ``retention_s + state.redis_late_allowance_s``
  before the entity's last seen time (and the latest instant before that, as ``EntityRecord.trim``: the idle time of a
  late event), and it expires that many seconds (wall clock) after its last write: an idle entity's history disappears.
- ``P:e:{link}:{value}`` (hash): ``first`` / ``last`` seen and ``prev``, the latest time before ``last`` (so the idle
  time of a second event at the last instant survives the history).
- ``P:c:{link}:{counterpart link}:{value}`` (hash): counterpart value -> first seen together (the earliest kept).
- ``P:a:{link}:{value}`` (hash): account -> when its fraud became known on this entity (the earliest kept).
- ``P:f:{link}:{value}`` / ``P:l:{link}:{value}`` (hashes): event id -> arrival time of its fraud / legitimate label.

Hash values are ``repr(float)``. Every key but the history is kept for good, because the semantics (``EntityBook``,
which never forgets them either) count them over all time: first and last seen (age, and idle time once the history
is gone), distinct counterparts, label counts, fraud accounts, and the registries (a label may arrive months after its
event; an id folded once is never folded again). These grow with distinct entities and with events and labels, as
the embedded book and its log do.

Concurrency (several ``RedisEntityState`` on one server, in one or many processes):

- An event id is folded at most once, and an event's label counted at most once: the write script registers each
  with ``HSETNX`` and applies its writes only when that registered it. Two replicas racing on one event both return
  features, but only one folds it; racing on labels of one event, the first write wins.
- A batch's writes are atomic (one script): a reader sees all of a batch or none of it; a read is one script too.
- Writes merge and commute: history and labels are added, first seen, counterpart first seen and fraud-account times
  keep the earliest, last seen the latest. The state converges to the same content whatever the interleaving.
- Not isolated: two replicas stepping batches that share an entity at the same moment each compute features without
  the other's in-flight events (a label folded meanwhile is missed the same way); two events at the same instant on
  one entity written by two replicas may tie in another order than a single process would (float rounding of sums
  at that instant only). A replica that dies between read and write has written nothing of the batch.
- A call retried by redis-py after a lost connection resends the same script: its gates make that harmless.
- One Redis server (or a primary); Redis Cluster is not supported (the script touches keys of many slots).

Trimming, expiry and loading only the window change no feature for events that reach each entity in time order
(ties included) or at most ``state.redis_late_allowance_s`` after its last event. A later straggler's windows may miss
trimmed events. (The embedded book trims every ``state.trim_every_events`` events at the newest time it has seen, with
no such allowance: after one of its trims, the two backends may differ on a straggler.)
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import struct
from collections import Counter
from collections.abc import Sequence

import numpy as np
import redis

from riskcascade.core.config import StateSettings
from riskcascade.core.entity_state import (
    ACCOUNT,
    EntityBook,
    EntityRecord,
    EntityState,
    LabelEvent,
    StateEvent,
    StateLayout,
)

_DEFAULTS = StateSettings()
_TIE = struct.Struct(">I")
_ID_BYTES = 8  # a digest of the event id ends a history member: members of distinct events never collide

# Applies one batch atomically. Ops name keys by their index in KEYS; ARGV is a stream of ops:
#   E k id v n     HSETNX k id v (register an event or a label); the next n ops apply only if this set it
#   Z k score m    ZADD                         S k field v    HSET
#   L k field v    HSET if absent or lower      W k t          seen at t: first (lowest), last, prev
#   T k cut        drop what is older than cut but the latest instant before it (as EntityRecord.trim)
#   X k seconds    EXPIRE
# `prev` is the latest time strictly before `last`: the previous instant outlives the trimmed history (idle time of a
# second event at the entity's last instant). Returns how many events it registered.
_WRITE_SCRIPT = """
local registered, skip, i, n = 0, 0, 1, #ARGV
while i <= n do
  local op = ARGV[i]
  if op == 'E' then
    if redis.call('HSETNX', KEYS[tonumber(ARGV[i + 1])], ARGV[i + 2], ARGV[i + 3]) == 1 then
      registered = registered + 1
      skip = 0
    else
      skip = tonumber(ARGV[i + 4])
    end
    i = i + 5
  else
    local width = (op == 'T' or op == 'X' or op == 'W') and 3 or 4
    if skip > 0 then
      skip = skip - 1
    else
      local key = KEYS[tonumber(ARGV[i + 1])]
      if op == 'Z' then
        redis.call('ZADD', key, ARGV[i + 2], ARGV[i + 3])
      elseif op == 'S' then
        redis.call('HSET', key, ARGV[i + 2], ARGV[i + 3])
      elseif op == 'L' then
        local old = redis.call('HGET', key, ARGV[i + 2])
        if not old or tonumber(ARGV[i + 3]) < tonumber(old) then
          redis.call('HSET', key, ARGV[i + 2], ARGV[i + 3])
        end
      elseif op == 'W' then
        local at, t = ARGV[i + 2], tonumber(ARGV[i + 2])
        local seen = redis.call('HMGET', key, 'first', 'last', 'prev')
        if not seen[1] or t < tonumber(seen[1]) then
          redis.call('HSET', key, 'first', at)
        end
        if not seen[2] then
          redis.call('HSET', key, 'last', at)
        elseif t > tonumber(seen[2]) then
          redis.call('HSET', key, 'last', at, 'prev', seen[2])
        elseif t < tonumber(seen[2]) and (not seen[3] or t > tonumber(seen[3])) then
          redis.call('HSET', key, 'prev', at)
        end
      elseif op == 'T' then
        local older = redis.call('ZREVRANGEBYSCORE', key, '(' .. ARGV[i + 2], '-inf', 'WITHSCORES', 'LIMIT', 0, 1)
        if older[2] then
          redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. older[2])
        end
      elseif op == 'X' then
        redis.call('EXPIRE', key, ARGV[i + 2])
      else
        return redis.error_reply('unknown entity state op ' .. op)
      end
    end
    i = i + width
  end
end
return registered
"""

# Reads what a batch needs atomically, in one reply with few parts (each part costs the client far more than bytes).
# KEYS[1] = the event registry, then per entity its hashes and (when ARGV[1] is not '') its history.
# ARGV = since, n, n event ids, then per entity its number of hashes. Returns {ids known (1/0), per entity: its
# hashes as JSON arrays [field, value, ...], then its history members since `since` and the one before, each
# group of fixed-length members concatenated}.
_READ_SCRIPT = """
local since, n = ARGV[1], tonumber(ARGV[2])
local known = {}
for i = 1, n do
  known[i] = redis.call('HEXISTS', KEYS[1], ARGV[2 + i])
end
local out, k = {known}, 2
for a = 3 + n, #ARGV do
  local entity = {}
  for j = 1, tonumber(ARGV[a]) do
    local flat = redis.call('HGETALL', KEYS[k])
    entity[j] = #flat > 0 and cjson.encode(flat) or '[]'
    k = k + 1
  end
  if since ~= '' then
    entity[#entity + 1] = table.concat(redis.call('ZRANGEBYSCORE', KEYS[k], since, '+inf'))
    entity[#entity + 1] = table.concat(redis.call('ZREVRANGEBYSCORE', KEYS[k], '(' .. since, '-inf', 'LIMIT', 0, 1))
    k = k + 1
  end
  out[#out + 1] = entity
end
return out
"""


class RedisEntityState(EntityState):
    """``EntityState`` in a Redis server (see the module docstring for keys and guarantees).

    Synchronous: the scorer calls it from its worker thread, never on an event loop. Each call builds its own book,
    so calls from several threads are safe (with the guarantees of several replicas).
    """

    def __init__(self, layout: StateLayout, url: str, key_prefix: str = _DEFAULTS.key_prefix,
                 timeout_s: float = _DEFAULTS.redis_timeout_s,
                 late_allowance_s: int = _DEFAULTS.redis_late_allowance_s) -> None:
        super().__init__(layout)
        self._late_allowance_s = late_allowance_s
        self._prefix = key_prefix
        self._registry = f"{key_prefix}:events"
        self._labelled = f"{key_prefix}:labels"
        self._redis = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._script = self._redis.register_script(_WRITE_SCRIPT)
        self._read_script = self._redis.register_script(_READ_SCRIPT)
        self._row = struct.Struct(f"<{1 + len(layout.aggregated)}d")
        # a history member, for decoding a whole history at once
        self._member = np.dtype([("tie", ">u4"), ("time", "<f8"), ("values", "<f8", (len(layout.aggregated),)),
                                 ("id", f"V{_ID_BYTES}")])
        self._history_s = float(layout.windows_s[-1])
        self._check_layout()
        for script in (_WRITE_SCRIPT, _READ_SCRIPT):  # loaded now, so that the first call is one round trip too
            self._redis.script_load(script)

    def _check_layout(self) -> None:
        body = json.dumps(self.layout.to_json(), sort_keys=True)
        key = f"{self._prefix}:layout"
        self._redis.set(key, body, nx=True)
        stored = self._redis.get(key)
        if stored is not None and stored.decode() != body:
            raise ValueError(
                f"the Redis entity state under key prefix {self._prefix!r} was written for another layout "
                f"({stored.decode()}); this model needs {body}: use another state.key_prefix, or delete the keys "
                f"{self._prefix}:* to rebuild the state from the data set"
            )

    def _key(self, kind: str, entity: tuple[str, str], counterpart: str = "") -> str:
        link, value = entity
        if counterpart:
            return f"{self._prefix}:{kind}:{link}:{counterpart}:{value}"
        return f"{self._prefix}:{kind}:{link}:{value}"

    def _read(self, ids: Sequence[str], entities: Sequence[tuple[str, str]],
              since: float | None) -> tuple[list[int], list[EntityRecord | None]]:
        """One round trip (the read script): which of ``ids`` the registry holds, and each entity's record, with its
        history since ``since`` and the event before that (no history when None)."""
        keys, groups = [self._registry], []
        for entity in entities:
            hashes = [self._key("e", entity), *(self._key("c", entity, m) for m in self.layout.counterparts(entity[0])),
                      self._key("a", entity), self._key("f", entity), self._key("l", entity)]
            keys += hashes
            groups.append(len(hashes))
            if since is not None:
                keys.append(self._key("h", entity))
        reply = self._read_script(keys=keys, args=["" if since is None else repr(since), len(ids), *ids, *groups],
                                  client=self._redis)
        return reply[0], [self._record(e, parts, since) for e, parts in zip(entities, reply[1:], strict=True)]

    def _record(self, entity: tuple[str, str], parts: list[bytes], since: float | None) -> EntityRecord | None:
        """An entity's record from its part of the read script's reply (None if it was never seen).

        The entity's last and previous instants go in front of the history when they are older than ``since`` and
        the history lacks them: no window reaches them (their values are never read), but ``features`` takes the
        idle time from the latest time before the event, which the whole history gives."""
        hashes = [_pairs(part) for part in parts[:len(parts) - (2 if since is not None else 0)]]
        seen, fraud_accounts, fraud, legit = hashes[0], hashes[-3], hashes[-2], hashes[-1]
        if not seen:
            return None
        rec = EntityRecord(
            first_seen=float(seen["first"]), last_seen=float(seen["last"]),
            counterparts={m: {k: float(v) for k, v in found.items()}
                          for m, found in zip(self.layout.counterparts(entity[0]), hashes[1:-3], strict=True)
                          if found},
            fraud_accounts={k: float(v) for k, v in fraud_accounts.items()},
            fraud_known=sorted(map(float, fraud.values())), legit_known=sorted(map(float, legit.values())),
        )
        if since is not None and (parts[-1] or parts[-2]):  # ascending time, ties in fold order (tie index first)
            members = np.frombuffer(parts[-1] + parts[-2], dtype=self._member)
            rec.load_history(members["time"].tolist(), members["values"])
        missing = (math.nan,) * len(self.layout.aggregated)
        previous = float(seen["prev"]) if "prev" in seen else math.nan
        for instant in (rec.last_seen, previous):
            at = bisect.bisect_left(rec.times, instant)
            if since is not None and instant < since and (at == len(rec.times) or rec.times[at] != instant):
                rec.insert_history(instant, missing)  # no event at that instant: it goes at `at` (NaN < since is False)
        return rec

    # ---- step -------------------------------------------------------------------------------------------------

    def step(self, events: Sequence[StateEvent]) -> np.ndarray:
        out = np.empty((len(events), len(self.names)))
        if not events:
            return out
        book = self._load_for_step(events)
        writes = _Writes()
        touched: set[tuple[str, str]] = set()
        # The loop of EntityBook.step, with each fold's changes noted so that the write can gate them per event.
        for i, event in enumerate(events):
            out[i] = book.features(event)
            before = _Before(book, event, self.layout.links)
            if book.fold_event(event):
                writes.gate(self._registry, event.event_id, event.to_json())
                self._note_fold(book, event, before, writes, touched)
        for entity in touched:
            history = self._key("h", entity)
            writes.trim(history, book.records[entity].last_seen - self.layout.retention_s - self._late_allowance_s)
            writes.expire(history, self.layout.retention_s + self._late_allowance_s)
        self._write(writes)
        return out

    def _load_for_step(self, events: Sequence[StateEvent]) -> EntityBook:
        """One round trip: which of the batch's ids were folded before, and the records of its entities."""
        ids = list(dict.fromkeys(e.event_id for e in events))
        entities = list(dict.fromkeys(
            (link, e.entities[link]) for e in events for link in self.layout.links if e.entities.get(link)
        ))
        since = min(e.time for e in events) - self._history_s  # [t - w, t) for every t of the batch lies above
        known, records = self._read(ids, entities, since)
        book = EntityBook(self.layout)
        folded = {event_id for event_id, found in zip(ids, known, strict=True) if found}
        # fold_event only asks whether an id is known; the stored event is the same id's first sending
        book.events.update((e.event_id, e) for e in events if e.event_id in folded)
        book.records.update((entity, rec) for entity, rec in zip(entities, records, strict=True) if rec is not None)
        return book

    def _note_fold(self, book: EntityBook, event: StateEvent, before: _Before, writes: _Writes,
                   touched: set[tuple[str, str]]) -> None:
        """Write ops for what folding ``event`` changed in the records of its entities."""
        account = event.entities.get(ACCOUNT, "")
        for entity, (n_rows, pairs, fraud_at) in before.records.items():
            rec = book.records[entity]
            if len(rec.times) > n_rows:  # the new row sits last among the entity's rows at its instant
                at = bisect.bisect_right(rec.times, event.time) - 1
                time = rec.times[at]
                tie = at - bisect.bisect_left(rec.times, time)
                member = _TIE.pack(tie) + self._row.pack(time, *rec.row(at)) + _id_digest(event.event_id)
                writes.zadd(self._key("h", entity), time, member)
                writes.seen(self._key("e", entity), time)  # first and last seen are the extremes of the times added
                touched.add(entity)
            for (link, other), seen in pairs.items():
                now = rec.counterparts.get(link, {}).get(other)
                if now is not None and now != seen:
                    writes.keep_lowest(self._key("c", entity, link), other, now)
            now = rec.fraud_accounts.get(account) if account else None
            if now is not None and now != fraud_at:
                writes.keep_lowest(self._key("a", entity), account, now)

    # ---- labels -----------------------------------------------------------------------------------------------

    def apply_labels(self, labels: Sequence[LabelEvent]) -> int:
        book = self._load_for_labels(labels)
        known = [label for label in labels if label.event_id in book.events and label.event_id not in book.labelled]
        if not known:
            return 0
        writes = _Writes()
        for label in known:
            event = book.events[label.event_id]
            targets = _label_targets(book, event)
            before = {entity: _label_fields(book.records.get(entity), event) for entity in targets}
            if not book.fold_label(label):
                continue
            writes.gate(self._labelled, label.event_id, "1" if label.fraud else "0")
            account = event.entities.get(ACCOUNT, "")
            for entity, (fraud, legit, _) in before.items():
                rec = book.records.get(entity)
                if rec is None:
                    continue
                for kind, added in (("f", Counter(rec.fraud_known) - fraud), ("l", Counter(rec.legit_known) - legit)):
                    for known_at in added.elements():  # a field per label: an id the label alone writes
                        writes.set(self._key(kind, entity), label.event_id, known_at)
                fraud_at = rec.fraud_accounts.get(account) if account else None
                if fraud_at is not None and fraud_at != before[entity][2]:
                    writes.keep_lowest(self._key("a", entity), account, fraud_at)
        return self._write(writes)

    def _load_for_labels(self, labels: Sequence[LabelEvent]) -> EntityBook:
        """A book with the labelled events, which of them were labelled before, and the records of the accounts of
        fraud labels (fold_label walks their counterparts). One round trip, two with fraud labels. The entities a
        label writes to need not be loaded: label times are added and fraud-account times merged on the server."""
        book = EntityBook(self.layout)
        if not labels:
            return book
        ids = list(dict.fromkeys(label.event_id for label in labels))
        pipe = self._redis.pipeline(transaction=True)
        pipe.hmget(self._registry, ids)
        pipe.hmget(self._labelled, ids)
        bodies, outcomes = pipe.execute()
        book.events.update(
            (i, StateEvent.from_json(b.decode())) for i, b in zip(ids, bodies, strict=True) if b is not None
        )
        book.labelled.update((i, o == b"1") for i, o in zip(ids, outcomes, strict=True) if o is not None)
        accounts = list(dict.fromkeys(
            account for label in labels
            if label.fraud and label.event_id in book.events and label.event_id not in book.labelled
            for account in [book.events[label.event_id].entities.get(ACCOUNT, "")]
            if account and ACCOUNT in self.layout.links
        ))
        if accounts:
            entities = [(ACCOUNT, account) for account in accounts]
            _, records = self._read([], entities, None)
            book.records.update((entity, rec) for entity, rec in zip(entities, records, strict=True) if rec is not None)
        return book

    # ---- the rest ---------------------------------------------------------------------------------------------

    def _write(self, writes: _Writes) -> int:
        """One round trip; how many events or labels it registered."""
        if not writes.args:
            return 0
        return int(self._script(keys=writes.keys, args=writes.args, client=self._redis))

    def event_count(self) -> int:
        return int(self._redis.hlen(self._registry))

    def close(self) -> None:
        self._redis.close()


def _pairs(flat_json: bytes) -> dict[str, str]:
    """A hash from the read script: a JSON array ``[field, value, ...]``."""
    flat = json.loads(flat_json)
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _id_digest(event_id: str) -> bytes:
    return hashlib.blake2b(event_id.encode(), digest_size=_ID_BYTES).digest()


def _label_targets(book: EntityBook, event: StateEvent) -> list[tuple[str, str]]:
    """The records a label of ``event`` may change: its entities, and its account's counterparts."""
    targets = [(link, value) for link, value in event.entities.items() if value]
    account = book.records.get((ACCOUNT, event.entities.get(ACCOUNT, "")))
    if account is not None:
        targets += [(link, other) for link, seen in account.counterparts.items() for other in seen]
    return list(dict.fromkeys(targets))


def _label_fields(rec: EntityRecord | None, event: StateEvent) -> tuple[Counter, Counter, float | None]:
    if rec is None:
        return Counter(), Counter(), None
    account = event.entities.get(ACCOUNT, "")
    return Counter(rec.fraud_known), Counter(rec.legit_known), rec.fraud_accounts.get(account) if account else None


class _Before:
    """The fields of an event's entities that folding it may change besides its history row, as they were."""

    def __init__(self, book: EntityBook, event: StateEvent, links: Sequence[str]) -> None:
        present = [(link, event.entities[link]) for link in links if event.entities.get(link)]
        account = event.entities.get(ACCOUNT, "")
        self.records: dict[tuple[str, str], tuple[int, dict[tuple[str, str], float | None], float | None]] = {}
        for entity in present:
            rec = book.records.get(entity)
            if rec is None:
                self.records[entity] = (0, {p: None for p in present if p != entity}, None)
                continue
            pairs = {p: rec.counterparts.get(p[0], {}).get(p[1]) for p in present if p != entity}
            self.records[entity] = (len(rec.times), pairs, rec.fraud_accounts.get(account) if account else None)


class _Writes:
    """Ops for the write script (see ``_WRITE_SCRIPT``), with the keys they name."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.args: list[str | bytes | int] = []
        self._index: dict[str, int] = {}
        self._gate_at: int | None = None  # where the open gate's op count is

    def _key(self, key: str) -> int:
        index = self._index.get(key)
        if index is None:
            self.keys.append(key)
            index = self._index[key] = len(self.keys)
        return index

    def _op(self, op: str, key: str, *rest: str | bytes) -> None:
        self.args += (op, self._key(key), *rest)
        if self._gate_at is not None:
            self.args[self._gate_at] += 1  # type: ignore[operator]

    def gate(self, key: str, field: str, value: str) -> None:
        """The ops that follow, up to the next gate or the first trim or expiry, apply only if ``HSETNX key field
        value`` sets the field (an event or label id seen for the first time)."""
        self.args += ["E", self._key(key), field, value, 0]
        self._gate_at = len(self.args) - 1

    def zadd(self, key: str, score: float, member: bytes) -> None:
        self._op("Z", key, repr(score), member)

    def seen(self, key: str, time: float) -> None:
        self._op("W", key, repr(time))

    def set(self, key: str, field: str, value: float) -> None:
        self._op("S", key, field, repr(value))

    def keep_lowest(self, key: str, field: str, value: float) -> None:
        self._op("L", key, field, repr(value))

    def trim(self, key: str, before: float) -> None:
        self._gate_at = None
        self._op("T", key, repr(before))

    def expire(self, key: str, seconds: int) -> None:
        self._gate_at = None
        self._op("X", key, str(int(seconds)))

"""SQLite (WAL) store: the source of truth of the cache.

One row per entry: namespace, fingerprint, context key, embedder version, the query text and its
embedding (float32 bytes), the response, model, cost and tokens of producing it, created / last
used times, hit count, expiry and size. Triggers keep, per partition (namespace + fingerprint +
context + embedder), the highest entry id and the sequence number of its latest deletion (each
deletion also leaves a tombstone), so an index can tell it is stale and catch up; and keep the
total entry count and size for the budget. Ids are AUTOINCREMENT: never reused, so an index label
always means one row.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from appliance.cache.embedder import Vector
from appliance.cache.errors import CacheError

SCHEMA_VERSION = "1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    partition TEXT NOT NULL,
    namespace TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    context_key TEXT NOT NULL,
    embedder TEXT NOT NULL,
    query TEXT NOT NULL,
    embedding BLOB NOT NULL,
    response TEXT NOT NULL,
    model TEXT NOT NULL,
    cost REAL NOT NULL,
    tokens INTEGER NOT NULL,
    created REAL NOT NULL,
    last_hit REAL,
    used REAL NOT NULL,
    hits INTEGER NOT NULL DEFAULT 0,
    expires REAL,
    size INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_partition ON entries(partition, id);
CREATE INDEX IF NOT EXISTS entries_namespace ON entries(namespace, fingerprint);
CREATE INDEX IF NOT EXISTS entries_used ON entries(used);
CREATE INDEX IF NOT EXISTS entries_created ON entries(created);
CREATE INDEX IF NOT EXISTS entries_expires ON entries(expires) WHERE expires IS NOT NULL;
CREATE TABLE IF NOT EXISTS partitions (
    partition TEXT PRIMARY KEY,
    max_id INTEGER NOT NULL DEFAULT 0,
    tomb_seq INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS tombstones (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    partition TEXT NOT NULL,
    id INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS tombstones_partition ON tombstones(partition, seq);
CREATE TABLE IF NOT EXISTS totals (
    one INTEGER PRIMARY KEY CHECK (one = 1), entries INTEGER NOT NULL, bytes INTEGER NOT NULL
);
INSERT OR IGNORE INTO totals VALUES (1, 0, 0);
CREATE TRIGGER IF NOT EXISTS entries_ins AFTER INSERT ON entries BEGIN
    INSERT INTO partitions(partition, max_id) VALUES (NEW.partition, NEW.id)
        ON CONFLICT(partition) DO UPDATE SET max_id = NEW.id;
    UPDATE totals SET entries = entries + 1, bytes = bytes + NEW.size;
END;
CREATE TRIGGER IF NOT EXISTS entries_del AFTER DELETE ON entries BEGIN
    INSERT INTO tombstones(partition, id) VALUES (OLD.partition, OLD.id);
    UPDATE partitions SET tomb_seq = last_insert_rowid() WHERE partition = OLD.partition;
    UPDATE totals SET entries = entries - 1, bytes = bytes - OLD.size;
END;
"""

_ROW = (
    "partition, namespace, fingerprint, context_key, query, embedding, response, model, cost, tokens, created, "
    "expires, embedder, id, last_hit, hits"
)


@dataclass(frozen=True)
class Entry:
    """One cached answer: as written (`id` 0 until the store gives one) and as read back (with its
    id and hit counts)."""

    partition: str
    namespace: str
    fingerprint: str
    context_key: str
    query: str
    embedding: Vector
    response: str
    model: str
    cost: float
    tokens: int
    created: float
    expires: float | None
    embedder: str = ""
    id: int = 0
    last_hit: float | None = None
    hits: int = 0

    @property
    def size(self) -> int:
        return len(self.query.encode()) + len(self.response.encode()) + self.embedding.nbytes + 200


@dataclass(frozen=True)
class PartitionState:
    max_id: int
    tomb_seq: int


class Store:
    """Thread-safe access to the cache database (one connection, one lock)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._db = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('store_id', ?)", (uuid.uuid4().hex,))
            meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as e:
            raise CacheError(f"cache database {path} cannot be opened: {e}") from None
        if meta["schema"] != SCHEMA_VERSION:
            raise CacheError(f"cache database {path} has schema {meta['schema']}, this version reads {SCHEMA_VERSION}")
        self.store_id: str = meta["store_id"]
        self._lock = threading.RLock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # ------------------------------------------------------------------ writes

    def insert(self, entries: Sequence[Entry]) -> list[int]:
        ids: list[int] = []
        with self._tx() as db:
            for e in entries:
                cur = db.execute(
                    "INSERT INTO entries(partition, namespace, fingerprint, context_key, embedder, query, embedding, "
                    "response, model, cost, tokens, created, used, expires, size) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        e.partition,
                        e.namespace,
                        e.fingerprint,
                        e.context_key,
                        e.embedder,
                        e.query,
                        e.embedding.astype(np.float32).tobytes(),
                        e.response,
                        e.model,
                        e.cost,
                        e.tokens,
                        e.created,
                        e.created,
                        e.expires,
                        e.size,
                    ),
                )
                assert cur.lastrowid is not None
                ids.append(cur.lastrowid)
        return ids

    def record_hit(self, entry_id: int, now: float) -> None:
        with self._tx() as db:
            db.execute("UPDATE entries SET hits = hits + 1, last_hit = ?, used = ? WHERE id = ?", (now, now, entry_id))

    def delete_where(self, where: str, params: Sequence[object]) -> int:
        with self._tx() as db:
            return db.execute(f"DELETE FROM entries WHERE {where}", params).rowcount

    def evict(self, max_entries: int, max_bytes: int) -> int:
        """Delete least recently used entries until both budgets hold; returns how many went."""
        removed = 0
        with self._tx() as db:
            while True:
                n, size = db.execute("SELECT entries, bytes FROM totals").fetchone()
                if n <= max_entries and size <= max_bytes:
                    return removed
                # Over budget: drop at least the excess count, or a slice sized from the average entry.
                excess = max(n - max_entries, 0)
                if size > max_bytes and n:
                    excess = max(excess, int((size - max_bytes) / (size / n)) + 1)
                batch = max(1, min(excess, 10000))
                removed += db.execute(
                    "DELETE FROM entries WHERE id IN (SELECT id FROM entries ORDER BY used, id LIMIT ?)", (batch,)
                ).rowcount

    # ------------------------------------------------------------------ reads

    def rows(self, ids: Iterable[int]) -> dict[int, Entry]:
        ids = list(ids)
        if not ids:
            return {}
        with self._lock:
            got = self._db.execute(
                f"SELECT {_ROW} FROM entries WHERE id IN ({','.join('?' * len(ids))})", ids
            ).fetchall()
        return {
            r[13]: Entry(
                r[0],
                r[1],
                r[2],
                r[3],
                r[4],
                np.frombuffer(r[5], dtype=np.float32),
                r[6],
                r[7],
                r[8],
                r[9],
                r[10],
                r[11],
                embedder=r[12],
                id=r[13],
                last_hit=r[14],
                hits=r[15],
            )
            for r in got
        }

    def partition_of(self, entry_id: int) -> str | None:
        with self._lock:
            r = self._db.execute("SELECT partition FROM entries WHERE id = ?", (entry_id,)).fetchone()
        return None if r is None else str(r[0])

    def partition_state(self, partition: str) -> PartitionState:
        with self._lock:
            r = self._db.execute("SELECT max_id, tomb_seq FROM partitions WHERE partition = ?", (partition,)).fetchone()
        return PartitionState(0, 0) if r is None else PartitionState(int(r[0]), int(r[1]))

    def vectors(self, partition: str, after_id: int, up_to_id: int) -> tuple[list[int], list[bytes]]:
        """Ids and embeddings of the partition's entries with after_id < id <= up_to_id."""
        with self._lock:
            got = self._db.execute(
                "SELECT id, embedding FROM entries WHERE partition = ? AND id > ? AND id <= ? ORDER BY id",
                (partition, after_id, up_to_id),
            ).fetchall()
        return [int(r[0]) for r in got], [bytes(r[1]) for r in got]

    def tombstones(self, partition: str, after_seq: int, up_to_seq: int) -> list[int]:
        with self._lock:
            got = self._db.execute(
                "SELECT id FROM tombstones WHERE partition = ? AND seq > ? AND seq <= ?",
                (partition, after_seq, up_to_seq),
            ).fetchall()
        return [int(r[0]) for r in got]

    def questions(self, namespace: str) -> list[tuple[str, str]]:
        """(query, response) of every entry of ``namespace`` and its ``namespace/user`` sub-namespaces,
        oldest first: what tunes that tenant's embedder."""
        with self._lock:
            got = self._db.execute(
                "SELECT query, response FROM entries WHERE namespace = ? OR substr(namespace, 1, ?) = ? ORDER BY id",
                (namespace, len(namespace) + 1, namespace + "/"),
            ).fetchall()
        return [(str(q), str(r)) for q, r in got]

    def totals(self) -> tuple[int, int]:
        with self._lock:
            n, size = self._db.execute("SELECT entries, bytes FROM totals").fetchone()
        return int(n), int(size)


def now() -> float:
    return time.time()

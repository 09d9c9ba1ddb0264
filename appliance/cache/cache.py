"""SemanticCache: look up, store and invalidate answers; see the package docstring for the API."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from appliance.cache.config import CacheConfig, embedder_calibration, shipped_threshold
from appliance.cache.decision import answer_key, choose
from appliance.cache.embedder import Embedder, GgufEmbedder, MemoEmbedder, Vector
from appliance.cache.errors import CacheError, QueryError
from appliance.cache.guards import Signature, conflict, signature
from appliance.cache.indexset import IndexSet
from appliance.cache.keys import Context, check_fingerprint, check_namespace, partition_key
from appliance.cache.policy import Policy
from appliance.cache.store import Entry, Store, now
from appliance.cache.text import clean_text

DB_NAME = "cache.sqlite3"
INDEX_DIR = "index"
_PURGE_INTERVAL_S = 60.0


@dataclass(frozen=True)
class Hit:
    """A cached answer. ``cost_saved`` / ``tokens_saved`` are what producing it cost when it was stored."""

    entry_id: int
    response: str
    similarity: float
    matched_query: str
    model: str
    cost_saved: float
    tokens_saved: int
    created: float
    hits: int
    lookup_ms: float


@dataclass(frozen=True)
class _Key:
    namespace: str
    fingerprint: str
    context_key: str
    partition: str


class SemanticCache:
    """A tenant-isolated semantic cache in one directory (SQLite + hnswlib files). Thread-safe."""

    def __init__(self, directory: Path, embedder: Embedder, config: CacheConfig, *, owns_embedder: bool) -> None:
        self.directory = directory
        # Shared with the router and the Embed call, so that one request's text is embedded once.
        self.embedder = embedder if isinstance(embedder, MemoEmbedder) else MemoEmbedder(embedder)
        self.config = config
        tuned = embedder_calibration(embedder)
        if config.threshold is not None:
            self.threshold = config.threshold
        else:
            self.threshold = tuned.threshold if tuned is not None else shipped_threshold(embedder.version)
        # a tuned embedder's calibrated decision over the top-k neighbours replaces the threshold
        self.decision = tuned.decision if tuned is not None and config.threshold is None and config.decide else None
        self._owns_embedder = owns_embedder
        directory.mkdir(parents=True, exist_ok=True)
        self.store_db = Store(directory / DB_NAME)
        self.indexes = IndexSet(
            directory / INDEX_DIR,
            self.store_db,
            embedder.dim,
            embedder.version,
            config.hnsw,
            persist_min_entries=config.persist_min_entries,
            max_loaded=config.max_loaded_partitions,
        )
        self.stats: Counter[str] = Counter()
        self._lock = threading.RLock()
        self._last_flush = self._last_purge = time.monotonic()
        self._closed = False

    @classmethod
    def open(
        cls, directory: Path | str, embedder: Embedder | None = None, config: CacheConfig | None = None
    ) -> SemanticCache:
        """Open (creating if needed) the cache in ``directory``; without ``embedder`` it loads the
        provisioned default embedding model and closes it with the cache."""
        owns = embedder is None
        emb: Embedder = GgufEmbedder() if embedder is None else embedder
        return cls(Path(directory), emb, config or CacheConfig(), owns_embedder=owns)

    # ------------------------------------------------------------------ keys and vectors

    def _key(self, namespace: str, fingerprint: str, context: Context | None) -> _Key:
        ns, fp = check_namespace(namespace), check_fingerprint(fingerprint)
        ctx = (context or Context()).key()
        return _Key(ns, fp, ctx, partition_key(ns, fp, ctx, self.embedder.version))

    def _clean(self, query: object) -> str:
        return clean_text(query, "query", max_chars=self.config.max_query_chars)

    def embed(self, text: str) -> Vector:
        """The embedding of an already cleaned query; the embedder remembers the last few, so that a
        store right after a missed lookup (or the router in between) does not embed it again."""
        return self.embedder.embed(text)

    # ------------------------------------------------------------------ lookup

    def lookup(
        self,
        namespace: str,
        fingerprint: str,
        query: str | bytes,
        *,
        context: Context | None = None,
        policy: Policy | str = Policy.AUTO,
    ) -> Hit | None:
        """The cached answer to a query meaning the same as ``query``, or None."""
        if not Policy.parse(policy).reads:
            return None
        t0 = time.perf_counter()
        self._check_open()
        key = self._key(namespace, fingerprint, context)
        text = self._clean(query)
        vec = self.embed(text)
        decision = self.decision
        k = max(self.config.candidates, decision.k) if decision is not None else self.config.candidates
        with self._lock:
            candidates = self.indexes.get(key.partition).search(vec, k)
        self.stats["lookups"] += 1
        floor = decision.floor if decision is not None else self.threshold
        if not candidates or candidates[0][1] < floor - 1e-3:
            return None
        t = now()
        # the whole neighbourhood is evidence for a decision; a threshold needs only what reaches it
        wanted = [i for i, sim in candidates if decision is not None or sim >= self.threshold - 1e-3]
        found = self._valid_rows(key, wanted, vec, t)
        sig: list[Signature] = []

        def blocked(c: int) -> bool:
            if not self.config.guards:
                return False
            if not sig:
                sig.append(signature(text))
            if conflict(sig[0], signature(found[c][1].query)) is None:
                return False
            self.stats["guard_blocks"] += 1
            return True

        if decision is not None:
            at, _ = choose([s for s, _ in found], [answer_key(r.response) for _, r in found], blocked, decision)
        else:
            at = next((c for c, (s, _) in enumerate(found) if s >= self.threshold and not blocked(c)), -1)
        if at < 0:
            return None
        sim, row = found[at]
        self.store_db.record_hit(row.id, t)
        self.stats["hits"] += 1
        return Hit(
            entry_id=row.id,
            response=row.response,
            similarity=sim,
            matched_query=row.query,
            model=row.model,
            cost_saved=row.cost,
            tokens_saved=row.tokens,
            created=row.created,
            hits=row.hits + 1,
            lookup_ms=(time.perf_counter() - t0) * 1e3,
        )

    def _valid_rows(self, key: _Key, ids: list[int], vec: Vector, t: float) -> list[tuple[float, Entry]]:
        """The rows of ``ids`` this lookup may serve, with their similarity, best first."""
        rows = self.store_db.rows(ids)
        found: list[tuple[float, Entry]] = []
        for entry_id in ids:
            row = rows.get(entry_id)
            # Defence in depth: the index is per partition, but only SQLite decides what is served.
            if row is None or (row.partition, row.namespace, row.fingerprint, row.context_key) != (
                key.partition,
                key.namespace,
                key.fingerprint,
                key.context_key,
            ):
                self.stats["index_mismatch"] += row is not None
                continue
            if row.expires is not None and row.expires <= t:
                self.stats["expired"] += 1
                continue
            found.append((float(row.embedding @ vec), row))  # from SQLite, not from the index
        found.sort(key=lambda f: -f[0])
        return found

    # ------------------------------------------------------------------ store

    def store(
        self,
        namespace: str,
        fingerprint: str,
        query: str | bytes,
        response: str,
        *,
        model: str,
        context: Context | None = None,
        cost: float = 0.0,
        tokens: int = 0,
        ttl_s: float | None = None,
        policy: Policy | str = Policy.AUTO,
    ) -> int | None:
        """Remember ``response`` as the answer to ``query``; returns the entry id, or None when the
        policy does not write. ``cost`` and ``tokens`` are what producing the response cost (what
        a later hit saves). ``ttl_s`` overrides the configured time to live."""
        if not Policy.parse(policy).writes:
            return None
        self._check_open()
        key = self._key(namespace, fingerprint, context)
        text = self._clean(query)
        if not isinstance(response, str):
            raise QueryError(f"response must be str, not {type(response).__name__}")
        if not model:
            raise QueryError("store needs the model that produced the response")
        ttl = self.config.ttl_s if ttl_s is None else ttl_s
        if ttl is not None and ttl <= 0:
            raise QueryError(f"ttl_s must be positive, got {ttl}")
        vec = self.embed(text)
        created = now()
        entry = Entry(
            partition=key.partition,
            namespace=key.namespace,
            fingerprint=key.fingerprint,
            context_key=key.context_key,
            embedder=self.embedder.version,
            query=text,
            embedding=vec,
            response=response,
            model=model,
            cost=float(cost),
            tokens=int(tokens),
            created=created,
            expires=None if ttl is None else created + ttl,
        )
        (entry_id,) = self.store_db.insert([entry])
        self.stats["stores"] += 1
        self._after_write([key.partition])
        return entry_id

    def store_vectors(
        self,
        namespace: str,
        fingerprint: str,
        items: list[tuple[str, Vector, str]],
        *,
        model: str,
        context: Context | None = None,
    ) -> list[int]:
        """Bulk import of (query, embedding, response) with embeddings computed elsewhere (by the
        same embedder); for warm-up and benchmarks. Queries are cleaned, vectors must be unit length."""
        self._check_open()
        key = self._key(namespace, fingerprint, context)
        for q, v, _ in items:
            if v.shape != (self.embedder.dim,) or abs(float(np.linalg.norm(v)) - 1.0) > 1e-3:
                raise QueryError(f"embedding of {q[:40]!r} must be a unit vector of length {self.embedder.dim}")
        created = now()
        ttl = self.config.ttl_s
        entries = [
            Entry(
                key.partition,
                key.namespace,
                key.fingerprint,
                key.context_key,
                self._clean(q),
                v.astype("float32"),
                r,
                model,
                0.0,
                0,
                created,
                None if ttl is None else created + ttl,
                embedder=self.embedder.version,
            )
            for q, v, r in items
        ]
        ids = self.store_db.insert(entries)
        self._after_write([key.partition])
        return ids

    def _after_write(self, partitions: list[str]) -> None:
        with self._lock:
            for p in partitions:
                self.indexes.get(p)  # adds the new rows to the in-memory index now
        evicted = self.store_db.evict(self.config.max_entries, self.config.max_bytes)
        self.stats["evicted"] += evicted
        t = time.monotonic()
        if t - self._last_purge >= _PURGE_INTERVAL_S:
            self._last_purge = t
            self.purge_expired()
        if t - self._last_flush >= self.config.save_interval_s:
            self.flush()

    # ------------------------------------------------------------------ invalidation

    def invalidate(
        self,
        namespace: str | None = None,
        *,
        fingerprint: str | None = None,
        entry_id: int | None = None,
        older_than_s: float | None = None,
        include_users: bool = True,
    ) -> int:
        """Delete entries matching every given criterion; returns how many. ``namespace`` also
        covers its ``namespace/user`` sub-namespaces unless ``include_users`` is False."""
        self._check_open()
        where: list[str] = []
        params: list[object] = []
        if namespace is not None:
            ns = check_namespace(namespace)
            if include_users:
                where.append("(namespace = ? OR substr(namespace, 1, ?) = ?)")
                params += [ns, len(ns) + 1, ns + "/"]
            else:
                where.append("namespace = ?")
                params.append(ns)
        if fingerprint is not None:
            where.append("fingerprint = ?")
            params.append(check_fingerprint(fingerprint))
        if entry_id is not None:
            where.append("id = ?")
            params.append(int(entry_id))
        if older_than_s is not None:
            if older_than_s < 0:
                raise QueryError(f"older_than_s must not be negative, got {older_than_s}")
            where.append("created < ?")
            params.append(now() - older_than_s)
        if not where:
            raise QueryError("invalidate needs a namespace, fingerprint, entry_id or older_than_s")
        n = self.store_db.delete_where(" AND ".join(where), params)
        self.stats["invalidated"] += n
        return n

    def purge_expired(self) -> int:
        """Delete entries past their TTL (lookups never serve them either way)."""
        n = self.store_db.delete_where("expires IS NOT NULL AND expires <= ?", [now()])
        self.stats["expired_purged"] += n
        return n

    # ------------------------------------------------------------------ lifecycle

    def entries(self) -> int:
        return self.store_db.totals()[0]

    def flush(self) -> None:
        """Write changed indexes to disk (also done every ``save_interval_s`` and on close)."""
        with self._lock:
            self.indexes.flush()
            self._last_flush = time.monotonic()

    def _check_open(self) -> None:
        if self._closed:
            raise CacheError(f"cache {self.directory} is closed")

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self.flush()
            self._closed = True
            self.store_db.close()
            if self._owns_embedder:
                self.embedder.close()

    def __enter__(self) -> SemanticCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""Local semantic cache: answer repeated questions in milliseconds, without wrong or cross-tenant hits.

Use from the service pipeline (one line each)::

    from appliance.cache import CacheConfig, Context, SemanticCache, fingerprint

    cache = SemanticCache.open(directory, embedder=None, config=CacheConfig())  # None: default MiniLM GGUF
    fp = fingerprint(model, system_prompt, {"temperature": 0.0, "max_tokens": 256})
    hit = cache.lookup(tenant, fp, query, context=Context(summary, previous_turn), policy="auto")
    if hit is None:
        answer = generate(...)
        cache.store(tenant, fp, query, answer, model=model, context=..., cost=usd, tokens=n, policy="auto")
    # hit.response, hit.similarity, hit.cost_saved, hit.tokens_saved, hit.lookup_ms
    cache.invalidate(tenant)                     # or fingerprint=..., entry_id=..., older_than_s=...
    cache.close()                                # writes the indexes

- ``namespace`` is the tenant (``tenant`` or ``tenant/user``): a lookup searches only entries of the
  same namespace, fingerprint, conversation context and embedder (one index per such partition).
- ``fingerprint(model, system_prompt, params)`` covers everything besides the query that changes
  the answer; the cache adds the embedder version. ``Context`` (summary, previous turn) makes a
  multi-turn lookup depend on the conversation state, not on the last message alone.
- ``policy``: ``auto`` (look up; store), ``read-only`` (look up; store is a no-op), ``skip``
  (neither; nothing is embedded).
- A hit needs cosine >= the threshold calibrated for the embedder (``data/thresholds.json``,
  override with ``CacheConfig(threshold=...)``), recomputed from the SQLite copy of the
  embedding, not from the index; and no guard (:mod:`appliance.cache.guards`: negation, opposite
  actions, numbers, dates, named entities) may fire. Expired entries (``ttl_s``) are never served.
- SQLite (WAL) is the source of truth; hnswlib indexes are caches of it, caught up before every
  search, loaded only when their digest and sidecar match, rebuilt otherwise.
- Size budget: ``max_entries`` / ``max_bytes``; least recently used entries are evicted.
- Errors: :class:`QueryError` (empty, too long, non-UTF-8 query; bad ttl), :class:`KeyError_`
  (namespace / fingerprint), :class:`ConfigError`, :class:`EmbedderError`; all are
  :class:`CacheError`.

Modules: embedder (GGUF embeddings via llama.cpp), text (query checks), keys, guards, policy,
store (SQLite), index (hnswlib file), indexset (indexes kept in step with SQLite), config
(thresholds shipped), cache (this API), replay (``appliance cache eval``), calibrate, bench.
"""

from __future__ import annotations

from appliance.cache.cache import Hit, SemanticCache
from appliance.cache.config import CacheConfig, shipped_threshold
from appliance.cache.embedder import Embedder, GgufEmbedder
from appliance.cache.errors import CacheError, ConfigError, EmbedderError, KeyError_, QueryError
from appliance.cache.keys import Context, fingerprint
from appliance.cache.policy import Policy

__all__ = [
    "CacheConfig",
    "CacheError",
    "ConfigError",
    "Context",
    "Embedder",
    "EmbedderError",
    "GgufEmbedder",
    "Hit",
    "KeyError_",
    "Policy",
    "QueryError",
    "SemanticCache",
    "fingerprint",
    "shipped_threshold",
]

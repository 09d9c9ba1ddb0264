"""Lookup latency at scale (``appliance cache bench``): one partition filled with ``entries`` rows
(synthetic unit vectors, which are harder for hnswlib than real sentence embeddings), then
``lookups`` distinct real queries embedded by the real model: ``queries`` in order when there are
enough of them (``--queries CSV``), else six built-in questions numbered apart. Reports the one-off
index build from SQLite separately from the per-lookup figures."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from appliance.cache.cache import SemanticCache
from appliance.cache.config import CacheConfig
from appliance.cache.embedder import Embedder
from appliance.cache.keys import fingerprint

_QUERIES = (
    "How do I reset my online banking password?",
    "My card has not arrived yet, what should I do?",
    "Why was I charged a fee for a transfer?",
    "Can I get a refund for a duplicate payment?",
    "How long does a bank transfer take?",
    "What is the exchange rate for a card payment abroad?",
)


def bench(
    embedder: Embedder, entries: int = 100_000, lookups: int = 300, queries: Sequence[str] | None = None, seed: int = 0
) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    fp = fingerprint("bench-model")
    with tempfile.TemporaryDirectory(prefix="appliance-cache-bench-") as tmp:
        cache = SemanticCache.open(Path(tmp), embedder, CacheConfig(max_entries=max(entries, 1) * 2))
        try:
            t0 = time.perf_counter()
            done = 0
            while done < entries:
                n = min(10_000, entries - done)
                vecs = rng.standard_normal((n, embedder.dim)).astype(np.float32)
                vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
                cache.store_vectors(
                    "bench", fp, [(f"synthetic entry {done + i}", vecs[i], "answer") for i in range(n)], model="bench"
                )
                done += n
            insert_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            cache.lookup("bench", fp, "warm up the index")
            build_s = time.perf_counter() - t0
            times, embed_times = [], []
            queries = queries or _QUERIES
            computed = cache.embedder.computed
            for i in range(lookups):
                # distinct texts, so that no lookup finds its vector in the embedder's memory
                q = queries[i] if len(queries) >= lookups else f"{queries[i % len(queries)]} (request {i})"
                t0 = time.perf_counter()
                cache.embedder.inner.embed(q)  # the model alone, past the memory
                embed_times.append((time.perf_counter() - t0) * 1e3)
                t0 = time.perf_counter()
                cache.lookup("bench", fp, q)
                times.append((time.perf_counter() - t0) * 1e3)
            embedded = cache.embedder.computed - computed
            t0 = time.perf_counter()
            cache.flush()
            save_s = time.perf_counter() - t0
            n_entries = cache.entries()
        finally:
            cache.close()
    return {
        "entries": n_entries,
        "lookups": lookups,
        "lookups_embedded": embedded,  # lookups that ran the model (all of them: the texts are distinct)
        "p50_ms": float(np.percentile(times, 50)),
        "p99_ms": float(np.percentile(times, 99)),
        "embed_p50_ms": float(np.percentile(embed_times, 50)),
        "insert_s": insert_s,
        "index_build_s": build_s,
        "index_save_s": save_s,
        "embedder": embedder.version,
    }

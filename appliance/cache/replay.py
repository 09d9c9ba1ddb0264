"""Replay a labelled workload (CSV ``text,category``) through a cache, and the threshold curve.

:func:`replay` is what ``appliance cache eval`` reports: a fresh cache in a temporary directory
(real SQLite, real hnswlib index, real embedder) sees the rows in order; a miss stores the query
with its category as the answer, a hit is correct when the stored category equals the query's.
Its ``hit_rate`` and ``precision`` are those of the cache as configured (shipped threshold and
guards). :func:`simulate` recomputes the same dynamics in memory for many thresholds (exact
top-k search instead of hnswlib) to draw the precision / hit-rate curve.
"""

from __future__ import annotations

import csv
import random
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from appliance.cache.cache import SemanticCache
from appliance.cache.config import CacheConfig
from appliance.cache.embedder import Embedder
from appliance.cache.errors import CacheError
from appliance.cache.frontier import Replayer, embedder_decision, frontier_of
from appliance.cache.keys import fingerprint
from appliance.cache.text import clean_text

CURVE_THRESHOLDS = tuple(round(0.70 + 0.02 * i, 2) for i in range(15))
EVAL_NAMESPACE = "eval"


@dataclass(frozen=True)
class Example:
    text: str
    category: str


def read_csv(path: Path, *, shuffle_seed: int | None = None) -> list[Example]:
    """Rows of a ``text,category`` CSV (header required), optionally shuffled with a fixed seed."""
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"text", "category"} <= set(reader.fieldnames):
                raise CacheError(f"{path}: expected a header with columns text,category, got {reader.fieldnames}")
            rows = [Example(r["text"], r["category"]) for r in reader if r["text"] and r["text"].strip()]
    except UnicodeDecodeError as e:
        raise CacheError(f"{path} is not UTF-8: {e}") from None
    except OSError as e:
        raise CacheError(f"cannot read {path}: {e.strerror or e}") from None
    if not rows:
        raise CacheError(f"{path} has no rows")
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(rows)
    return rows


def split(rows: Sequence[Example], fraction: float) -> tuple[list[Example], list[Example]]:
    cut = int(len(rows) * fraction)
    return list(rows[:cut]), list(rows[cut:])


def _pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else 0.0


def replay(
    rows: Sequence[Example], embedder: Embedder, config: CacheConfig | None = None, *, curve: bool = True
) -> dict[str, Any]:
    """Replay ``rows`` through a fresh cache; returns the figures ``cache eval --json`` prints."""
    config = config or CacheConfig()
    fp = fingerprint("eval-model")
    times: list[float] = []
    embed_times: list[float] = []
    hits = correct = 0
    vectors: list[npt.NDArray[np.float32]] = []
    with tempfile.TemporaryDirectory(prefix="appliance-cache-eval-") as tmp:
        cache = SemanticCache.open(Path(tmp), embedder, config)
        try:
            for ex in rows:
                # Embedding and the rest of the lookup timed apart (the lookup finds the vector in
                # the cache's memo); p50_ms / p99_ms are of their sum.
                t0 = time.perf_counter()
                vec = cache.embed(clean_text(ex.text))
                t1 = time.perf_counter()
                hit = cache.lookup(EVAL_NAMESPACE, fp, ex.text)
                t2 = time.perf_counter()
                times.append((t2 - t0) * 1e3)
                embed_times.append((t1 - t0) * 1e3)
                if hit is not None:
                    hits += 1
                    correct += hit.response == ex.category
                else:
                    cache.store(EVAL_NAMESPACE, fp, ex.text, ex.category, model="eval-model")
                if curve:
                    vectors.append(vec)
            entries = cache.entries()
            threshold = cache.threshold
            decision = cache.decision
        finally:
            cache.close()
    out: dict[str, Any] = {
        "lookups": len(rows),
        "entries": entries,
        "hits": hits,
        "hit_rate": hits / len(rows),
        "precision": correct / hits if hits else 1.0,
        "p50_ms": _pct(times, 50),
        "p99_ms": _pct(times, 99),
        "embed_p50_ms": _pct(embed_times, 50),
        "search_p50_ms": _pct([t - e for t, e in zip(times, embed_times, strict=True)], 50),
        "threshold": threshold,
        "decision": "threshold" if decision is None else f"calibrated, cutoff {decision.cutoff}",
        "guards": config.guards,
        "embedder": embedder.version,
    }
    if curve:
        replayer = Replayer(np.stack(vectors), [r.text for r in rows], [r.category for r in rows], guards=config.guards)
        out["curve"] = replayer.threshold_curve(CURVE_THRESHOLDS)
        out["frontier"] = frontier_of(replayer, decision)
    return out


def embed_rows(rows: Sequence[Example], embedder: Embedder) -> npt.NDArray[np.float32]:
    return np.stack([embedder.embed(clean_text(r.text)) for r in rows])


def frontier(rows: Sequence[Example], embedder: Embedder, *, guards: bool = True) -> dict[str, Any]:
    """The precision / hit-rate frontier of ``rows`` replayed under ``embedder``: its threshold curve
    and, when it carries a calibrated decision, that decision's curve."""
    replayer = Replayer(embed_rows(rows, embedder), [r.text for r in rows], [r.category for r in rows], guards=guards)
    return {"embedder": embedder.version, **frontier_of(replayer, embedder_decision(embedder))}


def simulate(
    vectors: npt.NDArray[np.float32],
    texts: Sequence[str],
    labels: Sequence[str],
    thresholds: Sequence[float],
    config: CacheConfig,
) -> list[dict[str, float]]:
    """Hit rate and precision of the replay at each threshold (exact top-k, same guards)."""
    return Replayer(vectors, texts, labels, guards=config.guards, k=config.candidates).threshold_curve(thresholds)

"""Time to first token with a 1,024-token system prompt already in the prefix cache versus cold.

Cold: the same prompt under a tenant that never ran it (the prefix cache is salted per tenant).
Warm: after one request of that tenant with the same system prompt, a new request whose user turn
differs. Medians over `reps`; one engine, in this process.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from appliance.bench.common import random_tokens


def bench_prefix(model: str, threads: int, n_system: int = 1024, n_user: int = 16, reps: int = 3) -> dict[str, Any]:
    from appliance import _native

    m = _native.Model(model)
    engine = _native.BatchEngine(m, kv_cache_mb=256, n_threads=threads)
    system = random_tokens(m.n_vocab, n_system, 7)

    def ttft(tenant: str, user_seed: int) -> float:
        t0 = time.perf_counter()
        engine.submit(system + random_tokens(m.n_vocab, n_user, user_seed), max_tokens=1, tenant=tenant)
        first = 0.0
        while not engine.idle:
            for ev in engine.step():
                if ev.tokens and not first:
                    first = time.perf_counter() - t0
        return first

    ttft("warm-up", 0)
    cold = [ttft(f"cold-{k}", 100 + k) for k in range(reps)]
    ttft("warm", 1)  # caches the system prompt for tenant "warm"
    warm = [ttft("warm", 200 + k) for k in range(reps)]
    stats = engine.stats()
    cold_ms = statistics.median(cold) * 1000
    warm_ms = statistics.median(warm) * 1000
    return {
        "model": model,
        "threads": threads,
        "system_prompt_tokens": n_system,
        "user_tokens": n_user,
        "reps": reps,
        "cold_ttft_ms": round(cold_ms, 1),
        "warm_ttft_ms": round(warm_ms, 1),
        "ratio": round(warm_ms / cold_ms, 4),
        # every cached position costs the global layers' K/V; sliding-window layers keep only windows
        "kv_bytes_per_token": stats["kv_bytes_per_token"],
        "kv_bytes_per_token_swa": stats["kv_bytes_per_token_swa"],
        "kv_cells": stats["n_blocks"] * stats["block_size"],
        "kv_cells_swa": stats["n_blocks_swa"] * stats["block_size"],
        "kv_bytes": stats["kv_bytes"],
        "prefix_hits": stats["prefix_hits"],
    }

"""What the service costs: requests/s and latency of short generations through the gRPC service (a
real server process on a Unix socket, real clients, the ledger committed per request) versus the
same requests through the batching engine directly, in this process.

Each round: `c` clients each send their share of the requests one after another (greedy, 16 tokens,
semantic cache off so every request runs the model). Same model, thread count and engine settings
on both sides; the server and the direct engine never run at the same time.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from appliance.bench.common import start_service, write_service_config
from appliance.sampling import SamplingOptions

CONCURRENCY = (1, 4, 8, 16)
MAX_TOKENS = 16


def _prompts(n: int, round_id: int) -> list[str]:
    """Distinct prompts whose first tokens differ, so no round reuses another's cached prefix blocks."""
    topics = ["my card", "a transfer", "the app", "my pin", "a refund", "my account", "exchange rates", "fees"]
    return [
        f"Ticket {round_id}-{k}: I have a problem with {topics[k % len(topics)]}. What should I do?" for k in range(n)
    ]


def _summary(latencies: list[float], wall: float) -> dict[str, float]:
    lat = sorted(latencies)
    return {
        "rps": round(len(lat) / wall, 3),
        "p50_ms": round(statistics.median(lat) * 1000, 1),
        "p99_ms": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1000, 1),
    }


def _direct(model: str, threads: int, c: int, prompts: list[str]) -> dict[str, float]:
    from appliance.async_engine import AsyncEngine

    engine = AsyncEngine(model, n_threads=threads, max_seqs=16)
    opts = SamplingOptions(temperature=0.0, max_tokens=MAX_TOKENS)
    latencies: list[float] = []

    async def client(mine: list[str]) -> None:
        for p in mine:
            t0 = time.perf_counter()
            async for _chunk in engine.generate(p, opts, tenant="bench"):
                pass
            latencies.append(time.perf_counter() - t0)

    async def main() -> float:
        await client(_prompts(1, -1))  # warm-up
        latencies.clear()
        t0 = time.perf_counter()
        await asyncio.gather(*(client(prompts[i::c]) for i in range(c)))
        return time.perf_counter() - t0

    try:
        wall = asyncio.run(main())
    finally:
        engine.close()
    return _summary(latencies, wall)


def _start_server(model: str, threads: int, d: Path) -> subprocess.Popen[str]:
    cfg = write_service_config(d, model, threads, max_concurrent=16, cache=False, extra=[])
    return start_service(cfg, d / "s.sock", d / "server.log")


def _service(target: str, c: int, prompts: list[str]) -> dict[str, float]:
    from appliance.service.client import Client

    latencies: list[float] = []

    def client(mine: list[str]) -> None:
        with Client.connect(target) as cl:
            for p in mine:
                t0 = time.perf_counter()
                cl.generate(prompt=p, max_tokens=MAX_TOKENS, temperature=0.0, cache_policy=1, timeout=300)
                latencies.append(time.perf_counter() - t0)

    client(_prompts(1, -1))  # warm-up
    latencies.clear()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(c) as pool:
        list(pool.map(client, [prompts[i::c] for i in range(c)]))
    return _summary(latencies, time.perf_counter() - t0)


def bench_serve(model: str, threads: int, concurrency: tuple[int, ...] = CONCURRENCY) -> dict[str, Any]:
    res: dict[str, Any] = {
        "model": model,
        "threads": threads,
        "max_tokens": MAX_TOKENS,
        "concurrency": list(concurrency),
    }
    rows: dict[str, list[dict[str, float]]] = {"service": [], "engine": []}
    with tempfile.TemporaryDirectory(prefix="appliance-bench-serve-") as tmp:
        proc = _start_server(model, threads, Path(tmp))
        try:
            for c in concurrency:
                rows["service"].append(_service(f"unix:{Path(tmp) / 's.sock'}", c, _prompts(max(8, 4 * c), c)))
                print(f"  c={c} service: {rows['service'][-1]}", file=sys.stderr, flush=True)
        finally:
            proc.terminate()
            proc.wait(60)
    for c in concurrency:
        rows["engine"].append(_direct(model, threads, c, _prompts(max(8, 4 * c), c)))
        print(f"  c={c} engine: {rows['engine'][-1]}", file=sys.stderr, flush=True)
    for side in ("service", "engine"):
        for key in ("rps", "p50_ms", "p99_ms"):
            res[f"{side}_{key}"] = [r[key] for r in rows[side]]
    res["throughput_cost"] = [round(1 - s / e, 3) for s, e in zip(res["service_rps"], res["engine_rps"], strict=True)]
    return res

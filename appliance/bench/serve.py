"""What the service costs: requests/s and latency of short generations through the gRPC service (a
real server process on a Unix socket, real clients, the ledger committed per request) versus the
same requests through the batching engine directly, in this process. With `peer="llama-server"`
(`bench_serve_peer`): the service against llama-server instead, 128-token streamed greedy requests
from 1, 8 and 16 clients, tokens/s and time to first token (the runner `bench http` uses).

Each round: `c` clients each send their share of the requests one after another (greedy, 16 tokens,
semantic cache off so every request runs the model). Same model, thread count and engine settings
on both sides (early exit off on both); the server and the direct engine never run at the same time.
CPU time per request is reported for the server process, the clients (this process) and the direct
engine, since on a small machine the clients compete with the server for the same cores.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from appliance.bench.common import start_service, write_service_config
from appliance.bench.rounds import against_llama_server, grpc_side
from appliance.bench.rounds import prompts as _prompts
from appliance.engine.sampling import SamplingOptions

CONCURRENCY = (1, 4, 8, 16)
PEER_CONCURRENCY = (1, 8, 16)
MAX_TOKENS = 16
PEER_MAX_TOKENS = 128


def _summary(latencies: list[float], wall: float) -> dict[str, float]:
    lat = sorted(latencies)
    return {
        "rps": round(len(lat) / wall, 3),
        "p50_ms": round(statistics.median(lat) * 1000, 1),
        "p99_ms": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1000, 1),
    }


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid`, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _direct(model: str, threads: int, c: int, prompts: list[str]) -> dict[str, float]:
    from appliance.engine.async_engine import AsyncEngine

    engine = AsyncEngine(model, n_threads=threads, max_seqs=16)
    opts = SamplingOptions(temperature=0.0, max_tokens=MAX_TOKENS)
    latencies: list[float] = []

    async def client(mine: list[str]) -> None:
        for p in mine:
            t0 = time.perf_counter()
            async for _chunk in engine.generate(p, opts, tenant="bench"):
                pass
            latencies.append(time.perf_counter() - t0)

    async def main() -> tuple[float, float]:
        await client(_prompts(1, -1))  # warm-up
        latencies.clear()
        t0, cpu0 = time.perf_counter(), time.process_time()
        await asyncio.gather(*(client(prompts[i::c]) for i in range(c)))
        return time.perf_counter() - t0, time.process_time() - cpu0

    try:
        wall, cpu = asyncio.run(main())
    finally:
        engine.close()
    return {**_summary(latencies, wall), "cpu_ms_per_req": round(cpu / len(prompts) * 1000, 1)}


def _start_server(model: str, threads: int, d: Path) -> subprocess.Popen[str]:
    cfg = write_service_config(
        d,
        model,
        threads,
        max_concurrent=16,
        cache=False,
        extra=[],
        model_extra=('early_exit = "off"', "cut_loops = false"),
    )
    return start_service(cfg, d / "s.sock", d / "server.log")


def _service(target: str, c: int, prompts: list[str], server_pid: int) -> dict[str, float]:
    from appliance.edge.grpc.client import Client

    latencies: list[float] = []

    def client(mine: list[str]) -> None:
        with Client.connect(target) as cl:
            for p in mine:
                t0 = time.perf_counter()
                cl.generate(prompt=p, max_tokens=MAX_TOKENS, temperature=0.0, cache_policy=1, timeout=300)
                latencies.append(time.perf_counter() - t0)

    client(_prompts(1, -1))  # warm-up
    latencies.clear()
    t0, cpu0, server0 = time.perf_counter(), time.process_time(), _cpu_s(server_pid)
    with ThreadPoolExecutor(c) as pool:
        list(pool.map(client, [prompts[i::c] for i in range(c)]))
    wall, cpu, server_cpu = time.perf_counter() - t0, time.process_time() - cpu0, _cpu_s(server_pid) - server0
    n = len(prompts)
    return {
        **_summary(latencies, wall),
        "cpu_ms_per_req": round(server_cpu / n * 1000, 1),
        "client_cpu_ms_per_req": round(cpu / n * 1000, 1),
    }


def bench_serve(
    model: str, threads: int, concurrency: tuple[int, ...] = CONCURRENCY, repeats: int = 3, per_client: int = 4
) -> dict[str, Any]:
    """At each concurrency, `repeats` pairs of rounds, service then engine, back to back (so slow drift
    of the machine hits both sides alike); figures are the medians over the repeats, and the cost of
    each pair is listed too. Every round has prompts of its own (no prefix-cache reuse across rounds)."""
    res: dict[str, Any] = {
        "model": model,
        "threads": threads,
        "max_tokens": MAX_TOKENS,
        "concurrency": list(concurrency),
        "repeats": repeats,
        "per_client": per_client,
    }
    rows: dict[str, list[dict[str, float]]] = {"service": [], "engine": []}
    pair_costs: list[list[float]] = []
    with tempfile.TemporaryDirectory(prefix="appliance-bench-serve-") as tmp:
        proc = _start_server(model, threads, Path(tmp))
        try:
            for c in concurrency:
                runs: dict[str, list[dict[str, float]]] = {"service": [], "engine": []}
                for rep in range(repeats):
                    prompts = _prompts(max(8, per_client * c), f"{c}.{rep}")
                    runs["service"].append(_service(f"unix:{Path(tmp) / 's.sock'}", c, prompts, proc.pid))
                    runs["engine"].append(_direct(model, threads, c, prompts))
                    print(f"  c={c} #{rep}: service {runs['service'][-1]} engine {runs['engine'][-1]}", file=sys.stderr)
                for side in ("service", "engine"):
                    rows[side].append({k: statistics.median(r[k] for r in runs[side]) for k in runs[side][0]})
                pair_costs.append(
                    [round(1 - s["rps"] / e["rps"], 3) for s, e in zip(runs["service"], runs["engine"], strict=True)]
                )
        finally:
            proc.terminate()
            proc.wait(60)
    for side in ("service", "engine"):
        for key in ("rps", "p50_ms", "p99_ms", "cpu_ms_per_req"):
            res[f"{side}_{key}"] = [r[key] for r in rows[side]]
    res["client_cpu_ms_per_req"] = [r["client_cpu_ms_per_req"] for r in rows["service"]]
    res["throughput_cost"] = [round(1 - s / e, 3) for s, e in zip(res["service_rps"], res["engine_rps"], strict=True)]
    res["throughput_cost_per_pair"] = pair_costs
    return res


def bench_serve_peer(
    model: str,
    threads: int,
    concurrency: Sequence[int] = PEER_CONCURRENCY,
    repeats: int = 3,
    max_tokens: int = PEER_MAX_TOKENS,
) -> dict[str, Any]:
    """Our gRPC service (a real `appliance serve`: the default config, early exit as it configures it,
    the semantic cache off) against llama-server (`-np` = clients, flash attention, the same model and
    ggml build): streamed greedy requests of `max_tokens` tokens, alternating rounds, medians."""
    res = against_llama_server(
        model,
        threads,
        lambda d: lambda c: grpc_side(f"unix:{d / 's.sock'}", max_tokens),
        concurrency=concurrency,
        repeats=repeats,
        max_tokens=max_tokens,
        label="serve ",
    )
    return {**res, "ours": "gRPC GenerateStream over the Unix socket; default early exit; semantic cache off"}

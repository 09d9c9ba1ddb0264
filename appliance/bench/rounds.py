"""Ours against a peer as a client sees it: rounds of `clients` concurrent streamed requests of
`max_tokens` greedy tokens each, a round of one side then a round of the other (which goes first
alternates), every round with prompts of its own so no side reuses cached prefixes; per concurrency
the medians over the rounds of the aggregate completion tokens/s and of each round's median time to
first token. `bench http` and `bench serve --peer` both run through `compare`."""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx

from appliance.bench import peer
from appliance.bench.common import start_service, write_service_config

Send = Callable[[str], tuple[int, float]]  # one streamed request: (completion tokens, seconds to first text)
Side = Callable[[int], AbstractContextManager[Send]]  # given the concurrency, a side ready to take requests


def prompts(n: int, round_id: int | str) -> list[str]:
    """Distinct prompts whose first tokens differ, so no round reuses another's cached prefix blocks."""
    topics = ["my card", "a transfer", "the app", "my pin", "a refund", "my account", "exchange rates", "fees"]
    return [
        f"Ticket {round_id}-{k}: I have a problem with {topics[k % len(topics)]}. What should I do?" for k in range(n)
    ]


@contextmanager
def openai_side(base_url: str, model: str, max_tokens: int, *, chat: bool = False) -> Iterator[Send]:
    """Streamed greedy `/v1/completions` (or `/v1/chat/completions`) requests to an OpenAI-compatible
    server: the same client code for ours and the peer's. Tokens are the server's own usage count."""
    # a connection per request (no keep-alive): one left idle while the other side's round runs may be
    # closed by its server just as it is reused
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=0)
    http = httpx.Client(timeout=httpx.Timeout(600.0), limits=limits)
    url = base_url.rstrip("/") + ("/chat/completions" if chat else "/completions")

    def send(prompt: str) -> tuple[int, float]:
        body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": 0.0, "stream": True}
        body["stream_options"] = {"include_usage": True}
        if chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        t0 = time.perf_counter()
        first = 0.0
        tokens = pieces = 0
        with http.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                raise RuntimeError(f"{url} answered {resp.status_code}: {resp.read()[:300]!r}")
            for line in resp.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    raise RuntimeError(f"{url} stream error: {data['error']}")
                for choice in data.get("choices") or []:
                    text = choice.get("text") or (choice.get("delta") or {}).get("content")
                    if text:
                        pieces += 1
                        first = first or time.perf_counter() - t0
                if data.get("usage"):
                    tokens = int(data["usage"]["completion_tokens"])
        return tokens or pieces, first

    try:
        yield send
    finally:
        http.close()


@contextmanager
def grpc_side(target: str, max_tokens: int) -> Iterator[Send]:
    """Streamed greedy GenerateStream requests to our gRPC service (the server's config decides the rest:
    early exit, the semantic cache)."""
    from appliance.edge.grpc.client import Client

    client = Client.connect(target)

    def send(prompt: str) -> tuple[int, float]:
        t0 = time.perf_counter()
        first = 0.0
        tokens = 0
        for chunk in client.stream(prompt=prompt, max_tokens=max_tokens, temperature=0.0, timeout=600):
            if chunk.delta and not first:
                first = time.perf_counter() - t0
            if chunk.done:
                tokens = chunk.final.usage.completion_tokens
        return tokens, first

    try:
        yield send
    finally:
        client.close()


@contextmanager
def llama_server_side(model: str, threads: int, slots: int, log: Path, max_tokens: int) -> Iterator[Send]:
    """llama-server (`bench/peer.py`) with `slots` parallel sequences, taking the same streamed greedy
    /v1/completions requests, for as long as the block runs."""
    proc, url = peer.start(model, log, threads=threads, slots=slots)
    try:
        with openai_side(url, "llama-server", max_tokens) as send:
            yield send
    finally:
        proc.terminate()
        proc.wait(60)


def against_llama_server(
    model: str,
    threads: int,
    ours: Callable[[Path], Side],
    *,
    concurrency: Sequence[int],
    repeats: int,
    max_tokens: int,
    extra: Sequence[str] = (),
    label: str = "",
) -> dict[str, Any]:
    """A real `appliance serve` (default config plus `extra` lines, the semantic cache off so every
    request runs the model, `max_concurrent` at least the clients) against llama-server with `-np` =
    clients; `ours(folder)` is our side given the service's folder (its socket is folder/s.sock)."""
    peer.build()
    with tempfile.TemporaryDirectory(prefix="appliance-bench-peer-") as tmp:
        d = Path(tmp)
        cfg = write_service_config(
            d,
            model,
            threads,
            max_concurrent=max(8, *concurrency),
            cache=False,
            extra=list(extra),
            model_extra=("cut_loops = false",),  # as many tokens as llama-server generates
        )
        proc = start_service(cfg, d / "s.sock", d / "server.log")
        try:
            sides = {
                "ours": ours(d),
                "llama_server": lambda c: llama_server_side(model, threads, c, d / f"llama-server-{c}.log", max_tokens),
            }
            rows = compare(sides, concurrency, repeats, label=label)
        finally:
            proc.terminate()
            proc.wait(60)
    res: dict[str, Any] = {"model": model, "threads": threads, "max_tokens": max_tokens, "repeats": repeats}
    return {**res, **columns(rows)}


def one_round(send: Send, batch: Sequence[str]) -> dict[str, float]:
    """All of `batch` at once, one client thread each: aggregate tokens/s and the median TTFT."""
    start = threading.Barrier(len(batch) + 1)

    def client(p: str) -> tuple[int, float]:
        start.wait()
        return send(p)

    with ThreadPoolExecutor(len(batch)) as pool:
        futures = [pool.submit(client, p) for p in batch]
        start.wait()
        t0 = time.perf_counter()
        done = [f.result() for f in futures]
        wall = time.perf_counter() - t0
    return {
        "tps": sum(t for t, _ in done) / wall,
        "ttft_p50_ms": statistics.median(f for _, f in done) * 1000,
        "tokens": sum(t for t, _ in done),
    }


def compare(
    sides: dict[str, Side],
    concurrency: Sequence[int],
    repeats: int,
    *,
    label: str = "",
) -> list[dict[str, Any]]:
    """For each concurrency `c`, `repeats` rounds per side, alternating which side goes first.
    `sides` maps a name ("ours" first, then the peer) to a context manager factory: given `c`, it
    yields the side's Send for that concurrency (a peer may be started per concurrency, with `c`
    slots). Rows: clients, <side>_tps, <side>_ttft_p50_ms (medians), ratio (first side / second),
    and each round's tokens/s."""
    names = list(sides)
    rows = []
    for c in concurrency:
        runs: dict[str, list[dict[str, float]]] = {n: [] for n in names}
        with _entered(sides, c) as senders:
            for n in names:  # warm-up: the first request of a process pays for page faults, graph setup
                senders[n](f"Warm-up {label} {c}: hello")
            for rep in range(repeats):
                order = names if rep % 2 == 0 else names[::-1]
                batch = prompts(c, f"{label}{c}.{rep}")
                for n in order:
                    runs[n].append(one_round(senders[n], batch))
                line = ", ".join(f"{n} {runs[n][-1]['tps']:.1f} t/s" for n in names)
                print(f"  {label}clients={c} round {rep + 1}/{repeats}: {line}", file=sys.stderr, flush=True)
        row: dict[str, Any] = {"clients": c}
        for n in names:
            row[f"{n}_tps"] = round(statistics.median(r["tps"] for r in runs[n]), 2)
        ours, peer = names[0], names[1]
        row["ratio"] = round(row[f"{ours}_tps"] / row[f"{peer}_tps"], 3) if row[f"{peer}_tps"] else None
        for n in names:
            row[f"{n}_ttft_p50_ms"] = round(statistics.median(r["ttft_p50_ms"] for r in runs[n]), 1)
        row["round_ratios"] = [
            round(a["tps"] / b["tps"], 3) if b["tps"] else None for a, b in zip(runs[ours], runs[peer], strict=True)
        ]
        row["tokens_per_round"] = {n: [int(r["tokens"]) for r in runs[n]] for n in names}
        rows.append(row)
    return rows


def columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Rows (one per concurrency) as one list per key, as the other benchmarks print them."""
    return {k: [r[k] for r in rows] for k in rows[0]} if rows else {}


@contextmanager
def _entered(sides: dict[str, Side], c: int) -> Iterator[dict[str, Send]]:
    with ExitStack() as stack:
        yield {n: stack.enter_context(factory(c)) for n, factory in sides.items()}

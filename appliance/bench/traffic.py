"""Mixed gRPC traffic for `bench soak` and `bench chaos`: worker threads, each a closed loop of requests
of kinds drawn from a weighted mix, through the real client (appliance.edge.grpc.client) on the
service's Unix socket. Every request gets its own request_id; what each ended as (the gRPC status, the
route that answered, latency) is kept, and an answer the client received in full (a unary response,
a stream's final chunk) is *acknowledged*: the service promises its ledger row before sending it.

Kinds:
    cache     one of a few fixed questions again and again (local, semantic cache on): hits after the first
    local     a new prompt, generated locally (cache skipped)
    stream    the same, streamed
    chat      a turn in one of the worker's sessions (Chat, streamed)
    embed     Embed of one to three texts (no ledger row: not a generation)
    cancel    a stream the client cancels after its first chunk
    deadline  a longer generation under a short deadline (0.2-1 s)
    cloud     a new prompt, cloud only (the flaky cloud: unary or streamed; failures fall back locally)
    capture   a question, cloud only, cache on (cacheable, captured when the tenant captures)
    hot       a question under a long shared system prompt (local): a hot prefix to save at shutdown

A request refused as overloaded (RESOURCE_EXHAUSTED) waits a short random backoff (the service's
retry hint, capped) before the worker's next request, so the offered load stays at the worker count.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from appliance.edge.grpc.client import Client

KINDS = ("cache", "local", "stream", "chat", "embed", "cancel", "deadline", "cloud", "capture", "hot")
ROUTES = {0: "", 1: "cache", 2: "local", 3: "cloud"}
CACHE_QUESTIONS = (
    "What is the capital of France?",
    "How many days are in a leap year?",
    "What colour is the sky on a clear day?",
    "Name the largest planet in the solar system.",
    "What is two plus two?",
    "Which ocean is the largest?",
    "What language is spoken in Brazil?",
    "How many legs does a spider have?",
)
TOPICS = ("rivers", "bread", "trains", "owls", "glass", "maps", "tea", "clocks", "bees", "salt", "wool", "kites")
HOT_SYSTEM = (
    "You are the help desk of a small bank. Answer briefly and politely, in one sentence, and never ask "
    "for a password or a PIN. If a question is not about banking, say that you can only help with banking. "
) * 3
LOCAL_ONLY, CLOUD_ONLY = 1, 2
CACHE_AUTO, CACHE_SKIP = 0, 1
TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Outcome:
    start: float  # seconds since the traffic started
    kind: str
    code: str  # gRPC status name: OK, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, CANCELLED, ...
    latency_s: float
    request_id: str = ""
    tenant: str = ""
    route: str = ""  # the route that answered (acknowledged answers only)
    degraded: bool = False
    finish: str = ""
    prompt: str = ""  # for cacheable answers: the question, to find its cache entry
    text: str = ""  # for cacheable answers: the answer

    @property
    def acked(self) -> bool:
        return self.code == "OK" and bool(self.request_id) and self.kind != "embed"


class Traffic:
    """`workers` threads over `channels` gRPC channels to `target`, drawing kinds from `mix`."""

    def __init__(
        self,
        target: str,
        workers: int,
        mix: Mapping[str, float],
        *,
        prefix: str = "t",
        tenant: str = "",
        max_tokens: int = 16,
        seed: int = 0,
        channels: int = 4,
        backoff_cap_s: float = 0.25,
    ) -> None:
        unknown = sorted(set(mix) - set(KINDS))
        if unknown or not any(w > 0 for w in mix.values()):
            raise ValueError(f"traffic mix {dict(mix)}: weights over {', '.join(KINDS)}, not all 0")
        self.target, self.workers, self.mix = target, workers, dict(mix)
        self.prefix, self.tenant, self.max_tokens = prefix, tenant, max_tokens
        self.seed, self.backoff_cap_s = seed, backoff_cap_s
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._clients = [Client.connect(target) for _ in range(max(1, min(channels, workers)))]
        self._threads: list[threading.Thread] = []
        self.t0 = 0.0

    # ------------------------------------------------------------------ running

    def start(self) -> None:
        self.t0 = time.monotonic()
        for w in range(self.workers):
            t = threading.Thread(target=self._worker, args=(w,), name=f"traffic-{w}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, join_s: float = TIMEOUT_S + 5) -> int:
        """Stop drawing new requests and wait for the ones in flight; returns the workers still stuck."""
        self._stop.set()
        deadline = time.monotonic() + join_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return sum(t.is_alive() for t in self._threads)

    def close(self) -> None:
        for c in self._clients:
            c.close()

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)

    def acked(self) -> list[Outcome]:
        return [o for o in self.snapshot() if o.acked]

    # ------------------------------------------------------------------ one worker

    def _worker(self, w: int) -> None:
        rng = random.Random(self.seed * 1000 + w)
        client = self._clients[w % len(self._clients)]
        kinds = [k for k in self.mix if self.mix[k] > 0]
        weights = [self.mix[k] for k in kinds]
        i = 0
        while not self._stop.is_set():
            kind = rng.choices(kinds, weights)[0]
            rid = f"{self.prefix}-w{w}-{i}"
            i += 1
            t = time.monotonic()
            try:
                out = self._one(client, kind, rid, w, i, rng)
                code = "OK"
            except _Cancelled:
                out, code = {}, "CANCELLED_BY_CLIENT"
            except grpc.RpcError as e:
                out, code = {}, _code(e)
            except Exception as e:  # a client-side surprise is an outcome too, never a dead worker
                out, code = {}, f"CLIENT_{type(e).__name__}"
            o = Outcome(t - self.t0, kind, code, time.monotonic() - t, **out)
            with self._lock:
                self.outcomes.append(o)
            if code == "RESOURCE_EXHAUSTED":
                self._stop.wait(rng.uniform(0.02, self.backoff_cap_s))
            elif code not in ("OK", "CANCELLED_BY_CLIENT", "DEADLINE_EXCEEDED"):
                self._stop.wait(0.02)

    def _one(self, c: Client, kind: str, rid: str, w: int, i: int, rng: random.Random) -> dict[str, Any]:
        tenant, mt = self.tenant, self.max_tokens
        base: dict[str, Any] = {"request_id": rid, "tenant": tenant, "temperature": 0.0, "timeout": TIMEOUT_S}
        unique = f"In one sentence, tell me a fact about {rng.choice(TOPICS)} (note {rid})."
        if kind == "cache":
            q = rng.choice(CACHE_QUESTIONS)
            r = c.generate(prompt=q, route_policy=LOCAL_ONLY, cache_policy=CACHE_AUTO, max_tokens=mt, **base)
            return _final(r, rid, tenant, prompt=q)
        if kind == "local":
            r = c.generate(prompt=unique, route_policy=LOCAL_ONLY, cache_policy=CACHE_SKIP, max_tokens=mt, **base)
            return _final(r, rid, tenant)
        if kind == "stream":
            it = c.stream(prompt=unique, route_policy=LOCAL_ONLY, cache_policy=CACHE_SKIP, max_tokens=mt, **base)
            return _drain(it, rid, tenant)
        if kind == "chat":
            session = f"{self.prefix}-s{w}-{rng.randrange(3)}"
            it = c.chat(
                session_id=session,
                messages=[("user", unique)],
                route_policy=LOCAL_ONLY,
                cache_policy=CACHE_SKIP,
                max_tokens=mt,
                **base,
            )
            return _drain(it, rid, tenant)
        if kind == "embed":
            c.embed([f"{rng.choice(TOPICS)} {n}" for n in range(rng.randint(1, 3))], tenant=tenant, timeout=TIMEOUT_S)
            return {}
        if kind == "cancel":
            it = c.stream(prompt=unique, route_policy=LOCAL_ONLY, cache_policy=CACHE_SKIP, max_tokens=4 * mt, **base)
            next(iter(it))
            it.cancel()  # type: ignore[attr-defined]
            raise _Cancelled()
        if kind == "deadline":
            base["timeout"] = rng.uniform(0.2, 1.0)
            r = c.generate(prompt=unique, route_policy=LOCAL_ONLY, cache_policy=CACHE_SKIP, max_tokens=4 * mt, **base)
            return _final(r, rid, tenant)
        if kind == "cloud":
            ask: dict[str, Any] = {
                "prompt": unique,
                "route_policy": CLOUD_ONLY,
                "cache_policy": CACHE_SKIP,
                "max_tokens": 2 * mt,
            }
            if i % 2:
                return _drain(c.stream(**ask, **base), rid, tenant)
            return _final(c.generate(**ask, **base), rid, tenant)
        if kind == "capture":
            q = f"Please explain {rng.choice(TOPICS)}, case {rng.randrange(1_000_000)}."
            r = c.generate(prompt=q, route_policy=CLOUD_ONLY, cache_policy=CACHE_AUTO, max_tokens=mt, **base)
            return _final(r, rid, tenant, prompt=q)
        if kind == "hot":
            msgs = [("system", HOT_SYSTEM), ("user", unique)]
            r = c.generate(messages=msgs, route_policy=LOCAL_ONLY, cache_policy=CACHE_SKIP, max_tokens=4, **base)
            return _final(r, rid, tenant)
        raise ValueError(f"unknown traffic kind {kind!r}")


class _Cancelled(Exception):
    """The client cancelled its own stream (counted as CANCELLED_BY_CLIENT)."""


def _code(e: grpc.RpcError) -> str:
    code = e.code() if hasattr(e, "code") else None
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"


def _final(r: Any, rid: str, tenant: str, prompt: str = "") -> dict[str, Any]:
    out = {
        "request_id": rid,
        "tenant": tenant,
        "route": ROUTES.get(int(r.route), str(r.route)),
        "degraded": bool(r.degraded),
        "finish": str(r.finish_reason),
    }
    if prompt:
        out.update(prompt=prompt, text=str(r.text))
    return out


def _drain(it: Iterator[Any], rid: str, tenant: str) -> dict[str, Any]:
    last = None
    for chunk in it:
        last = chunk
    if last is None or not last.done:
        raise RuntimeError("the stream ended without its final chunk")
    return _final(last.final, rid, tenant)

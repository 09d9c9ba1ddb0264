"""Prometheus metrics in the text exposition format, served on a local HTTP port (GET /metrics).
Kept in a `Metrics` instance owned by the server (no module-level state)."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

from appliance.common.types import Result

LATENCY_BUCKETS_MS = (10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)
Gauges = Callable[[], dict[str, float]]


def _labels(**kv: str) -> str:
    inner = ",".join(
        f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"' for k, v in kv.items()
    )
    return "{" + inner + "}"


def early_exit_gauges(stats: Mapping[str, Any]) -> dict[str, float]:
    """The lossless drafting policy from the engine's stats (BatchEngine.stats()): the draft's
    measured acceptance and, per number of decoding sequences, whether it drafts, its draft-length
    cap, the predicted milliseconds per token of drafting and of plain steps, and the measured pass
    times (draft and plain by sequences, verification by drafted positions)."""
    out: dict[str, float] = {"appliance_early_exit_acceptance": float(stats.get("spec_acceptance", 0.0))}
    for n, c in stats.get("spec_choices", {}).items():
        seqs = _labels(seqs=str(n))
        out[f"appliance_early_exit_drafting{seqs}"] = 1.0 if c["drafting"] else 0.0
        out[f"appliance_early_exit_draft_cap{seqs}"] = float(c["cap"] if c["drafting"] else 0)
        for kind in ("spec", "plain"):
            out[f"appliance_early_exit_predicted_ms_per_token{_labels(seqs=str(n), kind=kind)}"] = (
                c[f"{kind}_us_per_token"] / 1e3
            )
    for kind, rows in (("draft", "seqs"), ("plain", "seqs"), ("verify", "positions")):
        for n, us in stats.get(f"spec_{kind}_us", {}).items():
            out[f"appliance_early_exit_pass_ms{_labels(kind=kind, **{rows: str(n)})}"] = us / 1e3
    return out


class Metrics:
    def __init__(self) -> None:
        self.requests: defaultdict[tuple[str, str, str], int] = defaultdict(int)  # (method, route, code)
        self.tokens: defaultdict[tuple[str, str], int] = defaultdict(int)  # (route, kind)
        self.cost: defaultdict[tuple[str, str], float] = defaultdict(float)  # (route, kind)
        self.latency_counts: defaultdict[str, list[int]] = defaultdict(lambda: [0] * (len(LATENCY_BUCKETS_MS) + 1))
        self.latency_sum: defaultdict[str, float] = defaultdict(float)
        self.decisions: defaultdict[tuple[str, str, str], int] = defaultdict(int)  # (route, reason, degraded)
        # requests that named a task: (task, model that answered, route, confident: true/false/"")
        self.tasks: defaultdict[tuple[str, str, str, str], int] = defaultdict(int)

    def observe(self, method: str, r: Result) -> None:
        if r.replayed:  # a retry answered from the ledger: its tokens and cost were counted the first time
            self.requests[(method, "replay", "OK")] += 1
            return
        u = r.usage
        self.requests[(method, r.route, "OK")] += 1
        for kind, n in (
            ("prompt", u.prompt_tokens),
            ("cached", u.cached_tokens),
            ("cache_write", u.cache_write_tokens),
            ("completion", u.completion_tokens),
            ("summary_saved", u.summary_saved_tokens),
            ("early_exit", u.early_exit_tokens),
        ):
            self.tokens[(r.route, kind)] += n
        self.cost[(r.route, "actual")] += u.cost
        if r.route != "cache":
            self.decisions[(r.route, r.route_reason, str(r.degraded).lower())] += 1
        self.cost[(r.route, "counterfactual")] += u.counterfactual_cost
        if r.task:
            confident = "" if r.confident is None else str(r.confident).lower()
            self.tasks[(r.task, r.model, r.route, confident)] += 1
        counts = self.latency_counts[method]
        i = next((i for i, b in enumerate(LATENCY_BUCKETS_MS) if u.latency_ms <= b), len(LATENCY_BUCKETS_MS))
        counts[i] += 1
        self.latency_sum[method] += u.latency_ms / 1e3

    def count_error(self, method: str, code: str) -> None:
        self.requests[(method, "", code)] += 1

    def render(self, gauges: dict[str, float]) -> str:
        out = ["# TYPE appliance_requests_total counter"]
        for (method, route, code), n in sorted(self.requests.items()):
            out.append(f"appliance_requests_total{_labels(method=method, route=route, code=code)} {n}")
        out.append("# TYPE appliance_tokens_total counter")
        for (route, kind), n in sorted(self.tokens.items()):
            out.append(f"appliance_tokens_total{_labels(route=route, kind=kind)} {n}")
        out.append("# TYPE appliance_cost_total counter")
        for (route, kind), v in sorted(self.cost.items()):
            out.append(f"appliance_cost_total{_labels(route=route, kind=kind)} {v:.9g}")
        out.append("# TYPE appliance_route_decisions_total counter")
        for (route, reason, degraded), n in sorted(self.decisions.items()):
            labels = _labels(route=route, reason=reason, degraded=degraded)
            out.append(f"appliance_route_decisions_total{labels} {n}")
        out.append("# TYPE appliance_task_requests_total counter")
        for (task, model, route, confident), n in sorted(self.tasks.items()):
            labels = _labels(task=task, model=model, route=route, confident=confident)
            out.append(f"appliance_task_requests_total{labels} {n}")
        out.append("# TYPE appliance_request_seconds histogram")
        for method, counts in sorted(self.latency_counts.items()):
            acc = 0
            for b, c in zip((*LATENCY_BUCKETS_MS, None), counts, strict=True):
                acc += c
                le = "+Inf" if b is None else f"{b / 1e3:g}"
                out.append(f"appliance_request_seconds_bucket{_labels(method=method, le=le)} {acc}")
            out.append(f"appliance_request_seconds_sum{_labels(method=method)} {self.latency_sum[method]:.6f}")
            out.append(f"appliance_request_seconds_count{_labels(method=method)} {acc}")
        typed: set[str] = set()
        for name, value in sorted(gauges.items()):  # a name may carry labels: 'x{seqs="4"}'
            base = name.split("{", 1)[0]
            if base not in typed:
                typed.add(base)
                out.append(f"# TYPE {base} gauge")
            out.append(f"{name} {value:g}")
        return "\n".join(out) + "\n"

    async def serve(self, host: str, port: int, gauges: Gauges) -> asyncio.Server:
        """A minimal HTTP/1.0 endpoint: GET /metrics, anything else 404."""

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                line = await asyncio.wait_for(reader.readline(), 5.0)
                while (await asyncio.wait_for(reader.readline(), 5.0)) not in (b"\r\n", b"\n", b""):
                    pass
                parts = line.decode("latin-1").split()
                if len(parts) >= 2 and parts[0] == "GET" and parts[1].split("?")[0] == "/metrics":
                    body = self.render(gauges()).encode()
                    head = "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                else:
                    body, head = b"not found\n", "HTTP/1.0 404 Not Found\r\nContent-Type: text/plain\r\n"
                writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
                await writer.drain()
            except (TimeoutError, ConnectionError):
                pass
            finally:
                writer.close()

        return await asyncio.start_server(handle, host, port)

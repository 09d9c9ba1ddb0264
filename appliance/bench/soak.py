"""`appliance bench soak`: a real `appliance serve` under mixed traffic at 4x its admission capacity for
a number of minutes, with a loopback cloud that misbehaves (bench/flaky_cloud.py), then checks that
nothing was lost or left behind.

Traffic (bench/traffic.py): LOAD_FACTOR x capacity closed-loop workers (capacity: max_concurrent +
max_cloud_concurrent + max_queue, bench/harness.py's Limits), each drawing request kinds from SOAK_MIX:
repeated questions (semantic cache hits), local generations, streams, chat turns in sessions,
embeddings, client cancels mid-stream, short deadlines and cloud-only requests. Overloaded refusals
(RESOURCE_EXHAUSTED) back off a short random time, so the offered load stays.

Reported: requests by kind and gRPC status, the routes that answered, p50/p99 latency per kind per
time window, the server's RSS over time (rss.csv, and soak.png when matplotlib is installed), what the
cloud served. End checks (each a pass/fail with what was seen; `ok` is their conjunction):
  server_alive      the server process never died during the traffic
  workers_done      every client worker returned after the traffic stopped (no call hung past its timeout)
  no_stuck          the server's running and queued requests and the engine's sequences reach 0
  kv_pool_free      the KV pools are whole again: free blocks == blocks (cached prefix blocks count as free)
  ledger_rows       every acknowledged request (an answer the client received in full) has its ledger row
  no_server_errors  no request ended UNKNOWN or INTERNAL (an exception the service did not turn into a status)
  rss_growth        RSS after warm-up: median of the last 10% of samples vs the first 10%, below the bound
  queue_bounded     the requests queued at once (sampled every 2 s) never exceed admission's bound: max_queue, plus
                    the admitted requests that may be moving lanes (at most max_concurrent + max_cloud_concurrent)
  clean_shutdown    SIGTERM drains and exits 0
  sqlite_integrity  every SQLite database under the service's home passes PRAGMA integrity_check
"""

from __future__ import annotations

import json
import statistics
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from appliance.bench.checks import Check, gauges, integrity, missing_rows, quiesce, rss_mb
from appliance.bench.flaky_cloud import SOAK_MIX as CLOUD_MIX
from appliance.bench.flaky_cloud import FlakyCloud
from appliance.bench.harness import Limits, Served, fresh_home, write_config
from appliance.bench.traffic import Outcome, Traffic

LOAD_FACTOR = 4
SOAK_MIX: dict[str, float] = {
    "cache": 3,
    "local": 2,
    "stream": 2,
    "chat": 2,
    "embed": 1,
    "cancel": 2,
    "deadline": 2,
    "cloud": 1,
}
RSS_GROWTH_MAX = 0.15  # last-10% median over first-10% median after warm-up
WARMUP_FRACTION = 0.2


def bench_soak(
    model: str,
    threads: int,
    minutes: float,
    out: Path,
    *,
    seed: int = 0,
    limits: Limits | None = None,
    rss_growth_max: float = RSS_GROWTH_MAX,
    max_tokens: int = 16,
    cloud_mix: dict[str, float] | None = None,
    mix: dict[str, float] | None = None,
) -> dict[str, Any]:
    limits = limits or Limits()
    mix = SOAK_MIX if mix is None else mix
    cloud_mix = CLOUD_MIX if cloud_mix is None else cloud_mix
    duration = minutes * 60.0
    out.mkdir(parents=True, exist_ok=True)
    home = fresh_home(out)
    cloud = FlakyCloud(cloud_mix, stall_s=limits.cloud_timeout_s + 1.0, seed=seed)
    workers = LOAD_FACTOR * limits.capacity
    res: dict[str, Any] = {
        "model": model,
        "threads": threads,
        "minutes": minutes,
        "workers": workers,
        "capacity": limits.capacity,
        "limits": limits.__dict__,
        "mix": mix,
        "cloud_mix": cloud_mix,
    }
    checks: list[Check] = []
    try:
        cfg, metrics = write_config(home, model, threads, cloud.url, limits)
        try:
            srv = Served(cfg)
        except (RuntimeError, TimeoutError) as e:
            checks.append(Check("server_start", False, str(e)[-2000:]))
        else:
            res["start_to_serving_s"] = round(srv.serving_s, 2)
            try:
                _run(
                    srv,
                    metrics,
                    duration,
                    workers,
                    seed,
                    max_tokens,
                    res,
                    checks,
                    rss_growth_max,
                    limits.max_queue + limits.max_concurrent + limits.max_cloud_concurrent,
                    mix,
                )
            finally:
                code = srv.stop()
            checks.append(Check("clean_shutdown", code == 0, f"exit code {code} after SIGTERM"))
            checks.append(integrity(home))
    finally:
        cloud.close()
    res["cloud_served"] = dict(cloud.counts)
    res["checks"] = [c.to_dict() for c in checks]
    res["ok"] = all(c.ok for c in checks)
    (out / "soak.json").write_text(json.dumps(res, indent=2) + "\n")
    return res


def _run(
    srv: Served,
    metrics: str,
    duration: float,
    workers: int,
    seed: int,
    max_tokens: int,
    res: dict[str, Any],
    checks: list[Check],
    rss_growth_max: float,
    queue_bound: int,
    mix: dict[str, float],
) -> None:
    out = srv.home.parent
    samples: list[tuple[float, float]] = []  # (seconds, RSS MiB)
    occupancy: list[tuple[float, float, float]] = []  # (seconds, requests queued, requests running)
    stop = threading.Event()
    t0 = time.monotonic()

    def sample() -> None:
        n = 0
        while not stop.is_set():
            mb = rss_mb(srv.pid)
            if mb is not None:
                samples.append((time.monotonic() - t0, mb))
            if n % 2 == 0:
                try:
                    g = gauges(metrics)
                    occupancy.append(
                        (time.monotonic() - t0, g["appliance_requests_queued"], g["appliance_requests_running"])
                    )
                except (OSError, KeyError):
                    pass
            n += 1
            stop.wait(1.0)

    sampler = threading.Thread(target=sample, name="rss", daemon=True)
    sampler.start()
    traffic = Traffic(srv.target, workers, mix, prefix="soak", max_tokens=max_tokens, seed=seed)
    traffic.start()
    died = ""
    next_report = 30.0
    while (elapsed := time.monotonic() - t0) < duration:
        if srv.proc.poll() is not None:
            died = f"the server exited with code {srv.proc.returncode} after {elapsed:.0f} s"
            break
        if elapsed >= next_report:
            next_report += 30.0
            done = traffic.snapshot()
            codes = Counter(o.code for o in done)
            rss = f"{samples[-1][1]:.0f}" if samples else "?"
            print(
                f"  soak {elapsed:4.0f}/{duration:.0f} s: {len(done)} requests {dict(codes)}; RSS {rss} MiB",
                file=sys.stderr,
            )
        time.sleep(min(1.0, max(0.0, duration - elapsed)))
    traffic_s = time.monotonic() - t0
    stuck_workers = traffic.stop()
    traffic.close()
    checks.append(Check("server_alive", not died, died or f"alive through {traffic_s:.0f} s of traffic"))
    checks.append(Check("workers_done", stuck_workers == 0, f"{stuck_workers} client workers still in a call"))
    outcomes = traffic.snapshot()
    if not died:
        g, waited = quiesce(metrics)
        held = {k: g.get(k, -1.0) for k in ("appliance_requests_running", "appliance_requests_queued")}
        held.update(
            {k: g.get(k, -1.0) for k in ("appliance_engine_sequences_running", "appliance_engine_sequences_waiting")}
        )
        idle = all(v == 0 for v in held.values())
        checks.append(
            Check("no_stuck", idle, f"{'idle' if idle else 'still busy'} {waited:.1f} s after the traffic: {held}")
        )
        free = (g.get("appliance_kv_blocks_free"), g.get("appliance_kv_blocks_total"))
        swa = (g.get("appliance_kv_window_blocks_free"), g.get("appliance_kv_window_blocks_total"))
        whole = free[0] == free[1] and swa[0] == swa[1] and free[1] is not None
        checks.append(
            Check(
                "kv_pool_free", whole, f"free/total blocks {free[0]:g}/{free[1]:g}, window pool {swa[0]:g}/{swa[1]:g}"
            )
        )
        res["gauges_after"] = {
            k: v for k, v in g.items() if k.startswith(("appliance_kv", "appliance_requests", "appliance_engine"))
        }
    stop.set()
    sampler.join()
    acked = [(o.tenant, o.request_id) for o in outcomes if o.acked]
    checks.append(missing_rows(srv.home, acked))
    errors = Counter(o.kind for o in outcomes if o.code in ("UNKNOWN", "INTERNAL"))
    checks.append(
        Check("no_server_errors", not errors, f"UNKNOWN/INTERNAL by kind: {dict(errors)}" if errors else "none")
    )
    checks.append(_rss_check(samples, traffic_s, rss_growth_max))
    queued = max((q for _, q, _ in occupancy), default=0.0)
    checks.append(
        Check(
            "queue_bounded",
            queued <= queue_bound,
            f"most requests queued at once: {queued:g} (bound {queue_bound}; {len(occupancy)} samples every 2 s)",
        )
    )
    res["queued_running_over_time"] = [[round(t), q, r] for t, q, r in occupancy]
    res.update(_summary(outcomes, traffic_s))
    res["rss_mb"] = _rss_figures(samples)
    res["files"] = _write_series(out, samples, occupancy, res["latency_windows"])


def parse_mix(text: str) -> dict[str, float]:
    """SOAK_MIX with "kind=weight,..." applied (e.g. "cloud=0,cancel=4"); ValueError names what is wrong."""
    mix = dict(SOAK_MIX)
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, sep, weight = part.partition("=")
        if not sep or kind not in SOAK_MIX:
            raise ValueError(f"--mix: {part!r} is not KIND=WEIGHT with KIND one of {', '.join(SOAK_MIX)}")
        try:
            mix[kind] = float(weight)
        except ValueError:
            raise ValueError(f"--mix: weight {weight!r} of {kind} is not a number") from None
        if not mix[kind] >= 0:
            raise ValueError(f"--mix: weight of {kind} must be >= 0, got {weight}")
    if not any(mix.values()):
        raise ValueError("--mix: every weight is 0")
    return mix


def _summary(outcomes: list[Outcome], traffic_s: float) -> dict[str, Any]:
    by_code: defaultdict[str, Counter[str]] = defaultdict(Counter)
    by_route: defaultdict[str, Counter[str]] = defaultdict(Counter)
    for o in outcomes:
        by_code[o.kind][o.code] += 1
        if o.acked:
            by_route[o.kind][o.route + (" degraded" if o.degraded else "")] += 1
    n_windows = max(1, min(10, int(traffic_s // 10)))
    width = traffic_s / n_windows
    windows: list[dict[str, Any]] = []
    for w in range(n_windows):
        row: dict[str, Any] = {"from_s": round(w * width), "to_s": round((w + 1) * width)}
        for kind in sorted(by_code):
            lat = sorted(
                o.latency_s
                for o in outcomes
                if o.kind == kind and o.code == "OK" and w * width <= o.start < (w + 1) * width
            )
            row[kind] = {"ok": len(lat), "p50_ms": _pct(lat, 0.5), "p99_ms": _pct(lat, 0.99)}
        windows.append(row)
    total = len(outcomes)
    return {
        "traffic_s": round(traffic_s, 1),
        "requests": total,
        "requests_per_s": round(total / traffic_s, 2) if traffic_s else 0.0,
        "acknowledged": sum(o.acked for o in outcomes),
        "by_kind_and_status": {k: dict(v) for k, v in sorted(by_code.items())},
        "answered_by_route": {k: dict(v) for k, v in sorted(by_route.items())},
        "latency_windows": windows,
    }


def _pct(sorted_s: list[float], q: float) -> float | None:
    if not sorted_s:
        return None
    return round(sorted_s[min(len(sorted_s) - 1, int(q * (len(sorted_s) - 1) + 0.5))] * 1000, 1)


def _after_warmup(samples: list[tuple[float, float]], traffic_s: float) -> list[float]:
    return [mb for t, mb in samples if t >= WARMUP_FRACTION * traffic_s]


def _rss_check(samples: list[tuple[float, float]], traffic_s: float, bound: float) -> Check:
    after = _after_warmup(samples, traffic_s)
    if len(after) < 10:
        return Check("rss_growth", False, f"only {len(after)} RSS samples after warm-up: run longer")
    k = max(1, len(after) // 10)
    first, last = statistics.median(after[:k]), statistics.median(after[-k:])
    growth = last / first - 1.0
    detail = (
        f"after {WARMUP_FRACTION:.0%} warm-up: first-10% median {first:.0f} MiB, last-10% median {last:.0f} MiB, "
        f"growth {growth:+.1%} (bound {bound:.0%})"
    )
    return Check("rss_growth", growth < bound, detail)


def _rss_figures(samples: list[tuple[float, float]]) -> dict[str, float]:
    if not samples:
        return {}
    mbs = [mb for _, mb in samples]
    return {"first": round(mbs[0], 1), "max": round(max(mbs), 1), "last": round(mbs[-1], 1), "samples": len(mbs)}


def _write_series(
    out: Path, samples: list[tuple[float, float]], held: list[tuple[float, float, float]], windows: list[dict[str, Any]]
) -> dict[str, str]:
    """rss.csv always; soak.png (RSS, requests held, p99 latency per kind over time) with matplotlib."""
    files = {"rss_csv": str(out / "rss.csv"), "json": str(out / "soak.json")}
    (out / "rss.csv").write_text("seconds,rss_mib\n" + "".join(f"{t:.1f},{mb:.1f}\n" for t, mb in samples))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        files["png"] = "not written: matplotlib is not installed"
        return files
    fig, (ax1, ax3, ax2) = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    ax1.plot([t for t, _ in samples], [mb for _, mb in samples])
    ax1.set_ylabel("server RSS (MiB)")
    ax1.set_title("appliance bench soak")
    ax3.plot([t for t, _, _ in held], [q for _, q, _ in held], label="queued")
    ax3.plot([t for t, _, _ in held], [r for _, _, r in held], label="running")
    ax3.set_ylabel("requests held")
    ax3.legend(fontsize=7)
    kinds = sorted({k for w in windows for k in w if k not in ("from_s", "to_s")})
    mids = [(w["from_s"] + w["to_s"]) / 2 for w in windows]
    for kind in kinds:
        ys = [w[kind]["p99_ms"] if w.get(kind) and w[kind]["p99_ms"] is not None else float("nan") for w in windows]
        ax2.plot(mids, ys, marker="o", label=kind)
    ax2.set_yscale("log")
    ax2.set_ylabel("p99 latency of OK requests (ms)")
    ax2.set_xlabel("seconds")
    ax2.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(out / "soak.png", dpi=100)
    plt.close(fig)
    files["png"] = str(out / "soak.png")
    return files

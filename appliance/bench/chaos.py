"""`appliance bench chaos`: kill -9 loops. Each cycle starts a real `appliance serve` (semantic cache on,
teacher capture on for the tenant the traffic uses, hot-prefix saving on, the loopback cloud answering
mostly well), drives mixed traffic at it (bench/traffic.py: cloud answers that are captured and cached,
repeated questions, prompts under a long shared system prompt, streams, chat turns, cancels), kills it
with SIGKILL at a moment the cycle aims for, and restarts it. The moments rotate over:

    load             a random time under load
    capture-write    0-15 ms after the cloud finished a good answer for the capturing tenant: the
                     service is then committing the ledger row, the teacher example and the cache entry
    hot-prefix-save  SIGTERM under load, then SIGKILL the moment a hot prefix's file (state/prefixes/*.tmp)
                     appears: the shutdown's hot-prefix save is half written
    cache-save       SIGTERM under load, then SIGKILL the moment an hnswlib index file
                     (semantic-cache/index/*/*.tmp) appears: the cache's index save is half written

The save moments need something to save: before the first start the cache gets SEED_ENTRIES entries
(random unit vectors) in the partition the traffic's cacheable answers go to, so that partition's index
is big enough to be written (CacheConfig.persist_min_entries), and the traffic shares a system prompt
long enough to be a hot prefix. A save the poll did not catch before the process exited is reported as
missed (the cycle then ended with a clean shutdown), never as a kill that landed; a server still running
60 s after SIGTERM fails the cycle (sigterm_exit). Each start's log is kept (server.N.log: cycle N's).

After each restart (spawn to gRPC health SERVING, timed; bounded by SERVING_BOUND_S) the checks, over
everything acknowledged in every cycle so far (bench/checks.py): every SQLite database passes
integrity_check; every acknowledged request has its ledger row; every acknowledged captured cloud answer
is a teacher example; every acknowledged cacheable answer is a cache entry; every saved hnswlib index
either loads intact with the live count SQLite has up to the id it reflects, or is one the cache's
loader refuses (and so rebuilds from SQLite); and the service itself serves the last acknowledged
cacheable question as a cache hit (its index, loaded or rebuilt, finds what SQLite holds)."""

from __future__ import annotations

import json
import random
import re
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from appliance.bench.checks import (
    Check,
    index_files,
    integrity,
    missing_cache_entries,
    missing_examples,
    missing_rows,
)
from appliance.bench.flaky_cloud import FlakyCloud
from appliance.bench.harness import CAPTURE_TENANT, Limits, Served, fresh_home, write_config
from appliance.bench.traffic import LOCAL_ONLY, ROUTES, Outcome, Traffic
from appliance.edge.grpc.client import Client

MOMENTS = ("load", "capture-write", "hot-prefix-save", "cache-save")
CHAOS_MIX: dict[str, float] = {"capture": 3, "hot": 3, "cache": 1, "local": 1, "stream": 1, "chat": 1, "cancel": 1}
CHAOS_CLOUD_MIX: dict[str, float] = {"ok": 0.9, "500": 0.05, "429": 0.05}
WORKERS = 8
MAX_TOKENS = 8
SEED_ENTRIES = 600
SERVING_BOUND_S = 60.0
READ_ONLY = 2  # CachePolicy CACHE_READ_ONLY


def bench_chaos(
    model: str,
    threads: int,
    cycles: int,
    out: Path,
    *,
    seed: int = 0,
    load_s: float = 8.0,
    serving_bound_s: float = SERVING_BOUND_S,
) -> dict[str, Any]:
    if cycles < 1 or load_s < 2.0:
        raise ValueError(f"chaos needs cycles >= 1 and load_s >= 2 (got {cycles}, {load_s})")
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    home = fresh_home(out)
    answered = threading.Event()
    cloud = FlakyCloud(CHAOS_CLOUD_MIX, seed=seed, on_answer=lambda body: answered.set())
    limits = Limits(max_queue=16)
    res: dict[str, Any] = {"model": model, "threads": threads, "cycles": cycles, "workers": WORKERS, "mix": CHAOS_MIX}
    acked: list[Outcome] = []
    rows: list[dict[str, Any]] = []
    try:
        cfg, _metrics = write_config(home, model, threads, cloud.url, limits)
        res["seeded_partition"] = _seed_cache(home, model)
        for cycle in range(cycles + 1):  # the last start only checks (and stops cleanly)
            row: dict[str, Any] = {"cycle": cycle}
            rows.append(row)
            if cycle:  # keep each run's log: server.N.log is cycle N's
                (home / "server.log").replace(home / f"server.{cycle - 1}.log")
            try:
                srv = Served(cfg)
            except (RuntimeError, TimeoutError) as e:
                row["checks"] = [Check("restart", False, str(e)[-2000:]).to_dict()]
                break
            row["serving_s"] = round(srv.serving_s, 2)
            row["log"] = _startup_log(home)
            checks = [Check("serving_bound", srv.serving_s <= serving_bound_s, f"{srv.serving_s:.2f} s to SERVING")]
            checks += _verify(home, srv, acked)
            row["checks"] = [c.to_dict() for c in checks]
            if cycle == cycles:  # a clean stop saves the index: it must then hold every row
                code = srv.stop()
                row["checks"].append(Check("clean_shutdown", code == 0, f"exit code {code} after SIGTERM").to_dict())
                row["checks"].append(index_files(home).to_dict())
                break
            moment = MOMENTS[cycle % len(MOMENTS)]
            traffic = Traffic(
                srv.target,
                WORKERS,
                CHAOS_MIX,
                prefix=f"c{cycle}",
                tenant=CAPTURE_TENANT,
                max_tokens=MAX_TOKENS,
                seed=seed + cycle,
            )
            answered.clear()
            traffic.start()
            try:
                row.update(moment=moment, **_kill(srv, home, moment, rng, load_s, answered))
                if row["landed"].startswith("missed: hung"):
                    row["checks"].append(Check("sigterm_exit", False, row["landed"]).to_dict())
            finally:
                srv.kill9()
                traffic.stop(join_s=30.0)
                traffic.close()
            done = traffic.snapshot()
            acked += [o for o in done if o.acked]
            row["requests"] = len(done)
            row["by_status"] = dict(Counter(o.code for o in done))
            row["acknowledged"] = sum(o.acked for o in done)
            bad = [c for c in row["checks"] if not c["ok"]]
            print(
                f"  chaos cycle {cycle}: {moment}: {row.get('landed')}; {row['acknowledged']} acknowledged; "
                f"started in {row['serving_s']} s; {len(bad)} failed check(s)",
                file=sys.stderr,
            )
    finally:
        cloud.close()
    serving = [r["serving_s"] for r in rows if "serving_s" in r]
    failed = [
        f"cycle {r['cycle']}: {c['name']}: {c['detail']}" for r in rows for c in r.get("checks", []) if not c["ok"]
    ]
    res.update(
        cycles_run=sum(1 for r in rows if "moment" in r),
        kills_landed={
            m: sum(1 for r in rows if r.get("moment") == m and not str(r.get("landed", "")).startswith("missed"))
            for m in MOMENTS
        },
        serving_s_max=max(serving) if serving else None,
        serving_s_median=sorted(serving)[len(serving) // 2] if serving else None,
        serving_bound_s=serving_bound_s,
        acknowledged_total=len(acked),
        per_cycle=rows,
        failed=failed,
        ok=not failed and len(serving) == cycles + 1,
    )
    (out / "chaos.json").write_text(json.dumps(res, indent=2) + "\n")
    return res


def _seed_cache(home: Path, model: str) -> str:
    """SEED_ENTRIES entries (random unit vectors) in the partition that the traffic's cacheable answers
    of CAPTURE_TENANT go to, so its index is written by the service's saves; returns the partition."""
    from appliance.cache import CacheConfig, GgufEmbedder, SemanticCache, fingerprint
    from appliance.cache.names import resolve_embedder

    fp = fingerprint(Path(model).stem, "", {"max_tokens": MAX_TOKENS, "stop": [], "chat": False})
    cache = SemanticCache(
        home / "semantic-cache", GgufEmbedder(resolve_embedder(None), n_threads=1), CacheConfig(), owns_embedder=True
    )
    try:
        vecs = np.random.default_rng(0).standard_normal((SEED_ENTRIES, cache.embedder.dim)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        items = [(f"seeded question number {i}", vecs[i], f"seeded answer {i}") for i in range(SEED_ENTRIES)]
        ids = cache.store_vectors(CAPTURE_TENANT, fp, items, model=Path(model).stem)
        partition = cache.store_db.partition_of(ids[0]) or ""
    finally:
        cache.close()
    return partition


def _kill(
    srv: Served, home: Path, moment: str, rng: random.Random, load_s: float, answered: threading.Event
) -> dict[str, Any]:
    """Drive to `moment` and SIGKILL there (the caller kills again, harmlessly, in any case)."""
    t0 = time.monotonic()
    if moment == "load":
        time.sleep(rng.uniform(1.0, load_s))
        srv.kill9()
        return {"kill_after_s": round(time.monotonic() - t0, 2), "landed": "at a random time under load"}
    if moment == "capture-write":
        time.sleep(1.0)
        answered.clear()
        got = answered.wait(load_s)
        delay = rng.uniform(0.0, 0.015)
        time.sleep(delay)
        srv.kill9()
        landed = (
            f"{delay * 1e3:.1f} ms after a good cloud answer" if got else "missed: no cloud answer; killed at random"
        )
        return {"kill_after_s": round(time.monotonic() - t0, 2), "landed": landed}
    time.sleep(rng.uniform(1.5, load_s))
    pattern = (
        (home / "state" / "prefixes", "*.tmp")
        if moment == "hot-prefix-save"
        else (home / "semantic-cache" / "index", "*/*.tmp")
    )
    srv.proc.send_signal(signal.SIGTERM)
    t_term = time.monotonic()
    while srv.proc.poll() is None and time.monotonic() - t_term < 60.0:
        half = next(iter(pattern[0].glob(pattern[1])), None)
        if half is not None:
            srv.kill9()
            return {
                "kill_after_s": round(time.monotonic() - t0, 2),
                "landed": f"during the save: {half.relative_to(home)} half written, "
                f"{time.monotonic() - t_term:.2f} s after SIGTERM",
            }
        time.sleep(0.0002)
    code = srv.proc.poll()
    landed = (
        f"missed: hung shutdown, still running {time.monotonic() - t_term:.0f} s after SIGTERM (see its server log)"
        if code is None
        else f"missed: the save finished first (exit code {code})"
    )
    return {"kill_after_s": round(time.monotonic() - t0, 2), "landed": landed}


def _startup_log(home: Path) -> list[str]:
    """What the restart said about recovered state (hot prefixes loaded or dropped, cache warnings)."""
    try:
        text = (home / "server.log").read_text(errors="replace")
    except OSError:
        return []
    keep = re.compile(r"hot prefix|saved prefix|semantic cache|rebuil|integrity|WARNING|ERROR")
    return [line.split(" ", 2)[-1][:200] for line in text.splitlines() if keep.search(line)][:10]


def _verify(home: Path, srv: Served, acked: list[Outcome]) -> list[Check]:
    captured = [
        (o.tenant, o.request_id) for o in acked if o.kind == "capture" and o.route == "cloud" and o.finish == "stop"
    ]
    cacheable = [
        o
        for o in acked
        if o.prompt and o.text and o.route in ("local", "cloud") and not o.degraded and o.finish in ("stop", "length")
    ]
    checks = [
        integrity(home),
        missing_rows(home, [(o.tenant, o.request_id) for o in acked]),
        missing_examples(home, captured),
        missing_cache_entries(home, [(o.tenant, o.prompt, o.text) for o in cacheable]),
        index_files(home),
    ]
    prefixes = home / "state" / "prefixes"
    kv, tmp = len(list(prefixes.glob("*.kv"))), len(list(prefixes.glob("*.tmp")))
    checks.append(Check("hot_prefix_files", True, f"{kv} saved prefix file(s), {tmp} half-written .tmp left over"))
    if cacheable:
        last = cacheable[-1]
        try:
            with Client.connect(srv.target) as c:
                r = c.generate(
                    prompt=last.prompt,
                    tenant=last.tenant,
                    cache_policy=READ_ONLY,
                    route_policy=LOCAL_ONLY,
                    max_tokens=MAX_TOKENS,
                    temperature=0.0,
                    timeout=60.0,
                )
            route = ROUTES.get(int(r.route), str(r.route))
            checks.append(
                Check(
                    "cache_hit_after_restart", route == "cache", f"{last.request_id}'s question answered from {route}"
                )
            )
        except Exception as e:  # reported, never a crash of the loop
            checks.append(Check("cache_hit_after_restart", False, f"{type(e).__name__}: {e}"))
    return checks

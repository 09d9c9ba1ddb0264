"""What the appliance saves: a workload replayed through the whole service (a real `appliance serve`
process: semantic cache, router, local model, cascade, cloud, ledger), priced with a cloud price table,
against the cost of sending every request to the cloud.

The workload (seeded): support questions drawn from a text,category CSV (BANKING77) with a Zipf-like
repetition pattern (popular questions come back, sometimes in another wording of the same category),
plus a share of hard multi-step, code and math questions (the router's held-out set, which its
training data does not contain). The "cloud" is llama-cpp-python's OpenAI-compatible server on the
default model, on loopback, unless --cloud-url names a real one: its answers are not better, but it is
billed like the cloud. Costs come from the ledger: all-cloud is the sum of the counterfactual costs.
"""

from __future__ import annotations

import csv
import random
import sqlite3
import tempfile
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec

from appliance.bench.common import start_llama_server, start_service, write_service_config
from appliance.route.classifier import read_labelled, shipped_csv


class Prices(msgspec.Struct, frozen=True, kw_only=True):
    """Per million tokens. The defaults stand for a frontier cloud model; local tokens cost nothing."""

    input_per_mtok: float = 3.00
    cached_input_per_mtok: float = 0.30
    cache_write_per_mtok: float = 3.75
    output_per_mtok: float = 15.00
    local_per_mtok: float = 0.0


class Workload(msgspec.Struct, frozen=True, kw_only=True):
    requests: int = 120
    distinct_support: int = 60
    hard_share: float = 0.2
    paraphrase_share: float = 0.3  # a repeat asked in another wording of the same category
    max_tokens: int = 48
    clients: int = 4
    seed: int = 0
    cascade: bool = True  # [route].cascade: check local answers and escalate low-confidence ones


def _zipf_pick(rng: random.Random, n: int) -> int:
    weights = [1.0 / (k + 1) for k in range(n)]
    return rng.choices(range(n), weights=weights)[0]


def build_workload(queries_csv: Path, w: Workload) -> list[tuple[str, str]]:
    """(text, kind) per request, kind "support" or "hard"."""
    by_category: dict[str, list[str]] = defaultdict(list)
    with queries_csv.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            by_category[row["category"]].append(row["text"].strip())
    rng = random.Random(w.seed)
    categories = sorted(by_category)
    rng.shuffle(categories)
    picked = [(c, rng.choice(by_category[c])) for c in categories[: w.distinct_support]]
    hard, _ = read_labelled(shipped_csv().parent / "hard_eval.csv")
    rng.shuffle(hard)
    out = []
    for _ in range(w.requests):
        if rng.random() < w.hard_share:
            out.append((hard[_zipf_pick(rng, len(hard))], "hard"))
            continue
        category, text = picked[_zipf_pick(rng, len(picked))]
        if rng.random() < w.paraphrase_share:
            text = rng.choice(by_category[category])
        out.append((text, "support"))
    return out


def _config(d: Path, model: str, threads: int, cloud_url: str, cloud_model: str, prices: Prices, w: Workload) -> Path:
    extra = [
        "[cloud]",
        'provider = "openai"',
        f'base_url = "{cloud_url}"',
        f'model = "{cloud_model}"',
        "timeout_s = 300",
        "[route]",
        f"cascade = {str(w.cascade).lower()}",
        "[pricing]",
        f'cloud_model = "{cloud_model}"',
        *(f"{k} = {v}" for k, v in msgspec.structs.asdict(prices).items()),
    ]
    return write_service_config(d, model, threads, max_concurrent=8, cache=True, extra=extra)


def _replay(target: str, workload: list[tuple[str, str]], w: Workload) -> float:
    from appliance.edge.grpc.client import Client

    def client(mine: list[tuple[int, str, str]]) -> None:
        with Client.connect(target) as c:
            for i, text, kind in mine:
                c.generate(
                    messages=[("user", text)],
                    max_tokens=w.max_tokens,
                    temperature=0.0,
                    request_id=f"{i:05d}-{kind}",
                    timeout=600,
                )

    numbered = [(i, text, kind) for i, (text, kind) in enumerate(workload)]
    t0 = time.perf_counter()
    # in order within each client; the clients interleave like concurrent users
    with ThreadPoolExecutor(w.clients) as pool:
        list(pool.map(client, [numbered[i :: w.clients] for i in range(w.clients)]))
    return time.perf_counter() - t0


def summarize(rows: list[sqlite3.Row]) -> dict[str, Any]:
    """Costs and the saving by technique from ledger rows. Techniques: the semantic cache (cache hits
    cost nothing), local answers (routed or kept local), and the cloud rows' own difference (provider
    prompt-cache discounts, minus local answers the cascade paid for and replaced)."""
    all_cloud = sum(r["counterfactual_cost"] for r in rows)
    cost = sum(r["cost"] for r in rows)
    technique = {"semantic_cache": "cache", "local_model": "local", "cloud_prompt_cache_and_cascade": "cloud"}
    saving = {
        name: round(sum(r["counterfactual_cost"] - r["cost"] for r in rows if r["route"] == route), 6)
        for name, route in technique.items()
    }
    hard = [r for r in rows if r["request_id"].endswith("-hard")]
    return {
        "requests": len(rows),
        "cost_all_cloud": round(all_cloud, 6),
        "cost_appliance": round(cost, 6),
        "saving": round(1 - cost / all_cloud, 4) if all_cloud else 0.0,
        "saving_by_technique": saving,
        "saving_share_by_technique": {k: round(v / all_cloud, 4) if all_cloud else 0.0 for k, v in saving.items()},
        "by_route": dict(Counter(r["route"] for r in rows)),
        "by_reason": dict(Counter(f"{r['route']}:{r['route_reason'] or '-'}" for r in rows)),
        "degraded": sum(r["degraded"] for r in rows),
        "hard_requests": len(hard),
        "hard_answered_by_cloud_or_cache": sum(r["route"] in ("cloud", "cache") for r in hard),
        "support_requests_to_cloud": sum(r["route"] == "cloud" for r in rows if r["request_id"].endswith("-support")),
        "prompt_tokens": sum(r["prompt_tokens"] for r in rows),
        "completion_tokens": sum(r["completion_tokens"] for r in rows),
    }


def bench_savings(
    model: str, threads: int, queries_csv: Path, w: Workload, prices: Prices, cloud_url: str = "", cloud_model: str = ""
) -> dict[str, Any]:
    workload = build_workload(queries_csv, w)
    res: dict[str, Any] = {"model": model, "threads": threads, "workload": msgspec.structs.asdict(w)}
    res["prices_per_mtok"] = msgspec.structs.asdict(prices)
    with tempfile.TemporaryDirectory(prefix="appliance-bench-savings-") as tmp:
        d = Path(tmp)
        llama = None
        if not cloud_url:
            cloud_model = "stand-in-cloud"
            llama, cloud_url = start_llama_server(model, d / "cloud.log", alias=cloud_model, threads=1)
        res["cloud"] = "llama_cpp.server on the local model (stand-in)" if llama else cloud_model
        cfg = _config(d, model, threads, cloud_url, cloud_model or "cloud", prices, w)
        proc = start_service(cfg, d / "s.sock", d / "server.log")
        try:
            res["wall_s"] = round(_replay(f"unix:{d / 's.sock'}", workload, w), 1)
        finally:
            proc.terminate()
            proc.wait(60)
            if llama is not None:
                llama.terminate()
                llama.wait(30)
        conn = sqlite3.connect(d / "state" / "ledger.sqlite")
        conn.row_factory = sqlite3.Row
        rows = list(conn.execute("SELECT * FROM requests ORDER BY ts"))
        conn.close()
    res |= summarize(rows)
    return res

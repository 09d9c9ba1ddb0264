"""Plain vs tuned embedder on held-out intent data, in one run (``appliance bench cache-tune``).

BANKING77 (``text,category``) is shuffled with the seed and split: the first ``tune_fraction`` tunes an
embedder (``cache tune``: of that share, its own ``calibration_fraction`` is held back to calibrate
on), the rest is replayed. CLINC150 likewise, with its own tuned embedder. The BANKING77-tuned
embedder is also replayed on CLINC150's held-out rows (across domains). For every replay the report
gives, per embedder, the area under the precision / hit-rate curve and the best hit rate at precision
>= 0.97, for the cosine threshold rule and for the calibrated decision; the plain embedder gets a
decision too, fitted on the same calibration rows as the tuned one, so the two effects show apart.
Then the lookup latency of each embedder at ``entries`` entries (:func:`appliance.cache.bench.bench`).
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from appliance.cache.calibrate import fit_decision
from appliance.cache.embedder import Embedder, GgufEmbedder
from appliance.cache.frontier import Replayer, frontier_of
from appliance.cache.replay import Example, embed_rows, frontier, read_csv
from appliance.cache.tune import TuneConfig, tune

GOALS = {"banking77": 0.30, "clinc150": 0.65}


def _split(rows: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(tuning rows, replayed rows)."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    cut = int(len(rows) * fraction)
    return rows[:cut], rows[cut:]


def _calibration_rows(tune_rows: list[Example], config: TuneConfig) -> list[Example]:
    """The rows `cache tune` holds back (the same shuffle and cut as :func:`appliance.cache.tune.tune`)."""
    shuffled = list(tune_rows)
    random.Random(config.seed).shuffle(shuffled)
    return shuffled[int(len(shuffled) * (1 - config.calibration_fraction)) :]


def _plain_with_decision(
    plain: Embedder, cal_rows: list[Example], hold: list[Example], target: float
) -> dict[str, Any]:
    cal = Replayer(embed_rows(cal_rows, plain), [r.text for r in cal_rows], [r.category for r in cal_rows])
    decision, _ = fit_decision(cal, target)
    hold_rp = Replayer(embed_rows(hold, plain), [r.text for r in hold], [r.category for r in hold])
    out = frontier_of(hold_rp, decision)
    return {"embedder": plain.version, **out}


def _brief(f: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in f.items() if not k.endswith("_curve")}


def bench_tune(
    banking77: Path,
    clinc150: Path,
    work: Path,
    config: TuneConfig,
    *,
    tune_fraction: float = 0.6,
    clinc_tune_fraction: float = 0.5,
    entries: int = 100_000,
    lookups: int = 200,
    reuse: bool = False,
    stream: TextIO | None = sys.stderr,
) -> dict[str, Any]:
    from appliance.cache.bench import bench as lookup_bench

    work.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"config": {**config.__dict__}, "tune_fraction": tune_fraction}
    data = {
        "banking77": _split(read_csv(banking77), tune_fraction, config.seed),
        "clinc150": _split(read_csv(clinc150), clinc_tune_fraction, config.seed),
    }
    tuned: dict[str, Path] = {}
    for name, (tune_rows, _hold) in data.items():
        path = work / f"tuned-{name}-seed{config.seed}.gguf"
        if not (reuse and path.is_file()):
            t0 = time.perf_counter()
            res = tune(tune_rows, path, config, source=f"{name} tuning split", stream=stream)
            out[f"tune_{name}_s"] = time.perf_counter() - t0
            out[f"tune_{name}_steps"] = res["tune"]["steps"]
        tuned[name] = path
    with GgufEmbedder(n_threads=config.threads) as plain:
        for name, (tune_rows, hold) in data.items():
            cal_rows = _calibration_rows(tune_rows, config)
            with GgufEmbedder(tuned[name], n_threads=config.threads) as emb:
                t = frontier(hold, emb)
            p = _plain_with_decision(plain, cal_rows, hold, config.target)
            out[name] = {
                "replayed": len(hold),
                "tuned_on": len(tune_rows),
                "plain": _brief(p),
                "tuned": _brief(t),
                "goal_hit_rate_at_0.97": GOALS[name],
            }
        clinc_hold = data["clinc150"][1]
        with GgufEmbedder(tuned["banking77"], n_threads=config.threads) as emb:
            cross = frontier(clinc_hold, emb)
        out["clinc150"]["tuned_on_banking77"] = _brief(cross)
        if entries:
            texts = [r.text for r in data["banking77"][1]]
            out["latency_plain"] = lookup_bench(plain, entries=entries, lookups=lookups, queries=texts)
            with GgufEmbedder(tuned["banking77"], n_threads=config.threads) as emb:
                out["latency_tuned"] = lookup_bench(emb, entries=entries, lookups=lookups, queries=texts)
    out["note"] = "timings on a shared, loaded machine"
    return out

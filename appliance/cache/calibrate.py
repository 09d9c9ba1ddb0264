"""Calibrate the similarity threshold for an embedder on labelled data (``appliance cache calibrate``).

Method: shuffle the CSV with a fixed seed, keep the first ``fraction`` as the calibration split
and the rest as a held-out split. On the calibration split replay the cache dynamics
(:func:`appliance.cache.replay.simulate`, guards on) at thresholds from 0.60 to 0.99 in steps of
0.01 and pick the lowest threshold whose precision is at least ``target`` (a margin above the
0.97 goal, as held-out data is noisier); then report the held-out split at that threshold without
refitting. The result is written to ``data/thresholds.json`` keyed by the embedder version.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from appliance.cache.config import CALIBRATION_FILE, CacheConfig, Calibration
from appliance.cache.decision import Decision, fit_logistic
from appliance.cache.embedder import Embedder
from appliance.cache.errors import CacheError
from appliance.cache.frontier import THRESHOLDS, Point, Replayer
from appliance.cache.replay import Example, embed_rows, read_csv, simulate, split

GRID = THRESHOLDS
MARGIN = 0.005  # above the target on the calibration split: held-out data is noisier
DECISION_FLOOR = 0.5  # a nearest neighbour below this similarity is a miss whatever the rest says


def calibrate(
    csv_path: Path,
    embedder: Embedder,
    *,
    seed: int = 0,
    fraction: float = 0.7,
    target: float = 0.975,
    guards: bool = True,
) -> tuple[Calibration, list[dict[str, float]]]:
    rows = read_csv(csv_path, shuffle_seed=seed)
    cal_rows, hold_rows = split(rows, fraction)
    config = CacheConfig(threshold=0.9, guards=guards)
    cal_vec = embed_rows(cal_rows, embedder)
    curve = simulate(cal_vec, [r.text for r in cal_rows], [r.category for r in cal_rows], GRID, config)
    good = [p for p in curve if p["precision"] >= target and p["hits"] >= 20]
    if not good:
        raise CacheError(f"no threshold in {GRID[0]}..{GRID[-1]} reaches precision {target} on {csv_path}")
    best = min(good, key=lambda p: p["threshold"])
    hold_vec = embed_rows(hold_rows, embedder)
    (hold,) = simulate(
        hold_vec, [r.text for r in hold_rows], [r.category for r in hold_rows], [best["threshold"]], config
    )
    cal = Calibration(
        threshold=best["threshold"],
        guards=guards,
        method=f"lowest threshold on a 0.01 grid with replay precision >= {target} on the calibration split",
        data=csv_path.name,
        split=f"shuffled seed {seed}; calibration = first {fraction:.0%} ({len(cal_rows)} rows), "
        f"holdout = the remaining {len(hold_rows)} rows",
        seed=seed,
        calibration={k: float(v) for k, v in best.items()},
        holdout={k: float(v) for k, v in hold.items()},
    )
    return cal, curve


def fit_decision(replayer: Replayer, target: float, *, floor: float = DECISION_FLOOR) -> tuple[Decision, list[Point]]:
    """A logistic decision fitted on the replayer's rows (each against all rows before it) and its
    lowest probability cutoff whose replay precision reaches ``target`` + :data:`MARGIN` (with at
    least 20 hits; the highest cutoff of the grid when none does)."""
    x, y = replayer.training_set(floor)
    if len(y) < 20 or y.min() == y.max():
        raise CacheError(
            f"too little evidence to fit a decision: {len(y)} neighbourhoods, {int(y.sum())} of them right; "
            "calibrate on more questions"
        )
    weights, mean, scale = fit_logistic(x, y)
    decision = Decision(weights=weights, mean=mean, scale=scale, cutoff=0.5, floor=floor, target=target)
    curve = replayer.decision_curve(decision)
    good = [p for p in curve if p["precision"] >= target + MARGIN and p["hits"] >= 20]
    best = min(good, key=lambda p: p["cutoff"]) if good else curve[-1]
    cal = {"rows": float(len(replayer.texts)), "fitted_on": float(len(y)), **best}
    return msgspec.structs.replace(decision, cutoff=best["cutoff"], calibration=cal), curve


def calibrate_embedder(rows: list[Example], embedder: Embedder, *, target: float = 0.97) -> dict[str, Any]:
    """A tuned embedder's calibration (its GGUF metadata): the cosine threshold and the decision,
    fitted on ``rows`` replayed in order (with the guards)."""
    replayer = Replayer(embed_rows(rows, embedder), [r.text for r in rows], [r.category for r in rows])
    curve = replayer.threshold_curve(GRID)
    good = [p for p in curve if p["precision"] >= target + MARGIN and p["hits"] >= 20]
    threshold = min(good, key=lambda p: p["threshold"]) if good else curve[-1]
    try:
        decision: Decision | None = fit_decision(replayer, target)[0]
        why = ""
    except CacheError as e:  # too few held-back questions: the threshold alone decides
        decision, why = None, str(e)
    return {
        "threshold": threshold["threshold"],
        "threshold_calibration": threshold,
        "decision": None if decision is None else msgspec.to_builtins(decision),
        "no_decision": why,
        "target": target,
        "method": f"replay of {len(rows)} held-back questions in order; lowest threshold / probability cutoff "
        f"with precision >= {target} + {MARGIN}",
    }


def write_calibration(path: Path, embedder_version: str, cal: Calibration) -> None:
    """Merge one embedder's calibration into a thresholds.json file."""
    data: dict[str, Calibration] = {}
    if path.exists():
        data = msgspec.json.decode(path.read_bytes(), type=dict[str, Calibration])
    data[embedder_version] = cal
    path.write_bytes(msgspec.json.format(msgspec.json.encode(data), indent=2) + b"\n")


def shipped_path() -> Path:
    return Path(__file__).with_name("data") / CALIBRATION_FILE

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
import numpy as np

from appliance.cache.config import CALIBRATION_FILE, CacheConfig, Calibration
from appliance.cache.embedder import Embedder
from appliance.cache.errors import CacheError
from appliance.cache.replay import Example, read_csv, simulate, split
from appliance.cache.text import clean_text

GRID = tuple(round(0.60 + 0.01 * i, 2) for i in range(40))


def _vectors(rows: list[Example], embedder: Embedder) -> np.ndarray[Any, np.dtype[np.float32]]:
    return np.stack([embedder.embed(clean_text(r.text)) for r in rows])


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
    cal_vec = _vectors(cal_rows, embedder)
    curve = simulate(cal_vec, [r.text for r in cal_rows], [r.category for r in cal_rows], GRID, config)
    good = [p for p in curve if p["precision"] >= target and p["hits"] >= 20]
    if not good:
        raise CacheError(f"no threshold in {GRID[0]}..{GRID[-1]} reaches precision {target} on {csv_path}")
    best = min(good, key=lambda p: p["threshold"])
    hold_vec = _vectors(hold_rows, embedder)
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


def write_calibration(path: Path, embedder_version: str, cal: Calibration) -> None:
    """Merge one embedder's calibration into a thresholds.json file."""
    data: dict[str, Calibration] = {}
    if path.exists():
        data = msgspec.json.decode(path.read_bytes(), type=dict[str, Calibration])
    data[embedder_version] = cal
    path.write_bytes(msgspec.json.format(msgspec.json.encode(data), indent=2) + b"\n")


def shipped_path() -> Path:
    return Path(__file__).with_name("data") / CALIBRATION_FILE

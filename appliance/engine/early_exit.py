"""Early-exit calibration of a model: the shortlist of tokens both early-exit modes score, the exit
layers and the confidence threshold each one needs. Stored next to the model file as
`<model>.exit.json` by `appliance models calibrate-exit`; loaded by the engine when present.

The pure parts live here (the file format, choosing thresholds and the shortlist from probe data);
`appliance.engine.exit_calibrate` runs the model to collect that data.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

import msgspec
import numpy as np
import numpy.typing as npt

EXIT_MODES = ("off", "lossless", "adaptive")
FORMAT_VERSION = 1


class CalibrationError(ValueError):
    """The calibration file is missing a field, corrupt, or belongs to another model file."""


class LayerStats(msgspec.Struct, frozen=True):
    """What calibration measured at one exit layer, on held-out prompts."""

    layer: int
    threshold: float
    exit_rate: float  # share of held-out tokens that exit here (given they reached it)
    agreement: float  # share of those whose token equals the full model's (1.0 when none exit)


class ExitCalibration(msgspec.Struct, frozen=True, kw_only=True):
    version: int = FORMAT_VERSION
    model_file: str  # the model file's name and size: a calibration loads only with its model
    model_bytes: int
    n_layer: int
    n_vocab: int
    shortlist: list[int]
    exit_layers: list[int]
    thresholds: list[float]
    draft_exit_layer: int = 0  # lossless draft: layers [0, E); 0 = every layer (the cheap part is the head)
    target_agreement: float
    corpus_tokens: int  # continuation tokens the thresholds were chosen on
    shortlist_coverage: float  # held-out share of the full model's tokens that are in the shortlist
    held_out: list[LayerStats] = []


def calibration_path(model_path: str | os.PathLike[str]) -> Path:
    p = Path(model_path)
    return p.with_name(p.name + ".exit.json")


def load_calibration(model_path: str | os.PathLike[str]) -> ExitCalibration | None:
    """The calibration stored with the model, or None when it has not been calibrated."""
    path = calibration_path(model_path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CalibrationError(f"cannot read {path}: {e.strerror}") from None
    try:
        cal = msgspec.json.decode(data, type=ExitCalibration)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise CalibrationError(f"{path}: not a valid early-exit calibration ({e}); run calibrate-exit again") from None
    model = Path(model_path)
    size = model.stat().st_size
    if cal.version != FORMAT_VERSION or cal.model_file != model.name or cal.model_bytes != size:
        raise CalibrationError(
            f"{path} was made for {cal.model_file} ({cal.model_bytes} bytes, format {cal.version}), "
            f"not {model.name} ({size} bytes): run `appliance models calibrate-exit` again"
        )
    if len(cal.exit_layers) != len(cal.thresholds):
        raise CalibrationError(f"{path}: exit_layers and thresholds differ in length")
    return cal


def save_calibration(cal: ExitCalibration, model_path: str | os.PathLike[str]) -> Path:
    path = calibration_path(model_path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(msgspec.json.format(msgspec.json.encode(cal), indent=1))
    os.replace(tmp, path)
    return path


def read_prompts(text: str) -> list[str]:
    """One prompt per line; blank lines and # comments are skipped."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def packaged_prompts(name: str) -> list[str]:
    """A prompt list shipped in appliance/engine/data (exit_calibration_prompts.txt, early_exit_eval_prompts.txt)."""
    return read_prompts(resources.files("appliance.engine").joinpath("data", name).read_text("utf-8"))


def build_shortlist(sequences: Iterable[Iterable[int]], n_vocab: int, size: int) -> list[int]:
    """Every token seen in the corpus, most frequent first, then the lowest ids not seen (a
    tokenizer's first pieces are its most common ones) until `size`."""
    if size < 1:
        raise ValueError("shortlist size must be >= 1")
    counts: Counter[int] = Counter()
    for seq in sequences:
        counts.update(t for t in seq if 0 <= t < n_vocab)
    out = [t for t, _ in counts.most_common(size)]
    taken = set(out)
    t = 0
    while len(out) < min(size, n_vocab):
        if t not in taken:
            out.append(t)
        t += 1
    return out


def wilson_lower(hits: npt.NDArray[np.float64], n: npt.NDArray[np.float64], z: float) -> npt.NDArray[np.float64]:
    """Lower end of the Wilson score interval for a proportion hits/n."""
    p = hits / n
    centre = p + z * z / (2 * n)
    spread = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    out: npt.NDArray[np.float64] = (centre - spread) / (1 + z * z / n)
    return out


def choose_thresholds(
    conf: npt.NDArray[np.float32],
    agree: npt.NDArray[np.bool_],
    target: float,
    min_support: int = 20,
    z: float = 1.28,
) -> list[float]:
    """Per exit layer (columns, in order), the lowest confidence threshold at which the tokens that
    would exit there agree with the full model at least `target` of the time, judged by the lower end
    of a Wilson interval (z = 1.28: 90% one-sided) so that the target holds on new text too, not
    only on the calibration corpus. Layers are taken in order and a token that exits at one is not
    counted at later ones, as in decoding. A layer with fewer than `min_support` qualifying exits
    gets 1.0 (never exit)."""
    if conf.shape != agree.shape or conf.ndim != 2:
        raise ValueError("conf and agree must both be [n_tokens, n_exits]")
    if not 0.0 < target <= 1.0:
        raise ValueError("target agreement must be in (0, 1]")
    remaining = np.ones(conf.shape[0], dtype=bool)
    out: list[float] = []
    for x in range(conf.shape[1]):
        c, a = conf[remaining, x], agree[remaining, x]
        order = np.argsort(-c, kind="stable")
        hits = np.cumsum(a[order]).astype(np.float64)
        n = np.arange(1, len(order) + 1, dtype=np.float64)
        ok = np.nonzero((wilson_lower(hits, n, z) >= target) & (n >= min_support))[0]
        if len(ok) == 0:
            out.append(1.0)
            continue
        k = int(ok[-1])  # the most tokens that still meet the target
        # exit needs conf > threshold: put it just below the k-th confidence, above the next one
        nxt = float(c[order[k + 1]]) if k + 1 < len(order) else 0.0
        thr = float(np.nextafter(np.float32(c[order[k]]), np.float32(0.0)))
        out.append(max(thr, nxt))
        remaining &= ~(conf[:, x] > out[-1])
    return out


def exit_stats(
    conf: npt.NDArray[np.float32], agree: npt.NDArray[np.bool_], layers: list[int], thresholds: list[float]
) -> list[LayerStats]:
    """Exit rate and agreement per layer when decoding with `thresholds` (held-out measurement)."""
    remaining = np.ones(conf.shape[0], dtype=bool)
    out: list[LayerStats] = []
    for x, (layer, thr) in enumerate(zip(layers, thresholds, strict=True)):
        reached = int(remaining.sum())
        exits = remaining & (conf[:, x] > thr)
        n_exit = int(exits.sum())
        out.append(
            LayerStats(
                layer=layer,
                threshold=thr,
                exit_rate=n_exit / reached if reached else 0.0,
                agreement=float(agree[exits, x].mean()) if n_exit else 1.0,
            )
        )
        remaining &= ~exits
    return out

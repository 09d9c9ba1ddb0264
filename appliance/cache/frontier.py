"""The precision / hit-rate frontier of a cache replay, for a cosine threshold or a :class:`Decision`.

:class:`Replayer` recomputes the cache dynamics of :func:`appliance.cache.replay.replay` in memory:
the rows arrive in order, a miss stores the row (its label is the answer), a hit does not, and a hit
is correct when the served row's label equals the query's. The nearest earlier rows of every row
are found once (exact cosine, :func:`neighbours`), so each operating point of a curve costs a pass
over short lists, not a search. The guards are the cache's own (:mod:`appliance.cache.guards`).

``auc`` is the area under precision as a function of hit rate, from hit rate 0 to the curve's
largest one (precision held at its first point's value below it): a curve that keeps high precision
to a higher hit rate has more area. ``best_hit_rate(curve, 0.97)`` is the frontier's point the goals
name: the highest hit rate among the operating points with precision at least 0.97.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from appliance.cache.decision import Decision, K, answer_key, choose, features
from appliance.cache.guards import Signature, conflict, signature
from appliance.cache.text import clean_text

THRESHOLDS = tuple(round(0.60 + 0.01 * i, 2) for i in range(40))
# the frontier's grid: finer, as a tuned embedder's correct neighbours crowd above 0.9
FRONTIER_THRESHOLDS = tuple(round(0.60 + 0.005 * i, 3) for i in range(80))
CUTOFFS = (*tuple(round(0.3 + 0.025 * i, 3) for i in range(28)), 0.985, 0.99, 0.995, 0.9975, 0.999)
Point = dict[str, float]
_M = 64  # earlier rows remembered per row; beyond them the search falls back to all stored rows


def neighbours(
    vectors: npt.NDArray[np.float32], m: int = _M, chunk: int = 1024
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """For each row i, the (up to) ``m`` most similar rows j < i, best first; -1 pads."""
    n = len(vectors)
    idx = np.full((n, m), -1, dtype=np.int64)
    sims = np.full((n, m), -2.0, dtype=np.float32)
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        s = vectors[a:b] @ vectors[:b].T
        rows = np.arange(a, b)
        mask = np.arange(b)[None, :] >= rows[:, None]
        s[mask] = -2.0
        take = min(m, b)
        top = np.argpartition(-s, take - 1, axis=1)[:, :take]
        top_s = np.take_along_axis(s, top, axis=1)
        order = np.argsort(-top_s, axis=1, kind="stable")
        top, top_s = np.take_along_axis(top, order, axis=1), np.take_along_axis(top_s, order, axis=1)
        top[top_s <= -1.5] = -1
        idx[a:b, :take], sims[a:b, :take] = top, top_s
    return idx, sims


class Replayer:
    """The cache replay of one labelled, ordered workload, at any threshold or decision."""

    def __init__(
        self,
        vectors: npt.NDArray[np.float32],
        texts: Sequence[str],
        labels: Sequence[str],
        *,
        guards: bool = True,
        k: int = K,
    ) -> None:
        if not (len(vectors) == len(texts) == len(labels)):
            raise ValueError(f"{len(vectors)} vectors, {len(texts)} texts and {len(labels)} labels differ")
        self.vectors = vectors
        self.texts = texts
        self.labels = [answer_key(x) for x in labels]
        self.guards = guards
        self.k = k
        self.idx, self.sims = neighbours(vectors)
        self._sigs: list[Signature | None] = [None] * len(texts)

    def _sig(self, i: int) -> Signature:
        s = self._sigs[i]
        if s is None:
            s = self._sigs[i] = signature(clean_text(self.texts[i]))
        return s

    def blocked(self, i: int, j: int) -> bool:
        return self.guards and conflict(self._sig(i), self._sig(j)) is not None

    def candidates(self, i: int, stored: npt.NDArray[np.bool_]) -> tuple[list[int], list[float]]:
        """The ``k`` nearest stored rows before ``i``, best first."""
        row = self.idx[i]
        ok = row >= 0
        ok[ok] = stored[row[ok]]
        sel = np.flatnonzero(ok)[: self.k]
        if len(sel) < self.k and row[-1] >= 0:  # the list ran out before k stored rows: search them all
            pool = np.flatnonzero(stored[:i])
            s = self.vectors[pool] @ self.vectors[i]
            take = min(self.k, len(pool))
            top = np.argpartition(-s, take - 1)[:take] if len(pool) > take else np.arange(len(pool))
            top = top[np.argsort(-s[top], kind="stable")]
            return [int(pool[t]) for t in top], [float(s[t]) for t in top]
        return [int(j) for j in row[sel]], [float(v) for v in self.sims[i][sel]]

    def _run(self, serve: Any) -> Point:
        n = len(self.texts)
        stored = np.zeros(n, dtype=bool)
        hits = correct = 0
        for i in range(n):
            js, ss = self.candidates(i, stored)
            j = serve(i, js, ss) if js else -1
            if j >= 0:
                hits += 1
                correct += self.labels[j] == self.labels[i]
            else:
                stored[i] = True
        return {"hit_rate": hits / n if n else 0.0, "precision": correct / hits if hits else 1.0, "hits": hits}

    def at_threshold(self, t: float) -> Point:
        def serve(i: int, js: list[int], ss: list[float]) -> int:
            for j, s in zip(js, ss, strict=True):
                if s < t:
                    return -1
                if not self.blocked(i, j):
                    return j
            return -1

        return {"threshold": t, **self._run(serve)}

    def at_decision(self, decision: Decision) -> Point:
        def serve(i: int, js: list[int], ss: list[float]) -> int:
            at, _ = choose(ss, [self.labels[j] for j in js], lambda c: self.blocked(i, js[c]), decision)
            return js[at] if at >= 0 else -1

        return {"cutoff": decision.cutoff, **self._run(serve)}

    def threshold_curve(self, thresholds: Sequence[float] = THRESHOLDS) -> list[Point]:
        return [self.at_threshold(t) for t in thresholds]

    def decision_curve(self, decision: Decision, cutoffs: Sequence[float] = CUTOFFS) -> list[Point]:
        return [self.at_decision(decision.with_cutoff(c)) for c in cutoffs]

    def training_set(self, floor: float) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """Features and correctness of every row against all rows before it (each one stored), where
        the candidate's similarity reaches ``floor``: what a decision is fitted on."""
        xs: list[list[float]] = []
        ys: list[float] = []
        for i in range(len(self.texts)):
            row = self.idx[i]
            js = [int(j) for j in row[: self.k] if j >= 0]
            ss = [float(s) for s in self.sims[i][: len(js)]]
            start = 0
            while start < len(js) and self.blocked(i, js[start]):
                start += 1
            if start >= len(js) or ss[start] < floor:
                continue
            xs.append(features(ss[start:], [self.labels[j] for j in js[start:]], self.k))
            ys.append(float(self.labels[js[start]] == self.labels[i]))
        return np.asarray(xs, dtype=np.float64).reshape(-1, len(xs[0]) if xs else 1), np.asarray(ys)


def best_hit_rate(curve: Sequence[Point], precision: float = 0.97) -> float:
    return max((p["hit_rate"] for p in curve if p["precision"] >= precision and p["hits"] > 0), default=0.0)


def auc(curve: Sequence[Point]) -> float:
    pts = sorted((p["hit_rate"], p["precision"]) for p in curve if p["hits"] > 0)
    if not pts:
        return 0.0
    area, (x0, y0) = pts[0][0] * pts[0][1], pts[0]
    for x, y in pts[1:]:
        area += (x - x0) * (y + y0) / 2
        x0, y0 = x, y
    return area


def summary(curve: Sequence[Point], precision: float = 0.97) -> dict[str, float]:
    return {"auc": auc(curve), f"hit_rate_at_{precision:g}": best_hit_rate(curve, precision)}


def frontier_of(replayer: Replayer, decision: Decision | None, precision: float = 0.97) -> dict[str, Any]:
    """The threshold curve (and the decision's, when there is one) with their area and frontier point."""
    thr = replayer.threshold_curve(FRONTIER_THRESHOLDS)
    out: dict[str, Any] = {"threshold": summary(thr, precision), "threshold_curve": thr}
    if decision is not None:
        dec = replayer.decision_curve(decision)
        out["decision"] = {**summary(dec, precision), "calibrated": replayer.at_decision(decision)}
        out["decision_curve"] = dec
    return out


def embedder_decision(embedder: object) -> Decision | None:
    """The calibrated decision a (tuned) embedder carries, if any."""
    from appliance.cache.config import embedder_calibration

    cal = embedder_calibration(embedder)
    return None if cal is None else cal.decision


def side_by_side(frontiers: dict[str, dict[str, Any]], precision: float = 0.97) -> list[str]:
    """Text lines: the curves of several embedders' frontiers (:func:`frontier_of`) in columns."""
    names = list(frontiers)
    lines = [f"{'':>22}" + "".join(f"{n[:24]:>26}" for n in names)]
    for rule in ("threshold", "decision"):
        cells = []
        for n in names:
            s = frontiers[n].get(rule)
            cells.append(f"auc {s['auc']:.3f} hit@{precision:g} {s[f'hit_rate_at_{precision:g}']:.3f}" if s else "-")
        lines.append(f"{rule + ' rule':>22}" + "".join(f"{c:>26}" for c in cells))
    for rule, key in (("threshold", "threshold_curve"), ("cutoff", "decision_curve")):
        curves = [frontiers[n].get(key, []) for n in names]
        if not any(curves):
            continue
        lines.append(f"{rule:>22}" + "".join(f"{'hit_rate precision':>26}" for _ in names))
        for i, at in enumerate(next(c for c in curves if c)):
            cells = [f"{c[i]['hit_rate']:.3f} {c[i]['precision']:.3f}" if c else "-" for c in curves]
            lines.append(f"{at[rule]:>22.3f}" + "".join(f"{c:>26}" for c in cells))
    return lines

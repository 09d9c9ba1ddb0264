"""A calibrated hit decision over the top-k neighbours, instead of one global cosine threshold.

A lookup finds the ``k`` nearest stored queries. The candidate answer is the one of the nearest
neighbour that no guard blocks; :func:`features` describes how sure the neighbourhood is of it:

- ``best``: its cosine similarity;
- ``gap``: ``best`` minus the best similarity of a neighbour with another answer (the lowest of the
  ``k`` when all agree, ``best`` itself when the cache holds nothing else): a dense neighbourhood of
  other answers (card arrival next to card delivery estimate) shrinks it;
- ``agree``: the share of the ``k`` neighbours with the same answer;
- ``second``: the similarity of the second neighbour with the same answer (0 when there is none).

:class:`Decision` is a logistic model over these, fitted on a calibration split, and a cutoff on its
probability chosen there for a target precision; a hit needs ``P(correct) >= cutoff``. Evaluating
it is a handful of float operations (well under 0.1 ms; :func:`choose` is what the cache and the
replay both run). Answers are compared after :func:`answer_key` normalisation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import msgspec
import numpy as np
import numpy.typing as npt

FEATURES = ("best", "gap", "agree", "second", "best_x_gap")
K = 8


class Decision(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A fitted decision: weights over standardised :data:`FEATURES`, and the probability cutoff."""

    weights: list[float]  # one per feature, then the bias
    mean: list[float]
    scale: list[float]
    cutoff: float  # P(correct) a hit needs
    floor: float  # a best similarity below this is a miss without further work
    k: int = K
    target: float = 0.97
    calibration: dict[str, float] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(FEATURES)
        if len(self.weights) != n + 1 or len(self.mean) != n or len(self.scale) != n:
            raise ValueError(f"decision needs {n} features (+ bias), got {len(self.weights)} weights")
        if not 0.0 < self.cutoff < 1.0 or self.k < 1:
            raise ValueError(f"decision cutoff {self.cutoff} must be in (0, 1) and k {self.k} at least 1")

    def probability(self, feats: Sequence[float]) -> float:
        z = self.weights[-1]
        for w, x, m, s in zip(self.weights, feats, self.mean, self.scale, strict=False):
            z += w * (x - m) / s
        return 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, z))))

    def with_cutoff(self, cutoff: float) -> Decision:
        return msgspec.structs.replace(self, cutoff=cutoff)


def answer_key(response: str) -> str:
    """Answers that are the same after case folding and whitespace collapsing share a key."""
    return " ".join(response.casefold().split())


def features(sims: Sequence[float], answers: Sequence[str], k: int = K) -> list[float]:
    """The features of the neighbourhood (best first; ``answers[0]`` is the candidate answer)."""
    best, mine = sims[0], answers[0]
    other = None
    same = 0
    second = 0.0
    for s, a in zip(sims, answers, strict=True):
        if a == mine:
            same += 1
            if same == 2:
                second = s
        elif other is None:
            other = s
    if other is None:
        other = sims[-1] if len(sims) >= k else 0.0
        if len(sims) == 1:
            other = 0.0
    gap = best - other
    return [best, gap, same / k, second, best * gap]


def choose(
    sims: Sequence[float],
    answers: Sequence[str],
    blocked: Callable[[int], bool],
    decision: Decision,
) -> tuple[int, float]:
    """(index of the neighbour to serve or -1, its probability of being right).

    ``sims`` best first. Neighbours ahead of the first one ``blocked`` lets through are dropped; the
    rest stay as evidence (guards are checked lazily: at most until the first unblocked one)."""
    start = 0
    while start < len(sims) and sims[start] >= decision.floor:
        if not blocked(start):
            break
        start += 1
    if start >= len(sims) or sims[start] < decision.floor:
        return -1, 0.0
    p = decision.probability(features(sims[start:], answers[start:], decision.k))
    return (start if p >= decision.cutoff else -1), p


def fit_logistic(
    x: npt.NDArray[np.float64], y: npt.NDArray[np.float64], l2: float = 1e-2, iters: int = 50
) -> tuple[list[float], list[float], list[float]]:
    """Weights (+ bias), means and scales of an L2-regularised logistic regression (Newton steps)."""
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-6] = 1.0
    z = np.hstack([(x - mean) / scale, np.ones((len(x), 1))])
    w = np.zeros(z.shape[1])
    reg = np.full(z.shape[1], l2)
    reg[-1] = 0.0
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-np.clip(z @ w, -50, 50)))
        grad = z.T @ (p - y) + reg * w
        hess = (z * (p * (1 - p))[:, None]).T @ z + np.diag(reg + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if float(np.abs(step).max()) < 1e-8:
            break
    return [float(v) for v in w], [float(v) for v in mean], [float(v) for v in scale]

"""The calibrated hit decision over the top-k neighbours and the frontier it is judged by: features,
the fit, the guards inside it, the cost of one decision, and the curve's area and frontier point."""

from __future__ import annotations

import time

import msgspec
import numpy as np
import pytest

from appliance.cache.calibrate import fit_decision
from appliance.cache.config import TunedCalibration, tuned_calibration
from appliance.cache.decision import Decision, answer_key, choose, features, fit_logistic
from appliance.cache.errors import CacheError, ConfigError
from appliance.cache.frontier import Replayer, auc, best_hit_rate, neighbours


def _decision(cutoff: float = 0.5) -> Decision:
    # P(correct) grows with the best similarity and the gap to another answer
    return Decision(
        weights=[2.0, 2.0, 0.5, 0.0, 0.0, 0.0],
        mean=[0.8, 0.1, 0.5, 0.5, 0.1],
        scale=[0.1] * 5,
        cutoff=cutoff,
        floor=0.5,
    )


def test_features_describe_the_neighbourhood() -> None:
    sims = [0.95, 0.90, 0.80, 0.70, 0.60, 0.55, 0.52, 0.51]
    answers = ["a", "a", "b", "a", "c", "c", "c", "c"]
    best, gap, agree, second, cross = features(sims, answers, 8)
    assert (best, second) == (0.95, 0.90)
    assert gap == pytest.approx(0.95 - 0.80) and agree == 3 / 8 and cross == pytest.approx(best * gap)
    # all neighbours agree: the gap runs to the lowest of the k; a lone entry has nothing else: gap = best
    assert features([0.9] * 8, ["a"] * 8, 8)[1] == 0.0
    assert features([0.9], ["a"], 8)[1:3] == [0.9, 1 / 8]


def test_choose_skips_guard_blocked_neighbours_and_applies_the_cutoff() -> None:
    dec = _decision()
    sims, answers = [0.97, 0.93, 0.6], ["x", "y", "z"]
    assert choose(sims, answers, lambda c: False, dec)[0] == 0
    assert choose(sims, answers, lambda c: c == 0, dec)[0] == 1  # the blocked best one is dropped
    assert choose(sims, answers, lambda c: True, dec)[0] == -1
    assert choose([0.45], ["x"], lambda c: False, dec) == (-1, 0.0)  # under the floor: no work
    at, p = choose(sims, answers, lambda c: False, dec.with_cutoff(0.999))
    assert at == -1 and 0.0 < p < 0.999


def test_a_decision_costs_well_under_a_tenth_of_a_millisecond() -> None:
    dec = _decision()
    sims = [0.95, 0.90, 0.80, 0.70, 0.60, 0.55, 0.52, 0.51]
    answers = [answer_key(a) for a in ["A", "a ", "b", "a", "c", "c", "c", "c"]]
    n = 2000
    t0 = time.thread_time()  # CPU time: a loaded machine stretches wall time, not the work
    for _ in range(n):
        choose(sims, answers, lambda c: False, dec)
    per_ms = (time.thread_time() - t0) / n * 1e3
    assert per_ms < 0.1, per_ms


def test_logistic_fit_separates_and_decision_round_trips() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 5))
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(float)
    w, mean, scale = fit_logistic(x, y)
    assert w[0] > 1.0 and w[1] > 0.3
    dec = Decision(weights=w, mean=mean, scale=scale, cutoff=0.9, floor=0.5)
    cal = TunedCalibration(threshold=0.9, decision=dec)
    back = tuned_calibration(msgspec.json.encode(cal).decode(), "test")
    assert back is not None and back.decision == dec
    with pytest.raises(ConfigError, match=r"calibration stored in x\.gguf is invalid"):
        tuned_calibration('{"threshold": 0.9, "decision": {"weights": [1.0]}}', "x.gguf")
    with pytest.raises(ValueError, match="cutoff"):
        Decision(weights=w, mean=mean, scale=scale, cutoff=1.5, floor=0.5)


def _clusters(n_labels: int, per: int, noise: float, seed: int = 0) -> tuple[np.ndarray, list[str], list[str]]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_labels, 32))
    labels = [f"l{i % n_labels}" for i in range(n_labels * per)]
    rng.shuffle(labels)
    vecs = np.stack([centres[int(lab[1:])] + noise * rng.normal(size=32) for lab in labels]).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    return vecs, [f"question {i}" for i in range(len(labels))], labels


def test_neighbours_are_the_exact_nearest_earlier_rows() -> None:
    vecs, _, _ = _clusters(5, 20, 0.5)
    idx, sims = neighbours(vecs, m=7)
    for i in (1, 17, 99):
        want = np.argsort(-(vecs[:i] @ vecs[i]), kind="stable")[:7]
        got = idx[i][idx[i] >= 0]
        assert set(got) == set(want) and np.all(np.diff(sims[i][: len(got)]) <= 1e-6)
    assert np.all(idx[0] == -1)


def test_fitted_decision_reaches_its_target_on_the_rows_it_was_calibrated_on() -> None:
    vecs, texts, labels = _clusters(20, 30, 0.9)
    rp = Replayer(vecs, texts, labels, guards=False)
    dec, curve = fit_decision(rp, 0.97)
    point = rp.at_decision(dec)
    assert point["precision"] >= 0.975 and point["hits"] >= 20
    assert dec.calibration["hits"] == point["hits"]
    assert [p["cutoff"] for p in curve] == sorted(p["cutoff"] for p in curve)
    with pytest.raises(CacheError, match="too little evidence"):
        fit_decision(Replayer(vecs[:10], texts[:10], labels[:10], guards=False), 0.97)


def test_area_and_frontier_point_of_a_curve() -> None:
    curve = [
        {"hit_rate": 0.1, "precision": 1.0, "hits": 10},
        {"hit_rate": 0.3, "precision": 0.98, "hits": 30},
        {"hit_rate": 0.5, "precision": 0.9, "hits": 50},
        {"hit_rate": 0.0, "precision": 1.0, "hits": 0},
    ]
    assert best_hit_rate(curve, 0.97) == 0.3 and best_hit_rate(curve, 0.999) == 0.1
    assert auc(curve) == pytest.approx(0.1 * 1.0 + 0.2 * 0.99 + 0.2 * 0.94)
    assert auc([]) == 0.0 and best_hit_rate([], 0.97) == 0.0

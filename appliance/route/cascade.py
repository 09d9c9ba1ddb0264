"""The confidence check after a local answer (the cascade): a looping, empty or truncated answer is
low confidence and goes to the cloud. Signals used: repetition of word 3-grams, truncation by
max_tokens, an empty answer. (Token log-probabilities and entropy are not exposed by the batching
engine's step results yet, so they are not part of the score.)"""

from __future__ import annotations

import re

import msgspec

from appliance.service.config import RouteConfig

_WORD = re.compile(r"\w+", re.U)


class Confidence(msgspec.Struct, frozen=True, kw_only=True):
    score: float  # 0..1
    repetition: float  # share of word 3-grams that repeat an earlier one
    truncated: bool
    escalate: bool
    why: str  # "" when confident


def repetition(text: str, n: int = 3) -> float:
    words = [w.lower() for w in _WORD.findall(text)]
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if len(grams) < 4:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def assess(text: str, finish_reason: str, cfg: RouteConfig) -> Confidence:
    rep = repetition(text)
    truncated = finish_reason == "length"
    empty = not text.strip()
    score = 0.0 if empty else (1.0 - rep) * (0.5 if truncated else 1.0)
    reasons = [
        why
        for why, hit in (
            ("empty answer", empty),
            (f"repetition {rep:.2f} > {cfg.max_repetition}", rep > cfg.max_repetition),
            ("truncated at max_tokens", truncated and cfg.escalate_truncated),
            (f"confidence {score:.2f} < {cfg.min_confidence}", score < cfg.min_confidence),
        )
        if hit
    ]
    return Confidence(score=score, repetition=rep, truncated=truncated, escalate=bool(reasons), why="; ".join(reasons))

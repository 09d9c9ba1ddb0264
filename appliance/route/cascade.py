"""The confidence check after a local answer (the cascade): a looping, empty, truncated or unsure
answer is low confidence and goes to the cloud.

Signals: the mean log-probability of the answer's tokens and the mean entropy of the distributions
they came from (the engine scores each token when asked: `SamplingOptions.logprobs`), repetition of
word 3-grams, truncation by max_tokens, an empty answer. The check can run on the first tokens of an
answer (`partial`): the pipeline holds back only a window of tokens, decides, then streams the rest
(or cancels the local generation and asks the cloud)."""

from __future__ import annotations

import math
import re

import msgspec

from appliance.common.config import RouteConfig

_WORD = re.compile(r"\w+", re.U)
CHECK_EVERY = 16  # tokens between the checks of a held-back local answer (the service and cascade-eval)


class Confidence(msgspec.Struct, frozen=True, kw_only=True):
    score: float  # 0..1
    repetition: float  # share of word 3-grams that repeat an earlier one
    truncated: bool
    mean_logprob: float | None  # None when the tokens were not scored
    mean_entropy: float | None
    escalate: bool
    why: str  # "" when confident


class TokenScores:
    """Running sums of the per-token scores of one answer."""

    def __init__(self) -> None:
        self.n = 0
        self.logprob = 0.0
        self.entropy = 0.0

    def add(self, logprob: float | None, entropy: float | None) -> None:
        if logprob is None or entropy is None or not (math.isfinite(logprob) and math.isfinite(entropy)):
            return
        self.n += 1
        self.logprob += logprob
        self.entropy += entropy

    def means(self) -> tuple[float | None, float | None]:
        return (self.logprob / self.n, self.entropy / self.n) if self.n else (None, None)


def repetition(text: str, n: int = 3) -> float:
    words = [w.lower() for w in _WORD.findall(text)]
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if len(grams) < 4:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def assess(
    text: str,
    finish_reason: str,
    cfg: RouteConfig,
    scores: TokenScores | None = None,
    *,
    partial: bool = False,
) -> Confidence:
    """`partial`: `text` is the start of an answer still being generated (not empty, not truncated yet).

    The score is (1 - repetition), halved when truncated; the token scores have thresholds of their
    own in `[route]` (min_mean_logprob, max_mean_entropy)."""
    rep = repetition(text)
    truncated = finish_reason == "length" and not partial
    empty = not partial and not text.strip()
    lp, ent = scores.means() if scores is not None else (None, None)
    score = 0.0 if empty else (1.0 - rep) * (0.5 if truncated else 1.0)
    reasons = [
        why
        for why, hit in (
            ("empty answer", empty),
            (f"repetition {rep:.2f} > {cfg.max_repetition}", rep > cfg.max_repetition),
            ("truncated at max_tokens", truncated and cfg.escalate_truncated),
            (f"mean logprob {lp or 0:.2f} < {cfg.min_mean_logprob}", lp is not None and lp < cfg.min_mean_logprob),
            (f"mean entropy {ent or 0:.2f} > {cfg.max_mean_entropy}", ent is not None and ent > cfg.max_mean_entropy),
            (f"confidence {score:.2f} < {cfg.min_confidence}", score < cfg.min_confidence),
        )
        if hit
    ]
    return Confidence(
        score=score,
        repetition=rep,
        truncated=truncated,
        mean_logprob=lp,
        mean_entropy=ent,
        escalate=bool(reasons),
        why="; ".join(reasons),
    )

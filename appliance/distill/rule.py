"""The confidence rule of a task model: how sure its answer was, as one number per answer.

Two signals, both read from the engine's per-token scores (SamplingOptions.logprobs):
- "margin" (the default): the smallest lead, over the answer's tokens, of the chosen token's logit
  over the best other token it could have been (the allowed answers' when the task decodes
  under its known answers). A token that was the only choice does not lower it. It separates "sure
  of this answer" from "torn between two answers", which a token's probability alone does not when
  the rest of the mass is spread over tokens that were never in the running.
- "logprob": the least likely token's log-probability (the first rule; older registrations).
An answer is kept local when it ended by itself, is not empty, and its signal is at or above the
threshold calibrated for the model (`appliance distill eval`). Calibration may also choose the
signal ("auto", the default there): the one that keeps more of the calibration set local at the
target precision, since which separates right from wrong answers better depends on the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SIGNALS = ("margin", "logprob")
DEFAULT_SIGNAL = "margin"  # what the service applies when a registration names none
AUTO = "auto"  # calibration picks the signal (evaluate.judge)
MARGIN_CAP = 100.0  # a lead this large is certainty; keeps the figures finite (JSON has no inf)


@dataclass
class Sureness:
    """Running minimum of an answer's token scores."""

    low: float = 0.0  # the least likely token's log-probability (0.0 before any token)
    margin: float = MARGIN_CAP  # the smallest lead (MARGIN_CAP before any token)

    def add(self, logprob: float | None, margin: float | None) -> None:
        if logprob is not None and not math.isnan(logprob):
            self.low = min(self.low, logprob)
        if margin is not None and not math.isnan(margin):
            self.margin = min(self.margin, margin)

    def value(self, signal: str) -> float:
        if signal not in SIGNALS:
            raise ValueError(f"unknown confidence signal {signal!r} (one of {', '.join(SIGNALS)})")
        return self.margin if signal == "margin" else self.low

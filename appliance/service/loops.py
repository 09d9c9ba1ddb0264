"""Cutting an answer that loops: a base model asked a question often repeats one phrase until
max_tokens. The service stops a local generation once its last tokens are one block of tokens
repeated, so nobody waits for (or spends the engine on) 128 tokens of it.

Looping means: for some period p <= MAX_PERIOD, the last max(COPIES * p, MIN_SPAN) tokens repeat with
period p (each equals the token p before it): the same block COPIES times or more in a row, and at
least MIN_SPAN tokens of it, so a short run ("!!!", a row of a table, "0, 0, 0, 0") is left alone.
"""

from __future__ import annotations

MAX_PERIOD = 64
COPIES = 3
MIN_SPAN = 32


class LoopCheck:
    """Feed it a generation's tokens one by one; `add` says when the answer has started looping."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.period = 0  # the loop's period once found

    def add(self, token: int) -> bool:
        t = self.tokens
        t.append(token)
        n = len(t)
        for p in range(1, MAX_PERIOD + 1):
            span = max(COPIES * p, MIN_SPAN)
            if span > n:
                break
            if t[n - span + p :] == t[n - span : n - p]:
                self.period = p
                return True
        return False

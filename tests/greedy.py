"""Greedy decoding with our engine, the way ref_greedy drives llama.cpp: the prompt in one pass, then
one token per decode."""

from __future__ import annotations

import numpy as np

from appliance import _native


def ours_greedy(ctx: _native.Context, prompt: list[int], n: int) -> list[int]:
    ctx.truncate(0)
    ctx.decode(prompt)
    out: list[int] = []
    while len(out) < n:
        out.append(int(np.argmax(ctx.logits())))
        if len(out) < n:
            ctx.decode([out[-1]])
    return out


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)

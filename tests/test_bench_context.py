"""`bench_context` at a tiny scale on a generated model: the scripted conversation runs with context
management on (folds into a summary, stays near the budget, keeps a cached prefix) and off (whole
history, counted past the model's context without generating)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.bench.context import bench_context

KEYS = (
    "turns",
    "budget",
    "on_prompt_tokens",
    "off_prompt_tokens",
    "on_total",
    "off_total",
    "summarizer_tokens",
    "saved_ratio",
    "cached_tokens_on",
    "wall_s",
)


def test_bench_context_tiny(tiny_model: Callable[..., Path]) -> None:
    path = tiny_model("gemma3", "F32")
    turns, budget = 7, 400
    # the tiny vocab spells most of the script byte by byte: ~60-90 tokens per turn, 512-token context
    res = bench_context(str(path), 1, turns=turns, max_tokens=4, budget=budget, summary_max_tokens=8, n_ctx=1000)
    json.dumps(res)  # JSON-ready
    for k in KEYS:
        assert k in res, k
    assert res["turns"] == turns and res["budget"] == budget
    on, off = res["on_prompt_tokens"], res["off_prompt_tokens"]
    assert len(on) == len(off) == len(res["cached_tokens_on"]) == len(res["per_turn"]) == turns
    assert on[0] == off[0]  # nothing to manage yet: the same prompt
    assert off == sorted(off) and off[-1] > res["n_ctx"]  # the whole history grows past the model's context
    assert res["off_over_context_turns"] and res["off_over_context_turns"][0] > 1
    assert all(t["off"]["reply"] is None for t in res["per_turn"] if not t["off"]["fits_context"])
    assert res["off_total_within_context"] < res["off_total"]

    assert res["fold_turns"] and res["folded_messages"] > 0 and res["summarizer_calls"] >= 1
    assert res["summarizer_tokens"] == res["summarizer_prompt_tokens"] + res["summarizer_completion_tokens"] > 0
    assert max(on) < max(off) and res["on_total"] < res["off_total"]
    assert all(t["on"]["budget_estimate"] <= budget for t in res["per_turn"])
    assert all(t["on"]["finish_reason"] in ("stop", "length") for t in res["per_turn"])
    net = res["on_total"] + res["summarizer_tokens"]
    assert res["saved_ratio"] == pytest.approx(1 - net / res["off_total"], abs=1e-4)
    # between folds the system prompt (+ summary) and the verbatim turns are a cached prefix
    assert res["cached_tokens_on"][1] > 0
    assert all(c < p for c, p in zip(res["cached_tokens_on"], on, strict=True))


def test_bench_context_turns_out_of_range(tiny_model: Callable[..., Path]) -> None:
    with pytest.raises(ValueError, match="turns"):
        bench_context(str(tiny_model("gemma3", "F32")), 1, turns=0)

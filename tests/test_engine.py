"""Engine behaviour: streaming, stop strings, sampling, prefix reuse, chat templates."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from appliance.engine.engine import Engine
from appliance.engine.sampling import SamplingOptions
from appliance.engine.textstream import TextStream

GREEDY = SamplingOptions(temperature=0.0, max_tokens=24)


@pytest.fixture(scope="module")
def engine(tiny_model: Callable[..., Path]) -> Engine:
    return Engine(tiny_model("gemma3", "Q8_0"), n_ctx=256, n_threads=2)


def test_stream_text_equals_detokenized_tokens(engine: Engine) -> None:
    chunks = list(engine.generate("the quick brown", GREEDY))
    tokens = [c.token for c in chunks if c.token is not None]
    assert chunks[-1].finish_reason in ("length", "stop")
    assert "".join(c.text for c in chunks) == engine.detokenize(tokens)


def test_max_tokens_and_length_finish(engine: Engine) -> None:
    chunks = list(engine.generate("the quick brown", SamplingOptions(temperature=0.0, max_tokens=5)))
    assert sum(c.token is not None for c in chunks) <= 5
    if chunks[-1].finish_reason == "length":
        assert sum(c.token is not None for c in chunks) == 5


def test_stop_string_cuts_output(engine: Engine) -> None:
    full = engine.generate_text("the quick brown", GREEDY)
    assert len(full) > 6
    stop = full[3:6]
    cut = engine.generate_text("the quick brown", SamplingOptions(temperature=0.0, max_tokens=24, stop=(stop,)))
    assert cut == full[: full.index(stop)]


def test_prefix_reuse_gives_same_output(engine: Engine) -> None:
    a = engine.generate_text("the quick brown fox jumps", GREEDY)
    engine.generate_text("something else entirely", GREEDY)
    b = engine.generate_text("the quick brown fox jumps", GREEDY)
    c = engine.generate_text("the quick brown fox jumps", GREEDY)  # full prefix hit
    assert a == b == c


def test_seeded_sampling_is_reproducible(engine: Engine) -> None:
    opts = SamplingOptions(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=42, max_tokens=16)
    assert engine.generate_text("hello", opts) == engine.generate_text("hello", opts)
    other = SamplingOptions(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=43, max_tokens=16)
    outs = {engine.generate_text("hello", other), engine.generate_text("hello", opts)}
    assert len(outs) == 2


def test_top_k_1_is_greedy_at_any_temperature(engine: Engine) -> None:
    greedy = engine.generate_text("the quick brown", GREEDY)
    for seed in range(3):
        opts = SamplingOptions(temperature=1.5, top_k=1, top_p=1.0, min_p=0.0, seed=seed, max_tokens=24)
        assert engine.generate_text("the quick brown", opts) == greedy


def test_repeat_penalty_keeps_recent_tokens_out_of_a_greedy_choice(engine: Engine) -> None:
    # a prompt whose greedy continuation repeats itself: the prompt plus 24 greedy tokens
    base = engine.tokenize("the quick brown")
    looped = base + [c.token for c in engine.generate(base, GREEDY) if c.token is not None]
    one = SamplingOptions(temperature=0.0, max_tokens=1)
    plain = next(c.token for c in engine.generate(looped, one) if c.token is not None)
    penalised = SamplingOptions(temperature=0.0, max_tokens=1, repeat_penalty=10.0, repeat_last_n=64)
    chosen = next(c.token for c in engine.generate(looped, penalised) if c.token is not None)
    assert plain in looped[-64:]  # without the penalty, greedy repeats a recent token
    assert chosen not in looped[-64:]


def test_chat_template(engine: Engine) -> None:
    text = engine.apply_chat_template([{"role": "user", "content": "hi there"}])
    assert "hi there" in text and "<start_of_turn>" in text
    with pytest.raises(ValueError, match=r"messages\[0\]"):
        engine.apply_chat_template([{"role": "user"}])


def test_textstream_holds_split_utf8_and_stop_prefixes() -> None:
    s = TextStream(stop=("STOP",))
    euro = "€".encode()
    assert s.push(euro[:1]) == ""
    assert s.push(euro[1:]) == "€"
    assert s.push(b"abc ST") == "abc "
    assert s.push(b"OP tail") == ""
    assert s.stopped
    t = TextStream()
    assert t.push(euro[:2]) == "" and t.finish() == "\ufffd"


def test_special_tokens_roundtrip(engine: Engine) -> None:
    toks = engine.tokenize("<start_of_turn>user", parse_special=True)
    plain = engine.tokenize("<start_of_turn>user", parse_special=False)
    assert len(toks) < len(plain)
    assert "<start_of_turn>" in engine.detokenize(toks, special=True)
    assert "<start_of_turn>" not in engine.detokenize(toks)


def test_engine_and_async_engine_give_the_same_tokens_and_scores(
    engine: Engine, tiny_model: Callable[..., Path]
) -> None:
    """Engine and AsyncEngine are one generation path: with logprobs=True, the same greedy tokens
    with the same log-probabilities and entropies at temperature 1."""
    import asyncio

    from appliance.engine.async_engine import AsyncEngine

    opts = SamplingOptions(temperature=0.0, max_tokens=8, logprobs=True)
    mine = [c for c in engine.generate("the quick brown", opts) if c.token is not None]
    assert mine and all(c.logprob is not None and c.entropy is not None for c in mine)
    assert all(c.logprob <= 0.0 and c.entropy >= 0.0 for c in mine)  # type: ignore[operator]
    plain = [c for c in engine.generate("the quick brown", GREEDY) if c.token is not None]
    assert all(c.logprob is None for c in plain)

    batching = AsyncEngine(tiny_model("gemma3", "Q8_0"), n_blocks=64, n_threads=2)

    async def collect() -> list[tuple[int | None, float | None, float | None]]:
        return [(c.token, c.logprob, c.entropy) async for c in batching.generate("the quick brown", opts)]

    try:
        theirs = [t for t in asyncio.run(collect()) if t[0] is not None]
    finally:
        batching.close()
    assert [c.token for c in mine] == [t[0] for t in theirs]
    np.testing.assert_allclose([c.logprob for c in mine], [t[1] for t in theirs], atol=1e-3)
    np.testing.assert_allclose([c.entropy for c in mine], [t[2] for t in theirs], atol=1e-3)

"""Engine behaviour: streaming, stop strings, sampling, prefix reuse, chat templates."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from greedy import first_divergence

from appliance import _native
from appliance.engine.engine import Engine
from appliance.engine.sampling import SamplingOptions
from appliance.engine.textstream import TextStream

GREEDY = SamplingOptions(temperature=0.0, max_tokens=24)
NEAR_TIE = 1e-3  # top-2 logit margin under which a kernel's summation order may pick either


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


def test_prefix_reuse_gives_same_output(engine: Engine, tiny_model: Callable[..., Path]) -> None:
    """A prompt served cold, after other traffic, and from the prefix cache twice decodes the same
    tokens, up to near-ties: a cached prompt's later blocks can sit in another order in the KV pool,
    and attention sums F16 cells in pool order (README, Early exit: "up to near-ties")."""
    prompt = engine.tokenize("the quick brown fox jumps")

    def tokens() -> list[int]:
        return [c.token for c in engine.generate(prompt, GREEDY) if c.token is not None]

    cold = tokens()
    engine.generate_text("something else entirely", GREEDY)
    ref = _native.Context(_native.Model(str(tiny_model("gemma3", "Q8_0"))), n_ctx=256, n_threads=1)
    for again in (tokens(), tokens(), tokens()):
        i = first_divergence(cold[: len(again)], again[: len(cold)])
        if i is not None:
            ref.truncate(0)
            ref.decode(prompt + cold[:i])
            top2 = np.sort(ref.logits())[-2:]
            assert top2[1] - top2[0] < NEAR_TIE, f"diverged at token {i} with a clear margin {top2[1] - top2[0]:.3g}"


def test_seeded_sampling_is_reproducible(tiny_model: Callable[..., Path]) -> None:
    """The same seed from the same engine state gives the same text (engines that served other
    requests may hold the prompt's cells in another pool order, which can move a draw at a near-tie)."""
    opts = SamplingOptions(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=42, max_tokens=16)
    other = SamplingOptions(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=43, max_tokens=16)

    def fresh(o: SamplingOptions) -> str:
        return Engine(tiny_model("gemma3", "Q8_0"), n_ctx=256, n_threads=2).generate_text("hello", o)

    assert fresh(opts) == fresh(opts)
    assert fresh(other) != fresh(opts)


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


def test_engine_and_async_engine_give_the_same_tokens_and_scores(tiny_model: Callable[..., Path]) -> None:
    """Engine and AsyncEngine are one generation path: with logprobs=True, the same greedy tokens
    with the same log-probabilities and entropies at temperature 1 (both fresh, so their KV pools
    hold the cells in the same order)."""
    engine = Engine(tiny_model("gemma3", "Q8_0"), n_ctx=256, n_threads=2)
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

"""Early exit: the lossless self-speculative mode reproduces full-depth output, the adaptive mode at
threshold 1.0 equals full depth, lower thresholds exit early (filling the skipped layers' K/V), and
the calibration picks thresholds and shortlists as documented."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import msgspec
import numpy as np
import pytest
from greedy import first_divergence
from test_batching import KERNEL_NOISE, PROMPTS

from appliance import _native
from appliance.engine.async_engine import AsyncEngine
from appliance.engine.chunk import DecodeStats
from appliance.engine.early_exit import (
    CalibrationError,
    build_shortlist,
    calibration_path,
    choose_thresholds,
    exit_stats,
    load_calibration,
    save_calibration,
)
from appliance.engine.exit_calibrate import calibrate
from appliance.engine.sampling import ExitMode, SamplingOptions
from appliance.service.metrics import Metrics, early_exit_gauges

TINY_PROMPTS = ["the quick brown fox", "hello world and", "one two three four", "a b c d e f", "zebra"]


def run(
    engine: _native.BatchEngine, prompts: list[list[int]], n: int, **kw: object
) -> tuple[list[list[int]], list[_native.Event]]:
    ids = [engine.submit(p, max_tokens=n, temperature=0.0, stop_at_eog=False, **kw) for p in prompts]  # type: ignore[arg-type]
    out: dict[int, list[int]] = {i: [] for i in ids}
    events: list[_native.Event] = []
    while not engine.idle:
        for ev in engine.step():
            out[ev.id] += ev.tokens
            events.append(ev)
        assert engine.check_invariants() == ""
    return [out[i] for i in ids], events


def tiny_engine(path: Path, shortlist: list[int] | None, **kw: object) -> _native.BatchEngine:
    engine = _native.BatchEngine(_native.Model(str(path)), n_blocks=64, block_size=16, **kw)
    if shortlist is not None:
        engine.set_shortlist(shortlist)
    return engine


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
@pytest.mark.parametrize("draft_exit_layer", [0, 2])
def test_lossless_equals_full_depth_tiny(tiny_model: Callable[..., Path], arch: str, draft_exit_layer: int) -> None:
    path = tiny_model(arch, "F32", n_layer=4)
    vocab = _native.Vocab(str(path))
    prompts = [list(vocab.tokenize(p)) for p in TINY_PROMPTS]
    full, _ = run(tiny_engine(path, None), prompts, 24)
    # half the vocabulary: drafts often miss, so rejection and KV rollback run too
    shortlist = list(range(0, vocab.n_tokens, 2))
    engine = tiny_engine(path, shortlist, draft_exit_layer=draft_exit_layer, draft_max=6, always_draft=True)
    for batch in ([prompts[0]], prompts):  # alone, and five sequences drafting together
        out, events = run(engine, batch, 24, exit_mode="lossless")
        assert out == full[: len(batch)]
    stats = engine.stats()
    assert stats["plain_decode_steps"] == 0 and stats["accepted"] < stats["drafted"]
    assert sum(ev.n_drafted for ev in events) > 0
    if draft_exit_layer == 0:  # the full network with half the head agrees about half the time
        assert stats["accepted"] > 0


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_adaptive_threshold_one_equals_full_depth(tiny_model: Callable[..., Path], arch: str) -> None:
    path = tiny_model(arch, "F32", n_layer=4)
    vocab = _native.Vocab(str(path))
    prompts = [list(vocab.tokenize(p)) for p in TINY_PROMPTS]
    full, _ = run(tiny_engine(path, None), prompts, 16)
    engine = tiny_engine(
        path, list(range(vocab.n_tokens)), exit_layers=[1, 2, 3], exit_thresholds=[0.5, 0.5, 0.5], always_draft=True
    )
    out, events = run(engine, prompts, 16, exit_mode="adaptive", exit_threshold=1.0)
    assert out == full
    decided = [at for ev in events for at in ev.exit_layers]
    assert decided and set(decided) == {4}  # every token ran every layer
    assert engine.stats()["exits_per_layer"][4] == engine.stats()["adaptive_tokens"]


def test_adaptive_exits_fill_skipped_layers(tiny_model: Callable[..., Path]) -> None:
    """At threshold 0 every decoded token leaves after the first exit layer; the layers it skipped
    get K/V from its hidden state, so later tokens (which also exit) read filled cells. The run is
    deterministic, keeps the pool consistent, and its first token (from the prefill) is full depth."""
    path = tiny_model("gemma3", "F32", n_layer=4)
    vocab = _native.Vocab(str(path))
    prompts = [list(vocab.tokenize(p)) for p in TINY_PROMPTS]
    full, _ = run(tiny_engine(path, None), prompts, 12)
    results = []
    for _ in range(2):
        vocab_ids = list(range(vocab.n_tokens))
        engine = tiny_engine(path, vocab_ids, exit_layers=[2], exit_thresholds=[0.0], always_draft=True)
        out, events = run(engine, prompts, 12, exit_mode="adaptive")
        results.append(out)
        per_token = [at for ev in events for at in ev.exit_layers]
        assert per_token.count(2) == 5 * 11 and per_token.count(4) == 5
        assert sum(ev.layers_run for ev in events) < sum(len(p) for p in prompts) * 4 + 5 * 12 * 4
    assert results[0] == results[1]
    assert [o[0] for o in results[0]] == [f[0] for f in full]  # the prefill's token is full depth
    assert results[0] != full  # exiting at layer 2 of 4 changes this random model's choices


def test_lossless_on_default_model_matches_full_depth(default_model: Path) -> None:
    """Greedy lossless output equals full depth up to near-ties: the verification pass computes
    the head over several positions at once, whose kernels differ from one-token decoding by up to
    KERNEL_NOISE in the logits (see test_batched_kernels_differ_like_llamacpp)."""
    model = _native.Model(str(default_model))
    vocab = _native.Vocab(str(default_model))
    prompts = [list(vocab.tokenize(p)) for p in PROMPTS[:4]]
    full, _ = run(_native.BatchEngine(model, kv_cache_mb=32), prompts, 32)
    shortlist = build_shortlist(full[:3], vocab.n_tokens, 8192)  # the 4th prompt's tokens are partly missing
    engine = _native.BatchEngine(model, kv_cache_mb=32, always_draft=True)
    engine.set_shortlist(shortlist)
    ctx = _native.Context(model, n_ctx=256)
    for batch in ([0], [0, 1, 2, 3]):
        out, _ = run(engine, [prompts[k] for k in batch], 32, exit_mode="lossless")
        for k, o in zip(batch, out, strict=True):
            i = first_divergence(o, full[k])
            if i is None:
                continue
            ctx.truncate(0)
            ctx.decode(prompts[k] + full[k][:i])
            top2 = np.sort(ctx.logits())[-2:]
            print(f"lossless: prompt {k} diverges at {i}, full-depth top-2 margin {top2[1] - top2[0]:.3f}")
            assert top2[1] - top2[0] < KERNEL_NOISE
    st = engine.stats()
    assert st["accepted"] > 0 and st["accepted"] <= st["drafted"]


def test_drafting_policy_measures_passes_and_decides(tiny_model: Callable[..., Path]) -> None:
    """Without always_draft the engine decides per step from the pass times it measured (one step of
    each kind at a new size first): the output stays full depth's, and the stats and the metrics
    show the measurements and the decision."""
    path = tiny_model("llama", "F32", n_layer=4)
    vocab = _native.Vocab(str(path))
    prompts = [list(vocab.tokenize(p)) for p in TINY_PROMPTS]
    full, _ = run(tiny_engine(path, None), prompts, 24)
    engine = tiny_engine(path, list(range(0, vocab.n_tokens, 2)), draft_max=6)
    out, _ = run(engine, prompts[:1], 24, exit_mode="lossless")
    assert out == full[:1]
    st = engine.stats()
    assert st["spec_steps"] >= 1 and st["plain_decode_steps"] >= 1  # both kinds measured at one sequence
    assert set(st["spec_draft_us"]) >= {1} and set(st["spec_plain_us"]) >= {1} and st["spec_verify_us"]
    assert all(us > 0 for us in st["spec_plain_us"].values())
    assert 0.0 < st["spec_acceptance"] < 1.0  # half the vocabulary: drafts often miss
    c = st["spec_choices"][1]
    assert c["why"] in ("model", "refresh") and c["plain_us_per_token"] > 0 and c["spec_us_per_token"] > 0
    if c["why"] == "model":  # the decision follows the prediction
        assert c["drafting"] == (c["spec_us_per_token"] < c["plain_us_per_token"])
    text = Metrics().render(early_exit_gauges(st))
    assert 'appliance_early_exit_drafting{seqs="1"}' in text
    assert 'appliance_early_exit_pass_ms{kind="plain",seqs="1"}' in text
    assert text.count("# TYPE appliance_early_exit_pass_ms gauge") == 1


def test_exit_requests_are_checked(tiny_model: Callable[..., Path]) -> None:
    path = tiny_model("llama", "F32")
    engine = tiny_engine(path, None)
    with pytest.raises(ValueError, match="calibration"):
        engine.submit([1, 2, 3], exit_mode="lossless")
    with pytest.raises(ValueError, match="exit_mode"):
        engine.submit([1, 2, 3], exit_mode="fast")
    engine.set_shortlist([1, 2, 3])
    with pytest.raises(ValueError, match="exit layers"):
        engine.submit([1, 2, 3], exit_mode="adaptive")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.set_shortlist([1, 10**6])
    with pytest.raises(ValueError, match="twice"):
        engine.set_shortlist([1, 1])
    with pytest.raises(ValueError, match="ascending"):
        tiny_engine(path, None, exit_layers=[1, 1], exit_thresholds=[0.5, 0.5])
    with pytest.raises(ValueError, match="same length"):
        tiny_engine(path, None, exit_layers=[1], exit_thresholds=[])
    with pytest.raises(ValueError, match="outside"):
        tiny_engine(path, None, exit_layers=[2], exit_thresholds=[0.5])  # the model has 2 layers


def test_choose_thresholds_meets_target_in_order() -> None:
    rng = np.random.default_rng(0)
    n = 4000
    conf = rng.uniform(0, 1, size=(n, 2)).astype(np.float32)
    # agreement grows with confidence; the second layer agrees more
    agree = np.stack([rng.uniform(0, 1, n) < conf[:, 0], rng.uniform(0, 1, n) < 0.5 + conf[:, 1] / 2], axis=1)
    thr = choose_thresholds(conf, agree, target=0.9)
    stats = exit_stats(conf, agree, [3, 6], thr)
    for s in stats:
        assert s.agreement >= 0.9 and s.exit_rate > 0
    assert thr[0] > thr[1]  # the more reliable layer may exit at lower confidence
    never = choose_thresholds(conf, np.zeros_like(agree), target=0.9)
    assert never == [1.0, 1.0]


def test_build_shortlist_frequency_then_low_ids() -> None:
    sl = build_shortlist([[9, 9, 9, 7, 7, 5], [7, 100]], n_vocab=200, size=6)
    assert sl[:3] == [9, 7, 5] and set(sl[3:5]) == {100} | {sl[4]} and len(sl) == len(set(sl)) == 6
    assert sl[4:] == [0, 1]


def test_calibration_file_round_trip_and_refusals(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    src = tiny_model("llama", "F32", n_layer=4)
    path = tmp_path / src.name
    path.write_bytes(src.read_bytes())
    prompts = [f"{w} and the {v}" for w in ("one", "two", "red", "blue", "cat", "dog") for v in ("sea", "sky")]
    cal = calibrate(path, prompts, target=0.6, shortlist_size=64, max_tokens=12, threads=1, progress=None)
    assert len(cal.shortlist) == 64 and cal.exit_layers and len(cal.thresholds) == len(cal.exit_layers)
    assert all(1 <= layer < 4 for layer in cal.exit_layers)
    save_calibration(cal, path)
    assert load_calibration(path) == cal

    # through the asyncio engine: lossless equals off, with decode statistics on the last chunk
    async def gen(mode: ExitMode) -> tuple[str, DecodeStats | None]:
        engine = AsyncEngine(path, n_blocks=64, n_threads=1)
        opts = SamplingOptions(temperature=0.0, max_tokens=16, early_exit=mode)
        try:
            text, stats = "", None
            async for c in engine.generate("the cat and the", opts):
                text += c.text
                stats = c.decode or stats
            return text, stats
        finally:
            engine.close()

    off_text, off_stats = asyncio.run(gen("off"))
    ll_text, ll_stats = asyncio.run(gen("lossless"))
    assert ll_text == off_text
    assert off_stats is not None and ll_stats is not None
    assert ll_stats.drafted > 0 and ll_stats.tokens == off_stats.tokens

    # a calibration belongs to its model file
    path.write_bytes(src.read_bytes() + b"\0")
    with pytest.raises(CalibrationError, match="calibrate-exit"):
        load_calibration(path)
    calibration_path(path).write_text("{not json")
    with pytest.raises(CalibrationError, match="not a valid"):
        load_calibration(path)
    calibration_path(path).write_bytes(msgspec.json.encode({"version": 1}))
    with pytest.raises(CalibrationError):
        load_calibration(path)


def test_engine_without_calibration_refuses_early_exit(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    src = tiny_model("qwen3", "F32")
    path = tmp_path / src.name
    path.write_bytes(src.read_bytes())

    async def go() -> None:
        engine = AsyncEngine(path, n_blocks=32, n_threads=1)
        try:
            with pytest.raises(ValueError, match="calibrate-exit"):
                async for _ in engine.generate("x", SamplingOptions(early_exit="adaptive")):
                    pass
        finally:
            engine.close()

    asyncio.run(go())


def test_service_serves_both_modes_with_usage(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    from test_service_support import ServerProcess, write_config

    src = tiny_model("llama", "F32", n_layer=4)
    path = tmp_path / src.name
    path.write_bytes(src.read_bytes())
    prompts = [f"{w} and the {v}" for w in ("one", "two", "red", "blue", "cat", "dog") for v in ("sea", "sky")]
    save_calibration(
        calibrate(path, prompts, target=0.6, shortlist_size=64, max_tokens=8, threads=1, progress=None), path
    )
    srv = ServerProcess(write_config(tmp_path / "appliance.toml", path))
    try:
        with srv.client() as c:
            off = c.generate(prompt="the cat and the", max_tokens=12, temperature=0, early_exit=1)
            ll = c.generate(prompt="the cat and the", max_tokens=12, temperature=0, early_exit=2)
            ad = c.generate(prompt="the cat and the", max_tokens=12, temperature=0, early_exit=3, exit_threshold=0.0)
            default = c.generate(prompt="the cat and the", max_tokens=12, temperature=0)  # [model] early_exit
    finally:
        assert srv.stop() == 0
    assert ll.text == off.text == default.text
    assert off.usage.layers_per_token == 4 and off.usage.early_exit_tokens == 0
    assert 0 <= ll.usage.draft_acceptance <= 1 and ll.usage.layers_per_token >= 4
    assert ad.usage.early_exit_tokens > 0 and ad.usage.layers_per_token < 4


def _scores_of(events: list[_native.Event]) -> dict[int, list[tuple[float, float]]]:
    out: dict[int, list[tuple[float, float]]] = {}
    for ev in events:
        assert len(ev.logprobs) == len(ev.entropies) == len(ev.tokens)
        out.setdefault(ev.id, []).extend(zip(ev.logprobs, ev.entropies, strict=True))
    return out


def test_token_scores_in_every_decode_mode(tiny_model: Callable[..., Path]) -> None:
    """logprobs=True scores each new token as numpy does from the full-depth logits (plain and
    lossless decoding, adaptive at threshold 1), and from the shortlist for tokens that exit early;
    without it nothing is scored."""
    path = tiny_model("llama", "F32", n_layer=4)
    model, vocab = _native.Model(str(path)), _native.Vocab(str(path))
    prompt = list(vocab.tokenize(TINY_PROMPTS[0]))
    n = 10
    plain, events = run(tiny_engine(path, None), [prompt], n)
    assert all(not ev.logprobs and not ev.entropies for ev in events)

    ctx = _native.Context(model, n_ctx=64)
    expected = []
    for i, tok in enumerate(plain[0]):
        ctx.truncate(0)
        ctx.decode(prompt + plain[0][:i])
        logits = np.asarray(ctx.logits(), dtype=np.float64)
        lse = logits.max() + np.log(np.exp(logits - logits.max()).sum())
        p = np.exp(logits - lse)
        expected.append((logits[tok] - lse, float(-(p * (logits - lse)).sum())))

    shortlist = list(range(vocab.n_tokens))
    cases: list[tuple[_native.BatchEngine, dict[str, object]]] = [
        (tiny_engine(path, None), {}),
        (tiny_engine(path, shortlist, always_draft=True, draft_max=4), {"exit_mode": "lossless"}),
        (
            tiny_engine(path, shortlist, exit_layers=[2], exit_thresholds=[0.5], always_draft=True),
            {"exit_mode": "adaptive", "exit_threshold": 1.0},
        ),
    ]
    for engine, kw in cases:
        out, events = run(engine, [prompt], n, logprobs=True, **kw)
        assert out == plain, kw
        got = next(iter(_scores_of(events).values()))
        np.testing.assert_allclose(np.array(got), np.array(expected), atol=2e-3, err_msg=str(kw))

    # every token exits at layer 2: scored over the shortlist (half the vocabulary here)
    half = list(range(0, vocab.n_tokens, 2))
    engine = tiny_engine(path, half, exit_layers=[2], exit_thresholds=[0.0], always_draft=True)
    out, events = run(engine, [prompt], n, logprobs=True, exit_mode="adaptive")
    got = next(iter(_scores_of(events).values()))
    assert len(got) == n
    for (lp, ent), tok in zip(got[1:], out[0][1:], strict=True):
        assert tok in half and lp <= 0 and 0 <= ent <= np.log(len(half)) + 1e-4

"""Bad input gets a Python exception naming what is wrong, never a crash."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from tinymodels import make_truncated, make_unknown_arch, make_wrong_shape, make_wrong_type

from appliance import _native
from appliance.engine.engine import ContextOverflowError, Engine, ModelFormatError
from appliance.engine.sampling import SamplingOptions


def test_truncated_gguf(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    src = tiny_model("llama", "Q4_K")
    for frac in (0.9, 0.5, 0.01):
        bad = make_truncated(src, tmp_path / f"trunc{frac}.gguf", frac)
        with pytest.raises(ModelFormatError, match=r"truncated|corrupt|not a GGUF"):
            _native.Model(str(bad))


def test_unknown_architecture(tmp_path: Path) -> None:
    bad = make_unknown_arch(tmp_path / "unknown.gguf")
    with pytest.raises(ModelFormatError, match=r"unsupported architecture 'notanarch'.*gemma3"):
        _native.Model(str(bad))


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_tensor_of_wrong_shape(arch: str, tmp_path: Path) -> None:
    bad = make_wrong_shape(tmp_path / "shape.gguf", arch)
    with pytest.raises(ModelFormatError, match=r"has shape .* expected"):
        _native.Model(str(bad))


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_tensor_of_wrong_type(arch: str, tmp_path: Path) -> None:
    bad = make_wrong_type(tmp_path / "type.gguf", arch)
    with pytest.raises(ModelFormatError, match=r"must be F32|cannot be used|corrupt"):
        _native.Model(str(bad))


def test_not_a_gguf_and_missing_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"this is not a model at all" * 10)
    with pytest.raises(ModelFormatError, match="not a GGUF"):
        _native.Model(str(junk))
    with pytest.raises(ModelFormatError, match="cannot open"):
        _native.Model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelFormatError):
        _native.Vocab(str(junk))


def test_prompt_longer_than_context(tiny_model: Callable[..., Path]) -> None:
    engine = Engine(tiny_model("qwen3"), n_ctx=32, n_threads=1)
    long_prompt = "word " * 100
    with pytest.raises(ContextOverflowError, match="too long: the longest sequence is 32 tokens"):
        next(engine.generate(long_prompt))
    # the context is still usable afterwards
    assert engine.generate_text("hello", SamplingOptions(max_tokens=4, temperature=0))


def test_decode_past_the_context_leaves_sequence_intact(tiny_model: Callable[..., Path]) -> None:
    ctx = _native.Context(_native.Model(str(tiny_model("llama"))), n_ctx=16, n_threads=1)
    ctx.decode(list(range(10, 20)))
    with pytest.raises(_native.ContextOverflowError, match="does not fit"):
        ctx.decode(list(range(10)))
    assert ctx.n_past == 10


def test_invalid_utf8(tiny_model: Callable[..., Path]) -> None:
    engine = Engine(tiny_model("llama"), n_ctx=64, n_threads=1)
    with pytest.raises(ValueError, match="not valid UTF-8: byte 5"):
        next(engine.generate(b"hello\xff\xfe world"))
    with pytest.raises(ValueError, match="lone surrogate"):
        engine.tokenize("bad \ud800 text")


@pytest.mark.parametrize("n_threads", [0, -1])
def test_nonpositive_threads(n_threads: int, tiny_model: Callable[..., Path]) -> None:
    path = tiny_model("llama")
    with pytest.raises(ValueError, match="n_threads must be positive"):
        Engine(path, n_threads=n_threads)
    with pytest.raises(ValueError, match="n_threads must be positive"):
        _native.Context(_native.Model(str(path)), n_threads=n_threads)


def test_token_ids_out_of_range_and_empty(tiny_model: Callable[..., Path]) -> None:
    path = tiny_model("llama")
    ctx = _native.Context(_native.Model(str(path)), n_ctx=32, n_threads=1)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ctx.decode([1, 2, 10**6])
    with pytest.raises(ValueError, match="out of range"):
        ctx.decode([2**40])
    with pytest.raises(ValueError, match="at least one token"):
        ctx.decode([])
    with pytest.raises(ValueError, match="call decode"):
        ctx.logits()
    engine = Engine(path, n_ctx=32, n_threads=1)
    with pytest.raises(ValueError, match="prompt is empty"):
        next(engine.generate([]))


def test_bad_sampling_options(tiny_model: Callable[..., Path]) -> None:
    engine = Engine(tiny_model("llama"), n_ctx=32, n_threads=1)
    for bad in (SamplingOptions(top_p=0.0), SamplingOptions(max_tokens=0), SamplingOptions(temperature=-1.0)):
        with pytest.raises(ValueError, match="sampling option"):
            next(engine.generate("hi", bad))

"""The tiny-model fixtures are valid for llama.cpp, non-degenerate, and the
broken fixtures are really broken (llama.cpp refuses them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import jinja2
import llama_cpp
import numpy as np
import numpy.typing as npt
import pytest
from reference import ref_greedy, ref_load, ref_logits, ref_tokenize
from tinymodels import (
    ARCHS,
    WTYPES,
    make_tiny_model,
    make_truncated,
    make_unknown_arch,
    make_wrong_shape,
    make_wrong_type,
    tiny_config,
    tiny_vocab,
)

CASES = [(arch, wtype) for arch in ARCHS for wtype in WTYPES]
Models = dict[tuple[str, str], Path]


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    root = tmp_path_factory.mktemp("tiny")
    return {(a, w): make_tiny_model(root / f"{a}-{w}.gguf", a, w) for a, w in CASES}


def _field(path: Path, key: str) -> Any:
    field = gguf.GGUFReader(path).get_field(key)
    assert field is not None, key
    return field.contents()


@pytest.fixture(scope="session")
def bad_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bad")


def _expected_tensors(arch: str, n_layer: int, tied: bool) -> set[str]:
    per_layer = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    per_layer += {
        "llama": [],
        "qwen2": [],
        "qwen3": ["attn_q_norm", "attn_k_norm"],
        "gemma3": ["attn_q_norm", "attn_k_norm", "post_attention_norm", "post_ffw_norm"],
    }[arch]
    names = {f"blk.{il}.{t}.weight" for il in range(n_layer) for t in per_layer}
    if arch == "qwen2":
        names |= {f"blk.{il}.attn_{t}.bias" for il in range(n_layer) for t in "qkv"}
    names |= {"token_embd.weight", "output_norm.weight"} | (set() if tied else {"output.weight"})
    return names


@pytest.mark.parametrize("arch,wtype", CASES)
def test_file_layout(models: Models, arch: str, wtype: str) -> None:
    reader = gguf.GGUFReader(models[arch, wtype])
    assert {t.name for t in reader.tensors} == _expected_tensors(arch, 2, tied=True)
    for t in reader.tensors:
        want = gguf.GGMLQuantizationType.F32 if len(t.shape) == 1 else gguf.GGMLQuantizationType[wtype]
        assert t.tensor_type == want, t.name
    assert _field(models[arch, wtype], "general.architecture") == arch
    assert _field(models[arch, wtype], f"{arch}.block_count") == 2


def test_generation_is_deterministic(tmp_path: Path) -> None:
    a = make_tiny_model(tmp_path / "a.gguf", "gemma3", "Q4_K", seed=1)
    b = make_tiny_model(tmp_path / "b.gguf", "gemma3", "Q4_K", seed=1)
    c = make_tiny_model(tmp_path / "c.gguf", "gemma3", "Q4_K", seed=2)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()


@pytest.mark.parametrize("arch,wtype", CASES)
def test_loads_tokenizes_and_generates(models: Models, arch: str, wtype: str) -> None:
    llm = ref_load(models[arch, wtype])
    assert llm.n_vocab() == tiny_config(arch).n_vocab
    prompt = ref_tokenize(llm, "hello world")
    assert len(prompt) > 1 and prompt[0] == 1  # BOS + text
    tokens, _, _ = tiny_vocab(tiny_config(arch))
    assert "".join(tokens[t] for t in prompt[1:]).replace("\u2581", " ").strip() == "hello world"

    out = ref_greedy(llm, prompt, 16)
    assert len(out) == 16
    assert len(set(out)) > 1, f"degenerate greedy continuation {out}"

    logits = ref_logits(llm, prompt + out)
    assert logits.shape == (len(prompt) + 16, llm.n_vocab())
    assert np.isfinite(logits).all()
    # the first greedy token comes from the same batched prompt pass
    assert int(np.argmax(logits[len(prompt) - 1])) == out[0]
    top2 = np.sort(logits, axis=1)[:, -2:]
    assert np.median(top2[:, 1] - top2[:, 0]) > 0.05, "top-2 logit margins are too small to compare engines"
    llm.close()


def test_untied_output(tmp_path: Path) -> None:
    tied = make_tiny_model(tmp_path / "tied.gguf", "llama")
    untied = make_tiny_model(tmp_path / "untied.gguf", "llama", tied=False)
    names = {t.name for t in gguf.GGUFReader(untied).tensors}
    assert names == _expected_tensors("llama", 2, tied=False)
    tokens = [1, 259, 260]
    a = ref_logits(ref_load(tied), tokens)
    b = ref_logits(ref_load(untied), tokens)
    assert not np.allclose(a, b)


def test_gemma3_has_sliding_and_global_layers(tmp_path: Path) -> None:
    cfg = tiny_config("gemma3")
    window = cfg.sliding_window
    assert [cfg.is_swa(il) for il in range(cfg.n_layer)] == [True, False]
    tokens = [1, *range(259, 259 + 3 * window)]

    def logits(name: str, **overrides: Any) -> npt.NDArray[np.float32]:
        return ref_logits(ref_load(make_tiny_model(tmp_path / name, "gemma3", **overrides)), tokens)

    # Sliding layers use rope base 10000 (llama.cpp's default when the key is
    # absent), global ones gemma3.rope.freq_base = 1e6.
    default = logits("default.gguf")
    same_rope = logits("same_rope.gguf", rope_freq_base_swa=cfg.rope_freq_base)
    np.testing.assert_array_equal(default[0], same_rope[0])  # position 0: rope is the identity
    assert np.abs(default[1:] - same_rope[1:]).max(axis=1).min() > 1e-3

    # With one rope base everywhere, only the attention window tells layouts apart.
    no_swa = logits("no_swa.gguf", sliding_window=0, rope_freq_base_swa=cfg.rope_freq_base)
    all_swa = logits("all_swa.gguf", swa_pattern=0, rope_freq_base_swa=cfg.rope_freq_base)
    for other in (no_swa, all_swa):
        # inside the window every layout sees the same keys ...
        np.testing.assert_allclose(other[:window], same_rope[:window], rtol=0, atol=1e-4)
        # ... beyond it they differ: the default has a sliding layer (vs
        # no_swa) and a global one (vs all_swa)
        assert np.abs(other[window:] - same_rope[window:]).max(axis=1).min() > 1e-3


@pytest.mark.parametrize("arch,control", [("gemma3", "<start_of_turn>"), ("qwen3", "<|im_start|>")])
def test_chat_template(models: Models, arch: str, control: str) -> None:
    llm = ref_load(models[arch, "F32"])
    template = llm.metadata["tokenizer.chat_template"]
    assert template == tiny_config(arch).chat_template
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    env = jinja2.Environment()
    text = env.from_string(template).render(messages=messages, add_generation_prompt=True, bos_token="<s>")
    ids = ref_tokenize(llm, text, add_bos=False, special=True)
    tokens, _, _ = tiny_vocab(tiny_config(arch))
    assert ids.count(tokens.index(control)) == 3
    end = control.replace("start", "end")
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    assert llama_cpp.llama_vocab_is_eog(vocab, tokens.index(end)), f"llama.cpp should treat {end} as end of generation"
    assert ref_tokenize(llm, control, add_bos=False, special=False) != [tokens.index(control)]


@pytest.mark.parametrize("keep_fraction", [0.0, 0.001, 0.05, 0.5, 0.999])
def test_truncated_is_rejected(models: Models, bad_dir: Path, keep_fraction: float) -> None:
    path = make_truncated(models["llama", "Q4_K"], bad_dir / f"truncated-{keep_fraction}.gguf", keep_fraction)
    with pytest.raises(ValueError):
        ref_load(path)


def test_unknown_arch_is_rejected(bad_dir: Path) -> None:
    path = make_unknown_arch(bad_dir / "unknown-arch.gguf")
    assert _field(path, "general.architecture") == "notanarch"
    with pytest.raises(ValueError):
        ref_load(path)


@pytest.mark.parametrize("arch", ARCHS)
def test_wrong_shape_is_rejected(bad_dir: Path, arch: str) -> None:
    path = make_wrong_shape(bad_dir / f"wrong-shape-{arch}.gguf", arch)
    shapes = {t.name: list(t.shape) for t in gguf.GGUFReader(path).tensors}  # still a valid GGUF
    cfg = tiny_config(arch)
    assert shapes["blk.0.attn_q.weight"] == [cfg.n_embd, cfg.n_q + 64]
    with pytest.raises(ValueError):
        ref_load(path)


@pytest.mark.parametrize("arch", ARCHS)
def test_wrong_type_is_rejected(bad_dir: Path, arch: str) -> None:
    path = make_wrong_type(bad_dir / f"wrong-type-{arch}.gguf", arch)
    with pytest.raises(ValueError):
        ref_load(path)

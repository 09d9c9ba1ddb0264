"""The LoRA export, checked numerically without training: a PEFT model with random LoRA weights on each
tiny architecture, exported as a llama.cpp LoRA GGUF, must give llama.cpp (base + adapter) the logits
transformers gives the PEFT model; the merged GGUF must give our core the logits llama.cpp gives
base + adapter. These pin the tensor naming, the A/B shapes, llama's Q/K row permutation and alpha."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import gguf
import numpy as np
import pytest
from reference import ref_load, ref_logits
from torch_threads import one_torch_thread  # noqa: F401 (an autouse fixture: torch on one thread here)

pytest.importorskip("torch")
pytest.importorskip("peft")

from appliance import _native
from appliance.distill import export
from appliance.distill.train import ALL_LINEAR, TrainConfig, attach_lora, load_model, lora_weights

Q = gguf.GGMLQuantizationType
TEXT = "hello world the of and to a in is it you that he was for on are with as I his they"


@contextlib.contextmanager
def _closing(llm: object) -> Iterator[object]:
    try:
        yield llm
    finally:
        llm.close()  # type: ignore[attr-defined]


def _random_peft(base: Path, seed: int = 0) -> object:
    """A PEFT model whose LoRA B matrices are random too (the default init leaves B at zero)."""
    import torch

    model = attach_lora(load_model(base), TrainConfig(rank=4, alpha=8.0, seed=seed))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def _adapter_of(model: object, base: Path) -> export.LoraAdapter:
    cfg = model.config  # type: ignore[attr-defined]
    return export.from_hf(
        str(gguf.GGUFReader(str(base)).fields["general.architecture"].contents()),
        n_layer=cfg.num_hidden_layers,
        n_head=cfg.num_attention_heads,
        n_head_kv=cfg.num_key_value_heads,
        alpha=8.0,
        rank=4,
        hf_weights=lora_weights(model),
    )


@pytest.mark.parametrize(
    ("arch", "overrides"),
    [("gemma3", {}), ("llama", {}), ("llama", {"n_head_kv": 4}), ("qwen2", {}), ("qwen3", {})],
)
def test_adapter_in_llama_cpp_matches_peft(
    tiny_model: Callable[..., Path], tmp_path: Path, arch: str, overrides: dict[str, object]
) -> None:
    import torch

    base = tiny_model(arch, "F32", **overrides)
    model = _random_peft(base)
    adapter = _adapter_of(model, base)
    path = export.write_adapter(adapter, tmp_path / "a.lora.gguf")

    with _closing(ref_load(base)) as plain:
        tokens = plain.tokenize(TEXT.encode(), add_bos=True)  # type: ignore[attr-defined]
        base_logits = ref_logits(plain, tokens)  # type: ignore[arg-type]
    with _closing(ref_load(base, n_ctx=128, n_threads=1, lora=path)) as llm:
        ours = ref_logits(llm, tokens)  # type: ignore[arg-type]
    with torch.no_grad():
        theirs = model(torch.tensor([tokens])).logits[0].numpy()  # type: ignore[operator]

    # the adapter changes the logits clearly, and llama.cpp applies it as PEFT does
    assert np.abs(theirs - base_logits).max() > 0.5
    assert np.abs(ours - theirs).max() < 0.05, np.abs(ours - theirs).max()
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.95


@pytest.mark.parametrize("arch", ["gemma3", "llama", "qwen3"])
def test_merged_f32_in_our_core_matches_llama_cpp_lora(
    tiny_model: Callable[..., Path], tmp_path: Path, arch: str
) -> None:
    base = tiny_model(arch, "F16")  # the merged tensors are F32, the rest are copied as F16
    adapter = _adapter_of(_random_peft(base, seed=3), base)
    lora = export.write_adapter(adapter, tmp_path / "a.lora.gguf")
    merged = export.merge(adapter, base, tmp_path / "m.gguf", quantize=False)

    with _closing(ref_load(base, n_ctx=128, n_threads=1, lora=lora)) as llm:
        tokens = llm.tokenize(TEXT.encode(), add_bos=True)  # type: ignore[attr-defined]
        ref = ref_logits(llm, tokens)  # type: ignore[arg-type]
    ctx = _native.Context(_native.Model(str(merged), use_gpu=False), n_ctx=128, n_threads=1)
    ctx.decode(tokens, all_logits=True)
    ours = ctx.all_logits()
    assert np.abs(ours - ref).max() < 0.05, np.abs(ours - ref).max()

    # merged tensors are F32 and changed; every other tensor is copied byte for byte
    b, m = gguf.GGUFReader(str(base)), gguf.GGUFReader(str(merged))
    mt = {t.name: t for t in m.tensors}
    for t in b.tensors:
        if t.name in adapter.weights:
            assert mt[t.name].tensor_type == gguf.GGMLQuantizationType.F32
        else:
            assert mt[t.name].tensor_type == t.tensor_type
            assert np.array_equal(np.asarray(mt[t.name].data), np.asarray(t.data)), t.name
    assert m.fields["tokenizer.ggml.tokens"].contents() == b.fields["tokenizer.ggml.tokens"].contents()


def test_merge_quantizes_through_libllama(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    """Untouched tensors keep the base's bytes and types; merged ones become Q8_0 (or, with
    merged_type=None, the base's type: Q4_K_M's mixture for an F32 base)."""
    for wtype, merged_type in (("Q4_K", "Q8_0"), ("F32", None)):
        base = tiny_model("gemma3", wtype)
        adapter = _adapter_of(_random_peft(base, seed=5), base)
        out = export.merge(adapter, base, tmp_path / f"m-{wtype}.gguf", merged_type=merged_type, threads=1)
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"
        b = {t.name: t for t in gguf.GGUFReader(str(base)).tensors}
        q = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
        assert b.keys() == q.keys()
        for name, t in b.items():
            if name in adapter.weights:
                want = {"Q8_0": (Q.Q8_0,), None: (Q.Q4_K, Q.Q5_0, Q.Q6_K)}[merged_type]
                assert q[name].tensor_type in want, (name, q[name].tensor_type)
            elif wtype != "F32":
                assert q[name].tensor_type == t.tensor_type
                assert np.array_equal(np.asarray(q[name].data), np.asarray(t.data)), name
        assert q["blk.0.attn_norm.weight"].tensor_type == Q.F32
        assert out.stat().st_mode & 0o044 == 0o044  # readable like any model file, not mkstemp's 0600
        _native.Model(str(out), use_gpu=False)  # loads in our core


def test_adapter_gguf_layout(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    base = tiny_model("gemma3", "F32")
    adapter = _adapter_of(_random_peft(base), base)
    path = export.write_adapter(adapter, tmp_path / "x.lora.gguf", name="x")
    r = gguf.GGUFReader(str(path))
    assert r.fields["general.type"].contents() == "adapter"
    assert r.fields["general.architecture"].contents() == "gemma3"
    assert r.fields["adapter.type"].contents() == "lora"
    assert r.fields["adapter.lora.alpha"].contents() == pytest.approx(8.0)
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in r.tensors}  # ggml order: ne0 first
    n_embd, n_q = 256, 4 * 64
    assert shapes["blk.0.attn_q.weight.lora_a"] == (n_embd, 4)  # A: ne = [n_in, rank]
    assert shapes["blk.0.attn_q.weight.lora_b"] == (4, n_q)  # B: ne = [rank, n_out]
    assert shapes["blk.1.ffn_down.weight.lora_a"] == (512, 4)
    assert len(shapes) == 2 * 2 * len(ALL_LINEAR)
    back = export.read_adapter(path)
    assert back.weights.keys() == adapter.weights.keys()
    for k, (a, b) in adapter.weights.items():
        assert np.array_equal(back.weights[k][0], a) and np.array_equal(back.weights[k][1], b)


def test_atomic_write_leaves_nothing_on_interrupt(tmp_path: Path) -> None:
    dest = tmp_path / "model.gguf"
    with pytest.raises(KeyboardInterrupt), export.atomic_path(dest) as tmp:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    dest.write_bytes(b"old")
    with pytest.raises(RuntimeError), export.atomic_path(dest) as tmp:
        tmp.write_bytes(b"new but broken")
        raise RuntimeError("crash")
    assert dest.read_bytes() == b"old" and list(tmp_path.iterdir()) == [dest]


@pytest.mark.parametrize("arch", ["gemma3", "qwen2"])
def test_answer_logits_are_the_full_models_logits_there(tiny_model: Callable[..., Path], arch: str) -> None:
    """The training loss's shortcut (the head applied only at answer positions, on a right-padded
    batch) gives what the full model gives at those positions, each example run alone."""
    import torch

    from appliance.distill.data import Example
    from appliance.distill.train import answer_logits, answer_loss, make_batch

    model = _random_peft(tiny_model(arch, "F32"))
    examples = [
        Example(tuple(range(10, 30)), (40, 41, 2)),  # longer than the sliding window (8)
        Example((1, 50, 51), (60, 2)),
    ]
    batch = make_batch(examples)
    assert batch.input_ids.shape == (2, 23) and batch.targets.tolist() == [40, 41, 2, 60, 2]
    with torch.no_grad():
        got = answer_logits(model, batch)
        want = []
        for e in examples:
            full = model(torch.tensor([e.tokens])).logits[0]  # type: ignore[operator]
            want.append(full[len(e.prompt) - 1 : len(e.tokens) - 1])
        want_t = torch.cat(want)
        assert torch.allclose(got, want_t, atol=1e-4), (got - want_t).abs().max()
        ce = torch.nn.functional.cross_entropy(want_t, batch.targets)
        assert float(answer_loss(model, batch)) == pytest.approx(float(ce), abs=1e-5)

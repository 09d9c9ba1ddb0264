"""Seed corpora for the native fuzz harnesses (native/fuzz/README.md), made from generated tiny models.

    python native/fuzz/seeds.py OUT_DIR

writes the models the harnesses load once (OUT_DIR/base.gguf: llama, untied head; base-swa.gguf:
gemma3 with sliding-window layers) and one seed directory per harness, OUT_DIR/seeds/{gguf,lora,
vocab,prefix}/. The gguf seeds are every architecture in F32, F16 and Q8_0, with the vocabulary cut
to 8 tokens (the model loader never reads the tokenizer), so a seed is a few kilobytes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import gguf
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from test_adapters import write_adapter  # noqa: E402
from tinymodels import make_tiny_model, tiny_config  # noqa: E402

TINY = {"n_embd": 32, "n_ff": 32, "n_head": 2, "n_head_kv": 1, "head_dim": 16, "n_vocab": 512, "n_ctx_train": 64}
BLOCK_SIZE = 4  # the prefix harness's engines (fuzz_prefix.cpp) use the same
MODEL_KEY = "fuzz"
SMALL_VOCAB = 8


def shrink_vocab(src: Path, dst: Path) -> None:
    """Copy a GGUF without its tokenizer keys and with token_embd/output cut to SMALL_VOCAB rows."""
    r = gguf.GGUFReader(str(src))
    arch = str(r.fields["general.architecture"].contents())
    w = gguf.GGUFWriter(str(dst), arch)
    for name, field in r.fields.items():
        if name.startswith(("GGUF.", "tokenizer.", "general.architecture")) or name.endswith(".vocab_size"):
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_array(name, field.contents())
        else:
            w.add_key_value(name, field.contents(), vtype)
    for t in r.tensors:
        data = np.asarray(t.data)
        if t.name in ("token_embd.weight", "output.weight"):
            data = data[:SMALL_VOCAB]
        w.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def prefix_seeds(base: Path, swa: Path, out: Path) -> None:
    """Hot-prefix files as the service saves them, from both harness engines (global-only and windowed)."""
    from appliance import _native

    for model_path in (base, swa):
        model = _native.Model(str(model_path))
        vocab = _native.Vocab(str(model_path))
        engine = _native.BatchEngine(model, n_blocks=32, block_size=BLOCK_SIZE, model_key=MODEL_KEY)
        prompt = list(vocab.tokenize("hello world the of and to a in is it you that he was " * 2))
        for tenant in ("", "acme"):
            engine.submit(prompt, max_tokens=1, temperature=0.0, tenant=tenant)
            while not engine.idle:
                engine.step()
            path = out / f"{model_path.stem}-{tenant or 'default'}.bin"
            assert engine.save_prefix(prompt, tenant=tenant, path=str(path)) > 0, "a seed prefix must hold blocks"


def main(out: Path) -> None:
    seeds = out / "seeds"
    for name in ("gguf", "lora", "vocab", "prefix"):
        (seeds / name).mkdir(parents=True, exist_ok=True)
    full = out / "full.gguf"
    for arch in ("llama", "qwen2", "qwen3", "gemma3"):
        for wtype in ("F32", "F16", "Q8_0"):
            n_layer = 2 if arch == "gemma3" else 1
            make_tiny_model(full, arch, wtype, n_layer=n_layer, tied=wtype != "F16", **TINY)
            shrink_vocab(full, seeds / "gguf" / f"{arch}-{wtype}.gguf")
    full.unlink()

    base = make_tiny_model(out / "base.gguf", "llama", "F32", n_layer=1, tied=False, **TINY)
    swa = make_tiny_model(out / "base-swa.gguf", "gemma3", "F32", n_layer=2, **TINY)
    cfg = tiny_config("llama", n_layer=1, tied=False, **TINY)
    write_adapter(seeds / "lora" / "all.gguf", cfg, seed=1, rank=2)
    write_adapter(
        seeds / "lora" / "head-f16.gguf", cfg, seed=2, rank=1, targets=("attn_q",), head=True, dtype=np.float16
    )
    write_adapter(seeds / "lora" / "no-alpha.gguf", cfg, seed=3, rank=3, alpha=0.0, targets=("ffn_down", "attn_v"))

    texts = ["hello world", "the of and", "<s>hi</s> <unk>", "caf\u00e9 \u2581x", "user\x01hi\x00assistant\x01yo", ""]
    for k, t in enumerate(texts):
        (seeds / "vocab" / f"text-{k}").write_bytes(bytes([k]) + t.encode())
    (seeds / "vocab" / "bytes").write_bytes(b"\x00\xff\xfe\xc3(\xe2\x82\xf0\x9f\x98")
    prefix_seeds(base, swa, seeds / "prefix")
    print(f"seeds in {seeds}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))

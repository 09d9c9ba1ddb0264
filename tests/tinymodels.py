"""Tiny random GGUF models (and deliberately broken ones) for engine tests.

The models are small enough to generate in milliseconds and to run in
llama.cpp in well under a second, yet use the real tensor layout and metadata
of each supported architecture, so the engine and llama.cpp (the reference,
see ``reference.py``) can be compared logit for logit.

Quantized weights are produced by ggml's own ``ggml_quantize_chunk`` (called
through ctypes from the ``libggml-base`` shipped inside llama-cpp-python), so
the bytes are exactly what llama.cpp's quantizer would write.
"""

from __future__ import annotations

import ctypes
import dataclasses
import string
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import gguf
import numpy as np
import numpy.typing as npt

ARCHS: tuple[str, ...] = ("llama", "qwen2", "qwen3", "gemma3")
WTYPES: tuple[str, ...] = ("F32", "F16", "Q8_0", "Q4_0", "Q4_K", "Q6_K")

_FILE_TYPES: Mapping[str, gguf.LlamaFileType] = MappingProxyType(
    {
        "F32": gguf.LlamaFileType.ALL_F32,
        "F16": gguf.LlamaFileType.MOSTLY_F16,
        "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
        "Q4_K": gguf.LlamaFileType.MOSTLY_Q4_K_M,  # what llama.cpp guesses for all-Q4_K
        "Q6_K": gguf.LlamaFileType.MOSTLY_Q6_K,
    }
)

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# SentencePiece word-boundary marker.
SPACE = "\u2581"
_WORDS = (  # most important first: words that do not fit the vocab are skipped
    "hello world the of and to a in is it you that he was for on are with as I his they be "
    "at one have this from or had by not but what some we can out other were all there when "
    "up use your how said an each she which do their time if will way about many then them "
    "would like so these her long make thing see him two has look more day could go come did "
    "number no most people my over know water than call first who may down side been now find"
).split()
_SUBWORDS = ("in", "ing", "er", "ed", "es", "on", "an", "re", "th", "he", "ll", "or", "at", "en", "st", "ly")
_CONTROLS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "qwen2": ("<|im_start|>", "<|im_end|>"),
        "qwen3": ("<|im_start|>", "<|im_end|>"),
        "gemma3": ("<start_of_turn>", "<end_of_turn>"),
    }
)
_CHARS = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation


@dataclasses.dataclass(frozen=True)
class TinyConfig:
    """Hyper-parameters of a tiny model; every field can be overridden."""

    arch: str
    n_layer: int = 2
    n_ctx_train: int = 512
    n_vocab: int = 512
    n_embd: int = 256
    n_ff: int = 512
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int = 64
    rms_eps: float = 1e-5
    rope_freq_base: float = 10000.0
    tied: bool = True  # no output.weight: the LM head reuses token_embd
    # gemma3 only. Layer il is global iff il % swa_pattern == swa_pattern - 1
    # (0: all layers slide); None omits the key and llama.cpp's built-in
    # pattern 6 applies. rope_freq_base_swa=None omits the key: llama.cpp then
    # uses 10000 for the sliding layers (rope_freq_base is for global ones).
    sliding_window: int = 8
    swa_pattern: int | None = 2
    rope_freq_base_swa: float | None = None
    add_space_prefix: bool | None = None  # None = omit the key (SPM default: true)
    chat_template: str | None = None
    # standard deviations of the random weights
    embd_std: float = 0.1
    w_std: float = 0.1
    out_std: float = 0.1
    norm_std: float = 0.1
    output_norm_mean: float = 1.0
    post_norm_mean: float = 1.0  # gemma3 post_attention_norm / post_ffw_norm
    bias_std: float = 0.1

    @property
    def n_q(self) -> int:
        return self.n_head * self.head_dim

    @property
    def n_kv(self) -> int:
        return self.n_head_kv * self.head_dim

    def is_swa(self, il: int) -> bool:
        """True when layer `il` uses sliding-window attention (gemma3 only)."""
        if self.arch != "gemma3" or self.sliding_window <= 0:
            return False
        pattern = 6 if self.swa_pattern is None else self.swa_pattern
        return pattern == 0 or il % pattern < pattern - 1


def _arch_defaults(arch: str) -> dict[str, Any]:
    if arch == "llama":
        return {}
    if arch in ("qwen2", "qwen3"):
        return {"rms_eps": 1e-6, "rope_freq_base": 1_000_000.0, "chat_template": CHATML_TEMPLATE}
    if arch == "gemma3":
        return {
            "rms_eps": 1e-6,
            "rope_freq_base": 1_000_000.0,
            "add_space_prefix": False,  # as convert_hf_to_gguf writes for gemma3
            "chat_template": GEMMA_TEMPLATE,
            # gemma3 scales the input embeddings by sqrt(n_embd) = 16: keep them
            # small and the (normalized) block outputs large, or the tied LM
            # head just echoes the current token; a large final norm restores
            # the logit scale (std ~1.3).
            "embd_std": 0.01,
            "post_norm_mean": 4.0,
            "output_norm_mean": 8.0,
        }
    raise ValueError(f"unsupported arch {arch!r}; expected one of {ARCHS}")


def tiny_config(arch: str, **overrides: Any) -> TinyConfig:
    """The configuration make_tiny_model(path, arch, **overrides) would use."""
    cfg = TinyConfig(arch=arch, **{**_arch_defaults(arch), **overrides})
    if arch == "qwen2" and cfg.n_q != cfg.n_embd:
        raise ValueError("qwen2 needs n_head * head_dim == n_embd (llama.cpp's attn_output is [n_embd, n_embd])")
    return cfg


def make_tiny_model(
    path: str | Path,
    arch: str,
    wtype: str = "F32",
    *,
    seed: int = 0,
    n_layer: int = 2,
    n_ctx_train: int = 512,
    **overrides: Any,
) -> Path:
    """Write a random `arch` model whose 2-D weights are stored as `wtype`.

    `overrides` are TinyConfig fields (e.g. tied=False, n_head_kv=4).
    """
    if wtype not in WTYPES:
        raise ValueError(f"unsupported wtype {wtype!r}; expected one of {WTYPES}")
    cfg = tiny_config(arch, n_layer=n_layer, n_ctx_train=n_ctx_train, **overrides)
    tensors = tiny_tensors(cfg, seed)
    return _write_gguf(Path(path), cfg, wtype, tensors)


# --------------------------------------------------------------------------
# vocabulary


def tiny_vocab(cfg: TinyConfig) -> tuple[list[str], list[float], list[int]]:
    """SentencePiece-style vocab: tokens, scores, token types (gguf.TokenType)."""
    tokens = ["<unk>", "<s>", "</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [gguf.TokenType.BYTE] * 256

    # chat-template control tokens go last so byte ids stay 3..258 everywhere
    controls = _CONTROLS.get(cfg.arch, ())
    budget = cfg.n_vocab - len(tokens) - len(controls)
    # Every multi-character piece must be reachable by SPM's pairwise merges,
    # so each word contributes all of its prefixes ("▁h", "▁he", "▁hel", ...).
    pieces: dict[str, None] = dict.fromkeys([SPACE, *_CHARS])
    pieces.update(dict.fromkeys(_SUBWORDS))
    for word in _WORDS:
        chain = [SPACE + word[:i] for i in range(1, len(word) + 1)]
        new = [p for p in chain if p not in pieces]
        if len(pieces) + len(new) > budget:
            continue
        pieces.update(dict.fromkeys(new))
    if len(pieces) > budget:
        raise ValueError(f"n_vocab={cfg.n_vocab} is too small for the base vocabulary")

    # Longer pieces merge first (higher score), like a trained SPM model.
    normal = sorted(pieces, key=len, reverse=True)  # stable: ties keep insertion order
    tokens += normal
    types += [gguf.TokenType.NORMAL] * len(normal)
    n_unused = budget - len(normal)
    tokens += [f"<unused{i}>" for i in range(n_unused)] + list(controls)
    types += [gguf.TokenType.UNUSED] * n_unused + [gguf.TokenType.CONTROL] * len(controls)

    scores = [0.0] * 259 + [-float(i) for i in range(len(normal))] + [0.0] * (n_unused + len(controls))
    assert len(tokens) == len(set(tokens)) == len(scores) == len(types) == cfg.n_vocab
    return tokens, scores, [int(t) for t in types]


# --------------------------------------------------------------------------
# tensors


def tiny_tensors(cfg: TinyConfig, seed: int = 0) -> dict[str, npt.NDArray[np.float32]]:
    """Random weights in numpy order (ggml's ne reversed), all float32."""
    rng = np.random.default_rng(seed)

    def mat(rows: int, cols: int, std: float) -> npt.NDArray[np.float32]:
        return (rng.standard_normal((rows, cols)) * std).astype(np.float32)

    def norm(n: int, mean: float = 1.0) -> npt.NDArray[np.float32]:
        return (mean + rng.standard_normal(n) * cfg.norm_std).astype(np.float32)

    def bias(n: int) -> npt.NDArray[np.float32]:
        return (rng.standard_normal(n) * cfg.bias_std).astype(np.float32)

    t: dict[str, npt.NDArray[np.float32]] = {
        "token_embd.weight": mat(cfg.n_vocab, cfg.n_embd, cfg.embd_std),
        "output_norm.weight": norm(cfg.n_embd, cfg.output_norm_mean),
    }
    if not cfg.tied:
        t["output.weight"] = mat(cfg.n_vocab, cfg.n_embd, cfg.out_std)
    for il in range(cfg.n_layer):
        p = f"blk.{il}."
        t[p + "attn_norm.weight"] = norm(cfg.n_embd)
        t[p + "attn_q.weight"] = mat(cfg.n_q, cfg.n_embd, cfg.w_std)
        t[p + "attn_k.weight"] = mat(cfg.n_kv, cfg.n_embd, cfg.w_std)
        t[p + "attn_v.weight"] = mat(cfg.n_kv, cfg.n_embd, cfg.w_std)
        t[p + "attn_output.weight"] = mat(cfg.n_embd, cfg.n_q, cfg.w_std)
        if cfg.arch == "qwen2":
            t[p + "attn_q.bias"] = bias(cfg.n_q)
            t[p + "attn_k.bias"] = bias(cfg.n_kv)
            t[p + "attn_v.bias"] = bias(cfg.n_kv)
        if cfg.arch in ("qwen3", "gemma3"):
            t[p + "attn_q_norm.weight"] = norm(cfg.head_dim)
            t[p + "attn_k_norm.weight"] = norm(cfg.head_dim)
        if cfg.arch == "gemma3":
            t[p + "post_attention_norm.weight"] = norm(cfg.n_embd, cfg.post_norm_mean)
        t[p + "ffn_norm.weight"] = norm(cfg.n_embd)
        t[p + "ffn_gate.weight"] = mat(cfg.n_ff, cfg.n_embd, cfg.w_std)
        t[p + "ffn_up.weight"] = mat(cfg.n_ff, cfg.n_embd, cfg.w_std)
        t[p + "ffn_down.weight"] = mat(cfg.n_embd, cfg.n_ff, cfg.w_std)
        if cfg.arch == "gemma3":
            t[p + "post_ffw_norm.weight"] = norm(cfg.n_embd, cfg.post_norm_mean)
    return t


def _ggml_base() -> ctypes.CDLL:
    import llama_cpp  # only needed for quantized types

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    return lib


def quantize(data: npt.NDArray[np.float32], qtype: gguf.GGMLQuantizationType) -> npt.NDArray[np.uint8]:
    """Quantize a 2-D float32 array row by row with ggml; returns [rows, row_bytes]."""
    lib = _ggml_base()
    src = np.ascontiguousarray(data, dtype=np.float32)
    nrows, n_per_row = src.shape
    dst = np.zeros((nrows, lib.ggml_row_size(int(qtype), n_per_row)), dtype=np.uint8)
    written = lib.ggml_quantize_chunk(int(qtype), src.ctypes.data, dst.ctypes.data, 0, nrows, n_per_row, None)
    if written != dst.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {dst.nbytes}")
    return dst


def _encode(data: npt.NDArray[np.float32], wtype: str) -> tuple[npt.NDArray[Any], gguf.GGMLQuantizationType | None]:
    if data.ndim == 1 or wtype == "F32":
        return data, None
    if wtype == "F16":
        return data.astype(np.float16), None
    qtype = gguf.GGMLQuantizationType[wtype]
    return quantize(data, qtype), qtype


# --------------------------------------------------------------------------
# writer


def _write_gguf(
    path: Path,
    cfg: TinyConfig,
    wtype: str,
    tensors: Mapping[str, npt.NDArray[np.float32]],
    *,
    arch_name: str | None = None,
    raw: Mapping[str, tuple[npt.NDArray[Any], list[int] | None, gguf.GGMLQuantizationType]] | None = None,
) -> Path:
    """Write metadata and tensors.

    `raw` maps tensor names to (data, shape, type) written verbatim instead,
    as gguf.GGUFWriter.add_tensor(name, data, raw_shape=shape, raw_dtype=type)
    does: the shape is in numpy order and, for uint8 data, counts bytes.
    """
    arch = arch_name or cfg.arch
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{cfg.arch}-{wtype}")
    w.add_file_type(_FILE_TYPES[wtype])
    w.add_context_length(cfg.n_ctx_train)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.n_ff)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_head_kv)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_rope_freq_base(cfg.rope_freq_base)
    if cfg.arch == "llama":  # real llama files carry these two; the others do not
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_vocab_size(cfg.n_vocab)
    # llama/qwen2 leave head_dim implicit (n_embd / n_head) like real files
    if cfg.arch in ("qwen3", "gemma3") or cfg.head_dim * cfg.n_head != cfg.n_embd:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    if cfg.arch == "gemma3" and cfg.sliding_window > 0:
        w.add_sliding_window(cfg.sliding_window)
        if cfg.swa_pattern is not None:
            w.add_sliding_window_pattern(cfg.swa_pattern)
        if cfg.rope_freq_base_swa is not None:
            w.add_rope_freq_base_swa(cfg.rope_freq_base_swa)

    tokens, scores, types = tiny_vocab(cfg)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    if cfg.add_space_prefix is not None:
        w.add_add_space_prefix(cfg.add_space_prefix)
    if cfg.chat_template is not None:
        w.add_chat_template(cfg.chat_template)

    raw = raw or {}
    for name, data in tensors.items():
        if name in raw:
            continue
        enc, qtype = _encode(data, wtype)
        w.add_tensor(name, enc, raw_dtype=qtype)
    for name, (data, shape, qtype) in raw.items():
        w.add_tensor(name, data, raw_shape=shape, raw_dtype=qtype)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# --------------------------------------------------------------------------
# broken fixtures: each must be rejected at load time


def make_truncated(src: str | Path, dst: str | Path, keep_fraction: float) -> Path:
    """Copy the first `keep_fraction` of the bytes of `src` to `dst`."""
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: int(len(data) * keep_fraction)])
    return Path(dst)


def make_unknown_arch(dst: str | Path, *, seed: int = 0) -> Path:
    """A well-formed llama-shaped GGUF whose general.architecture is "notanarch"."""
    cfg = tiny_config("llama")
    return _write_gguf(Path(dst), cfg, "F32", tiny_tensors(cfg, seed), arch_name="notanarch")


def make_wrong_shape(dst: str | Path, arch: str, *, seed: int = 0) -> Path:
    """blk.0.attn_q.weight has 64 extra output rows ([n_embd, n_q + 64] in ggml order)."""
    cfg = tiny_config(arch)
    tensors = tiny_tensors(cfg, seed)
    tensors["blk.0.attn_q.weight"] = np.zeros((cfg.n_q + 64, cfg.n_embd), dtype=np.float32)
    return _write_gguf(Path(dst), cfg, "F32", tensors)


def make_wrong_type(dst: str | Path, arch: str, *, seed: int = 0) -> Path:
    """blk.0.attn_norm.weight is stored as Q4_K, a type that cannot hold a norm.

    The model uses n_embd=128, so the 128-element norm is not even a whole
    Q4_K super-block (256) and llama.cpp's GGUF parser rejects the tensor.
    (llama.cpp does load a Q4_K norm of 256 elements: its weight check only
    asks the CPU backend whether it supports a MUL with that tensor, which it
    always does, so such a file is not a usable "rejected" fixture.) All the
    other tensors are valid F32.
    """
    cfg = tiny_config(arch, n_embd=128, n_head=2, n_head_kv=1, n_ff=256)
    tensors = tiny_tensors(cfg, seed)
    name = "blk.0.attn_norm.weight"
    n_bytes = cfg.n_embd * 144 // 256  # Q4_K: 144 bytes per 256 values
    raw = {name: (np.zeros(n_bytes, dtype=np.int8), [cfg.n_embd], gguf.GGMLQuantizationType.Q4_K)}
    return _write_gguf(Path(dst), cfg, "F32", tensors, raw=raw)


__all__ = [
    "ARCHS",
    "CHATML_TEMPLATE",
    "GEMMA_TEMPLATE",
    "SPACE",
    "WTYPES",
    "TinyConfig",
    "make_tiny_model",
    "make_truncated",
    "make_unknown_arch",
    "make_wrong_shape",
    "make_wrong_type",
    "quantize",
    "tiny_config",
    "tiny_tensors",
    "tiny_vocab",
]

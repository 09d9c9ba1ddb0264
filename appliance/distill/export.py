"""Export a trained LoRA: as a llama.cpp LoRA GGUF, and merged into the base GGUF (quantized by libllama).

llama.cpp's LoRA convention (convert_lora_to_gguf.py, src/llama-adapter.cpp, build_lora_mm): for a base
weight ``blk.N.attn_q.weight`` of ggml shape ``[n_in, n_out]`` (numpy ``[n_out, n_in]``) the adapter holds
``blk.N.attn_q.weight.lora_a`` of numpy shape ``[rank, n_in]`` and ``.lora_b`` of ``[n_out, rank]``: the
shapes of PEFT's ``lora_A.weight`` and ``lora_B.weight``, unchanged. llama.cpp computes
``W x + scale * B (A x)`` with ``scale = user_scale * alpha / rank`` (rank read from ``lora_b``), which is
PEFT's ``alpha / r`` scaling. The base conversion's row transforms apply to B's rows: llama-family
models have their Q and K rows permuted by convert_hf_to_gguf (HF's rotate-half RoPE to llama.cpp's
interleaved one) and transformers undoes that when it loads the GGUF, so B of q_proj/k_proj is permuted
the same way here. Gemma's norm convention (weights stored as 1 + w) touches only norms, which LoRA
does not adapt. Nothing here needs torch: weights come in as numpy arrays.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]

# architectures whose Q/K rows convert_hf_to_gguf permutes (LlamaModel.permute)
_PERMUTED_QK = frozenset({"llama"})
_FLOAT_TYPES = frozenset({0, 1, 30})  # ggml F32, F16, BF16


@dataclass(frozen=True)
class LoraAdapter:
    """A LoRA in GGUF terms: base tensor name -> (A [rank, n_in], B [n_out, rank]), rows in GGUF order."""

    arch: str
    alpha: float
    rank: int
    weights: Mapping[str, tuple[F32, F32]]
    meta: Mapping[str, str] = field(default_factory=dict)  # extra string metadata (training.*)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self, name: str) -> F32:
        """scale * B @ A for one base tensor: what merging adds to it (numpy [n_out, n_in])."""
        a, b = self.weights[name]
        return np.asarray((b.astype(np.float64) @ a.astype(np.float64)) * self.scale, dtype=np.float32)


def _permute_rows(w: F32, n_head: int) -> F32:
    """convert_hf_to_gguf's LlamaModel.permute on the rows (output dimension) of `w`."""
    rows = w.shape[0]
    return np.ascontiguousarray(w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def gguf_tensor_name(arch: str, n_layer: int, hf_module: str) -> str:
    """The GGUF weight a transformers module corresponds to: "model.layers.3.self_attn.q_proj" ->
    "blk.3.attn_q.weight". Raises ValueError for a module llama.cpp has no tensor for."""
    import gguf

    arch_ids = {name: arch_id for arch_id, name in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in arch_ids:
        raise ValueError(f"architecture {arch!r} is unknown to gguf")
    name = gguf.get_tensor_name_map(arch_ids[arch], n_layer).get_name(hf_module)
    if name is None:
        raise ValueError(f"no GGUF tensor for module {hf_module!r} of a {arch} model")
    return name + ".weight"


def from_hf(
    arch: str,
    *,
    n_layer: int,
    n_head: int,
    n_head_kv: int,
    alpha: float,
    rank: int,
    hf_weights: Mapping[str, tuple[F32, F32]],
    meta: Mapping[str, str] | None = None,
) -> LoraAdapter:
    """A LoraAdapter from PEFT's per-module weights: module name (without PEFT's "base_model.model."
    prefix) -> (lora_A.weight [r, n_in], lora_B.weight [n_out, r])."""
    out: dict[str, tuple[F32, F32]] = {}
    for module, (a, b) in sorted(hf_weights.items()):
        name = gguf_tensor_name(arch, n_layer, module)
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise ValueError(f"{module}: LoRA shapes A {a.shape}, B {b.shape} do not fit rank {rank}")
        a = np.ascontiguousarray(a, dtype=np.float32)
        b = np.ascontiguousarray(b, dtype=np.float32)
        if arch in _PERMUTED_QK and name.endswith((".attn_q.weight", ".attn_k.weight")):
            b = _permute_rows(b, n_head if name.endswith(".attn_q.weight") else n_head_kv)
        out[name] = (a, b)
    if not out:
        raise ValueError("the adapter has no LoRA weights")
    return LoraAdapter(arch=arch, alpha=float(alpha), rank=int(rank), weights=out, meta=dict(meta or {}))


# ---------------------------------------------------------------- atomic files


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside `path`, renamed onto it when the block ends normally; removed on any
    exception (Ctrl-C included), so `path` is either the old file or the complete new one."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a served model must be readable
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------- the adapter GGUF


ANSWERS_KEY = "training.answers"  # JSON list: a classification task's known answers


def read_answers(path: str | os.PathLike[str]) -> list[str] | None:
    """The known answers an adapter was trained to choose among (None: free text, or not recorded)."""
    import gguf

    field = gguf.GGUFReader(os.fspath(path)).fields.get(ANSWERS_KEY)
    if field is None:
        return None
    try:
        answers = json.loads(str(field.contents()))
    except ValueError:
        raise ValueError(f"{os.fspath(path)}: {ANSWERS_KEY} is not JSON") from None
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"{os.fspath(path)}: {ANSWERS_KEY} is not a list of strings")
    return answers or None


def write_adapter(adapter: LoraAdapter, path: str | os.PathLike[str], *, name: str = "") -> Path:
    """Write `adapter` as a llama.cpp LoRA GGUF (F32 tensors), atomically. Loads with
    `llama_cpp.Llama(model_path=BASE, lora_path=path)` or llama.cpp's `--lora`."""
    import gguf

    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), adapter.arch)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(adapter.alpha))
        if name:
            w.add_name(name)
        w.add_file_type(gguf.LlamaFileType.ALL_F32)
        for key, value in sorted(adapter.meta.items()):
            w.add_string(key, value)
        for tname, (a, b) in adapter.weights.items():
            w.add_tensor(tname + ".lora_a", a)
            w.add_tensor(tname + ".lora_b", b)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return Path(path)


def read_adapter(path: str | os.PathLike[str]) -> LoraAdapter:
    """Read a LoRA GGUF written by write_adapter (or convert_lora_to_gguf.py, F32/F16 tensors)."""
    import gguf

    r = gguf.GGUFReader(os.fspath(path))

    def kv(key: str) -> Any:
        f = r.fields.get(key)
        return None if f is None else f.contents()

    if kv("general.type") != "adapter" or kv("adapter.type") != "lora":
        raise ValueError(f"{os.fspath(path)} is not a LoRA adapter GGUF")
    halves: dict[str, dict[str, F32]] = {}
    for t in r.tensors:
        base, _, part = t.name.rpartition(".")
        if part not in ("lora_a", "lora_b"):
            continue
        halves.setdefault(base, {})[part] = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
    weights = {k: (v["lora_a"], v["lora_b"]) for k, v in halves.items()}
    rank = next(iter(weights.values()))[1].shape[1]
    meta = {k: str(kv(k)) for k in r.fields if k.startswith("training.")}
    return LoraAdapter(
        arch=str(kv("general.architecture")),
        alpha=float(kv("adapter.lora.alpha")),
        rank=int(rank),
        weights=weights,
        meta=meta,
    )


# ---------------------------------------------------------------- merging


def _copy_metadata(reader: Any, writer: Any) -> None:
    import gguf

    skip = {"general.architecture", "GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}
    for key, f in reader.fields.items():
        if key in skip:
            continue
        vtype = gguf.GGUFValueType(f.types[0])
        sub = gguf.GGUFValueType(f.types[-1]) if vtype == gguf.GGUFValueType.ARRAY and len(f.types) > 1 else None
        if vtype == gguf.GGUFValueType.ARRAY and sub == gguf.GGUFValueType.ARRAY:
            raise ValueError(f"metadata {key}: nested arrays are not supported")
        writer.add_key_value(key, f.contents(), vtype, sub)
        if key == "general.alignment":
            writer.data_alignment = int(f.contents())


def merge_f32(adapter: LoraAdapter, base: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """The base GGUF with scale * B @ A added to every tensor the adapter touches (dequantized to F32);
    every other tensor and all metadata copied byte for byte. Written atomically."""
    import gguf

    reader = gguf.GGUFReader(os.fspath(base))
    arch = str(reader.fields["general.architecture"].contents())
    if arch != adapter.arch:
        raise ValueError(f"the adapter is for {adapter.arch}, the base model {os.fspath(base)} is {arch}")
    names = {t.name for t in reader.tensors}
    missing = sorted(set(adapter.weights) - names)
    if missing:
        raise ValueError(f"the base model has no tensor {missing[0]} (wrong base model?)")
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        _copy_metadata(reader, w)
        for t in reader.tensors:
            if t.name in adapter.weights:
                base_w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
                delta = adapter.delta(t.name)
                if base_w.shape != delta.shape:
                    raise ValueError(f"{t.name}: base shape {base_w.shape}, adapter delta {delta.shape}")
                w.add_tensor(t.name, base_w + delta)
            else:
                w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return Path(out)


@contextlib.contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """Send fd 2 (libllama's log) to a temporary file; the list receives its text afterwards."""
    captured: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            log.seek(0)
            captured.append(log.read().decode("utf-8", errors="replace"))


def quantize_q4_k_m(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    like: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, str] | None = None,
    threads: int = 0,
) -> Path:
    """Quantize `src` to Q4_K_M with libllama's quantizer (llama_model_quantize), atomically.

    With `like` (the base GGUF the merge started from), every tensor that is quantized there keeps its
    type there (pinned through tensor-type overrides), so the result has the served model's layout:
    untouched tensors are copied as they are. `overrides` (tensor name -> ggml type name, "Q8_0")
    pins other types; F32 tensors of `like` that nothing pins follow the Q4_K_M mixture.
    """
    import gguf
    import llama_cpp

    types: dict[str, int] = {}
    if like is not None:
        for t in gguf.GGUFReader(os.fspath(like)).tensors:
            if t.tensor_type not in _FLOAT_TYPES:
                types[t.name] = int(t.tensor_type)
    for name, type_name in (overrides or {}).items():
        types[name] = int(gguf.GGMLQuantizationType[type_name])
    pins = [(("^" + re.escape(name) + "$").encode(), qtype) for name, qtype in sorted(types.items())]
    table = (llama_cpp.llama_model_tensor_override * (len(pins) + 1))()
    for i, (pattern, qtype) in enumerate(pins):
        table[i].pattern = pattern
        table[i].type = qtype
    table[len(pins)].pattern = None

    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = int(threads)
    params.allow_requantize = False  # every already-quantized tensor must be copied, not requantized
    if pins:
        params.tt_overrides = ctypes.cast(table, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    with atomic_path(out) as tmp:
        with _captured_stderr() as log:
            rc = llama_cpp.llama_model_quantize(os.fspath(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            tail = "\n".join(log[0].strip().splitlines()[-5:]) if log else ""
            raise RuntimeError(f"llama_model_quantize failed (rc={rc}) for {os.fspath(src)}:\n{tail}")
    return Path(out)


def merge(
    adapter: LoraAdapter,
    base: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    quantize: bool = True,
    merged_type: str | None = "Q8_0",
    threads: int = 0,
) -> Path:
    """Merge `adapter` into `base` and write `out` atomically.

    quantize=False leaves the merged tensors F32. quantize=True runs libllama's Q4_K_M quantizer:
    tensors the adapter does not touch keep the base's bytes and types; the merged ones are quantized
    to `merged_type` (default Q8_0), or to their type in the base with merged_type=None. Why Q8_0:
    a LoRA's update is small next to a 4-5 bit quantization step, and the base's values lie on that
    step's grid, so requantizing W + scale*B@A to Q4_K/Q5_0 rounds most of the update away (measured
    on Gemma 3 270M: greedy answers then follow the base, not base + adapter). Q8_0's step is 8-16x
    finer and keeps it, for about 50 MB more on the default model.
    """
    if not quantize:
        return merge_f32(adapter, base, out)
    dest = Path(out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".f32.tmp", dir=dest.parent)
    os.close(fd)
    try:
        merge_f32(adapter, base, tmp)
        overrides = dict.fromkeys(adapter.weights, merged_type) if merged_type else None
        return quantize_q4_k_m(tmp, dest, like=base, overrides=overrides, threads=threads)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)

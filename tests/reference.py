"""llama.cpp (through llama-cpp-python) as the correctness reference.

Everything here drives the context directly (llama_decode + llama_get_logits)
and takes a plain argmax, so no sampler chain, penalties or caching of
llama-cpp-python can change the reference tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import llama_cpp
import numpy as np
import numpy.typing as npt
from llama_cpp import _internals

from appliance.bench.batch import llamacpp_context
from appliance.bench.common import gpu_layers


def ref_load(
    path: str | Path,
    n_ctx: int = 512,
    n_threads: int = 2,
    logits_all: bool = False,
    lora: str | Path | None = None,
    lora_scale: float = 1.0,
) -> llama_cpp.Llama:
    """Load a model the way llama.cpp runs it by default on a CPU (weights repacked for its fastest
    kernels), quietly, seed 0, with flash attention on as our engine uses it; `lora`: a LoRA GGUF
    adapter applied at `lora_scale`.

    Raises ValueError when llama.cpp refuses the file.
    """
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_ubatch=n_ctx,
        n_threads=n_threads,
        n_threads_batch=n_threads,
        n_gpu_layers=gpu_layers(default=0),  # APPLIANCE_GPU_LAYERS=-1: llama.cpp CUDA (tools/gpu_check.sh)
        flash_attn=True,
        logits_all=logits_all,
        lora_path=None if lora is None else str(lora),
        lora_scale=lora_scale,
        seed=0,
        verbose=False,
    )


def ref_tokenize(llm: llama_cpp.Llama, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
    return llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)


def _clear(llm: llama_cpp.Llama) -> None:
    """Forget every cached token (KV cache and llama-cpp-python's bookkeeping)."""
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
    llm.reset()  # type: ignore[no-untyped-call]


def _decode(llm: llama_cpp.Llama, tokens: Sequence[int], n_past: int, all_logits: bool) -> npt.NDArray[np.float32]:
    """Decode `tokens` at positions n_past...; returns logits [n_out, n_vocab] (n_out = len or 1)."""
    n_vocab = llm.n_vocab()
    out: list[npt.NDArray[np.float32]] = []
    n_batch = llm.n_batch
    batch = _internals.LlamaBatch(n_tokens=n_batch, embd=0, n_seq_max=1, verbose=False)
    try:
        for start in range(0, len(tokens), n_batch):
            chunk = list(tokens[start : start + n_batch])
            batch.set_batch(chunk, n_past=n_past + start, logits_all=all_logits)
            rc = llama_cpp.llama_decode(llm.ctx, batch.batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            n_out = len(chunk) if all_logits else 1
            ptr = llama_cpp.llama_get_logits(llm.ctx)
            out.append(np.ctypeslib.as_array(ptr, shape=(n_out, n_vocab)).copy())
    finally:
        batch.close()  # type: ignore[no-untyped-call]
    logits = np.concatenate(out)
    return logits if all_logits else logits[-1:]


def ref_logits(llm: llama_cpp.Llama, tokens: Sequence[int]) -> npt.NDArray[np.float32]:
    """Logits at every position, [len(tokens), n_vocab], from one fresh batched pass."""
    _clear(llm)
    try:
        return _decode(llm, tokens, 0, all_logits=True)
    finally:
        _clear(llm)


def ref_greedy(llm: llama_cpp.Llama, prompt_tokens: Sequence[int], n: int) -> list[int]:
    """Greedy (pure argmax) continuation of `n` tokens from a fresh context.

    The prompt is decoded as one batch, then one token per decode call, which
    is what an engine serving a single request does.
    """
    _clear(llm)
    try:
        logits = _decode(llm, prompt_tokens, 0, all_logits=False)
        out: list[int] = []
        pos = len(prompt_tokens)
        for _ in range(n):
            tok = int(np.argmax(logits[-1]))
            out.append(tok)
            if len(out) == n:
                break
            logits = _decode(llm, [tok], pos, all_logits=False)
            pos += 1
        return out
    finally:
        _clear(llm)


def ref_batch_spread(llm: llama_cpp.Llama, prompts: Sequence[Sequence[int]], n_threads: int = 2) -> float:
    """How far llama.cpp's own logits move when it decodes `prompts` as sequences of one batch
    rather than one at a time: the largest |difference| over every prompt's last-position logits.

    With quantized weights llama.cpp (like our engine) runs other kernels once a batch holds several
    output rows (the repacked GEMM against a GEMV, activations quantized in groups of rows), which
    sum in another order: on the default Q4_K_M model a logit moves by up to about 1, and a greedy
    token whose top-2 margin is under twice that can differ between a prompt decoded alone and the
    same prompt in a batch, in llama.cpp itself. A second context on the same weights, made as
    llama-server makes one, serves the batch.
    """
    n = max(sum(len(p) for p in prompts), 64)
    ctx = llamacpp_context(llm, n, len(prompts), n_threads, n_batch=n)
    n_vocab = llm.n_vocab()

    def decode(group: Sequence[Sequence[int]]) -> list[npt.NDArray[np.float32]]:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        total = sum(len(p) for p in group)
        batch = llama_cpp.llama_batch_init(total, 0, len(group))
        try:
            k, last = 0, []
            for s, p in enumerate(group):
                for j, t in enumerate(p):
                    batch.token[k], batch.pos[k], batch.n_seq_id[k] = t, j, 1
                    batch.seq_id[k][0] = s
                    batch.logits[k] = j == len(p) - 1
                    k += 1
                last.append(k - 1)
            batch.n_tokens = total
            rc = llama_cpp.llama_decode(ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            return [
                np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).copy() for i in last
            ]
        finally:
            llama_cpp.llama_batch_free(batch)

    try:
        together = decode(prompts)
        return max(float(np.abs(decode([p])[0] - t).max()) for p, t in zip(prompts, together, strict=True))
    finally:
        llama_cpp.llama_free(ctx)


__all__ = ["ref_batch_spread", "ref_greedy", "ref_load", "ref_logits", "ref_tokenize"]

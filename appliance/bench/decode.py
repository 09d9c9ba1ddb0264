"""Prefill and decode speed of our engine against llama.cpp (llama-cpp-python) on one model.

Each engine runs in its own child process (so its peak RSS is its own), alternating ours/ref for
`reps` rounds; medians are reported. Both process the same random token ids (as llama-bench does):
a 512-token prompt in one pass, then 128 single-token decode steps, same thread count, flash
attention on for both, the reference with llama.cpp's default weight placement (CPU repacking on).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from typing import Any

from appliance.bench.common import gpu_layers, random_tokens, run_child


def run_ours(model: str, threads: int, n_prompt: int, n_gen: int) -> dict[str, float]:
    from appliance import _native

    m = _native.Model(model, gpu_layers=gpu_layers())
    ctx = _native.Context(m, n_ctx=n_prompt + n_gen + 16, n_ubatch=n_prompt, n_threads=threads)
    prompt = random_tokens(m.n_vocab, n_prompt, 0)
    gen = random_tokens(m.n_vocab, n_gen, 1)
    ctx.decode(prompt[:32])  # warm-up: touch the weights, size the compute buffers
    ctx.decode(gen[:4])
    ctx.truncate(0)
    t0 = time.perf_counter()
    ctx.decode(prompt)
    t1 = time.perf_counter()
    for tok in gen:
        ctx.decode([tok])
    t2 = time.perf_counter()
    return {"prefill_tps": n_prompt / (t1 - t0), "decode_tps": n_gen / (t2 - t1)}


def run_ref(model: str, threads: int, n_prompt: int, n_gen: int) -> dict[str, float]:
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=model,
        n_ctx=n_prompt + n_gen + 16,
        n_batch=n_prompt,
        n_ubatch=n_prompt,
        n_threads=threads,
        n_threads_batch=threads,
        flash_attn=True,
        n_gpu_layers=gpu_layers(),
        verbose=False,
    )
    ctx = llm._ctx.ctx
    n_vocab = llm.n_vocab()
    prompt = random_tokens(n_vocab, n_prompt, 0)
    gen = random_tokens(n_vocab, n_gen, 1)
    batch = llama_cpp.llama_batch_init(n_prompt, 0, 1)

    def decode(tokens: list[int], pos0: int) -> None:
        batch.n_tokens = len(tokens)
        for i, t in enumerate(tokens):
            batch.token[i] = t
            batch.pos[i] = pos0 + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i == len(tokens) - 1
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        llama_cpp.llama_get_logits_ith(ctx, -1)

    mem = llama_cpp.llama_get_memory(ctx)
    decode(prompt[:32], 0)
    decode(gen[:4], 32)
    llama_cpp.llama_memory_clear(mem, True)
    t0 = time.perf_counter()
    decode(prompt, 0)
    t1 = time.perf_counter()
    for i, tok in enumerate(gen):
        decode([tok], n_prompt + i)
    t2 = time.perf_counter()
    llama_cpp.llama_batch_free(batch)
    return {"prefill_tps": n_prompt / (t1 - t0), "decode_tps": n_gen / (t2 - t1)}


def _child(engine: str, model: str, threads: int, n_prompt: int, n_gen: int) -> dict[str, float]:
    args = [
        "--child",
        engine,
        "--model",
        model,
        "--threads",
        str(threads),
        "--prompt",
        str(n_prompt),
        "--gen",
        str(n_gen),
    ]
    result: dict[str, float] = run_child("appliance.bench.decode", args)
    return result


def bench_decode(model: str, threads: int, reps: int = 3, n_prompt: int = 512, n_gen: int = 128) -> dict[str, Any]:
    runs: dict[str, list[dict[str, float]]] = {"ours": [], "ref": []}
    for r in range(reps):
        for engine in ("ours", "ref") if r % 2 == 0 else ("ref", "ours"):
            runs[engine].append(_child(engine, model, threads, n_prompt, n_gen))
            print(f"  round {r + 1}/{reps} {engine}: {runs[engine][-1]}", file=sys.stderr)

    def med(engine: str, key: str) -> float:
        return statistics.median(x[key] for x in runs[engine])

    res: dict[str, Any] = {
        "model": model,
        "threads": threads,
        "prompt_tokens": n_prompt,
        "gen_tokens": n_gen,
        "reps": reps,
        "ours_prefill_tps": round(med("ours", "prefill_tps"), 1),
        "ref_prefill_tps": round(med("ref", "prefill_tps"), 1),
        "ours_decode_tps": round(med("ours", "decode_tps"), 2),
        "ref_decode_tps": round(med("ref", "decode_tps"), 2),
        "peak_rss_mb": round(med("ours", "peak_rss_mb"), 1),
        "ref_peak_rss_mb": round(med("ref", "peak_rss_mb"), 1),
    }
    res["prefill_ratio"] = round(res["ours_prefill_tps"] / res["ref_prefill_tps"], 3)
    res["decode_ratio"] = round(res["ours_decode_tps"] / res["ref_decode_tps"], 3)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--child", choices=["ours", "ref"], required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    a = ap.parse_args()
    fn = run_ours if a.child == "ours" else run_ref
    res = fn(a.model, a.threads, a.prompt, a.gen)
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

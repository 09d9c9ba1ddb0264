"""Aggregate decode throughput under concurrency: our BatchEngine, llama.cpp's own batched decode
(llama-cpp-python's low-level API with every sequence in one llama_batch, as llama-server runs it)
and llama-cpp-python's high-level API serving the same requests one after another.

Every request: a 128-token random prompt, 128 greedy tokens. Decode throughput counts the tokens
generated after every request of the round has its first token, over that phase's time (what
llama-batched-bench calls S_TG). The serial figure is generated tokens over total wall time with
one request at a time (it does not depend on the concurrency; it is measured over min(c, 4)
requests). Each engine runs in its own child process; same thread count for all.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from typing import Any

from appliance.bench.common import random_tokens, run_child

CONCURRENCY = (1, 2, 4, 8, 16)


def ours(model: str, threads: int, c: int, n_prompt: int, n_gen: int) -> dict[str, float]:
    from appliance import _native

    m = _native.Model(model)
    kv_per_token = m.n_layer * 2 * m.n_head_kv * m.head_dim * 2  # K and V, F16
    kv_mb = max(64, c * (n_prompt + n_gen) * kv_per_token // 2**20 + 32)
    engine = _native.BatchEngine(m, kv_cache_mb=kv_mb, max_seqs=max(16, c), n_threads=threads)
    engine.submit(random_tokens(m.n_vocab, 16, 99), max_tokens=4, stop_at_eog=False)  # warm-up
    while not engine.idle:
        engine.step()
    ids = [
        engine.submit(random_tokens(m.n_vocab, n_prompt, k), max_tokens=n_gen, temperature=0.0, stop_at_eog=False)
        for k in range(c)
    ]
    started: set[int] = set()
    t0 = time.perf_counter()
    t_all = t0
    produced_after = 0
    while not engine.idle:
        for ev in engine.step():
            rid, toks = ev.id, ev.tokens
            if rid in started:
                produced_after += len(toks)
            elif toks:
                started.add(rid)
                if len(started) == len(ids):
                    t_all = time.perf_counter()
    t1 = time.perf_counter()
    return {"decode_tps": produced_after / (t1 - t_all), "e2e_tps": c * n_gen / (t1 - t0)}


def llamacpp_batched(model: str, threads: int, c: int, n_prompt: int, n_gen: int) -> dict[str, float]:
    import llama_cpp

    # the model through the high-level API; the context as llama-server makes it (several
    # sequences, one unified KV cache, flash attention), which that API does not expose
    llm = llama_cpp.Llama(model_path=model, n_ctx=64, n_threads=threads, n_gpu_layers=0, verbose=False)
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = c * (n_prompt + n_gen) + 64
    params.n_batch = params.n_ubatch = 512
    params.n_seq_max = c
    params.n_threads = params.n_threads_batch = threads
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
    params.kv_unified = True
    ctx = llama_cpp.llama_init_from_model(llm.model, params)
    if not ctx:
        raise RuntimeError("llama_init_from_model failed")
    n_vocab = llm.n_vocab()
    sampler = llama_cpp.llama_sampler_init_greedy()
    batch = llama_cpp.llama_batch_init(512, 0, 1)

    def submit(entries: list[tuple[int, int, int, bool]]) -> None:  # (token, pos, seq, logits)
        batch.n_tokens = len(entries)
        for i, (tok, pos, seq, out) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos, 1, out
            batch.seq_id[i][0] = seq
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    prompts = [random_tokens(n_vocab, n_prompt, k) for k in range(c)]
    entries = [(t, p, s, p == n_prompt - 1) for s in range(c) for p, t in enumerate(prompts[s])]
    t0 = time.perf_counter()
    last: list[int] = []
    for off in range(0, len(entries), 512):
        chunk = entries[off : off + 512]
        submit(chunk)
        for i, e in enumerate(chunk):
            if e[3]:
                last.append(llama_cpp.llama_sampler_sample(sampler, ctx, i))
    t_all = time.perf_counter()
    for step in range(1, n_gen):
        submit([(last[s], n_prompt + step - 1, s, True) for s in range(c)])
        last = [llama_cpp.llama_sampler_sample(sampler, ctx, i) for i in range(c)]
    t1 = time.perf_counter()
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_sampler_free(sampler)
    llama_cpp.llama_free(ctx)
    return {"decode_tps": c * (n_gen - 1) / (t1 - t_all), "e2e_tps": c * n_gen / (t1 - t0)}


def serial(model: str, threads: int, c: int, n_prompt: int, n_gen: int) -> dict[str, float]:
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=model,
        n_ctx=n_prompt + n_gen + 16,
        n_threads=threads,
        n_threads_batch=threads,
        flash_attn=True,
        n_gpu_layers=0,
        verbose=False,
    )
    n = min(c, 4)
    t0 = time.perf_counter()
    produced = 0
    for k in range(n):
        out = llm.create_completion(random_tokens(llm.n_vocab(), n_prompt, k), max_tokens=n_gen, temperature=0.0)
        assert isinstance(out, dict)
        produced += int(out["usage"]["completion_tokens"])
    return {"decode_tps": produced / (time.perf_counter() - t0)}


ENGINES = {"ours": ours, "llamacpp_batched": llamacpp_batched, "serial": serial}


def bench_batch(
    model: str,
    threads: int,
    concurrency: tuple[int, ...] = CONCURRENCY,
    n_prompt: int = 128,
    n_gen: int = 128,
    progress: bool = True,
) -> dict[str, Any]:
    res: dict[str, Any] = {
        "model": model,
        "threads": threads,
        "prompt_tokens": n_prompt,
        "gen_tokens": n_gen,
        "concurrency": list(concurrency),
        "ours_tps": [],
        "llamacpp_batched_tps": [],
        "serial_tps": [],
        "ours_e2e_tps": [],
        "llamacpp_batched_e2e_tps": [],
    }
    for c in concurrency:
        for name in ENGINES:
            args = [
                "--child",
                name,
                "--model",
                model,
                "--threads",
                str(threads),
                "--concurrency",
                str(c),
                "--prompt",
                str(n_prompt),
                "--gen",
                str(n_gen),
            ]
            r = run_child("appliance.bench.batch", args)
            res[f"{name}_tps"].append(round(r["decode_tps"], 1))
            if "e2e_tps" in r:
                res[f"{name}_e2e_tps"].append(round(r["e2e_tps"], 1))
            if name == "ours" and c == max(concurrency):
                res["ours_peak_rss_mb_at_max_concurrency"] = round(r["peak_rss_mb"], 1)
            if progress:
                print(f"  c={c} {name}: {r}", flush=True, file=sys.stderr)
    res["ratio_vs_llamacpp_batched"] = [
        round(a / b, 3) for a, b in zip(res["ours_tps"], res["llamacpp_batched_tps"], strict=True)
    ]
    res["ratio_vs_serial"] = [round(a / b, 3) for a, b in zip(res["ours_tps"], res["serial_tps"], strict=True)]
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", choices=list(ENGINES), required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--concurrency", type=int, required=True)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=128)
    a = ap.parse_args()
    r = ENGINES[a.child](a.model, a.threads, a.concurrency, a.prompt, a.gen)
    r["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

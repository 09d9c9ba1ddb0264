"""Aggregate decode throughput under concurrency: our BatchEngine with early exit off ("ours") and in
the service's default mode ("ours_default": lossless, with its measured drafting policy; needs the
model's exit calibration), llama.cpp's own batched decode (llama-cpp-python's low-level API with
every sequence in one llama_batch, as llama-server runs it) and llama-cpp-python's high-level API
serving the same requests one after another.

Every request: a 128-token random prompt, 128 greedy tokens. Decode throughput counts the tokens
generated after every request of the round has its first token, over that phase's time (what
llama-batched-bench calls S_TG). The serial figure is generated tokens over total wall time with
one request at a time (it does not depend on the concurrency; it is measured over min(c, 4)
requests). Each engine runs in its own child process; same thread count for all.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import sys
import time
from typing import Any

from appliance.bench.common import gpu_layers, random_tokens, run_child

CONCURRENCY = (1, 2, 4, 8, 16)


def ours(model: str, threads: int, c: int, n_prompt: int, n_gen: int) -> dict[str, float]:
    engine, n_vocab = ours_engine(model, threads, c, n_prompt, n_gen)
    prompts = [random_tokens(n_vocab, n_prompt, k) for k in range(c)]
    t_first, t_decode, produced_after = ours_decode(engine, prompts, n_gen)
    return {"decode_tps": produced_after / t_decode, "e2e_tps": c * n_gen / (t_first + t_decode)}


def ours_default(model: str, threads: int, c: int, n_prompt: int, n_gen: int) -> dict[str, float]:
    """Ours in the service's default decoding mode, lossless early exit; drafting_share: the share of
    decode steps its policy drafted in."""
    engine, n_vocab = ours_engine(model, threads, c, n_prompt, n_gen, early_exit=True)
    prompts = [random_tokens(n_vocab, n_prompt, k) for k in range(c)]
    t_first, t_decode, produced_after = ours_decode(engine, prompts, n_gen, exit_mode="lossless")
    st = engine.stats()
    steps = st["spec_steps"] + st["plain_decode_steps"]
    return {
        "decode_tps": produced_after / t_decode,
        "e2e_tps": c * n_gen / (t_first + t_decode),
        "drafting_share": st["spec_steps"] / steps if steps else 0.0,
    }


def ours_engine(
    model: str, threads: int, c: int, n_prompt: int, n_gen: int, early_exit: bool = False
) -> tuple[Any, int]:
    """Our BatchEngine with room for c requests of n_prompt + n_gen tokens, warmed up; and n_vocab.
    early_exit: with the model's exit calibration (its shortlist and draft layer)."""
    from appliance import _native
    from appliance.engine.early_exit import load_calibration

    cal = load_calibration(model) if early_exit else None
    if early_exit and cal is None:
        raise SystemExit(f"{model} has no early-exit calibration: run `appliance models calibrate-exit` first")

    m = _native.Model(model, gpu_layers=gpu_layers())
    kv_per_token = m.n_layer * 2 * m.n_head_kv * m.head_dim * 2  # K and V, F16
    kv_mb = max(64, c * (n_prompt + n_gen) * kv_per_token // 2**20 + 32)
    engine = _native.BatchEngine(
        m,
        kv_cache_mb=kv_mb,
        max_seqs=max(16, c),
        n_threads=threads,
        draft_exit_layer=cal.draft_exit_layer if cal else 0,
    )
    if cal is not None:
        engine.set_shortlist(cal.shortlist)
    engine.submit(random_tokens(m.n_vocab, 16, 99), max_tokens=4, stop_at_eog=False)  # warm-up
    while not engine.idle:
        engine.step()
    return engine, int(m.n_vocab)


def ours_decode(
    engine: Any, prompts: list[list[int]], n_gen: int, adapters: list[int] | None = None, exit_mode: str = "off"
) -> tuple[float, float, int]:
    """Submits every prompt at once (prompt k under adapters[k]; none: the base; in early-exit mode
    `exit_mode`) and steps `engine` until idle, greedy. Returns (seconds until every request has its
    first token, seconds after, tokens generated after)."""
    ids = [
        engine.submit(
            p,
            max_tokens=n_gen,
            temperature=0.0,
            stop_at_eog=False,
            adapter=adapters[k] if adapters else 0,
            exit_mode=exit_mode,
        )
        for k, p in enumerate(prompts)
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
    return t_all - t0, time.perf_counter() - t_all, produced_after


def llamacpp_batched(model: str, threads: int, c: int, n_prompt: int, n_gen: int) -> dict[str, float]:
    import llama_cpp

    # the model through the high-level API; the context as llama-server makes it (see llamacpp_decode)
    llm = llama_cpp.Llama(model_path=model, n_ctx=64, n_threads=threads, n_gpu_layers=gpu_layers(), verbose=False)
    prompts = [random_tokens(llm.n_vocab(), n_prompt, k) for k in range(c)]
    t_prefill, t_decode = llamacpp_decode(llm, prompts, n_gen, threads)
    return {"decode_tps": c * (n_gen - 1) / t_decode, "e2e_tps": c * n_gen / (t_prefill + t_decode)}


def llamacpp_context(llm: Any, n_ctx: int, n_seq: int, threads: int, n_batch: int = 512) -> Any:
    """A fresh llama.cpp context on `llm`'s weights as llama-server makes one: `n_seq` sequences in
    one unified KV cache, flash attention (llama-cpp-python's contexts hold one sequence). The
    caller frees it (llama_cpp.llama_free). Raises RuntimeError when llama.cpp cannot make it."""
    import llama_cpp

    params = llama_cpp.llama_context_default_params()
    params.n_ctx = n_ctx
    params.n_batch = params.n_ubatch = n_batch
    params.n_seq_max = n_seq
    params.n_threads = params.n_threads_batch = threads
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
    params.kv_unified = True
    ctx = llama_cpp.llama_init_from_model(llm.model, params)
    if not ctx:
        raise RuntimeError("llama_init_from_model failed")
    return ctx


def llamacpp_decode(
    llm: Any, prompts: list[list[int]], n_gen: int, threads: int, lora: Any = None
) -> tuple[float, float]:
    """llama.cpp's own batched greedy decode of every prompt as one sequence of a fresh context made as
    llama-server makes it (several sequences, one unified KV cache, flash attention), which
    llama-cpp-python's high-level API does not expose; `lora`: a llama_adapter_lora set on that
    context (llama.cpp applies adapters per context). Returns (seconds until every sequence has its
    first token, seconds of the n_gen - 1 decode steps after)."""
    import llama_cpp

    c, n_prompt = len(prompts), len(prompts[0])
    ctx = llamacpp_context(llm, c * (n_prompt + n_gen) + 64, c, threads)
    if lora is not None:
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(lora)
        if llama_cpp.llama_set_adapters_lora(ctx, adapters, 1, (ctypes.c_float * 1)(1.0)) != 0:
            raise RuntimeError("llama_set_adapters_lora failed")
    sampler = llama_cpp.llama_sampler_init_greedy()
    batch = llama_cpp.llama_batch_init(512, 0, 1)

    def submit(entries: list[tuple[int, int, int, bool]]) -> None:  # (token, pos, seq, logits)
        batch.n_tokens = len(entries)
        for i, (tok, pos, seq, out) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos, 1, out
            batch.seq_id[i][0] = seq
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

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
    return t_all - t0, t1 - t_all


def serial(model: str, threads: int, c: int, n_prompt: int, n_gen: int) -> dict[str, float]:
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=model,
        n_ctx=n_prompt + n_gen + 16,
        n_threads=threads,
        n_threads_batch=threads,
        flash_attn=True,
        n_gpu_layers=gpu_layers(),
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


ENGINES = {"ours": ours, "ours_default": ours_default, "llamacpp_batched": llamacpp_batched, "serial": serial}


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
        "ours_default_tps": [],  # lossless early exit, the service's default
        "ours_default_drafting_share": [],
        "llamacpp_batched_tps": [],
        "serial_tps": [],
        "ours_e2e_tps": [],
        "ours_default_e2e_tps": [],
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
            if "drafting_share" in r:
                res[f"{name}_drafting_share"].append(round(r["drafting_share"], 3))
            if name == "ours" and c == max(concurrency):
                res["ours_peak_rss_mb_at_max_concurrency"] = round(r["peak_rss_mb"], 1)
            if progress:
                print(f"  c={c} {name}: {r}", flush=True, file=sys.stderr)
    res["ratio_vs_llamacpp_batched"] = [
        round(a / b, 3) for a, b in zip(res["ours_tps"], res["llamacpp_batched_tps"], strict=True)
    ]
    res["default_vs_off"] = [round(a / b, 3) for a, b in zip(res["ours_default_tps"], res["ours_tps"], strict=True)]
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

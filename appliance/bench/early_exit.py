"""Early exit against full depth and against llama.cpp, in one run.

Our engine serves the held-out prompts (appliance/engine/data/early_exit_eval_prompts.txt, none used by
calibration) greedily, `concurrency` requests in flight at a time, once per mode: off (full depth),
lossless (self-speculative, the service's default, with the engine's drafting policy: a cost model
over the pass times it measures; `lossless_policy` shows what it measured and decided at each
concurrency) and adaptive at three thresholds (the calibrated per-layer ones, then two fixed ones).
Throughput is generated tokens over wall time (the prompts are about ten tokens, so it is nearly all
decoding). Agreement compares each mode's tokens with full depth's, position by position (a token
after a divergence rarely agrees, so this is the strict measure) and as exact-match of whole
outputs; `local_agreement` is the share of tokens the full model itself would have picked after the
same prefix (the per-token measure CALM uses). llama.cpp decodes random prompts of the same length
through its own batched API (appliance.bench.batch), in a child process.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np

from appliance import _native
from appliance.bench.common import run_child
from appliance.engine.core import eog_tokens
from appliance.engine.early_exit import ExitCalibration, load_calibration, packaged_prompts


def serve_all(
    engine: _native.BatchEngine, prompts: list[list[int]], n_gen: int, c: int, mode: str, threshold: float
) -> tuple[list[list[int]], float, dict[str, int]]:
    """Greedy outputs of every prompt with c in flight; tokens/s over the wall time; decode tallies."""
    results: list[list[int]] = [[] for _ in prompts]
    live: dict[int, int] = {}  # request id -> prompt index
    tally = {"tokens": 0, "layers": 0, "drafted": 0, "accepted": 0}
    nxt = 0
    t0 = time.perf_counter()
    while nxt < len(prompts) or live:
        while nxt < len(prompts) and len(live) < c:
            rid = engine.submit(
                prompts[nxt], max_tokens=n_gen, temperature=0.0, exit_mode=mode, exit_threshold=threshold
            )
            live[rid] = nxt
            nxt += 1
        for ev in engine.step():
            results[live[ev.id]] += ev.tokens
            tally["tokens"] += len(ev.exit_layers)
            tally["layers"] += ev.layers_run
            tally["drafted"] += ev.n_drafted
            tally["accepted"] += ev.n_accepted
            if ev.finish_reason:
                del live[ev.id]
    dt = time.perf_counter() - t0
    return results, sum(len(r) for r in results) / dt, tally


def agreement(outs: list[list[int]], full: list[list[int]]) -> tuple[float, float]:
    """(position-wise token agreement, exact-match rate) against full depth."""
    same = sum(sum(a == b for a, b in zip(o, f, strict=False)) for o, f in zip(outs, full, strict=True))
    total = sum(max(len(o), len(f)) for o, f in zip(outs, full, strict=True))
    exact = sum(o == f for o, f in zip(outs, full, strict=True)) / len(full)
    return same / max(1, total), exact


def local_agreement(ctx: _native.Context, prompts: list[list[int]], outs: list[list[int]]) -> float:
    """Share of emitted tokens the full model picks after the same prefix."""
    agree = n = 0
    for p, o in zip(prompts, outs, strict=True):
        if not o:
            continue
        seq = p + o
        full, _, _ = ctx.probe_exits(seq[:-1], [])  # full-depth pick after every prefix
        picks = full[len(p) - 1 :]
        agree += int(np.sum(picks == np.asarray(o)))
        n += len(o)
    return agree / max(1, n)


def policy_summary(stats: dict[str, Any], c: int) -> dict[str, Any]:
    """What the lossless drafting policy measured and last decided at c sequences (spec_policy.h):
    drafting or not, its draft-length cap, predicted ms per token of each kind, the draft's acceptance
    and the share of decode steps that drafted so far."""
    choice = stats["spec_choices"].get(c, {})
    steps = stats["spec_steps"] + stats["plain_decode_steps"]
    return {
        "concurrency": c,
        "drafting": choice.get("drafting"),
        "cap": choice.get("cap"),
        "why": choice.get("why"),
        "spec_ms_per_token": round(choice.get("spec_us_per_token", 0.0) / 1e3, 3),
        "plain_ms_per_token": round(choice.get("plain_us_per_token", 0.0) / 1e3, 3),
        "acceptance": round(stats["spec_acceptance"], 3),
        "drafting_share": round(stats["spec_steps"] / steps, 3) if steps else 0.0,
    }


def pass_costs(ctx: _native.Context, n_layer: int, exit_layers: list[int], reps: int = 20) -> dict[str, float]:
    """Milliseconds (best of `reps`) of one decode position's passes: what each part of early exit costs."""

    def best(**kw: Any) -> float:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            ctx.run_pass([100], **kw)
            times.append(time.perf_counter() - t0)
        return round(min(times) * 1e3, 3)

    out = {
        "full_pass_ms": best(),
        "layers_only_ms": best(head="none"),
        "full_head_only_ms": best(l_begin=n_layer, head="full"),
        "shortlist_head_only_ms": best(l_begin=n_layer, head="shortlist"),
        "draft_pass_ms": best(head="shortlist", keep_hidden=True),
    }
    for e in exit_layers:  # an exit check: the segment to layer e, the shortlisted head and the K/V fill
        out[f"exit_segment_0_{e}_ms"] = best(l_end=e, head="shortlist", keep_hidden=True, fill_kv=True)
    return out


def bench_early_exit(
    model: str,
    threads: int,
    concurrency: tuple[int, ...] = (1, 4, 8, 16),
    n_prompts: int = 50,
    n_gen: int = 48,
    fixed_thresholds: tuple[float, ...] = (0.9, 0.8),
    progress: bool = True,
) -> dict[str, Any]:
    cal: ExitCalibration | None = load_calibration(model)
    if cal is None:
        raise SystemExit(f"{model} has no early-exit calibration: run `appliance models calibrate-exit` first")
    m = _native.Model(model)
    vocab = _native.Vocab(model)
    texts = packaged_prompts("early_exit_eval_prompts.txt")[:n_prompts]
    prompts = [list(vocab.tokenize(t)) for t in texts]
    eog = eog_tokens(vocab)
    ctx = _native.Context(m, n_ctx=max(len(p) for p in prompts) + n_gen + 8, n_threads=threads)
    ctx.set_shortlist(cal.shortlist)
    ctx.decode(prompts[0])
    modes: list[tuple[str, str, float]] = [("off", "off", -1.0), ("lossless", "lossless", -1.0)]
    modes += [("adaptive", "adaptive", -1.0)] + [("adaptive", "adaptive", t) for t in fixed_thresholds]
    res: dict[str, Any] = {
        "model": model,
        "threads": threads,
        "prompts": len(prompts),
        "gen_tokens": n_gen,
        "concurrency": list(concurrency),
        "exit_layers": cal.exit_layers,
        "calibrated_thresholds": cal.thresholds,
        "shortlist_tokens": len(cal.shortlist),
        "shortlist_coverage_calibration": cal.shortlist_coverage,
        "n_layer": int(m.n_layer),
        "off_tps": [],
        "lossless_tps": [],
        "lossless_identical": [],
        "lossless_acceptance": [],
        "lossless_speedup": [],
        "lossless_policy": [],
        "adaptive": [],
        "ref_decode_tps": [],
    }
    res["pass_costs"] = pass_costs(ctx, int(m.n_layer), cal.exit_layers)
    for c in concurrency:
        engine = _native.BatchEngine(
            m,
            kv_cache_mb=64,
            max_seqs=max(16, c),
            n_threads=threads,
            eog_tokens=eog,
            model_key=model,
            exit_layers=cal.exit_layers,
            exit_thresholds=cal.thresholds,
            draft_exit_layer=cal.draft_exit_layer,
        )
        engine.set_shortlist(cal.shortlist)
        serve_all(engine, prompts[:2], 4, 1, "off", -1.0)  # warm-up
        full: list[list[int]] = []
        adaptive: list[dict[str, Any]] = []
        for name, mode, thr in modes:
            outs, tps, tally = serve_all(engine, prompts, n_gen, c, mode, thr)
            if name == "off":
                full = outs
                res["off_tps"].append(round(tps, 1))
            tok_agree, exact = agreement(outs, full)
            if name == "lossless":
                res["lossless_tps"].append(round(tps, 1))
                res["lossless_identical"].append(round(exact, 3))
                res["lossless_acceptance"].append(round(tally["accepted"] / max(1, tally["drafted"]), 3))
                res["lossless_speedup"].append(round(tps / res["off_tps"][-1], 3))
                res["lossless_policy"].append(policy_summary(engine.stats(), c))
            elif name == "adaptive":
                adaptive.append(
                    {
                        "threshold": "calibrated" if thr < 0 else thr,
                        "tps": round(tps, 1),
                        "speedup": round(tps / res["off_tps"][-1], 3),
                        "token_agreement": round(tok_agree, 3),
                        "exact_match": round(exact, 3),
                        "local_agreement": round(local_agreement(ctx, prompts, outs), 3),
                        "mean_layers": round(tally["layers"] / max(1, tally["tokens"]), 2),
                    }
                )
            if progress:
                print(f"  c={c} {name} {thr if thr >= 0 else ''}: {tps:.1f} tokens/s", file=sys.stderr, flush=True)
        res["adaptive"].append({"concurrency": c, "runs": adaptive})
        st = engine.stats()
        res.setdefault("exits_per_layer", []).append({"concurrency": c, "counts": st["exits_per_layer"]})
        n_prompt = round(float(np.mean([len(p) for p in prompts])))
        args = ["--child", "llamacpp_batched", "--model", model, "--threads", str(threads), "--concurrency", str(c)]
        r = run_child("appliance.bench.batch", [*args, "--prompt", str(n_prompt), "--gen", str(n_gen)])
        res["ref_decode_tps"].append(round(r["decode_tps"], 1))
        if progress:
            print(f"  c={c} llama.cpp batched: {r['decode_tps']:.1f} tokens/s", file=sys.stderr, flush=True)
    res["lossless_vs_llamacpp"] = [
        round(a / b, 3) for a, b in zip(res["lossless_tps"], res["ref_decode_tps"], strict=True)
    ]
    res["off_vs_llamacpp"] = [round(a / b, 3) for a, b in zip(res["off_tps"], res["ref_decode_tps"], strict=True)]
    return res

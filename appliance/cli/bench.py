"""`appliance bench ...`: benchmarks of the native engine, each against its reference measured in the
same run, printed as JSON."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from appliance.bench.savings import Prices
from appliance.engine.core import default_threads
from appliance.models.manifest import ManifestError
from appliance.models.modelref import resolve_model


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("bench", help="benchmark the native engine against llama.cpp")
    bsub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)

    d = _add(
        bsub,
        "decode",
        "prefill and decode tokens/s and peak RSS, ours vs llama.cpp",
        "Prefill (one 512-token prompt) and decode (128 tokens) speed of our engine and of llama.cpp on the "
        "same model and thread count, alternating runs in child processes; medians.",
    )
    d.add_argument("--reps", type=int, default=3, help="rounds per engine (default 3)")
    d.add_argument("--prompt-tokens", type=int, default=512)
    d.add_argument("--gen-tokens", type=int, default=128)
    d.set_defaults(func=_runner(_decode))

    b = _add(
        bsub,
        "batch",
        "aggregate decode tokens/s at 1-16 concurrent requests, ours vs llama.cpp",
        "Continuous batching: aggregate decode tokens/s at each concurrency for our engine, llama.cpp's own "
        "batched decode and llama-cpp-python serving the requests one after another (128-token prompts, "
        "128 tokens out).",
    )
    b.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    b.set_defaults(func=_runner(_batch))

    x = _add(
        bsub,
        "prefix",
        "time to first token with a cached 1,024-token system prompt vs cold",
        "Prefix cache: TTFT of a request whose system prompt is already cached (same tenant) versus cold.",
    )
    x.add_argument("--system-tokens", type=int, default=1024)
    x.set_defaults(func=_runner(_prefix))

    s = _add(
        bsub,
        "serve",
        "requests/s and p50/p99 through the gRPC service vs the engine directly",
        "What the service costs: short generations through a real server process and real clients versus the "
        "same requests through the batching engine in-process, at 1, 4, 8 and 16 concurrent clients.",
    )
    s.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    s.add_argument("--repeats", type=int, default=3, help="service/engine round pairs per concurrency (median)")
    s.add_argument(
        "--per-client", type=int, default=4, help="requests each client sends per round (default 4; at least 8 a round)"
    )
    s.set_defaults(func=_runner(_serve))

    c = _add(
        bsub,
        "context",
        "prompt tokens per turn of a scripted 30-turn chat, context management on vs off",
        "Context-window management: the prompt tokens each turn of a scripted 30-turn conversation sends with "
        "summarization of older turns (the service's own ContextBuilder and Summarizer) and with the whole history "
        "verbatim; the summarizer's own tokens are counted against the saving.",
    )
    c.add_argument("--turns", type=int, default=30)
    c.add_argument("--budget", type=int, default=1024, help="context budget in tokens (default 1024)")
    c.add_argument("--max-tokens", type=int, default=48, help="reply length per turn (default 48)")
    c.set_defaults(func=_runner(_context))

    e = _add(
        bsub,
        "early-exit",
        "decode tokens/s and agreement with full depth: off, lossless, adaptive; vs llama.cpp",
        "Early exit: held-out prompts served greedily at each concurrency with early exit off, lossless "
        "(self-speculative) and adaptive at the calibrated and two fixed thresholds; tokens/s, agreement with "
        "full-depth output, mean layers per token, and llama.cpp's batched decode in the same run. Needs the "
        "model's calibration (appliance models calibrate-exit).",
    )
    e.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    e.add_argument("--prompts", type=int, default=50, help="held-out prompts served per mode (default 50)")
    e.add_argument("--tokens", type=int, default=48, help="tokens generated per prompt (default 48)")
    e.set_defaults(func=_runner(_early_exit))

    v = _add(
        bsub,
        "savings",
        "cost of a workload through the whole service vs sending it all to the cloud",
        "Replays BANKING77-style support questions (with repetition and rewordings) plus a share of hard "
        "multi-step/code/math questions through a real `appliance serve` (semantic cache, router, cascade, local "
        "model, cloud) and prices the ledger with a cloud price table. The cloud is llama-cpp-python's "
        "OpenAI-compatible server on the local model unless --cloud-url is given. Reports the all-cloud cost, the "
        "appliance's cost and the saving by technique.",
    )
    v.add_argument("--queries", type=Path, required=True, help="text,category CSV of support questions (BANKING77)")
    v.add_argument("--requests", type=int, default=120)
    v.add_argument("--hard-share", type=float, default=0.2, help="share of hard questions (default 0.2)")
    v.add_argument("--max-tokens", type=int, default=48)
    v.add_argument("--no-cascade", action="store_true", help="serve with [route] cascade = false")
    v.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--cloud-url", default="", help="a real OpenAI-compatible endpoint instead of the stand-in")
    v.add_argument("--cloud-model", default="", help="the model to ask at --cloud-url")
    for name, default in msgspec.structs.asdict(Prices()).items():
        v.add_argument(f"--{name.replace('_', '-')}", type=float, default=default, help=f"price (default {default})")
    v.set_defaults(func=_runner(_savings))


def _add(
    bsub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help: str, desc: str
) -> argparse.ArgumentParser:
    p = bsub.add_parser(name, help=help, description=desc)
    p.add_argument("--model", "-m", default=None, help="manifest name or .gguf path (default: the default model)")
    p.add_argument("--threads", type=int, default=None, help=f"CPU threads (default {default_threads()})")
    p.add_argument("--json", action="store_true", help="print only the JSON result on stdout")
    return p


def _model(args: argparse.Namespace) -> str | None:
    try:
        return str(resolve_model(args.model))
    except (LookupError, OSError, ManifestError) as e:
        print(f"appliance bench: {e}", file=sys.stderr)
        return None


def _print(res: dict[str, Any], as_json: bool) -> int:
    if as_json:
        print(json.dumps(res, indent=2))
    else:
        for k, v in res.items():
            print(f"{k:>28}: {v}")
    return 0


def _runner(bench: Callable[[str, int, argparse.Namespace], dict[str, Any]]) -> Callable[[argparse.Namespace], int]:
    """The command for one benchmark: resolve the model, run, print."""

    def run(args: argparse.Namespace) -> int:
        model = _model(args)
        if model is None:
            return 2
        res = bench(model, args.threads or default_threads(), args)
        if not args.json:
            res.pop("per_turn", None)  # bench context's per-turn detail is for the JSON
        return _print(res, args.json)

    return run


def _savings(model: str, threads: int, a: argparse.Namespace) -> dict[str, Any]:
    from appliance.bench.savings import Workload, bench_savings

    w = Workload(
        requests=a.requests,
        hard_share=a.hard_share,
        max_tokens=a.max_tokens,
        clients=a.clients,
        seed=a.seed,
        cascade=not a.no_cascade,
    )
    prices = Prices(**{k: getattr(a, k) for k in msgspec.structs.asdict(Prices())})
    return bench_savings(model, threads, a.queries, w, prices, a.cloud_url, a.cloud_model)


def _decode(model: str, threads: int, a: argparse.Namespace) -> dict[str, Any]:
    from appliance.bench.decode import bench_decode

    return bench_decode(model, threads, a.reps, a.prompt_tokens, a.gen_tokens)


def _batch(model: str, threads: int, a: argparse.Namespace) -> dict[str, Any]:
    from appliance.bench.batch import bench_batch

    return bench_batch(model, threads, tuple(a.concurrency))


def _prefix(model: str, threads: int, a: argparse.Namespace) -> dict[str, Any]:
    from appliance.bench.prefix import bench_prefix

    return bench_prefix(model, threads, a.system_tokens)


def _serve(model: str, threads: int, a: argparse.Namespace) -> dict[str, Any]:
    from appliance.bench.serve import bench_serve

    return bench_serve(model, threads, tuple(a.concurrency), max(1, a.repeats), max(1, a.per_client))


def _early_exit(model: str, threads: int, a: argparse.Namespace) -> dict[str, Any]:
    from appliance.bench.early_exit import bench_early_exit

    return bench_early_exit(model, threads, tuple(a.concurrency), a.prompts, a.tokens)


def _context(model: str, threads: int, a: argparse.Namespace) -> dict[str, Any]:
    from appliance.bench.context import bench_context

    return bench_context(model, threads, a.turns, a.max_tokens, a.budget)

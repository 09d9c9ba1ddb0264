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
    _gpu_layers_arg(d)
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
    _gpu_layers_arg(b)
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
        "same requests through the batching engine in-process, at 1, 4, 8 and 16 concurrent clients. With --peer "
        "llama-server: the service (default config, semantic cache off) against llama-server built from the pinned "
        "llama-cpp-python sdist (-np = clients, flash attention), 128-token streamed greedy requests from 1, 8 and 16 "
        "clients, alternating rounds: tokens/s, time to first token and the ratio.",
    )
    s.add_argument("--concurrency", type=int, nargs="+", default=None, help="default 1 4 8 16; with --peer 1 8 16")
    s.add_argument("--repeats", type=int, default=3, help="round pairs per concurrency (median)")
    s.add_argument(
        "--per-client", type=int, default=4, help="requests each client sends per round (default 4; at least 8 a round)"
    )
    s.add_argument("--peer", choices=["llama-server"], default=None, help="measure against llama-server instead")
    s.add_argument("--max-tokens", type=int, default=128, help="tokens per request with --peer (default 128)")
    s.set_defaults(func=_runner(_serve))

    h = _add(
        bsub,
        "http",
        "tokens/s through our OpenAI-compatible HTTP edge vs llama-server",
        "The HTTP edge against llama-server (built from the pinned llama-cpp-python sdist, `make llama-server`): "
        "128-token streamed greedy /v1/completions requests from 1 and 8 concurrent clients through a real "
        "`appliance serve` (default config, semantic cache off) and through llama-server (-np = clients, flash "
        "attention, same model and prompts), alternating rounds, medians of 3.",
    )
    h.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    h.add_argument("--repeats", type=int, default=3, help="rounds per side and concurrency (median)")
    h.add_argument("--max-tokens", type=int, default=128, help="tokens per request (default 128)")
    h.set_defaults(func=_runner(_http))

    ad = _add(
        bsub,
        "adapters",
        "8 requests under no adapter, one LoRA adapter and 8 different ones in one batch, vs llama.cpp",
        "Per-request LoRA adapters: aggregate decode tokens/s of 8 concurrent requests (128-token prompts, 128 "
        "tokens out) with no adapter, all under one adapter and under 8 different adapters in one batch (rank-16 "
        "adapters on every linear layer, seeded, cached under build/bench-adapters/), and llama.cpp serving the "
        "same requests with one context per adapter configuration; alternating rounds in child processes, medians.",
    )
    ad.add_argument("--reps", type=int, default=3, help="rounds per engine (default 3)")
    ad.set_defaults(func=_runner(_adapters))

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
    e.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    e.add_argument("--prompts", type=int, default=50, help="held-out prompts served per mode (default 50)")
    e.add_argument("--tokens", type=int, default=48, help="tokens generated per prompt (default 48)")
    e.set_defaults(func=_runner(_early_exit))

    dd = _add(
        bsub,
        "distill",
        "a LoRA task model trained on BANKING77 intents: accuracy, local share, training time, saving",
        "Distillation on one repeated task: intent classification on a text,label CSV (BANKING77's train.csv),"
        " shuffled by --seed; the first --train rows train a LoRA on the served model (10%% of them held out for"
        " validation, early stopping and calibrating the confidence rule), the rest are the test set. Reports"
        " the base model's exact match, the task model's (decoding kept to the trained labels), the share the"
        " confidence rule keeps local at --target precision and its accuracy there, training time and"
        " tokens/s, and the cascade's saving against sending everything to the cloud at the configured prices."
        " Training 3,000 examples takes tens of minutes on 2 cores; progress goes to stderr.",
    )
    dd.add_argument(
        "--csv", type=Path, default=None, help="text,label CSV (default: ../shared/data/banking77/train.csv)"
    )
    dd.add_argument("--train", type=int, default=3000, help="rows to train on (default 3000)")
    dd.add_argument("--test", type=int, default=None, help="rows to test on (default: all the rest)")
    dd.add_argument("--base-n", type=int, default=300, help="test rows the base model answers (default 300)")
    dd.add_argument("--epochs", type=int, default=3, help="passes over the training rows (default 3)")
    dd.add_argument("--lr", type=float, default=5e-4)
    dd.add_argument("--rank", type=int, default=16)
    dd.add_argument("--batch-size", type=int, default=8)
    dd.add_argument(
        "--layers",
        type=int,
        default=9,
        help="LoRA on the top N blocks only (default 9, half of the default model's; 0: every block)",
    )
    dd.add_argument("--seed", type=int, default=0)
    dd.add_argument("--target", type=float, default=0.97, help="precision the confidence rule is calibrated for")
    dd.add_argument("--work", type=Path, default=Path("build/bench-distill"), help="where the split and model go")
    dd.add_argument("--adapter", type=Path, default=None, help="reuse an adapter trained on this split (no training)")
    dd.add_argument("--config", "-c", default=None, help="the service's TOML config (for its [pricing])")
    dd.set_defaults(func=_runner(_distill))

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

    ct = bsub.add_parser(
        "cache-tune",
        help="semantic cache: plain vs tuned MiniLM on held-out BANKING77 and CLINC150 queries",
        description="Tunes the cache's MiniLM (`appliance cache tune`) on a share of BANKING77 train.csv and on "
        "half of CLINC150's validation split, then replays the queries tuning never saw through the plain and "
        "the tuned embedders: area under the precision/hit-rate curve and best hit rate at precision >= 0.97, "
        "for the cosine threshold and the calibrated decision; the BANKING77-tuned embedder also on CLINC150; "
        "lookup latency at --entries entries. Tuning takes tens of minutes on 2 busy cores; progress on stderr.",
    )
    ct.add_argument("--banking77", type=Path, default=None, help="default: ../shared/data/banking77/train.csv")
    ct.add_argument("--clinc150", type=Path, default=None, help="default: tests/data/clinc150_val.csv")
    ct.add_argument("--work", type=Path, default=Path("build/bench-cache-tune"), help="where the tuned GGUFs go")
    ct.add_argument("--reuse", action="store_true", help="reuse tuned GGUFs already in --work")
    ct.add_argument("--tune-fraction", type=float, default=0.6, help="BANKING77 share that tunes (default 0.6)")
    ct.add_argument("--epochs", type=int, default=3, help="passes over the anchors (default 3)")
    ct.add_argument("--max-anchors", type=int, default=2400, help="anchors per epoch (default 2400)")
    ct.add_argument("--mix", type=float, default=0.5, help="share of the tuning's weight change kept (default 0.5)")
    ct.add_argument("--entries", type=int, default=100_000, help="entries for the latency check (0: skip it)")
    ct.add_argument("--seed", type=int, default=0)
    ct.add_argument("--threads", type=int, default=2)
    ct.add_argument("--json", action="store_true", help="print only the JSON result on stdout")
    ct.set_defaults(func=_cache_tune)

    so = _reliability(
        bsub,
        "soak",
        "mixed traffic at 4x admission capacity with a misbehaving cloud; checks nothing is lost or left behind",
        "A real `appliance serve` (semantic cache on, a loopback cloud answering 429s, 500s, stalls, malformed "
        "bodies and mid-stream disconnects among good answers) under closed-loop traffic from 4x its admission "
        "capacity: cache hits, local generations, streams, chat sessions, embeddings, client cancels, short "
        "deadlines, cloud requests. Reports requests by kind and status, p50/p99 latency per kind per time "
        "window, server RSS over time (rss.csv, soak.png with matplotlib), and end checks (ledger row for every "
        "acknowledged request, KV pools whole, nothing stuck, bounded RSS growth, clean shutdown, SQLite "
        "integrity). Exits 1 when a check fails. Progress on stderr.",
    )
    so.add_argument("--minutes", type=float, default=30.0, help="traffic duration (default 30)")
    so.add_argument("--rss-growth-max", type=float, default=0.15, help="RSS growth bound after warm-up (0.15)")
    so.add_argument("--mix", default="", help="KIND=WEIGHT,... over the default traffic mix, e.g. cloud=0")
    so.set_defaults(func=_soak)
    ch = _reliability(
        bsub,
        "chaos",
        "kill -9 loops under load: SQLite integrity, no acknowledged row lost, index verified, time to SERVING",
        "Cycles of: start `appliance serve` (semantic cache, teacher capture for a tenant, hot-prefix saving), "
        "drive mixed traffic, SIGKILL it at a moment the cycle aims for (random under load, right after a "
        "captured cloud answer, during the hot-prefix save, during the cache index save), restart. After each "
        "restart: every SQLite database passes integrity_check, every acknowledged ledger row, teacher example "
        "and cache entry is there, saved hnswlib indexes agree with SQLite, the service serves a cached answer, "
        "and it was SERVING within --serving-bound seconds. Exits 1 when a check fails.",
    )
    ch.add_argument("--cycles", type=int, default=10, help="kill/restart cycles (default 10)")
    ch.add_argument("--load-seconds", type=float, default=8.0, help="longest load before a kill (default 8)")
    ch.add_argument("--serving-bound", type=float, default=60.0, help="seconds a restart may take to SERVING")
    ch.set_defaults(func=_chaos)


def _reliability(
    bsub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help: str, desc: str
) -> argparse.ArgumentParser:
    p = bsub.add_parser(name, help=help, description=desc)
    p.add_argument("--model", "-m", default=None, help="manifest name or .gguf path (default: the default model)")
    p.add_argument("--threads", type=int, default=1, help="the server's engine threads (default 1)")
    p.add_argument("--out", type=Path, default=Path(f"build/{name}"), help=f"report and service home (build/{name})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print only the JSON result on stdout")
    return p


def _soak(a: argparse.Namespace) -> int:
    from appliance.bench.soak import bench_soak, parse_mix

    def run(model: str) -> dict[str, Any]:
        if not a.minutes > 0:
            raise ValueError("--minutes must be > 0")
        mix = parse_mix(a.mix)
        return bench_soak(model, a.threads, a.minutes, a.out, seed=a.seed, rss_growth_max=a.rss_growth_max, mix=mix)

    return _checked("soak", a, run)


def _chaos(a: argparse.Namespace) -> int:
    from appliance.bench.chaos import bench_chaos

    def run(model: str) -> dict[str, Any]:
        if a.cycles < 1 or a.load_seconds < 2:
            raise ValueError("--cycles must be >= 1 and --load-seconds >= 2")
        return bench_chaos(
            model, a.threads, a.cycles, a.out, seed=a.seed, load_s=a.load_seconds, serving_bound_s=a.serving_bound
        )

    return _checked("chaos", a, run)


def _checked(name: str, a: argparse.Namespace, run: Callable[[str], dict[str, Any]]) -> int:
    """Resolve the model, run, print; exit 1 when one of the run's checks failed, 2 on bad input."""
    model = _model(a)
    if model is None:
        return 2
    try:
        if a.threads < 1:
            raise ValueError("--threads must be >= 1")
        res = run(model)
    except (ValueError, FileExistsError) as e:
        print(f"appliance bench {name}: {e}", file=sys.stderr)
        return 2
    _print(res, a.json)
    return 0 if res["ok"] else 1


def _cache_tune(a: argparse.Namespace) -> int:
    from appliance.cache.errors import CacheError
    from appliance.cache.tune import TuneConfig
    from appliance.cache.tunebench import bench_tune

    root = Path(__file__).resolve().parents[2]
    try:
        cfg = TuneConfig(epochs=a.epochs, max_anchors=a.max_anchors, mix=a.mix, threads=a.threads, seed=a.seed)
        cfg.validate()
        res = bench_tune(
            a.banking77 or root.parent / "shared" / "data" / "banking77" / "train.csv",
            a.clinc150 or root / "tests" / "data" / "clinc150_val.csv",
            a.work,
            cfg,
            tune_fraction=a.tune_fraction,
            entries=a.entries,
            reuse=a.reuse,
        )
    except CacheError as e:
        print(f"appliance bench: {e}", file=sys.stderr)
        return 2
    return _print(res, a.json)


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


def _distill(model: str, threads: int, a: argparse.Namespace) -> dict[str, Any]:
    from appliance.bench.distill import bench_distill
    from appliance.common.config import load_config
    from appliance.distill.train import TrainConfig

    csv_path = a.csv or Path(__file__).resolve().parents[2].parent / "shared" / "data" / "banking77" / "train.csv"
    cfg = TrainConfig(
        epochs=a.epochs,
        lr=a.lr,
        rank=a.rank,
        alpha=2.0 * a.rank,
        batch_size=a.batch_size,
        threads=threads,
        seed=a.seed,
        layers=a.layers or None,
    )
    return bench_distill(
        model,
        threads,
        csv_path,
        a.work,
        n_train=a.train,
        n_test=a.test,
        n_base=a.base_n,
        seed=a.seed,
        cfg=cfg,
        adapter=a.adapter,
        target=a.target,
        pricing=load_config(a.config).pricing,
    )


def _gpu_layers_value(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -2
    if n < -1:
        raise argparse.ArgumentTypeError(f"must be an integer >= -1 (-1: all), got {text!r}")
    return n


def _gpu_layers_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--gpu-layers",
        type=_gpu_layers_value,
        default=-1,
        help="with a GPU build and a GPU: layers both engines put on it, as llama.cpp's -ngl (default -1: all)",
    )


def _set_gpu_layers(a: argparse.Namespace) -> None:
    import os

    from appliance.bench.common import ENV_GPU_LAYERS

    os.environ[ENV_GPU_LAYERS] = str(a.gpu_layers)


def _decode(model: str, threads: int, a: argparse.Namespace) -> dict[str, Any]:
    from appliance.bench.decode import bench_decode

    _set_gpu_layers(a)
    return bench_decode(model, threads, a.reps, a.prompt_tokens, a.gen_tokens)


def _batch(model: str, threads: int, a: argparse.Namespace) -> dict[str, Any]:
    from appliance.bench.batch import bench_batch

    _set_gpu_layers(a)
    return bench_batch(model, threads, tuple(a.concurrency))


def _adapters(model: str, threads: int, a: argparse.Namespace) -> dict[str, Any]:
    from appliance.bench.adapters import bench_adapters

    return bench_adapters(model, threads, max(1, a.reps))


def _prefix(model: str, threads: int, a: argparse.Namespace) -> dict[str, Any]:
    from appliance.bench.prefix import bench_prefix

    return bench_prefix(model, threads, a.system_tokens)


def _serve(model: str, threads: int, a: argparse.Namespace) -> dict[str, Any]:
    from appliance.bench.serve import PEER_CONCURRENCY, bench_serve, bench_serve_peer

    if a.peer:
        return bench_serve_peer(model, threads, a.concurrency or PEER_CONCURRENCY, max(1, a.repeats), a.max_tokens)
    return bench_serve(model, threads, tuple(a.concurrency or (1, 4, 8, 16)), max(1, a.repeats), max(1, a.per_client))


def _http(model: str, threads: int, a: argparse.Namespace) -> dict[str, Any]:
    from appliance.bench.http import bench_http

    return bench_http(model, threads, a.concurrency, max(1, a.repeats), a.max_tokens)


def _early_exit(model: str, threads: int, a: argparse.Namespace) -> dict[str, Any]:
    from appliance.bench.early_exit import bench_early_exit

    return bench_early_exit(model, threads, tuple(a.concurrency), a.prompts, a.tokens)


def _context(model: str, threads: int, a: argparse.Namespace) -> dict[str, Any]:
    from appliance.bench.context import bench_context

    return bench_context(model, threads, a.turns, a.max_tokens, a.budget)

"""`appliance bench ...`: benchmarks against llama.cpp, measured in the same run."""

from __future__ import annotations

import argparse
import json
import sys

from appliance.engine import default_threads
from appliance.manifest import ManifestError
from appliance.modelref import resolve_model


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("bench", help="benchmark the native engine against llama.cpp")
    bsub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    d = bsub.add_parser(
        "decode",
        help="prefill and decode tokens/s and peak RSS, ours vs llama.cpp",
        description="Prefill (one 512-token prompt) and decode (128 tokens) speed of our engine and of "
        "llama.cpp on the same model and thread count, alternating runs in child processes; medians.",
    )
    d.add_argument("--model", "-m", default=None, help="manifest name or .gguf path (default: the default model)")
    d.add_argument("--threads", type=int, default=None, help=f"CPU threads (default {default_threads()})")
    d.add_argument("--reps", type=int, default=3, help="rounds per engine (default 3)")
    d.add_argument("--prompt-tokens", type=int, default=512)
    d.add_argument("--gen-tokens", type=int, default=128)
    d.add_argument("--json", action="store_true", help="print only the JSON result on stdout")
    d.set_defaults(func=run_decode)


def run_decode(args: argparse.Namespace) -> int:
    from appliance.bench.decode import bench_decode

    try:
        model = str(resolve_model(args.model))
    except (LookupError, OSError, ManifestError) as e:
        print(f"appliance bench: {e}", file=sys.stderr)
        return 2
    threads = args.threads or default_threads()
    res = bench_decode(model, threads, args.reps, args.prompt_tokens, args.gen_tokens)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for k, v in res.items():
            print(f"{k:>18}: {v}")
    return 0

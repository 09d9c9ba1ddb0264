"""`appliance cache ...`: evaluate, calibrate, benchmark and administer the semantic cache."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from appliance.cache.errors import CacheError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("cache", help="semantic cache: eval, calibrate, bench, stats, invalidate")
    csub = p.add_subparsers(dest="cache", metavar="ACTION", required=True)

    e = csub.add_parser(
        "eval",
        help="replay a text,category CSV through a fresh cache",
        description="Replays the CSV in file order (or shuffled with --shuffle SEED) through a fresh cache with its "
        "shipped threshold and guards: a miss stores the category as the answer, a hit is correct when the "
        "categories match. Reports hit_rate, precision, lookups, entries, p50_ms, p99_ms and the threshold curve.",
    )
    e.add_argument("--csv", type=Path, required=True)
    e.add_argument("--shuffle", type=int, default=None, metavar="SEED", help="shuffle rows with this seed first")
    e.add_argument("--limit", type=int, default=None, help="replay only the first N rows (after shuffling)")
    e.add_argument(
        "--holdout",
        type=float,
        default=None,
        metavar="FRACTION",
        help="replay only the rows `cache calibrate --fraction FRACTION` held out: the shuffled file "
        "(--shuffle SEED, default 0, calibrate's --seed) after its first FRACTION",
    )
    e.add_argument("--threshold", type=float, default=None, help="override the shipped threshold")
    e.add_argument("--no-guards", action="store_true", help="turn the opposite-meaning guards off")
    e.add_argument("--no-curve", action="store_true", help="skip the precision/hit-rate curve")
    _common(e)
    e.set_defaults(func=run_eval)

    c = csub.add_parser("calibrate", help="fit the threshold on a shuffled calibration split, check the held-out rest")
    c.add_argument("--csv", type=Path, required=True)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--fraction", type=float, default=0.7, help="calibration share of the rows (default 0.7)")
    c.add_argument("--target", type=float, default=0.975, help="precision to reach on the calibration split")
    c.add_argument("--write", action="store_true", help="store the result in the package's data/thresholds.json")
    _common(c)
    c.set_defaults(func=run_calibrate)

    b = csub.add_parser("bench", help="lookup latency with many entries")
    b.add_argument(
        "--entries", type=int, default=100_000, help="synthetic entries to fill the partition with (default 100000)"
    )
    b.add_argument("--lookups", type=int, default=300, help="lookups to time (default 300)")
    b.add_argument(
        "--queries",
        type=Path,
        default=None,
        metavar="CSV",
        help="look up the text column of this CSV (distinct rows, in file order) instead of six built-in "
        "questions numbered apart",
    )
    b.add_argument("--shuffle", type=int, default=None, metavar="SEED", help="shuffle the --queries rows first")
    _common(b)
    b.set_defaults(func=run_bench)

    s = csub.add_parser("stats", help="entries and size of a cache directory")
    s.add_argument("--dir", type=Path, required=True)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=run_stats)

    i = csub.add_parser("invalidate", help="delete entries by namespace, fingerprint, id or age")
    i.add_argument("--dir", type=Path, required=True)
    i.add_argument("--namespace", default=None)
    i.add_argument("--fingerprint", default=None)
    i.add_argument("--id", type=int, default=None, dest="entry_id")
    i.add_argument("--older-than", type=float, default=None, metavar="SECONDS")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=run_invalidate)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--embedding-model", type=Path, default=None, help="GGUF embedding model (default: all-MiniLM-L6-v2)"
    )
    p.add_argument("--threads", type=int, default=1, help="embedding threads (default 1)")
    p.add_argument("--json", action="store_true", help="print only the JSON result on stdout")


def _print(res: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(res, indent=2))
        return
    for k, v in res.items():
        if k != "curve":
            print(f"{k:>16}: {v}")
    for point in res.get("curve", []):
        print(
            f"  threshold {point['threshold']:.2f}: hit_rate {point['hit_rate']:.3f} precision {point['precision']:.3f}"
        )


def _fail(e: Exception) -> int:
    print(f"appliance cache: {e}", file=sys.stderr)
    return 2


def run_eval(args: argparse.Namespace) -> int:
    from appliance.cache.config import CacheConfig
    from appliance.cache.embedder import GgufEmbedder
    from appliance.cache.replay import read_csv, replay, split

    try:
        if args.holdout is not None:
            if not 0.0 < args.holdout < 1.0:
                raise CacheError(f"--holdout must be a fraction between 0 and 1, got {args.holdout}")
            args.shuffle = 0 if args.shuffle is None else args.shuffle
            rows = split(read_csv(args.csv, shuffle_seed=args.shuffle), args.holdout)[1][: args.limit]
        else:
            rows = read_csv(args.csv, shuffle_seed=args.shuffle)[: args.limit]
        config = CacheConfig(threshold=args.threshold, guards=not args.no_guards)
        with GgufEmbedder(args.embedding_model, n_threads=args.threads) as emb:
            res = replay(rows, emb, config, curve=not args.no_curve)
    except CacheError as e:
        return _fail(e)
    res = {"csv": str(args.csv), "shuffle_seed": args.shuffle, "holdout": args.holdout, **res}
    _print(res, args.json)
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    import msgspec

    from appliance.cache.calibrate import calibrate, shipped_path, write_calibration
    from appliance.cache.embedder import GgufEmbedder

    try:
        with GgufEmbedder(args.embedding_model, n_threads=args.threads) as emb:
            cal, curve = calibrate(args.csv, emb, seed=args.seed, fraction=args.fraction, target=args.target)
            version = emb.version
    except CacheError as e:
        return _fail(e)
    if args.write:
        write_calibration(shipped_path(), version, cal)
    res = {"embedder": version, **msgspec.to_builtins(cal), "curve": curve}
    _print(res, args.json)
    return 0


def run_bench(args: argparse.Namespace) -> int:
    from appliance.cache.bench import bench
    from appliance.cache.embedder import GgufEmbedder
    from appliance.cache.replay import read_csv

    try:
        queries = (
            None
            if args.queries is None
            else list(dict.fromkeys(r.text for r in read_csv(args.queries, shuffle_seed=args.shuffle)))
        )
        with GgufEmbedder(args.embedding_model, n_threads=args.threads) as emb:
            res = bench(emb, entries=args.entries, lookups=args.lookups, queries=queries)
    except CacheError as e:
        return _fail(e)
    _print(res, args.json)
    return 0


def run_stats(args: argparse.Namespace) -> int:
    from appliance.cache.cache import DB_NAME
    from appliance.cache.store import Store

    path = args.dir / DB_NAME
    if not path.is_file():
        return _fail(CacheError(f"no cache database at {path}"))
    try:
        store = Store(path)
        n, size = store.totals()
        store.close()
    except CacheError as e:
        return _fail(e)
    _print({"dir": str(args.dir), "entries": n, "bytes": size}, args.json)
    return 0


def run_invalidate(args: argparse.Namespace) -> int:
    from appliance.cache.cache import DB_NAME, SemanticCache
    from appliance.cache.config import CacheConfig
    from appliance.cache.embedder import GgufEmbedder

    if not (args.dir / DB_NAME).is_file():
        return _fail(CacheError(f"no cache database at {args.dir / DB_NAME}"))
    try:
        with GgufEmbedder() as emb, SemanticCache.open(args.dir, emb, CacheConfig(threshold=1.0)) as cache:
            n = cache.invalidate(
                args.namespace, fingerprint=args.fingerprint, entry_id=args.entry_id, older_than_s=args.older_than
            )
    except CacheError as e:
        return _fail(e)
    _print({"dir": str(args.dir), "deleted": n}, args.json)
    return 0

"""`appliance cache ...`: evaluate, calibrate, benchmark and administer the semantic cache."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.cache.errors import CacheError

if TYPE_CHECKING:
    from appliance.cache.embedder import GgufEmbedder
    from appliance.cache.replay import Example


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("cache", help="semantic cache: eval, calibrate, bench, stats, invalidate")
    csub = p.add_subparsers(dest="cache", metavar="ACTION", required=True)

    e = csub.add_parser(
        "eval",
        help="replay a text,category CSV through a fresh cache",
        description="Replays the CSV in file order (or shuffled with --shuffle SEED) through a fresh cache with its "
        "shipped threshold (a tuned embedder: its calibrated decision) and guards: a miss stores the category as the "
        "answer, a hit is correct when the categories match. Reports hit_rate, precision, lookups, entries, p50_ms, "
        "p99_ms and the precision/hit-rate frontier (threshold curve; a tuned embedder's decision curve too) with "
        "its area (auc) and the best hit rate at precision >= 0.97; with a tuned embedder, side by side with the "
        "plain one (--compare).",
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
    e.add_argument("--no-curve", action="store_true", help="skip the precision/hit-rate curves")
    e.add_argument(
        "--compare",
        default=None,
        metavar="MODEL",
        help="also draw this embedder's frontier, side by side (default: the plain all-MiniLM-L6-v2 when "
        "--embedding-model is given; none: no comparison)",
    )
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

    t = csub.add_parser(
        "tune",
        help="fine-tune the cache's MiniLM on question/answer pairs and calibrate its hit decision",
        description="Contrastive fine-tuning of all-MiniLM-L6-v2 (PyTorch, CPU) on questions that share an answer "
        "(positives) and nearest questions whose answers differ (hard negatives), from a text,category CSV (the "
        "category plays the answer) or from one tenant's cache entries. A share of the questions (--calibration-"
        "fraction) is held back from tuning and fits the embedder's own cosine threshold and its decision over the "
        "top-k neighbours for --target precision; both are stored in the GGUF it writes. Load it with "
        '--embedding-model NAME or [cache] embedding_model = "NAME". Progress goes to stderr.',
    )
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--csv", type=Path, help="text,category CSV of questions and their answers")
    src.add_argument("--tenant", help="tune on this tenant's cache entries (and its tenant/user namespaces)")
    t.add_argument("--dir", type=Path, default=None, help="cache directory for --tenant (default: [cache] dir)")
    t.add_argument("--config", "-c", default=None, help="the service's TOML config (for --tenant's default --dir)")
    t.add_argument(
        "--out",
        required=True,
        metavar="NAME",
        help="embedder name (written to $APPLIANCE_HOME/embedders/NAME.gguf) or a path ending in .gguf",
    )
    t.add_argument("--epochs", type=int, default=1, help="passes over the anchors (default 1)")
    t.add_argument("--threads", type=int, default=2, help="torch and embedding threads (default 2)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--max-anchors", type=int, default=None, help="anchor questions per epoch (default 4000)")
    t.add_argument("--batch-size", type=int, default=None, help="anchors per step (default 32)")
    t.add_argument("--lr", type=float, default=None, help="learning rate (default 2e-4)")
    t.add_argument(
        "--mix",
        type=float,
        default=None,
        help="share of the tuning's weight change kept (default 0.5; 1: all of it, best on the tuned domain, "
        "worse elsewhere)",
    )
    t.add_argument(
        "--calibration-fraction",
        type=float,
        default=None,
        help="share of the questions held back from tuning to calibrate on (default 0.2)",
    )
    t.add_argument("--target", type=float, default=0.97, help="precision the decision is calibrated for")
    t.add_argument("--limit", type=int, default=None, help="use only the first N questions (after --shuffle)")
    t.add_argument("--shuffle", type=int, default=None, metavar="SEED", help="shuffle the CSV rows first")
    t.add_argument("--json", action="store_true", help="print only the JSON result on stdout")
    t.set_defaults(func=run_tune)

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
        "--embedding-model",
        default=None,
        metavar="MODEL",
        help="a tuned embedder's name (`cache tune --out`), a manifest name or a .gguf path "
        "(default: all-MiniLM-L6-v2)",
    )
    p.add_argument("--threads", type=int, default=1, help="embedding threads (default 1)")
    p.add_argument("--json", action="store_true", help="print only the JSON result on stdout")


def _print(res: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(res, indent=2))
        return
    for k, v in res.items():
        if k not in ("curve", "frontier", "compare"):
            print(f"{k:>16}: {v}")
    if "compare" in res:
        return  # the caller prints the frontiers side by side
    for point in res.get("curve", []):
        print(
            f"  threshold {point['threshold']:.2f}: hit_rate {point['hit_rate']:.3f} precision {point['precision']:.3f}"
        )


def _fail(e: Exception) -> int:
    print(f"appliance cache: {e}", file=sys.stderr)
    return 2


def run_eval(args: argparse.Namespace) -> int:
    from appliance.cache.config import CacheConfig
    from appliance.cache.frontier import side_by_side
    from appliance.cache.replay import frontier, read_csv, replay, split

    try:
        if args.holdout is not None:
            if not 0.0 < args.holdout < 1.0:
                raise CacheError(f"--holdout must be a fraction between 0 and 1, got {args.holdout}")
            args.shuffle = 0 if args.shuffle is None else args.shuffle
            rows = split(read_csv(args.csv, shuffle_seed=args.shuffle), args.holdout)[1][: args.limit]
        else:
            rows = read_csv(args.csv, shuffle_seed=args.shuffle)[: args.limit]
        config = CacheConfig(threshold=args.threshold, guards=not args.no_guards)
        with _embedder(args) as emb:
            res = replay(rows, emb, config, curve=not args.no_curve)
        compare = args.compare if args.compare is not None else ("" if args.embedding_model else "none")
        if compare != "none" and not args.no_curve:
            with _embedder(argparse.Namespace(embedding_model=compare or None, threads=args.threads)) as other:
                res["compare"] = frontier(rows, other, guards=not args.no_guards)
    except CacheError as e:
        return _fail(e)
    res = {"csv": str(args.csv), "shuffle_seed": args.shuffle, "holdout": args.holdout, **res}
    _print(res, args.json)
    if not args.json and "compare" in res:
        main = f"{args.embedding_model}"
        other_name = compare or "all-minilm-l6-v2 (plain)"
        for line in side_by_side({main: res["frontier"], other_name: res["compare"]}):
            print(line)
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    import msgspec

    from appliance.cache.calibrate import calibrate, shipped_path, write_calibration

    try:
        with _embedder(args) as emb:
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
    from appliance.cache.replay import read_csv

    try:
        queries = (
            None
            if args.queries is None
            else list(dict.fromkeys(r.text for r in read_csv(args.queries, shuffle_seed=args.shuffle)))
        )
        with _embedder(args) as emb:
            res = bench(emb, entries=args.entries, lookups=args.lookups, queries=queries)
    except CacheError as e:
        return _fail(e)
    _print(res, args.json)
    return 0


def _embedder(args: argparse.Namespace) -> GgufEmbedder:
    """The embedder ``--embedding-model`` names, on ``--threads``."""
    from appliance.cache.embedder import GgufEmbedder
    from appliance.cache.names import resolve_embedder

    try:
        path = resolve_embedder(args.embedding_model)
    except (OSError, LookupError) as e:
        raise CacheError(str(e).strip("'\"")) from None
    return GgufEmbedder(path, n_threads=args.threads)


def _tenant_rows(args: argparse.Namespace) -> list[Example]:
    from appliance.cache.cache import DB_NAME
    from appliance.cache.keys import check_namespace
    from appliance.cache.replay import Example
    from appliance.cache.store import Store

    directory = args.dir
    if directory is None:
        from appliance.common.config import ConfigError, load_config

        try:
            directory = load_config(args.config).cache.path()
        except ConfigError as e:
            raise CacheError(f"--tenant needs the cache directory: {e}") from None
    path = directory / DB_NAME
    if not path.is_file():
        raise CacheError(f"no cache database at {path} (pass --dir)")
    store = Store(path)
    try:
        rows = store.questions(check_namespace(args.tenant))
    finally:
        store.close()
    return [Example(q, r) for q, r in rows]


def run_tune(args: argparse.Namespace) -> int:
    from appliance.cache.names import tuned_path
    from appliance.cache.replay import read_csv
    from appliance.cache.tune import TuneConfig, tune

    try:
        out = tuned_path(args.out)
        if args.limit is not None and args.limit < 1:
            raise CacheError(f"--limit must be at least 1, got {args.limit}")
        given = {k: getattr(args, k) for k in ("batch_size", "lr", "max_anchors", "calibration_fraction", "mix")}
        config = TuneConfig(
            epochs=args.epochs,
            threads=args.threads,
            seed=args.seed,
            target=args.target,
            **{k: v for k, v in given.items() if v is not None},
        )
        config.validate()
        if args.csv is not None:
            rows, source = read_csv(args.csv, shuffle_seed=args.shuffle), args.csv.name
        else:
            rows, source = _tenant_rows(args), f"tenant {args.tenant}"
        res = tune(rows[: args.limit], out, config, source=source)
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

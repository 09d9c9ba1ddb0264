"""`appliance router ...` (also `appliance route ...`): train the difficulty router, evaluate routing."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

DEFAULT_OUTPUT_TOKENS = 200


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "router",
        aliases=["route"],
        help="difficulty router: train it on labelled text, evaluate its decisions and cost",
        description="The router sends a request to the cloud when its classifier's P(cloud) is at least "
        "[route].threshold. It reads a sentence embedding (all-MiniLM-L6-v2) and cheap features (length, task "
        "kind, language). `train` fits it on a text,label CSV (label local or cloud); `eval` replays a CSV.",
    )
    rsub = p.add_subparsers(dest="route_action", metavar="ACTION", required=True)
    t = rsub.add_parser(
        "train",
        help="fit the router on a text,label CSV and make it the service's default",
        description="Fits the classifier (logistic regression on embedding + features, and a features-only "
        "fallback) on CSV rows `text,label` with label `local` or `cloud`, and writes it to --out (default: "
        "$APPLIANCE_HOME/router/classifier.npz, which `appliance serve` loads unless [route].classifier is set).",
    )
    t.add_argument("--csv", type=Path, required=True, help="text,label rows (label: local or cloud)")
    t.add_argument("--out", type=Path, default=None, help="where to write the model (.npz)")
    t.add_argument("--json", action="store_true", help="print the summary as JSON")
    t.set_defaults(func=run_train)

    e = rsub.add_parser(
        "eval",
        help="route a text[,label] CSV: decisions, share to cloud, cost vs all-cloud, accuracy",
        description="Routes each row with the service's router (or --model) and prices it with the config's "
        "price table: prompt tokens as the embedding tokenizer counts them, --output-tokens per answer. Reports "
        "each decision, the share sent to the cloud, the cost against sending everything to the cloud, and "
        "accuracy/precision/recall of the cloud label where rows are labelled.",
    )
    e.add_argument("--csv", type=Path, required=True, help="text[,label] rows")
    e.add_argument("--model", type=Path, default=None, help="router .npz (default: what the service loads)")
    e.add_argument("--config", "-c", type=Path, default=None, help="service TOML for [pricing] and [route]")
    e.add_argument("--threshold", type=float, default=None, help="override [route].threshold")
    e.add_argument("--output-tokens", type=int, default=DEFAULT_OUTPUT_TOKENS, help="assumed answer length")
    e.add_argument("--json", action="store_true", help="print JSON (with every decision)")
    e.set_defaults(func=run_eval)

    c = rsub.add_parser(
        "cascade-eval",
        help="answer a text[,label] CSV with the local model: what the cascade's checks would escalate",
        description="Answers each row with the local model as the service does (chat template, greedy, scored "
        "tokens), checks the held-back answer every --check-every tokens and once whole with the config's [route] "
        "thresholds, and reports the share of answers each check escalates (overall and per label) with every "
        "answer's figures. For tuning [route] thresholds and cascade_window on your own questions.",
    )
    c.add_argument("--csv", type=Path, required=True, help="text[,label] rows")
    c.add_argument("--config", "-c", type=Path, default=None, help="service TOML for [model] and [route]")
    c.add_argument("--max-tokens", type=int, default=256, help="answer length limit (default 256)")
    c.add_argument("--check-every", type=int, default=None, help="tokens between checks (default: the service's, 16)")
    c.add_argument("--limit", type=int, default=0, help="only the first N rows (0: all)")
    c.add_argument("--json", action="store_true", help="print JSON (with every answer's figures)")
    c.set_defaults(func=run_cascade_eval)


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def run_train(args: argparse.Namespace) -> int:
    from appliance.cache.embedder import GgufEmbedder
    from appliance.cache.errors import CacheError
    from appliance.route.classifier import TrainingDataError, file_source, read_labelled, train
    from appliance.route.router import trained_path

    out = args.out or trained_path()
    try:
        texts, labels = read_labelled(args.csv)
        with GgufEmbedder() as embedder:
            model = train(texts, labels, embedder, file_source(args.csv))
            correct = sum(
                (model.p_cloud(t, embedder) >= 0.5) == (lab == "cloud") for t, lab in zip(texts, labels, strict=True)
            )
        model.save(out)
    except (TrainingDataError, CacheError, OSError) as e:
        return _fail(str(e))
    summary = {
        "rows": len(texts),
        "cloud": labels.count("cloud"),
        "local": labels.count("local"),
        "training_accuracy": round(correct / len(texts), 4),
        "model": str(out),
        "source": model.source,
    }
    print(
        json.dumps(summary, indent=2)
        if args.json
        else f"trained on {len(texts)} rows -> {out} (training accuracy {summary['training_accuracy']})"
    )
    return 0


def evaluate(
    rows: list[tuple[str, str | None]], score: Any, count: Any, pricing: Any, threshold: float, output_tokens: int
) -> dict[str, Any]:
    """Decisions and totals for (text, label) rows; `score(text) -> (p_cloud, kind)`, `count(text) -> tokens`."""
    decisions, cost, all_cloud = [], 0.0, 0.0
    tp = fp = fn = correct = labelled = 0
    for text, label in rows:
        p, kind = score(text)
        route = "cloud" if p >= threshold else "local"
        price = pricing.cloud_cost(count(text), 0, output_tokens)
        all_cloud += price
        cost += price if route == "cloud" else pricing.local_cost(count(text), output_tokens)
        decisions.append({"text": text[:80], "p_cloud": round(p, 4), "route": route, "kind": kind, "label": label})
        if label is not None:
            labelled += 1
            correct += route == label
            tp += route == label == "cloud"
            fp += route == "cloud" != label
            fn += route == "local" != label
    n = max(len(rows), 1)
    report: dict[str, Any] = {
        "rows": len(rows),
        "threshold": threshold,
        "share_cloud": round(sum(d["route"] == "cloud" for d in decisions) / n, 4),
        "cost": round(cost, 6),
        "cost_all_cloud": round(all_cloud, 6),
        "saving": round(1 - cost / all_cloud, 4) if all_cloud else 0.0,
        "currency": pricing.currency,
    }
    if labelled:
        report |= {
            "labelled": labelled,
            "accuracy": round(correct / labelled, 4),
            "cloud_precision": round(tp / (tp + fp), 4) if tp + fp else None,
            "cloud_recall": round(tp / (tp + fn), 4) if tp + fn else None,
        }
    report["decisions"] = decisions
    return report


def run_eval(args: argparse.Namespace) -> int:
    from appliance.cache.embedder import GgufEmbedder
    from appliance.cache.errors import CacheError
    from appliance.common.config import ConfigError, load_config
    from appliance.route.classifier import RouterModel, TrainingDataError, read_labelled
    from appliance.route.router import Router, load_model

    try:
        cfg = load_config(args.config)
        texts, labels = read_labelled(args.csv, require_labels=False)
        with GgufEmbedder() as embedder:
            model = RouterModel.load(args.model) if args.model else load_model(cfg.route.classifier, embedder)
            threshold = cfg.route.threshold if args.threshold is None else args.threshold
            router = Router(model, embedder, threshold)
            report = evaluate(
                list(zip(texts, labels, strict=True)),
                router.score,
                lambda t: len(embedder.tokenize(t)),
                cfg.pricing,
                threshold,
                args.output_tokens,
            )
    except (TrainingDataError, CacheError, ConfigError, OSError) as e:
        return _fail(str(e))
    report["model"] = model.source
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        head = {k: v for k, v in report.items() if k != "decisions"}
        print("\n".join(f"{k}: {v}" for k, v in head.items()))
    return 0


def run_cascade_eval(args: argparse.Namespace) -> int:
    from appliance.common.config import ConfigError, load_config
    from appliance.engine.local_backend import LocalBackend
    from appliance.models.manifest import ManifestError
    from appliance.models.modelref import resolve_model
    from appliance.route.cascade import CHECK_EVERY
    from appliance.route.cascade_eval import evaluate
    from appliance.route.classifier import TrainingDataError, read_labelled

    if args.max_tokens < 1 or (args.check_every is not None and args.check_every < 1) or args.limit < 0:
        return _fail("--max-tokens and --check-every must be >= 1, --limit >= 0")
    try:
        cfg = load_config(args.config)
        texts, labels = read_labelled(args.csv, require_labels=False)
        if args.limit:
            texts, labels = texts[: args.limit], labels[: args.limit]
        m = cfg.model
        backend = LocalBackend.load(
            resolve_model(m.path or None), m.n_ctx, m.threads, kv_cache_mb=m.kv_cache_mb, gpu_layers=m.gpu_layers
        )
    except (TrainingDataError, ConfigError, ManifestError, LookupError, OSError, ValueError) as e:
        return _fail(str(e))
    try:
        report = evaluate(
            backend,
            texts,
            labels,
            cfg.route,
            max_tokens=args.max_tokens,
            check_every=args.check_every or CHECK_EVERY,
            progress=lambda i, n: print(f"\ranswered {i}/{n}", end="" if i < n else "\n", file=sys.stderr, flush=True),
        )
    finally:
        backend.close()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        head = {k: v for k, v in report.items() if k != "rows"}
        print("\n".join(f"{k}: {v}" for k, v in head.items()))
    return 0

"""`appliance distill`: the distillation loop's commands. `train` (distill_train.py) teaches the
local model a task; `export` and `purge` handle the cloud answers the service captured as teacher
examples; `eval` measures a task model on held-out examples and calibrates its confidence rule;
`promote` makes it serve a tenant's task; `status` shows a tenant's examples and task models."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from appliance.cli.distill_train import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from appliance.common.config import Config, ConfigError, load_config
from appliance.distill.rule import AUTO, SIGNALS

_DESCRIPTION = """\
The distillation loop. With capture on ([distill] capture = true, or a tenant's own `capture`), the
service keeps every answer the cloud gives a tenant as a teacher example, under the task the request
named in its `model` field ([distill] tasks or a tenant's `tasks` list the names). Export them, train
a LoRA task model on them, evaluate it on held-out examples and promote it: the service then answers
the task locally under that adapter when its confidence rule says confident, and asks the cloud (and
captures the answer) otherwise.

  appliance distill export --tenant acme --task triage --out triage.jsonl
  appliance distill train --data triage.jsonl --out triage
  appliance distill eval --model triage --data heldout.jsonl
  appliance distill promote triage --tenant acme --task triage"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from appliance.cli.distill_train import register_train

    parser = sub.add_parser(
        "distill",
        help="learn the office's repeated tasks from the cloud's answers (capture, train, eval, promote)",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="distill_command", metavar="ACTION", required=True)
    register_train(actions)

    def config_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", "-c", default=None, help="the service's TOML config (to find its state dir)")

    e = actions.add_parser(
        "export",
        help="write a tenant's captured examples as JSONL (OpenAI fine-tuning shapes)",
        description="Write a tenant's teacher examples as JSONL, oldest first: {prompt, completion} for"
        " prompt requests, {messages} (the last one the cloud's answer) for chat requests; the input"
        " `appliance distill train --data` reads.",
    )
    e.add_argument("--tenant", required=True)
    e.add_argument("--task", default=None, metavar="NAME", help="only this task's examples ('' for untasked ones)")
    e.add_argument("--out", required=True, type=Path, metavar="FILE.jsonl")
    config_arg(e)
    e.set_defaults(func=cmd_export)

    p = actions.add_parser("purge", help="delete a tenant's captured examples (of one task)")
    p.add_argument("--tenant", required=True)
    p.add_argument("--task", default=None, metavar="NAME")
    config_arg(p)
    p.set_defaults(func=cmd_purge)

    v = actions.add_parser(
        "eval",
        help="measure a task model on held-out JSONL examples and calibrate its confidence rule",
        description="Answer each example greedily with our engine under the adapter (as the service"
        " would), and print exact_match, n, coverage, covered_exact_match, p50_ms. When the adapter was"
        " trained on a classification (a few distinct answers, each seen several times), it records them"
        " and decoding keeps to them. Exact match compares after trimming whitespace. The confidence rule"
        " keeps an answer local when it ended by itself and its signal is at least a threshold, calibrated"
        " on a validation split for --target precision; the figures are measured on the rest. Signals:"
        " margin (the smallest lead of a chosen token's logit over the best other it could have been) or"
        " logprob (the least likely token's log-probability); by default calibration picks the one that"
        " keeps more of the validation split local. The figures are saved beside the"
        " adapter (NAME.eval.json), where `promote` reads them.",
    )
    v.add_argument("--model", required=True, metavar="NAME_OR_ADAPTER", help="a trained name, an adapter or a model")
    v.add_argument("--data", required=True, type=Path, metavar="FILE.jsonl")
    v.add_argument("--base", default=None, metavar="MODEL", help="the base model (default: the one it was trained on)")
    v.add_argument("--target", type=float, default=0.97, help="precision the threshold is calibrated for")
    v.add_argument("--val-fraction", type=float, default=0.3, help="share of the data used for calibration")
    v.add_argument(
        "--signal",
        choices=(AUTO, *SIGNALS),
        default=AUTO,
        help="the confidence signal (default auto: whichever keeps more of the calibration split local)",
    )
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--threads", type=int, default=None)
    v.add_argument("--concurrency", type=int, default=8, help="examples answered at once (default 8)")
    v.add_argument("--no-save", action="store_true", help="do not write NAME.eval.json")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_eval)

    r = actions.add_parser(
        "promote",
        help="make a task model serve a tenant's task (refused when worse than the one serving it)",
        description="Register the adapter with its held-out figures (from `appliance distill eval`) and"
        " make it serve the task for the tenant. Refused when its figures are worse than those of the"
        " model serving the task now: a lower exact_match, a lower covered_exact_match, or a lower"
        " coverage x covered_exact_match. A running service picks it up within [distill] reload_s.",
    )
    r.add_argument("name", metavar="NAME", help="a trained name (models dir) or an adapter path")
    r.add_argument("--tenant", required=True)
    r.add_argument("--task", default=None, help="the task it serves (default: NAME)")
    r.add_argument("--force", action="store_true", help="promote even when worse")
    r.add_argument("--demote", action="store_true", help="instead: stop serving the task locally (cloud again)")
    config_arg(r)
    r.set_defaults(func=cmd_promote)

    s = actions.add_parser("status", help="a tenant's captured examples per task, and its task models")
    s.add_argument("--tenant", required=True)
    s.add_argument("--json", action="store_true")
    config_arg(s)
    s.set_defaults(func=cmd_status)


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config)


def _store(cfg: Config) -> Any:
    from appliance.distill.capture import store_for

    return store_for(cfg)


def _fail(action: str, msg: str, rc: int = EXIT_FAILED) -> int:
    print(f"appliance distill {action}: {msg}", file=sys.stderr)
    return rc


def cmd_export(args: argparse.Namespace) -> int:
    try:
        cfg = _config(args)
    except ConfigError as e:
        return _fail("export", str(e), EXIT_USAGE)
    with _store(cfg) as store:
        n_have = store.counts(args.tenant)
        n = sum(n_have.values()) if args.task is None else n_have.get(args.task, 0)
        if n == 0:
            what = f"task '{args.task}'" if args.task is not None else "any task"
            return _fail("export", f"no examples captured for tenant '{args.tenant}' and {what}")
        written = store.export(args.tenant, args.out, args.task)
    print(f"wrote {written} example(s) to {args.out}")
    return EXIT_OK


def cmd_purge(args: argparse.Namespace) -> int:
    try:
        cfg = _config(args)
    except ConfigError as e:
        return _fail("purge", str(e), EXIT_USAGE)
    with _store(cfg) as store:
        n = store.purge(args.tenant, args.task)
    what = f" of task '{args.task}'" if args.task is not None else ""
    print(f"deleted {n} example(s){what} of tenant '{args.tenant}'")
    return EXIT_OK


def _models_dir() -> Path:
    from appliance.models.provision import models_dir

    return models_dir()


def resolve(ref: str) -> tuple[Path, str, bool]:
    """(file, name, is an adapter) for a trained name (NAME.lora.gguf in the models dir), a path, or a
    model the manifest knows."""
    from appliance.distill.evaluate import gguf_type
    from appliance.models.modelref import resolve_model

    path = Path(ref).expanduser()
    if not path.is_file():
        candidate = _models_dir() / f"{ref}.lora.gguf"
        path = candidate if candidate.is_file() else resolve_model(ref)
    name = path.name.removesuffix(".gguf").removesuffix(".lora")
    return path, name, gguf_type(path) == "adapter"


def _base_of(adapter: Path, name: str, given: str | None) -> Path:
    from appliance.models.modelref import resolve_model

    if given:
        p = Path(given).expanduser()
        return p if p.is_file() else resolve_model(given)
    report = adapter.parent / f"{name}.distill.json"
    if report.is_file():
        base = json.loads(report.read_text("utf-8")).get("base")
        if base and Path(base).is_file():
            return Path(base)
    return resolve_model(None)


def figures_path(path: Path, name: str) -> Path:
    return path.parent / f"{name}.eval.json"


def cmd_eval(args: argparse.Namespace) -> int:
    from appliance.distill.data import DataError
    from appliance.distill.evaluate import evaluate, load_cases
    from appliance.distill.export import read_answers
    from appliance.engine.async_engine import AsyncEngine

    try:
        path, name, is_adapter = resolve(args.model)
        base = _base_of(path, name, args.base) if is_adapter else path
        cases = load_cases(args.data, base)
        answers = read_answers(path) if is_adapter else None
        if args.concurrency < 1:
            raise ValueError(f"--concurrency must be >= 1, got {args.concurrency}")
    except (FileNotFoundError, ValueError) as e:  # DataError is a ValueError
        return _fail("eval", str(e), EXIT_USAGE)
    engine: AsyncEngine | None = None
    try:
        engine = AsyncEngine(base, n_threads=args.threads, early_exit=False, max_seqs=args.concurrency)
        adapter = engine.load_adapter(path) if is_adapter else 0
        result = evaluate(
            engine,
            cases,
            adapter=adapter,
            answers=answers,
            target=args.target,
            val_fraction=args.val_fraction,
            seed=args.seed,
            signal=args.signal,
            concurrency=args.concurrency,
        )
    except DataError as e:
        return _fail("eval", str(e), EXIT_USAGE)
    except (OSError, RuntimeError, ValueError) as e:
        return _fail("eval", f"failed: {e}")
    finally:
        if engine is not None:
            engine.close()
    result.update(
        {"model": name, "adapter": str(path) if is_adapter else None, "base": str(base), "data": str(args.data)}
    )
    if is_adapter and not args.no_save:
        figures_path(path, name).write_text(json.dumps(result, indent=2) + "\n", "utf-8")
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{name}: exact_match {result['exact_match']:.4f} on {result['n']} held-out examples;"
            f" coverage {result['coverage']:.4f} at covered_exact_match {result['covered_exact_match']:.4f}"
            f" ({result['signal']} >= {result['threshold']:.4f},"
            f" calibrated on {result['val_n']} for {args.target} precision);"
            f" p50 {result['p50_ms']:.1f} ms"
        )
    return EXIT_OK


def cmd_promote(args: argparse.Namespace) -> int:
    from appliance.distill.registry import Figures, PromoteRefused, open_registry

    try:
        cfg = _config(args)
    except ConfigError as e:
        return _fail("promote", str(e), EXIT_USAGE)
    known = {t.name for t in cfg.tenants} | {cfg.default_tenant}
    if args.tenant not in known:
        return _fail("promote", f"no tenant '{args.tenant}' in the config (tenants: {', '.join(sorted(known))})", 2)
    directory = cfg.distill.path(cfg.storage)
    if args.demote:
        with open_registry(directory) as reg:
            done = reg.demote(args.tenant, args.task or args.name)
        print(
            f"{args.tenant}/{args.task or args.name}: "
            + ("demoted; the cloud answers it again" if done else "nothing was promoted")
        )
        return EXIT_OK
    try:
        path, name, is_adapter = resolve(args.name)
    except (FileNotFoundError, ValueError) as e:
        return _fail("promote", str(e), EXIT_USAGE)
    if not is_adapter:
        return _fail("promote", f"{path} is not a LoRA adapter (serve a merged model with --model)", EXIT_USAGE)
    task = args.task or name
    fig = figures_path(path, name)
    if not fig.is_file():
        return _fail(
            "promote", f"no held-out figures for {name} ({fig}): run `appliance distill eval --model {name}`", 2
        )
    try:
        data = json.loads(fig.read_text("utf-8"))
        figures = Figures.from_dict(data)
    except ValueError as e:
        return _fail("promote", f"{fig}: {e}", EXIT_USAGE)
    with open_registry(directory) as reg:
        try:
            _, replaced = reg.promote(
                args.tenant, task, name, path.resolve(), figures, base=str(data.get("base") or ""), force=args.force
            )
        except PromoteRefused as e:
            return _fail("promote", f"refused: {e}")
    was = f" (replacing {replaced.name})" if replaced is not None else ""
    print(
        f"{name} serves {args.tenant}/{task}{was}: exact_match {figures.exact_match:.4f}, coverage"
        f" {figures.coverage:.4f}, covered_exact_match {figures.covered_exact_match:.4f},"
        f" threshold {figures.threshold:.4f}"
    )
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from appliance.distill.registry import open_registry

    try:
        cfg = _config(args)
    except ConfigError as e:
        return _fail("status", str(e), EXIT_USAGE)
    with _store(cfg) as store:
        counts = store.counts(args.tenant)
        n, size = store.size(args.tenant)
    with open_registry(cfg.distill.path(cfg.storage)) as reg:
        models = [m.as_dict() for m in reg.models(args.tenant)]
    tasks = list(dict.fromkeys([*cfg.tasks_for(args.tenant), *counts, *(m["task"] for m in models)]))
    out = {
        "tenant": args.tenant,
        "capture": cfg.captures(args.tenant),
        "examples": n,
        "bytes": size,
        "tasks": {t: {"examples": counts.get(t, 0), "models": [m for m in models if m["task"] == t]} for t in tasks},
    }
    if args.json:
        print(json.dumps(out))
        return EXIT_OK
    print(f"tenant {args.tenant}: capture {'on' if out['capture'] else 'off'}, {n} example(s), {size} bytes")
    for t in tasks:
        print(f"  task {t or '(none)'}: {counts.get(t, 0)} example(s)")
        for m in out["tasks"][t]["models"]:
            flag = "promoted" if m["promoted"] else "registered"
            print(
                f"    {m['name']} ({flag}): exact_match {m['exact_match']:.4f}, coverage {m['coverage']:.4f},"
                f" covered_exact_match {m['covered_exact_match']:.4f}, threshold {m['threshold']:.4f}"
            )
    return EXIT_OK

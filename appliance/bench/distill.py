"""What distillation earns: a LoRA task model trained on cloud-style answers to one repeated task,
measured on held-out requests of the same task, and what the cascade saves with it.

The task is intent classification on a text,category CSV (BANKING77's train.csv): shuffled by `seed`,
the first `train` rows are the training data (the trainer holds out 10% of them for validation and
early stopping; the confidence threshold is calibrated on that same held-out part), the remaining rows
are the test set, which neither training nor calibration sees. Prompt `Customer message: {text}\\nIntent:`,
completion ` {label}`.

Measured, in one run:
- `base_exact_match`: the base model as it serves today (free greedy decoding, no adapter);
- `exact_match`: the task model, decoding constrained to the labels it was trained on;
- `coverage` / `covered_exact_match`: the share the confidence rule (smallest logit margin, calibrated
  for `target` precision on the validation part) keeps local, and its accuracy there; the first rule
  (least likely token's log-probability) is reported beside it for comparison;
- `train_seconds`, `train_tokens_per_s` (wall clock, and the process's CPU seconds, since a shared
  machine stretches wall time);
- `saving_vs_cloud`: the cascade as the service runs it (every request tries the task model first, the
  unsure ones go to the cloud) against sending every request to the cloud, at the configured prices;
  only answers that passed the confidence rule count as savings.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from appliance.common.config import PricingConfig
from appliance.distill.data import load_examples, split
from appliance.distill.evaluate import EXTRA_TOKENS, Answer, Case, answer_all, judge, load_cases
from appliance.distill.export import read_answers
from appliance.distill.rule import AUTO, SIGNALS
from appliance.distill.run import distill, output_paths
from appliance.distill.train import TrainConfig

PROMPT = "Customer message: {text}\nIntent:"
NAME = "bench-distill"


@dataclass(frozen=True)
class Split:
    train: Path
    test: Path
    n_train: int
    n_test: int


def write_split(csv_path: Path, work: Path, *, n_train: int, n_test: int | None, seed: int) -> Split:
    """Shuffle the CSV's rows by `seed`; the first `n_train` to train.jsonl, the next `n_test` (all the
    rest by default) to test.jsonl. Raises ValueError naming what is wrong with the CSV."""
    with csv_path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or len(header) < 2:
            raise ValueError(f"{csv_path}: expected a header row 'text,label' (two columns)")
        rows = []
        for lineno, row in enumerate(reader, start=2):
            if len(row) < 2 or not row[0].strip() or not row[1].strip():
                raise ValueError(f"{csv_path}: line {lineno}: expected two non-empty columns (text, label)")
            rows.append((row[0], row[1].strip()))  # the text as given (a stray newline is the data)
    if n_train < 10 or n_train >= len(rows):
        raise ValueError(f"--train {n_train}: must be at least 10 and fewer than the CSV's {len(rows)} rows")
    random.Random(seed).shuffle(rows)
    test = rows[n_train:] if n_test is None else rows[n_train : n_train + n_test]
    if not test:
        raise ValueError("no rows left to test on")
    work.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, part in (("train.jsonl", rows[:n_train]), ("test.jsonl", test)):
        p = work / name
        with p.open("w", encoding="utf-8") as f:
            for text, label in part:
                f.write(json.dumps({"prompt": PROMPT.format(text=text), "completion": f" {label}"}) + "\n")
        paths.append(p)
    return Split(paths[0], paths[1], n_train, len(test))


def saving(test: list[Answer], cases: list[Case], threshold: float, signal: str, pricing: PricingConfig) -> float:
    """Share of the all-cloud cost the cascade saves: every request runs locally first (at the local
    price), the ones the rule keeps are not sent to the cloud. Cloud tokens: the prompt and the
    expected answer, as the local tokenizer counts them."""
    cloud_all = cascade = 0.0
    for a, c in zip(test, cases, strict=True):
        answer_tokens = c.max_tokens - EXTRA_TOKENS  # the expected answer's (end of sequence included)
        cloud = pricing.cloud_cost(len(c.prompt), 0, answer_tokens)
        cloud_all += cloud
        cascade += (len(c.prompt) + answer_tokens) * pricing.local_per_mtok / 1e6
        if not (a.keepable and a.signal(signal) >= threshold):
            cascade += cloud
    return 1.0 - cascade / cloud_all if cloud_all > 0 else 0.0


def _progress(what: str, out: TextIO) -> Any:
    last = [0.0]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if done == total or now - last[0] >= 10:
            last[0] = now
            print(f"bench distill: {what} {done}/{total}", file=out, flush=True)

    return report


def bench_distill(
    model: str,
    threads: int,
    csv_path: Path,
    work: Path,
    *,
    n_train: int = 3000,
    n_test: int | None = None,
    n_base: int = 300,
    seed: int = 0,
    cfg: TrainConfig | None = None,
    adapter: Path | None = None,
    target: float = 0.97,
    pricing: PricingConfig | None = None,
    concurrency: int = 8,
    log: TextIO | None = None,
) -> dict[str, Any]:
    from appliance.engine.async_engine import AsyncEngine

    out = sys.stderr if log is None else log
    cfg = cfg or TrainConfig(epochs=3, lr=5e-4, layers=9, threads=threads, seed=seed)
    pricing = pricing or PricingConfig()
    sp = write_split(csv_path, work, n_train=n_train, n_test=n_test, seed=seed)
    print(f"bench distill: {sp.n_train} training rows, {sp.n_test} test rows -> {work}", file=out, flush=True)

    if adapter is None:  # train now
        outputs = output_paths(str(work / NAME), work)
        report = distill(sp.train, model, outputs, cfg, log=out)
        adapter = outputs.adapter
    else:  # reuse one trained on this same split: its report says how training went
        report_path = adapter.with_name(adapter.name.removesuffix(".lora.gguf") + ".distill.json")
        report = json.loads(report_path.read_text("utf-8"))
        if report.get("data_sha256") != hashlib.sha256(sp.train.read_bytes()).hexdigest():
            raise ValueError(f"{adapter} was not trained on this split (--seed/--train differ)")
    answers = read_answers(adapter)

    # the validation part the trainer held out, as cases (calibration); the test rows (measurement)
    held = {e.line for e in split(load_examples(sp.train, model), seed=cfg.seed, val_fraction=cfg.val_fraction)[1]}
    val_cases = [c for c in load_cases(sp.train, model) if c.line in held]
    test_cases = load_cases(sp.test, model)

    engine = AsyncEngine(model, n_threads=threads, early_exit=False, max_seqs=concurrency)
    try:
        aid = engine.load_adapter(adapter)
        t0 = time.monotonic()
        base = answer_all(engine, test_cases[:n_base], concurrency=concurrency, progress=_progress("base model", out))
        base_s = time.monotonic() - t0
        val = answer_all(
            engine,
            val_cases,
            adapter=aid,
            answers=answers,
            concurrency=concurrency,
            progress=_progress("validation", out),
        )
        t0 = time.monotonic()
        test = answer_all(
            engine, test_cases, adapter=aid, answers=answers, concurrency=concurrency, progress=_progress("test", out)
        )
        test_s = time.monotonic() - t0
    finally:
        engine.close()

    # the rule as `distill eval` calibrates it by default (the signal chosen on the validation rows
    # alone), and each signal's own rule for comparison
    rule = judge(test, val, target=target, signal=AUTO)
    each = {s: judge(test, val, target=target, signal=s) for s in SIGNALS}
    cpu = report.get("cpu_seconds")
    return {
        "model": model,
        "threads": threads,
        "train_examples": report["train_examples"],
        "val_examples": report["val_examples"],
        "test_examples": len(test),
        "labels": len(answers) if answers else 0,
        "base_exact_match": round(sum(a.right for a in base) / len(base), 4) if base else None,
        "base_n": len(base),
        "exact_match": round(rule["exact_match"], 4),
        "coverage": round(rule["coverage"], 4),
        "covered_exact_match": round(rule["covered_exact_match"], 4),
        "threshold": rule["threshold"],
        "signal": rule["signal"],
        "target_precision": target,
        "val": rule["val"],
        **{
            f"{s}_rule": {k: r[k] for k in ("coverage", "covered_exact_match", "threshold", "val")}
            for s, r in each.items()
        },
        "train_seconds": report["seconds"],
        "train_cpu_seconds": cpu,
        "train_tokens_per_s": report["tokens_per_s"],
        "train_tokens": report["train_tokens"],
        "epochs_run": report["epochs_run"],
        "val_loss_before": report["val_loss_before"],
        "val_loss_after": report["val_loss_after"],
        "load_seconds": report["load_seconds"],
        "saving_vs_cloud": round(saving(test, test_cases, rule["threshold"], rule["signal"], pricing), 4),
        "prices_per_mtok": {"input": pricing.input_per_mtok, "output": pricing.output_per_mtok},
        "answer_p50_ms": rule["p50_ms"],
        "test_seconds": round(test_s, 1),
        "base_seconds": round(base_s, 1),
        "config": report.get("config"),
        "adapter": str(adapter),
    }

"""The router's parts: cheap features, the embedding classifier (trained on the shipped examples, checked
on held-out questions), the cascade's confidence check, budgets, policies, and the CLI."""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import random
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.cache import GgufEmbedder
from appliance.cli import route as cli_route
from appliance.common.config import BudgetConfig, Config, PricingConfig, RouteConfig, parse_config
from appliance.common.errors import FailedPrecondition
from appliance.common.ledger import Ledger
from appliance.common.types import Request, Result, Usage
from appliance.route.budget import Budget, month_start
from appliance.route.cascade import TokenScores, assess, repetition
from appliance.route.classifier import RouterModel, TrainingDataError, read_labelled, shipped_csv, train
from appliance.route.features import extract
from appliance.route.router import Router
from appliance.route.stage import Routing

BANKING77 = Path(__file__).resolve().parents[2] / "shared" / "data" / "banking77" / "train.csv"
HARD_HELD_OUT = shipped_csv().parent / "hard_eval.csv"


@pytest.fixture(scope="module")
def embedder() -> Iterator[GgufEmbedder]:
    with GgufEmbedder(n_threads=1) as emb:
        yield emb


@pytest.fixture(scope="module")
def shipped(embedder: GgufEmbedder) -> RouterModel:
    texts, labels = read_labelled(shipped_csv())
    return train(texts, labels, embedder, "default.csv")


def held_out() -> list[tuple[str, str]]:
    """Questions the shipped data does not contain: real BANKING77 queries (local), hard ones (cloud)."""
    with BANKING77.open() as f:
        support = [r["text"] for r in csv.DictReader(f)]
    random.Random(7).shuffle(support)
    hard, _ = read_labelled(HARD_HELD_OUT)
    return [(t, "local") for t in support[:120]] + [(t, "cloud") for t in hard]


def test_features_kind_length_language() -> None:
    assert extract("Write a Python function that merges intervals").kind == "code"
    assert extract("Solve x^2 - 4 = 0").kind == "math"
    assert extract("Compare the trade-offs of two designs").kind == "multi_step"
    assert extract("Extract every date from this letter").kind == "extraction"
    assert extract("Hello there!").kind == "chit_chat"
    assert extract("Where is my card?").kind == "question"
    assert extract("Explique en détail comment fonctionne le protocole").language == "other"
    assert extract("How do I reset my password?").language == "en"
    f = extract("one two three")
    assert (f.words, f.chars) == (3, 13)


def test_classifier_generalises_to_held_out_questions(shipped: RouterModel, embedder: GgufEmbedder) -> None:
    rows = held_out()
    router = Router(shipped, embedder, 0.5)
    right = sum(router.decide(t, "auto").route == label for t, label in rows)
    assert right / len(rows) >= 0.9, f"held-out accuracy {right / len(rows):.3f}"
    features_only = Router(shipped, None, 0.5)  # no embedding model: the cheap features alone
    right_f = sum(features_only.decide(t, "auto").route == label for t, label in rows)
    assert right_f / len(rows) >= 0.7, f"features-only held-out accuracy {right_f / len(rows):.3f}"


def test_model_round_trips_and_policies_override(shipped: RouterModel, embedder: GgufEmbedder, tmp_path: Path) -> None:
    shipped.save(tmp_path / "m.npz")
    loaded = RouterModel.load(tmp_path / "m.npz")
    text = "Derive the gradient of the softmax cross-entropy loss"
    assert loaded.p_cloud(text, embedder) == pytest.approx(shipped.p_cloud(text, embedder), abs=1e-6)
    router = Router(loaded, embedder, 0.5)
    assert router.decide(text, "local_only").route == "local"
    assert router.decide("hi", "cloud_only").route == "cloud"
    d = router.decide(text, "auto")
    assert d.route == "cloud" and d.reason == "router" and d.kind == "math"
    (tmp_path / "bad.npz").write_bytes(b"not a model")
    with pytest.raises(TrainingDataError, match="retrain"):
        RouterModel.load(tmp_path / "bad.npz")


def test_training_data_errors_name_file_and_row(tmp_path: Path) -> None:
    p = tmp_path / "t.csv"
    p.write_text("text,label\nhello,local\nhard one,maybe\n")
    with pytest.raises(TrainingDataError, match=r"t\.csv:3: label must be 'local' or 'cloud'"):
        read_labelled(p)
    p.write_text("text,label\nhello,local\nbye,local\n")
    texts, labels = read_labelled(p)
    with pytest.raises(TrainingDataError, match="both labels"):
        train(texts, labels, None, "t.csv")


def test_cascade_confidence_signals() -> None:
    cfg = RouteConfig()
    fine = assess("You can change your PIN at any cash machine that shows the card network's logo.", "stop", cfg)
    assert not fine.escalate and fine.score == pytest.approx(1.0)
    loop = "I can help you with that. " * 8
    assert repetition(loop) > 0.6
    looping = assess(loop, "stop", cfg)
    assert looping.escalate and "repetition" in looping.why
    cut = assess("The answer has three parts: first, the", "length", cfg)
    assert cut.escalate and cut.truncated and "truncated" in cut.why
    assert not assess(
        "The answer has three parts: first, the", "length", RouteConfig(escalate_truncated=False)
    ).escalate
    assert assess("  ", "stop", cfg).escalate
    # token scores: an unsure answer escalates on its mean log-probability or entropy, a sure one not
    sure, unsure = TokenScores(), TokenScores()
    for _ in range(10):
        sure.add(-0.2, 0.8)
        unsure.add(-3.0, 5.0)
    sure.add(None, None)  # unscored tokens do not count
    ok = assess("The card arrives in a week.", "stop", cfg, sure)
    assert not ok.escalate and ok.mean_logprob == pytest.approx(-0.2) and ok.mean_entropy == pytest.approx(0.8)
    bad = assess("The card arrives in a week.", "stop", cfg, unsure)
    assert bad.escalate and "mean logprob" in bad.why and "mean entropy" in bad.why
    # the start of an answer: not empty, not truncated yet
    start = assess("", "length", cfg, sure, partial=True)
    assert not start.escalate and not start.truncated


def test_budget_from_the_ledger(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite", "cloud-x")
    pricing = PricingConfig(input_per_mtok=1.0, output_per_mtok=1.0)
    budget = Budget(ledger, pricing)
    spent = Result(request_id="r1", text="x", route="cloud", model="m", finish_reason="stop", usage=Usage(cost=0.5))
    asyncio.run(ledger.record("acme", spent))
    assert ledger.cloud_spend("acme", month_start()) == pytest.approx(0.5)
    assert ledger.cloud_spend("other", month_start()) == 0
    ok = asyncio.run(budget.refusal("acme", BudgetConfig(monthly=1.0), 100, 100, None))
    over = asyncio.run(budget.refusal("acme", BudgetConfig(monthly=0.5001), 100, 100, None))
    request = asyncio.run(budget.refusal("acme", BudgetConfig(per_request=1e-5), 100, 100, None))
    caller = asyncio.run(budget.refusal("acme", BudgetConfig(), 100, 100, 1e-5))
    assert (ok, over, request, caller) == (None, "budget_monthly", "budget_request", "budget_request")
    ledger.close()


def test_old_ledger_gains_the_new_columns(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE requests (tenant TEXT, request_id TEXT, ts REAL, session_id TEXT, route TEXT, model TEXT,"
        " cloud_model TEXT, finish_reason TEXT, prompt_tokens INT, cached_tokens INT, completion_tokens INT,"
        " summary_saved_tokens INT, early_exit_tokens INT, latency_ms REAL, cost REAL, counterfactual_cost REAL,"
        " PRIMARY KEY (tenant, request_id))"
    )
    conn.commit()
    conn.close()
    ledger = Ledger(path, "cloud-x")
    r = Result(
        request_id="r",
        text="",
        route="local",
        model="m",
        finish_reason="stop",
        usage=Usage(),
        degraded=True,
        route_reason="no_cloud",
    )
    asyncio.run(ledger.record("t", r))
    row = ledger.rows("t")[0]
    assert row["degraded"] == 1 and row["route_reason"] == "no_cloud"
    ledger.close()


def test_tenant_policy_and_missing_cloud(shipped: RouterModel, tmp_path: Path) -> None:
    token = "0" * 64
    cfg = parse_config(
        f'[[tenants]]\nname = "a"\ntoken_sha256 = "{token}"\nroute_policy = "local_only"\n'
        f'[[tenants]]\nname = "b"\ntoken_sha256 = "{"1" * 64}"\n'
    )
    ledger = Ledger(tmp_path / "l.sqlite", "c")
    routing = Routing(cfg, Router(shipped, None, 0.5), None, Budget(ledger, cfg.pricing))
    hard = "Prove that the square root of 2 is irrational, step by step."
    a = asyncio.run(routing.decide(Request(request_id="1", tenant="a", prompt=hard)))
    b = asyncio.run(routing.decide(Request(request_id="2", tenant="b", prompt=hard)))
    assert (a.route, a.reason, a.degraded) == ("local", "policy", False)
    assert (b.route, b.reason, b.degraded) == ("local", "no_cloud", True)  # air-gapped: local, flagged
    with pytest.raises(FailedPrecondition, match="cloud_only"):
        asyncio.run(routing.decide(Request(request_id="3", tenant="b", prompt=hard, route_policy="cloud_only")))
    assert Config().policy_for("nobody") == "auto"
    ledger.close()


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="appliance")
    cli_route.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    rc = args.func(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_train_then_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "router.npz"
    rc, out, _ = _cli(["router", "train", "--csv", str(shipped_csv()), "--out", str(model), "--json"], capsys)
    summary = json.loads(out)
    assert rc == 0 and model.is_file() and summary["rows"] == 134 and summary["training_accuracy"] >= 0.95
    rows = tmp_path / "eval.csv"
    with rows.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(held_out())
    rc, out, _ = _cli(["route", "eval", "--csv", str(rows), "--model", str(model), "--json"], capsys)
    report = json.loads(out)
    assert rc == 0 and report["rows"] == 160 and len(report["decisions"]) == 160
    assert 0.2 <= report["share_cloud"] <= 0.35 and report["accuracy"] >= 0.9
    assert 0 < report["cost"] < report["cost_all_cloud"] and report["saving"] > 0.5
    bad = tmp_path / "bad.csv"
    bad.write_text("words\nhello\n")
    rc, _, err = _cli(["router", "train", "--csv", str(bad), "--out", str(model)], capsys)
    assert rc == 2 and "needs a header with a 'text' column" in err


def test_cli_cascade_eval_on_a_model(tiny_model: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The tiny random model's answers are unsure from the first check: every one would be cut at 16
    tokens, and every whole answer escalates; per-label summaries and per-answer figures are there."""
    rows = tmp_path / "q.csv"
    rows.write_text("text,label\nWhere is my card?,local\nProve the theorem.,cloud\nHello there,local\n")
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(f'[model]\npath = "{tiny_model("gemma3")}"\nthreads = 1\n')
    argv = ["route", "cascade-eval", "--csv", str(rows), "-c", str(cfg), "--max-tokens", "32", "--json"]
    rc, out, err = _cli(argv, capsys)
    report = json.loads(out)
    assert rc == 0 and report["answers"] == 3 and len(report["rows"]) == 3 and "answered 3/3" in err
    assert report["escalated_by_tokens"] == {"16": 1.0, "32": 1.0} and report["escalated_whole"] == 1.0
    assert "mean entropy" in report["whole_reasons"]
    assert report["by_label"]["local"]["answers"] == 2 and report["by_label"]["cloud"]["answers"] == 1
    assert all(r["cut_at"] == 16 and r["mean_entropy"] > 4.0 for r in report["rows"])
    rc, _, err = _cli(["route", "cascade-eval", "--csv", str(rows), "-c", str(cfg), "--max-tokens", "0"], capsys)
    assert rc == 2 and "--max-tokens" in err

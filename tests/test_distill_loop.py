"""The distillation loop around the service (issue 16 items 1, 2, 5; issue 17's service part): cloud
answers captured per tenant and bounded, exported as the training reader's JSONL, task names
(unknown: NOT_FOUND listing what exists), task models evaluated and promoted (a worse one refused),
and a running service that serves a promoted task under its LoRA adapter when confident and asks a
real loopback HTTP "cloud" otherwise, capturing that answer."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from fake_cloud import Answer, FakeCloud, openai_stream
from test_adapters import write_adapter
from test_service_support import TOKENS, ServerProcess, ledger_row, write_config
from tinymodels import tiny_config

from appliance.cli.main import main
from appliance.distill.capture import Limits, TeacherStore
from appliance.distill.data import load_examples, read_jsonl
from appliance.distill.evaluate import NEVER, calibrate, figures, judge
from appliance.distill.evaluate import Answer as EvalAnswer
from appliance.distill.registry import Figures, PromoteRefused, Registry

ROUTE_LOCAL, ROUTE_CLOUD = 2, 3
LOCAL_ONLY = 1
PROMPT = "Customer message: my card was stolen\nIntent:"


@pytest.fixture(scope="module")
def tiny(tiny_model: Any) -> Path:
    path: Path = tiny_model("gemma3", n_ctx_train=8192)
    return path


@pytest.fixture(scope="module")
def adapter(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("adapters")
    return write_adapter(d / "triage-v1.lora.gguf", tiny_config("gemma3", n_layer=2, n_ctx_train=8192), seed=1)


# ------------------------------------------------------------------ capture


def test_capture_is_per_tenant_and_bounded(tmp_path: Path) -> None:
    store = TeacherStore(tmp_path / "teacher.sqlite", Limits(retention_days=1.0, max_examples=3, max_bytes=10_000))
    t0 = 1_000_000.0
    for i in range(5):
        assert store.add("acme", f"answer {i}", task="triage", prompt=f"acme prompt {i}", now=t0 + i)
    assert store.add("globex", "g0", task="triage", messages=[{"role": "user", "content": "hi"}], now=t0)
    assert not store.add("acme", "  ", prompt="p", now=t0)  # nothing to learn from an empty answer
    # max_examples: acme keeps its 3 newest; globex is untouched
    assert [e.answer for e in store.examples("acme")] == ["answer 2", "answer 3", "answer 4"]
    assert [e.answer for e in store.examples("globex")] == ["g0"]
    # retention: a day later acme's old examples go when it adds one; globex's only when it is enforced
    assert store.add("acme", "late", task="other", prompt="p", now=t0 + 86400 + 3.5)
    assert [e.answer for e in store.examples("acme")] == ["answer 4", "late"]
    assert store.counts("globex") == {"triage": 1}
    assert store.expire(now=t0 + 86400 + 10) == 2 and store.counts("globex") == {}  # and acme's "answer 4"
    assert [e.answer for e in store.examples("acme")] == ["late"]
    # the size budget: the newest examples that fit stay
    small = TeacherStore(tmp_path / "small.sqlite", Limits(retention_days=0, max_examples=100, max_bytes=100))
    for i in range(6):
        small.add("acme", "a" * 20, prompt=f"p{i}" + "x" * 18, now=t0 + i)  # 40 bytes each
    assert small.size("acme") == (2, 80)
    assert not small.add("acme", "a" * 200, prompt="p")  # bigger than the whole budget: not kept
    # purge is per tenant (and task)
    store.add("globex", "g1", task="triage", prompt="q", now=t0 + 86400 + 20)
    store.add("acme", "a1", task="triage", prompt="q", now=t0 + 86400 + 20)
    assert store.purge("acme", "triage") == 1 and store.counts("acme") == {"other": 1}
    assert store.counts("globex") == {"triage": 1}
    assert store.purge("acme") == 1 and store.counts("acme") == {} and store.counts("globex") == {"triage": 1}
    store.close()
    small.close()


def test_export_round_trips_through_the_training_reader(tmp_path: Path, tiny: Path) -> None:
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(f'[storage]\ndir = "{tmp_path / "state"}"\n')
    with TeacherStore(tmp_path / "state" / "teacher.sqlite") as store:
        store.add("acme", " lost_card", task="triage", prompt=PROMPT, request_id="r1")
        msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Is my card on its way?"}]
        store.add("acme", "card_arrival", task="triage", messages=msgs, request_id="r2")
        store.add("acme", "other task", task="summaries", prompt="Summarize: x")
        store.add("globex", "never exported for acme", task="triage", prompt="globex secret")
    out = tmp_path / "triage.jsonl"
    assert main(["distill", "export", "-c", str(cfg), "--tenant", "acme", "--task", "triage", "--out", str(out)]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert lines == [
        {"prompt": PROMPT, "completion": " lost_card"},
        {"messages": [*msgs, {"role": "assistant", "content": "card_arrival"}]},
    ]
    parsed = read_jsonl(out)
    assert [kind for _, (kind, _) in parsed] == ["pc", "messages"]
    examples = load_examples(out, tiny)  # tokenized as training would
    assert len(examples) == 2 and all(e.answer for e in examples)
    everything = tmp_path / "all.jsonl"
    assert main(["distill", "export", "-c", str(cfg), "--tenant", "acme", "--out", str(everything)]) == 0
    assert len(everything.read_text().splitlines()) == 3
    assert main(["distill", "export", "-c", str(cfg), "--tenant", "nobody", "--out", str(tmp_path / "n.jsonl")]) == 1
    assert main(["distill", "purge", "-c", str(cfg), "--tenant", "acme", "--task", "triage"]) == 0
    with TeacherStore(tmp_path / "state" / "teacher.sqlite") as store:
        assert store.counts("acme") == {"summaries": 1} and store.counts("globex") == {"triage": 1}


# ------------------------------------------------------------------ eval and promote


def test_calibration_keeps_the_share_at_the_target_precision() -> None:
    rows = [(-0.1, 0.5, True), (-0.2, 3.0, True), (-0.5, 2.0, False), (-0.05, 4.0, True)]
    answers = [EvalAnswer("x", low, True, 1.0, right, margin) for low, margin, right in rows]
    assert calibrate(answers, 0.97, "logprob") == -0.2
    f = figures(answers, -0.2, "logprob")
    assert f["coverage"] == pytest.approx(3 / 4) and f["covered_exact_match"] == 1.0
    assert calibrate(answers, 0.97, "margin") == 3.0  # the margin rule ranks them differently
    f = figures(answers, 3.0, "margin")
    assert f["coverage"] == pytest.approx(2 / 4) and f["covered_exact_match"] == 1.0
    assert calibrate([EvalAnswer("x", -0.1, True, 1.0, False, 9.0)], 0.97) == NEVER
    with pytest.raises(ValueError, match="signal"):
        judge(answers, answers, signal="vibes")
    # auto: the calibration set decides (logprob keeps 3 of 4 here, margin 2); the measured set does not
    chosen = judge(answers[:1], answers, signal="auto")
    assert chosen["signal"] == "logprob" and chosen["threshold"] == -0.2 and chosen["val"]["coverage"] == 0.75
    # the two signals' rankings swapped: margin keeps 3 of 4, logprob 1
    flipped = [EvalAnswer("x", -a.margin / 10, True, 1.0, a.right, 10 + 10 * a.low) for a in answers]
    assert judge(answers, flipped, signal="auto")["signal"] == "margin"
    tie = [EvalAnswer("x", -0.1, True, 1.0, True, 1.0)]
    assert judge(tie, tie, signal="auto")["signal"] == "margin"  # a tie keeps the default


def test_eval_then_promote_refuses_a_worse_model(tmp_path: Path, tiny: Path, adapter: Path) -> None:
    data = tmp_path / "held.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"Customer message: {w}\nIntent:", "completion": " x"}) + "\n" for w in "abcdef")
    )
    models = tmp_path / "models"
    models.mkdir()
    good = models / "triage-v1.lora.gguf"
    good.write_bytes(adapter.read_bytes())
    rc = main(["distill", "eval", "--model", str(good), "--base", str(tiny), "--data", str(data), "--threads", "1"])
    assert rc == 0
    fig = json.loads((models / "triage-v1.eval.json").read_text())
    for key in ("exact_match", "n", "coverage", "covered_exact_match", "p50_ms", "threshold"):
        assert key in fig
    assert fig["n"] == 4 and fig["val_n"] == 2 and 0 <= fig["coverage"] <= 1 and fig["p50_ms"] > 0

    cfg = tmp_path / "appliance.toml"
    cfg.write_text(
        f'[storage]\ndir = "{tmp_path / "state"}"\n[[tenants]]\nname = "acme"\ntoken_sha256 = "{"0" * 64}"\n'
    )
    strong = {"exact_match": 0.9, "coverage": 0.8, "covered_exact_match": 0.99, "threshold": -0.5, "n": 100}
    (models / "triage-v1.eval.json").write_text(json.dumps(strong))
    worse = models / "triage-v2.lora.gguf"
    worse.write_bytes(adapter.read_bytes())
    (models / "triage-v2.eval.json").write_text(json.dumps({**strong, "exact_match": 0.85}))
    promote = ["distill", "promote", "-c", str(cfg), "--tenant", "acme", "--task", "triage"]
    assert main([*promote, str(good)]) == 0
    assert main([*promote, str(worse)]) == 1  # refused: lower exact match than what serves now
    assert main(["distill", "promote", "-c", str(cfg), "--tenant", "nobody", str(good)]) == 2
    with Registry(tmp_path / "state" / "tasks.sqlite") as reg:
        serving = reg.serving("acme", "triage")
        assert serving is not None and serving.name == "triage-v1" and serving.figures.threshold == -0.5
        better = Figures(exact_match=0.95, coverage=0.85, covered_exact_match=0.99, threshold=-0.4)
        with pytest.raises(PromoteRefused, match="covered_exact_match"):
            reg.promote("acme", "triage", "v3", worse, Figures(0.95, 0.9, 0.9, -1.0))
        _, replaced = reg.promote("acme", "triage", "v4", worse, better)
        assert replaced is not None and replaced.name == "triage-v1"
        assert [m.name for m in reg.promoted("acme")] == ["v4"]


# ------------------------------------------------------------------ the service


@pytest.fixture(scope="module")
def cloud() -> Iterator[FakeCloud]:
    c = FakeCloud()
    yield c
    c.close()


@pytest.fixture(scope="module")
def served(tiny: Path, cloud: FakeCloud, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    d = tmp_path_factory.mktemp("distill-srv")
    cfg = write_config(d / "appliance.toml", tiny, server={"http": "127.0.0.1:0"})
    text = cfg.read_text().replace('name = "acme"\n', 'name = "acme"\ncapture = true\n')  # globex: no capture
    text += '[distill]\ntasks = ["triage", "intents"]\nreload_s = 0.2\nmax_examples = 50\n'
    text += f'[cloud]\nprovider = "openai"\nbase_url = "{cloud.url}"\nmodel = "gpt-test"\nmax_retries = 0\n'
    text += "[route]\ncascade = false\n"
    cfg.write_text(text)
    srv = ServerProcess(cfg)
    yield srv
    assert srv.stop() == 0


def _cloud_answer(cloud: FakeCloud, text: str) -> None:
    usage = {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
    cloud.script.append(Answer(events=openai_stream([text], usage)))


def _http(srv: ServerProcess, path: str, body: dict[str, Any] | None = None, tenant: str = "acme") -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{srv.http_port}{path}", data=data)
    req.add_header("content-type", "application/json")
    req.add_header("authorization", f"Bearer {TOKENS[tenant]}")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            raw = r.read()
            return r.status, json.loads(raw) if raw.startswith(b"{") else raw.decode()
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _teacher(srv: ServerProcess, tenant: str) -> list[Any]:
    with TeacherStore(srv.config.parent / "state" / "teacher.sqlite") as store:
        return list(store.examples(tenant))


def test_unknown_task_is_not_found_listing_what_exists(served: ServerProcess) -> None:
    with served.client("acme") as c:
        with pytest.raises(grpc.RpcError) as err:
            c.generate(prompt=PROMPT, model="no-such-task", max_tokens=4)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-task" in err.value.details() and "triage" in err.value.details()
    status, body = _http(served, "/v1/completions", {"model": "no-such-task", "prompt": PROMPT, "max_tokens": 4})
    assert status == 404 and "triage" in body["error"]["message"]
    status, body = _http(served, "/v1/models")
    ids = [m["id"] for m in body["data"]]
    assert "triage" in ids and "intents" in ids and "appliance" in ids


def test_a_task_goes_to_the_cloud_and_is_captured_per_tenant(served: ServerProcess, cloud: FakeCloud) -> None:
    _cloud_answer(cloud, " lost_or_stolen_card")
    _cloud_answer(cloud, " globex answer")
    with served.client("acme") as c:
        r = c.generate(prompt=PROMPT, model="triage", max_tokens=8, request_id="t-cloud-1")
    with served.client("globex") as c:  # globex did not opt in: served, not captured
        g = c.generate(prompt=PROMPT, model="triage", max_tokens=8, request_id="t-cloud-2")
    assert r.route == ROUTE_CLOUD and r.route_reason == "task" and r.text == " lost_or_stolen_card"
    assert g.route == ROUTE_CLOUD and g.text == " globex answer"
    assert ledger_row(served, "t-cloud-1")["task"] == "triage"
    mine = [e for e in _teacher(served, "acme") if e.request_id == "t-cloud-1"]
    assert len(mine) == 1 and mine[0].task == "triage" and mine[0].prompt == PROMPT
    assert mine[0].answer == " lost_or_stolen_card" and mine[0].model == "gpt-test"
    assert _teacher(served, "globex") == []
    _cloud_answer(cloud, " card_arrival")  # the HTTP face names tasks the same way
    msgs = [{"role": "user", "content": "Where is my new card?"}]
    status, body = _http(served, "/v1/chat/completions", {"model": "triage", "messages": msgs, "max_tokens": 8})
    assert status == 200 and body["choices"][0]["message"]["content"] == " card_arrival"
    chat = [e for e in _teacher(served, "acme") if e.answer == " card_arrival"]
    assert len(chat) == 1 and chat[0].task == "triage" and chat[0].messages[-1]["content"] == msgs[0]["content"]


def test_a_promoted_task_is_served_under_its_adapter_and_escalates_when_unsure(
    served: ServerProcess, cloud: FakeCloud, adapter: Path
) -> None:
    state = served.config.parent / "state"
    with Registry(state / "tasks.sqlite") as reg:  # promoted while the service runs
        reg.promote("acme", "triage", "triage-v1", adapter, Figures(0.9, 0.8, 0.99, threshold=-1e9, n=10))
        reg.promote("acme", "intents", "intents-v1", adapter, Figures(0.9, 0.8, 0.99, threshold=NEVER, n=10))
    time.sleep(0.5)  # reload_s = 0.2
    ask = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0, "cache_policy": 1}
    with served.client("acme") as c:
        base = c.generate(**ask, route_policy=LOCAL_ONLY)
        probe = c.generate(**ask, model="triage", route_policy=LOCAL_ONLY)
        assert probe.route == ROUTE_LOCAL and probe.model == "triage-v1"
        assert probe.text != base.text  # the adapter changes the answer
        stop: list[str] = []
        if probe.finish_reason != "stop":  # make the greedy answer end by itself: stop at a later letter
            i = next(i for i, ch in enumerate(probe.text) if i > 0 and ch.isalpha() and probe.text[:i].strip())
            stop = [probe.text[i]]
        sure = c.generate(**ask, model="triage", stop=stop, request_id="t-sure")
        _cloud_answer(cloud, " card_lost")
        unsure = c.generate(**ask, model="intents", stop=stop, request_id="t-unsure")
    assert sure.route == ROUTE_LOCAL and sure.model == "triage-v1" and sure.route_reason == "task_model"
    assert sure.text and probe.text.startswith(sure.text) and sure.finish_reason == "stop"
    row = ledger_row(served, "t-sure")
    assert row["task"] == "triage" and row["confident"] == 1 and row["model"] == "triage-v1"
    assert unsure.route == ROUTE_CLOUD and unsure.route_reason == "task_unsure" and unsure.text == " card_lost"
    assert ledger_row(served, "t-unsure")["task"] == "intents"
    captured = [e for e in _teacher(served, "acme") if e.request_id == "t-unsure"]
    assert len(captured) == 1 and captured[0].task == "intents" and captured[0].answer == " card_lost"
    # the prometheus counters per task and adapter
    status, metrics = _http(served, "/metrics")
    assert status == 200
    assert 'appliance_task_requests_total{task="triage",model="triage-v1",route="local",confident="true"} 1' in metrics
    assert 'appliance_task_requests_total{task="intents",model="gpt-test",route="cloud",confident=""} 1' in metrics
    assert "appliance_task_models_loaded 2" in metrics


def test_report_shows_each_tasks_local_share_and_accuracy(
    served: ServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert main(["report", "-c", str(served.config), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    tasks = {(t["tenant"], t["task"]): t for t in rep["tasks"]}
    triage = tasks[("acme", "triage")]  # two cloud answers, the local_only probe, the confident answer
    assert (triage["requests"], triage["local"], triage["cloud"], triage["confident"]) == (4, 2, 2, 1)
    assert triage["model"] == "triage-v1" and triage["accuracy"] == pytest.approx(0.99)
    assert tasks[("acme", "intents")]["cloud"] == 1 and tasks[("globex", "triage")]["local_share"] == 0.0


def test_a_task_model_named_itself_is_served_under_its_adapter_as_asked(served: ServerProcess) -> None:
    """By its own name a task model answers locally under its adapter, without the confidence rule
    (intents-v1's rule would send every answer to the cloud); an unknown name lists the models."""
    ask = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "cache_policy": 1}
    with served.client("acme") as c:
        by_name = c.generate(**ask, model="intents-v1", request_id="t-named")
        by_task = c.generate(**ask, model="triage", route_policy=LOCAL_ONLY)
        with pytest.raises(grpc.RpcError) as err:
            c.generate(**ask, model="intents-v9")
    assert by_name.route == ROUTE_LOCAL and by_name.model == "intents-v1" and by_name.route_reason == "task_model_named"
    assert by_name.text == by_task.text  # the same adapter (both registered models are this file)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "intents-v1" in (err.value.details() or "")
    assert ledger_row(served, "t-named")["model"] == "intents-v1"

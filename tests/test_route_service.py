"""Routing through the real service: an `appliance serve` child on a tiny local model, with
llama-cpp-python's OpenAI-compatible server on the default model as its "cloud" (both real processes
on loopback), and a cloud that cannot be reached."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_service_support import ServerProcess, write_config

from appliance.bench.common import free_port, start_llama_server

HARD = "Prove by contradiction that there are infinitely many primes, and explain every step of the argument."
EASY = "My card has not arrived yet, what should I do?"
ROUTE_CLOUD, ROUTE_LOCAL = 3, 2
CLOUD_ONLY, LOCAL_ONLY = 2, 1


@pytest.fixture(scope="module")
def llama_cloud(default_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`python -m llama_cpp.server` on the default model: a real OpenAI-compatible endpoint."""
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    proc, url = start_llama_server(str(default_model), log, alias="cloud-gemma")
    yield url
    proc.terminate()
    proc.wait(30)


def _server(d: Path, tiny: Path, cloud_url: str, extra: str = "") -> ServerProcess:
    cfg = write_config(d / "appliance.toml", tiny, cache=True)
    text = cfg.read_text()
    text += "[tenants.budget]\nmonthly = 0.000000001\n"  # globex (the last tenant): a spent budget
    text += f'[cloud]\nprovider = "openai"\nbase_url = "{cloud_url}"\nmodel = "cloud-gemma"\nmax_retries = 1\n'
    text += "backoff_s = 0.01\ntimeout_s = 60\n[pricing]\ninput_per_mtok = 3.0\noutput_per_mtok = 15.0\n" + extra
    cfg.write_text(text)
    return ServerProcess(cfg)


@pytest.fixture(scope="module")
def served(tiny_model: Any, llama_cloud: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = _server(tmp_path_factory.mktemp("route-srv"), tiny_model("gemma3"), llama_cloud)
    yield srv
    assert srv.stop() == 0


def _ledger(srv: ServerProcess, request_id: str) -> sqlite3.Row:
    conn = sqlite3.connect(srv.config.parent / "state" / "ledger.sqlite")
    conn.row_factory = sqlite3.Row
    try:
        row: sqlite3.Row = conn.execute("SELECT * FROM requests WHERE request_id=?", (request_id,)).fetchone()
    finally:
        conn.close()
    return row


def test_cloud_only_streams_the_cloud_answer_and_prices_it(served: ServerProcess) -> None:
    with served.client("acme") as c:
        chunks = list(
            c.stream(
                messages=[("user", "Name three colours.")],
                max_tokens=16,
                temperature=0,
                route_policy=CLOUD_ONLY,
                request_id="cloud-1",
                cache_policy=1,
            )
        )
    final = chunks[-1].final
    assert final.route == ROUTE_CLOUD and final.model == "cloud-gemma" and final.route_reason == "policy"
    assert "".join(ch.delta for ch in chunks[:-1]) == final.text and final.text
    assert final.usage.completion_tokens > 0 and final.usage.prompt_tokens > 0
    assert final.usage.cost == pytest.approx(final.usage.counterfactual_cost) and final.usage.cost > 0
    row = _ledger(served, "cloud-1")
    assert row["route"] == "cloud" and row["route_reason"] == "policy" and row["degraded"] == 0
    assert row["cost"] == pytest.approx(final.usage.cost)


def test_router_sends_a_hard_question_to_the_cloud_and_keeps_local_only_local(served: ServerProcess) -> None:
    with served.client("acme") as c:
        hard = c.generate(messages=[("user", HARD)], max_tokens=12, temperature=0, cache_policy=1)
        easy = c.generate(
            messages=[("user", EASY)], max_tokens=12, temperature=0, route_policy=LOCAL_ONLY, cache_policy=1
        )
    assert hard.route == ROUTE_CLOUD and hard.route_reason == "router" and not hard.degraded
    assert easy.route == ROUTE_LOCAL and easy.route_reason == "policy" and easy.usage.cost == 0


def test_cascade_escalates_a_truncated_local_answer(served: ServerProcess) -> None:
    # the tiny model's answer to an easy question is cut at max_tokens: low confidence, so the cloud answers
    with served.client("acme") as c:
        r = c.generate(messages=[("user", EASY)], max_tokens=6, temperature=0, cache_policy=1, request_id="casc-1")
    assert r.route == ROUTE_CLOUD and r.route_reason == "cascade" and r.model == "cloud-gemma"
    assert _ledger(served, "casc-1")["route_reason"] == "cascade"


def test_monthly_budget_reached_answers_locally_and_says_so(served: ServerProcess) -> None:
    with served.client("globex") as c:
        r = c.generate(messages=[("user", HARD)], max_tokens=8, temperature=0, cache_policy=1, request_id="bud-1")
    assert r.route == ROUTE_LOCAL and r.degraded and r.route_reason == "budget_monthly"
    row = _ledger(served, "bud-1")
    assert row["degraded"] == 1 and row["route_reason"] == "budget_monthly"


def test_per_request_ceiling_keeps_an_expensive_request_local(served: ServerProcess) -> None:
    with served.client("acme") as c:
        r = c.generate(messages=[("user", HARD)], max_tokens=8, temperature=0, cache_policy=1, max_cost=1e-9)
    assert r.route == ROUTE_LOCAL and r.degraded and r.route_reason == "budget_request"


def test_unreachable_cloud_degrades_to_local_and_cloud_only_without_cloud_is_refused(
    tiny_model: Any, tmp_path: Path
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    srv = _server(tmp_path, tiny_model("gemma3"), dead)
    try:
        with srv.client("acme") as c:
            r = c.generate(messages=[("user", HARD)], max_tokens=8, temperature=0, cache_policy=1)
            forced = c.generate(prompt="hello", max_tokens=4, temperature=0, route_policy=CLOUD_ONLY, cache_policy=1)
        assert r.route == ROUTE_LOCAL and r.degraded and r.route_reason == "cloud_error" and r.text
        assert forced.route == ROUTE_LOCAL and forced.degraded and forced.route_reason == "cloud_error"
    finally:
        assert srv.stop() == 0


def test_anthropic_cloud_through_the_service_and_context_overflow(tiny_model: Any, tmp_path: Path) -> None:
    """An Anthropic-shaped cloud (the tests' own server) behind the service: a prompt too long for the
    local context goes there, and its cache-read/-write tokens are billed at their own prices."""
    from fake_cloud import Answer, FakeCloud, anthropic_stream

    cloud = FakeCloud()
    usage = {"input_tokens": 10, "cache_read_input_tokens": 400, "cache_creation_input_tokens": 100}
    cloud.script = [Answer(events=anthropic_stream(["Long ", "answer"], usage, output_tokens=2))]
    cfg = write_config(tmp_path / "appliance.toml", tiny_model("gemma3"), n_ctx=256, context_budget=128)
    cfg.write_text(
        cfg.read_text()
        + f'[cloud]\nprovider = "anthropic"\nbase_url = "{cloud.url}"\nmodel = "claude-x"\n'
        + f'api_key_file = "{tmp_path / "key"}"\n'
        + "[route]\nthreshold = 1.0\n"  # the router keeps everything local: only the overflow sends it
        + "[pricing]\ninput_per_mtok = 1.0\ncached_input_per_mtok = 0.1\n"
        + "cache_write_per_mtok = 1.25\noutput_per_mtok = 5.0\n"
    )
    (tmp_path / "key").write_text("ant-secret\n")
    srv = ServerProcess(cfg)
    try:
        with srv.client("acme") as c:
            r = c.generate(prompt="hello " * 400, max_tokens=8, cache_policy=1, route_policy=0, request_id="long-1")
        assert r.route == ROUTE_CLOUD and r.route_reason == "context_overflow" and r.text == "Long answer"
        u = r.usage
        assert (u.prompt_tokens, u.cached_tokens, u.cache_write_tokens, u.completion_tokens) == (510, 400, 100, 2)
        assert u.cost == pytest.approx((10 * 1.0 + 400 * 0.1 + 100 * 1.25 + 2 * 5.0) / 1e6)
        assert u.counterfactual_cost == pytest.approx((510 * 1.0 + 2 * 5.0) / 1e6)
        _, headers, body = cloud.requests[0]
        assert headers["x-api-key"] == "ant-secret" and body["model"] == "claude-x"
        assert _ledger(srv, "long-1")["cache_write_tokens"] == 100
        assert "ant-secret" not in (tmp_path / "server.log").read_text()
    finally:
        assert srv.stop() == 0
        cloud.close()

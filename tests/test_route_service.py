"""Routing through the real service: an `appliance serve` child on a tiny local model, with
llama-cpp-python's OpenAI-compatible server on the default model as its "cloud" (both real processes
on loopback), and a cloud that cannot be reached."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_service_support import ServerProcess, ledger_row, write_config

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
    row = ledger_row(served, "cloud-1")
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
    assert ledger_row(served, "casc-1")["route_reason"] == "cascade"


def test_cascade_checks_a_held_answer_as_it_grows(tiny_model: Any, llama_cloud: str, tmp_path: Path) -> None:
    """The held-back local answer is checked every 16 tokens: the tiny random model's unsure start is
    cut at 16 tokens (default, whole answers held) or at the 4-token `cascade_window`, and the
    escalated request pays for those local tokens only, not for a whole local answer (local tokens
    priced at 1 each to see it). With thresholds nothing fails, a 4-token window streams the local
    answer on: the same greedy answer local_only gives, in pieces."""
    price = "local_per_mtok = 1000000.0\n[route]\n"
    lenient = "min_mean_logprob = -1000.0\nmax_mean_entropy = 1000.0\nmax_repetition = 1.0\nmin_confidence = 0.0\n"
    ask = {"messages": [("user", EASY)], "max_tokens": 40, "temperature": 0, "cache_policy": 1}
    cases = [
        ("window-lenient", price + "cascade_window = 4\n" + lenient + "escalate_truncated = false\n", None),
        ("window", price + "cascade_window = 4\n", 4),
        ("held", price, 16),
    ]
    for name, extra, cut in cases:
        d = tmp_path / name
        d.mkdir()
        srv = _server(d, tiny_model("gemma3"), llama_cloud, extra)
        try:
            with srv.client("acme") as c:
                alone = c.generate(**ask, route_policy=LOCAL_ONLY)
                chunks = list(c.stream(**ask))
        finally:
            assert srv.stop() == 0
        final = chunks[-1].final
        assert alone.route == ROUTE_LOCAL and alone.usage.completion_tokens > 16, name
        if cut is None:
            assert final.route == ROUTE_LOCAL and final.route_reason == "router"
            assert "".join(ch.delta for ch in chunks[:-1]) == final.text == alone.text
            assert len(chunks) > 2  # streamed in pieces, not one held-back block
        else:
            assert final.route == ROUTE_CLOUD and final.route_reason == "cascade", name
            u = final.usage
            cloud = (3.0 * (u.prompt_tokens - u.cached_tokens) + 15.0 * u.completion_tokens) / 1e6
            local_paid = u.cost - cloud
            assert local_paid == pytest.approx(alone.usage.prompt_tokens + cut, abs=0.01), name


def test_monthly_budget_reached_answers_locally_and_says_so(served: ServerProcess) -> None:
    with served.client("globex") as c:
        r = c.generate(messages=[("user", HARD)], max_tokens=8, temperature=0, cache_policy=1, request_id="bud-1")
    assert r.route == ROUTE_LOCAL and r.degraded and r.route_reason == "budget_monthly"
    row = ledger_row(served, "bud-1")
    assert row["degraded"] == 1 and row["route_reason"] == "budget_monthly"


def test_per_request_ceiling_keeps_an_expensive_request_local(served: ServerProcess) -> None:
    with served.client("acme") as c:
        r = c.generate(messages=[("user", HARD)], max_tokens=8, temperature=0, cache_policy=1, max_cost=1e-9)
    assert r.route == ROUTE_LOCAL and r.degraded and r.route_reason == "budget_request"


def test_unreachable_cloud_degrades_to_local_and_cloud_only_without_cloud_is_refused(
    tiny_model: Any, tmp_path: Path
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    srv = _server(tmp_path, tiny_model("gemma3"), dead, "[route]\ncascade_window = 4\n")
    try:
        with srv.client("acme") as c:
            r = c.generate(messages=[("user", HARD)], max_tokens=8, temperature=0, cache_policy=1)
            forced = c.generate(prompt="hello", max_tokens=4, temperature=0, route_policy=CLOUD_ONLY, cache_policy=1)
            # the cascade cuts the unsure local answer after 4 tokens, the cloud fails: answered in full locally
            ask = {"messages": [("user", EASY)], "max_tokens": 16, "temperature": 0, "cache_policy": 1}
            cut = c.generate(**ask)
            alone = c.generate(**ask, route_policy=LOCAL_ONLY)
        assert r.route == ROUTE_LOCAL and r.degraded and r.route_reason == "cloud_error" and r.text
        assert forced.route == ROUTE_LOCAL and forced.degraded and forced.route_reason == "cloud_error"
        assert cut.route == ROUTE_LOCAL and cut.degraded and cut.route_reason == "cloud_error"
        assert cut.text == alone.text and cut.usage.completion_tokens == alone.usage.completion_tokens > 4
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
        assert ledger_row(srv, "long-1")["cache_write_tokens"] == 100
        assert "ant-secret" not in (tmp_path / "server.log").read_text()
    finally:
        assert srv.stop() == 0
        cloud.close()


def test_cloud_breaking_off_mid_answer(tiny_model: Any, tmp_path: Path) -> None:
    """A cloud answer that breaks off after some text: a unary Generate (the client has seen nothing)
    gets the local answer instead, degraded; a stream that already sent the text ends UNAVAILABLE."""
    import grpc
    from fake_cloud import Answer, FakeCloud, openai_stream, sse

    cloud = FakeCloud()
    broken = openai_stream(["Partial ", "answer"])[:2] + sse((None, "{not json"))
    cloud.script = [Answer(events=broken), Answer(events=broken)]
    cfg = write_config(tmp_path / "appliance.toml", tiny_model("gemma3"))
    cfg.write_text(
        cfg.read_text()
        + f'[cloud]\nprovider = "openai"\nbase_url = "{cloud.url}"\nmodel = "gpt-x"\nmax_retries = 0\n'
        + "[pricing]\ninput_per_mtok = 1.0\noutput_per_mtok = 5.0\n"
    )
    srv = ServerProcess(cfg)
    ask = {"prompt": "hello", "max_tokens": 6, "temperature": 0, "cache_policy": 1}
    try:
        with srv.client("acme") as c:
            r = c.generate(**ask, route_policy=CLOUD_ONLY, request_id="brk-1")
            alone = c.generate(**ask, route_policy=LOCAL_ONLY)
            with pytest.raises(grpc.RpcError) as e:
                list(c.stream(**ask, route_policy=CLOUD_ONLY, request_id="brk-2"))
        assert r.route == ROUTE_LOCAL and r.degraded and r.route_reason == "cloud_error"
        assert r.text == alone.text and "Partial" not in r.text
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "broke" in (e.value.details() or "")
        assert len(cloud.requests) == 2
    finally:
        assert srv.stop() == 0
        cloud.close()


def test_deadline_while_the_cascade_holds_the_answer_frees_the_kv(
    default_model: Path, llama_cloud: str, tmp_path: Path
) -> None:
    """A client whose deadline passes while its local answer is held back for the cascade's check
    (the default model, slow enough to be caught mid-answer): the local generation is cancelled at
    once (KV blocks free, no sequence running), the ledger says cancelled, and the server goes on."""
    import time
    import urllib.request

    metrics = f"127.0.0.1:{free_port()}"
    cfg = write_config(tmp_path / "appliance.toml", default_model, n_ctx=4096, server={"metrics": metrics})
    lenient = "min_mean_logprob = -1000.0\nmax_mean_entropy = 1000.0\nmax_repetition = 1.0\nmin_confidence = 0.0\n"
    cfg.write_text(
        cfg.read_text()
        + f'[cloud]\nprovider = "openai"\nbase_url = "{llama_cloud}"\nmodel = "cloud-gemma"\n'
        + "[route]\n"
        + lenient
    )

    def metric(name: str) -> float:
        body = urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5).read().decode()
        return float(next(line.split()[-1] for line in body.splitlines() if line.startswith(name + " ")))

    srv = ServerProcess(cfg)
    try:
        total = metric("appliance_kv_blocks_total")
        with srv.client("acme") as c:
            with pytest.raises(Exception) as e:
                list(
                    c.stream(
                        messages=[("user", EASY)], max_tokens=2000, temperature=0, request_id="held-1", timeout=1.0
                    )
                )
            assert "DEADLINE_EXCEEDED" in str(e.value)
            deadline = time.monotonic() + 10
            while metric("appliance_kv_blocks_free") < total and time.monotonic() < deadline:
                time.sleep(0.05)
            assert metric("appliance_kv_blocks_free") == total
            assert metric("appliance_engine_sequences_running") == 0
            after = c.generate(messages=[("user", EASY)], max_tokens=4, temperature=0, route_policy=LOCAL_ONLY)
        assert after.route == ROUTE_LOCAL and after.text
        row = ledger_row(srv, "held-1")
        assert row["finish_reason"] == "cancelled" and row["route"] == "local"
    finally:
        assert srv.stop() == 0


def test_an_escalated_request_waits_on_the_cloud_without_a_local_slot(tiny_model: Any, tmp_path: Path) -> None:
    """One local slot (max_concurrent = 1): a request whose held answer the cascade cuts waits for a
    slow cloud in the cloud lane, so a local request sent meanwhile is served before the cloud answers."""
    import threading

    from fake_cloud import Answer, FakeCloud, openai_stream

    cloud = FakeCloud()
    cloud.script = [Answer(events=openai_stream(["From ", "the cloud."]), stall_s=4.0)]
    cfg = write_config(tmp_path / "appliance.toml", tiny_model("gemma3"), server={"max_concurrent": 1})
    cfg.write_text(
        cfg.read_text()
        + f'[cloud]\nprovider = "openai"\nbase_url = "{cloud.url}"\nmodel = "gpt-x"\nmax_retries = 0\n'
        + "[pricing]\ninput_per_mtok = 1.0\noutput_per_mtok = 5.0\n"
    )
    srv = ServerProcess(cfg)
    done: list[str] = []
    try:
        with srv.client("acme") as c:

            def escalating() -> None:
                r = c.generate(messages=[("user", EASY)], max_tokens=40, temperature=0, cache_policy=1)
                assert r.route == ROUTE_CLOUD and r.route_reason == "cascade", r
                done.append("escalated")

            t = threading.Thread(target=escalating)
            t.start()
            while not cloud.requests:  # the cascade has cut the local answer and called the cloud
                assert t.is_alive()
                threading.Event().wait(0.02)
            local = c.generate(prompt="hello", max_tokens=4, temperature=0, route_policy=LOCAL_ONLY, cache_policy=1)
            done.append("local")
            t.join(30)
        assert local.route == ROUTE_LOCAL
        assert done == ["local", "escalated"]  # the local request did not wait for the escalated one's slot
    finally:
        assert srv.stop() == 0
        cloud.close()

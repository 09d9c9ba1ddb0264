"""The real server (a child process on a tiny model) and the real client, on a Unix socket and TCP."""

from __future__ import annotations

import math
import socket
import sqlite3
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from test_service_support import ServerProcess, write_config

from appliance.edge.grpc.client import Client


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def tiny(tiny_model: Any) -> Path:
    path: Path = tiny_model("gemma3", n_ctx_train=8192)  # long generations for the deadline tests
    return path


@pytest.fixture(scope="module")
def server(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    d = tmp_path_factory.mktemp("srv")
    metrics = f"127.0.0.1:{_free_port()}"
    cfg = write_config(d / "appliance.toml", tiny, server={"max_concurrent": 1, "max_queue": 2, "metrics": metrics})
    srv = ServerProcess(cfg)
    srv.metrics = metrics
    yield srv
    assert srv.stop() == 0


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _code(e: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    code: grpc.StatusCode = e.value.code()
    return code


def _details(e: pytest.ExceptionInfo[grpc.RpcError]) -> str:
    return str(e.value.details() or "")


def test_generate_on_unix_socket_and_tcp(server: ServerProcess) -> None:
    with server.client() as c:
        r = c.generate(prompt="hello world", max_tokens=8, temperature=0)
    assert r.route == 2 and r.finish_reason == "length"
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens > 0
    assert r.usage.counterfactual_cost > 0 and r.usage.cost == 0
    assert len(r.request_id) == 32
    with server.client("acme") as c:
        r2 = c.generate(prompt="hello world", max_tokens=8, temperature=0)
    assert r2.text == r.text  # greedy: same answer on both transports


def test_stream_matches_unary_and_ends_with_usage(server: ServerProcess) -> None:
    with server.client("acme") as c:
        unary = c.generate(messages=[("user", "the world")], max_tokens=12, temperature=0)
        chunks = list(c.stream(messages=[("user", "the world")], max_tokens=12, temperature=0, request_id="s-1"))
    assert chunks[-1].done and not any(ch.done for ch in chunks[:-1])
    assert "".join(ch.delta for ch in chunks) == unary.text == chunks[-1].final.text
    assert all(ch.request_id == "s-1" for ch in chunks)
    assert chunks[-1].final.usage.completion_tokens == 12
    assert chunks[-1].final.usage.cached_tokens > 0  # same prompt again: the KV prefix was reused


def test_tcp_needs_a_valid_token(server: ServerProcess) -> None:
    for token in (None, "wrong-token"):
        with Client.connect(server.tcp_target, token) as c, pytest.raises(grpc.RpcError) as e:
            c.generate(prompt="hi", max_tokens=1)
        assert _code(e) == grpc.StatusCode.UNAUTHENTICATED
    with server.client("acme") as c, pytest.raises(grpc.RpcError) as e:
        c.generate(prompt="hi", max_tokens=1, tenant="globex")
    assert _code(e) == grpc.StatusCode.PERMISSION_DENIED and "acme" in _details(e)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({}, "prompt"),
        ({"prompt": "a", "messages": [("user", "b")]}, "prompt"),
        ({"messages": [("robot", "b")]}, "messages[0].role"),
        ({"prompt": "a", "temperature": -1.0}, "sampling.temperature"),
        ({"prompt": "a", "top_p": 2.0}, "sampling.top_p"),
        ({"prompt": "a", "max_tokens": 0}, "sampling.max_tokens"),
        ({"prompt": "a", "temperature": math.nan}, "sampling.temperature"),
        ({"prompt": "a", "request_id": "no spaces allowed"}, "request_id"),
        ({"prompt": "a", "context": [("x", math.inf)]}, "context[0].score"),
        ({"prompt": "a", "stop": [""]}, "sampling.stop"),
        ({"prompt": "a", "max_cost": -1.0}, "max_cost"),
        ({"prompt": "word " * 9000}, "prompt"),
        ({"prompt": "a", "early_exit": 3}, "sampling.early_exit"),  # this model has no calibration
        ({"prompt": "a", "exit_threshold": 2.0}, "sampling.exit_threshold"),
    ],
)
def test_malformed_requests_name_the_field(server: ServerProcess, kwargs: dict[str, Any], field: str) -> None:
    with server.client() as c, pytest.raises(grpc.RpcError) as e:
        c.generate(**kwargs)
    assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT
    assert _details(e).startswith(field + ":"), _details(e)


def test_chat_needs_a_session(server: ServerProcess) -> None:
    with server.client() as c, pytest.raises(grpc.RpcError) as e:
        list(c.chat(messages=[("user", "hi")]))
    assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT and _details(e).startswith("session_id:")


def test_oversized_message_is_refused(server: ServerProcess) -> None:
    with Client.connect(server.unix_target, max_message_bytes=16 * 1024 * 1024) as c, pytest.raises(grpc.RpcError) as e:
        c.generate(prompt="x" * (5 * 1024 * 1024))
    assert _code(e) == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_other_statuses(server: ServerProcess) -> None:
    with server.client() as c:
        with pytest.raises(grpc.RpcError) as e:
            c.embed(["hello"])
        # this server runs with the semantic cache (and its embedder) disabled
        assert _code(e) == grpc.StatusCode.FAILED_PRECONDITION and "embedding" in _details(e)
        with pytest.raises(grpc.RpcError) as e:
            c.generate(prompt="hi", max_tokens=1, route_policy=2)
        assert _code(e) == grpc.StatusCode.FAILED_PRECONDITION
        first = c.generate(prompt="hi", max_tokens=1, request_id="dup-1")
        again = c.generate(prompt="hi", max_tokens=1, request_id="dup-1")  # a retry: the stored answer
        assert again.replayed and again.text == first.text and not first.replayed
        with pytest.raises(grpc.RpcError) as e:
            c.generate(prompt="hello", max_tokens=1, request_id="dup-1")
        assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT and _details(e).startswith("request_id:")


def test_health_and_reflection(server: ServerProcess) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with server.client() as c:
        assert c.health() == "SERVING" and c.health("appliance.v1.Appliance") == "SERVING"
        services = ProtoReflectionDescriptorDatabase(c.channel).get_services()
    assert "appliance.v1.Appliance" in services and "grpc.health.v1.Health" in services


def test_tenants_are_isolated(server: ServerProcess) -> None:
    with server.client("acme") as a, server.client("globex") as g:
        before = g.usage().total.requests
        first = list(a.chat(session_id="shared-id", messages=[("user", "my name is hello")], max_tokens=4))[-1]
        again = list(a.chat(session_id="shared-id", messages=[("user", "what is my name")], max_tokens=4))[-1]
        other = list(g.chat(session_id="shared-id", messages=[("user", "what is my name")], max_tokens=4))[-1]
        assert g.usage().total.requests == before + 1  # acme's requests are not in globex's ledger
        assert a.usage().tenant == "acme"
    # globex's turn did not see acme's history: its prompt is just its own message
    assert other.final.usage.prompt_tokens < again.final.usage.prompt_tokens
    assert again.final.usage.prompt_tokens > first.final.usage.prompt_tokens


def test_deadline_and_cancel_stop_generation(server: ServerProcess) -> None:
    with server.client() as c:
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            c.generate(prompt="hello", max_tokens=7000, temperature=0, timeout=0.5)
        assert _code(e) == grpc.StatusCode.DEADLINE_EXCEEDED
        # the engine is free at once: a short request is not stuck behind the long one (about 4 s)
        c.generate(prompt="hello", max_tokens=2, timeout=1.5)
        call = c.stream(prompt="hello", max_tokens=7000, temperature=0)
        for _ in range(3):
            next(call)
        call.cancel()  # type: ignore[attr-defined]
        c.generate(prompt="hello", max_tokens=2, timeout=1.5)
        assert time.monotonic() - t0 < 4.0


def test_overload_answers_resource_exhausted(server: ServerProcess) -> None:
    """max_concurrent=1, max_queue=2: of 8 long requests at once, at least 5 are refused at once."""
    started = threading.Barrier(8)

    def one(c: Client) -> tuple[str, dict[str, str]]:
        started.wait()
        try:
            c.generate(prompt="hello", max_tokens=400, temperature=0, timeout=30)
            return "OK", {}
        except grpc.RpcError as e:
            return e.code().name, {str(md.key): str(md.value) for md in e.trailing_metadata() or ()}

    rss_before = _rss_mb(server.proc.pid)
    clients = [server.client() for _ in range(8)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, clients))
        for _ in range(3):  # more bursts (the barrier resets itself): refused requests must not pile up
            list(pool.map(one, clients))
    for c in clients:
        c.close()
    assert _rss_mb(server.proc.pid) - rss_before < 64, "memory grew under overload"
    refused = [md for code, md in results if code == "RESOURCE_EXHAUSTED"]
    assert len(refused) >= 5 and all(md.get("retry-after-ms") == "1000" for md in refused), results
    assert sum(code == "OK" for code, _ in results) >= 1
    with server.client() as c:
        assert c.health() == "SERVING"


def test_prometheus_metrics(server: ServerProcess) -> None:
    with server.client() as c:
        c.generate(prompt="hello", max_tokens=2)
    body = urllib.request.urlopen(f"http://{server.metrics}/metrics", timeout=5).read().decode()
    assert 'appliance_requests_total{method="Generate",route="local",code="OK"}' in body
    assert 'appliance_route_decisions_total{route="local",reason="router",degraded="false"}' in body
    assert "appliance_request_seconds_bucket" in body and "appliance_ready 1" in body
    assert "appliance_kv_blocks_free" in body and "appliance_prefix_cache_hits_total" in body


def _metric(server: ServerProcess, name: str) -> float:
    body = urllib.request.urlopen(f"http://{server.metrics}/metrics", timeout=5).read().decode()
    return float(next(line.split()[-1] for line in body.splitlines() if line.startswith(name + " ")))


def test_cancel_and_deadline_free_the_kv_cache(server: ServerProcess) -> None:
    total = _metric(server, "appliance_kv_blocks_total")
    window_total = _metric(server, "appliance_kv_window_blocks_total")
    assert window_total > 0  # gemma3: its sliding-window layers have a pool of their own
    with server.client() as c:
        call = c.stream(prompt="hello", max_tokens=5000, temperature=0)
        for _ in range(3):
            next(call)
        assert _metric(server, "appliance_kv_blocks_free") < total  # the running request holds blocks
        call.cancel()  # type: ignore[attr-defined]
        with pytest.raises(grpc.RpcError):
            c.generate(prompt="hello", max_tokens=5000, temperature=0, timeout=0.3)
    deadline = time.monotonic() + 5
    while _metric(server, "appliance_kv_blocks_free") < total and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _metric(server, "appliance_kv_blocks_free") == total
    assert _metric(server, "appliance_kv_window_blocks_free") == window_total
    assert _metric(server, "appliance_engine_sequences_running") == 0


def test_history_survives_restart_and_drain_finishes_streams(tiny: Path, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "appliance.toml", tiny, tcp=False)
    srv = ServerProcess(cfg)
    with srv.client() as c:
        list(c.chat(session_id="s", messages=[("system", "be brief"), ("user", "hello there")], max_tokens=4))
        stream = c.stream(prompt="hello", max_tokens=3000, temperature=0)
        next(stream)
        srv.proc.send_signal(15)  # SIGTERM: drain
        time.sleep(0.2)
        assert c.health() == "NOT_SERVING"
        rest = list(stream)
    assert rest[-1].done and rest[-1].final.finish_reason == "length"  # the in-flight stream completed
    assert srv.stop() == 0
    srv = ServerProcess(cfg)
    try:
        with srv.client() as c:
            last = list(c.chat(session_id="s", messages=[("user", "and again")], max_tokens=4))[-1]
        assert last.done
    finally:
        srv.stop()
    db = sqlite3.connect(tmp_path / "state" / "history.sqlite")
    roles = [r for (r,) in db.execute("SELECT role FROM messages WHERE session_id='s' ORDER BY idx")]
    assert roles == ["user", "assistant", "user", "assistant"]
    assert db.execute("SELECT system FROM sessions").fetchone() == ("be brief",)


def test_chat_cli_talks_to_the_server(server: ServerProcess) -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "appliance", "chat", "--target", server.unix_target, "--max-tokens", "4"],
        input="hello there\nand again\nexit\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr.count(" prompt (") == 2  # one usage line per turn
    assert "session " in out.stderr

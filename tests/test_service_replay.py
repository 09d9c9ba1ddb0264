"""Idempotent retries: a retry with a served request_id gets the stored answer back (replayed, not
generated, charged or committed again), on the real server with its real SQLite ledger."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from test_service_support import ServerProcess, write_config

from appliance.common.errors import AlreadyExists, InvalidArgument
from appliance.common.ledger import Ledger
from appliance.common.types import Result, Usage

ROUTE_LOCAL = 2


@pytest.fixture(scope="module")
def server(tiny_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    d = tmp_path_factory.mktemp("svc-replay")
    srv = ServerProcess(write_config(d / "appliance.toml", tiny_model("gemma3")))
    yield srv
    assert srv.stop() == 0


def _rows(srv: ServerProcess, request_id: str, tenant: str | None = None) -> list[sqlite3.Row]:
    conn = sqlite3.connect(srv.config.parent / "state" / "ledger.sqlite")
    conn.row_factory = sqlite3.Row
    try:
        sql, args = "SELECT * FROM requests WHERE request_id=?", [request_id]
        if tenant is not None:
            sql, args = sql + " AND tenant=?", [request_id, tenant]
        return list(conn.execute(sql, args))
    finally:
        conn.close()


def _code(e: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    code: grpc.StatusCode = e.value.code()
    return code


def _details(e: pytest.ExceptionInfo[grpc.RpcError]) -> str:
    return str(e.value.details() or "")


def test_retry_replays_the_stored_answer(server: ServerProcess) -> None:
    with server.client("acme") as c:
        first = c.generate(prompt="Tell me a story", max_tokens=12, temperature=0.9, seed=7, request_id="rp-1")
        before = c.usage().total
        again = c.generate(prompt="Tell me a story", max_tokens=12, temperature=0.9, seed=7, request_id="rp-1")
        after = c.usage().total
    assert not first.replayed and again.replayed
    assert (again.text, again.route, again.finish_reason, again.model) == (
        first.text,
        first.route,
        first.finish_reason,
        first.model,
    )
    assert again.usage == first.usage  # the stored usage, latency included: nothing was generated again
    assert (after.requests, after.completion_tokens, after.cost) == (
        before.requests,
        before.completion_tokens,
        before.cost,
    )
    assert len(_rows(server, "rp-1")) == 1


def test_streamed_retry_is_one_delta_then_the_final(server: ServerProcess) -> None:
    with server.client("acme") as c:
        chunks = list(c.stream(messages=[("user", "the sea")], max_tokens=10, temperature=0, request_id="rp-s"))
        again = list(c.stream(messages=[("user", "the sea")], max_tokens=10, temperature=0, request_id="rp-s"))
        unary = c.generate(messages=[("user", "the sea")], max_tokens=10, temperature=0, request_id="rp-s")
    text = "".join(ch.delta for ch in chunks)
    assert len(again) == 2 and again[0].delta == text and not again[0].done
    assert again[1].done and again[1].final.replayed and again[1].final.text == text
    assert again[1].final.usage == chunks[-1].final.usage
    assert unary.replayed and unary.text == text  # the same request by another method
    assert len(_rows(server, "rp-s")) == 1


def test_chat_retry_does_not_commit_the_turn_again(server: ServerProcess) -> None:
    kw: dict[str, Any] = {"session_id": "rp-chat", "messages": [("user", "my name is Ada")], "max_tokens": 6}
    with server.client("acme") as c:
        first = list(c.chat(request_id="rp-c1", **kw))[-1].final
        again = list(c.chat(request_id="rp-c1", **kw))[-1].final
    assert again.replayed and again.text == first.text and again.session_id == "rp-chat"
    conn = sqlite3.connect(server.config.parent / "state" / "history.sqlite")
    try:
        n = conn.execute("SELECT COUNT(*) FROM messages WHERE session_id='rp-chat'").fetchone()[0]
    finally:
        conn.close()
    assert n == 2  # one user message and one answer


def test_retry_with_another_request_is_refused(server: ServerProcess) -> None:
    with server.client("acme") as c:
        original = c.generate(prompt="What is two plus two?", max_tokens=4, request_id="rp-d")
        for kw in ({"prompt": "What is three plus three?", "max_tokens": 4}, {"prompt": "What is two plus two?"}):
            with pytest.raises(grpc.RpcError) as e:
                c.generate(request_id="rp-d", **kw)
            assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT
            assert _details(e).startswith("request_id:") and original.text not in _details(e)


def test_tenants_never_share_request_ids(server: ServerProcess) -> None:
    with server.client("acme") as a, server.client("globex") as g:
        mine = a.generate(prompt="acme secret question", max_tokens=6, request_id="rp-t")
        theirs = g.generate(prompt="globex question", max_tokens=6, request_id="rp-t")
        same_prompt = g.generate(prompt="acme secret question", max_tokens=6, request_id="rp-t2")
        a_again = a.generate(prompt="acme secret question", max_tokens=6, request_id="rp-t2")
    assert not theirs.replayed and theirs.route == ROUTE_LOCAL
    assert not same_prompt.replayed and not a_again.replayed  # each tenant's key is its own
    assert mine.text == a_again.text
    assert len(_rows(server, "rp-t", "acme")) == 1 and len(_rows(server, "rp-t", "globex")) == 1


def test_retry_while_the_original_runs_is_aborted_and_after_a_cancel_runs_again(server: ServerProcess) -> None:
    """A retry during the original is refused; once the cancelled original's row commits, a retry runs
    the request again into the same row (attempts 2, the work of both attempts summed), and the next
    retry replays that answer."""
    ask = {"prompt": "hello", "max_tokens": 600, "temperature": 0, "request_id": "rp-f"}
    with server.client("acme") as c:
        call = c.stream(**ask)
        next(call)
        with pytest.raises(grpc.RpcError) as e:
            c.generate(**ask)
        assert _code(e) == grpc.StatusCode.ABORTED and "still being served" in _details(e)
        call.cancel()  # type: ignore[attr-defined]
        deadline = time.monotonic() + 10
        while True:  # until the cancelled original's row has committed
            rows = _rows(server, "rp-f")
            if (rows and rows[0]["finish_reason"] == "cancelled") or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        first = dict(rows[0])
        again = c.generate(**ask)
        replayed = c.generate(**ask)
    assert first["finish_reason"] == "cancelled" and first["attempts"] == 1
    assert not again.replayed and again.finish_reason in ("stop", "length") and again.text
    row = _rows(server, "rp-f")
    assert len(row) == 1 and row[0]["attempts"] == 2 and row[0]["finish_reason"] == again.finish_reason
    assert row[0]["completion_tokens"] == first["completion_tokens"] + again.usage.completion_tokens
    assert replayed.replayed and replayed.text == again.text


# ---------------------------------------------------------------------- an old ledger, a short window

OLD_SCHEMA = (
    "CREATE TABLE requests (tenant TEXT NOT NULL, request_id TEXT NOT NULL, ts REAL NOT NULL,"
    " session_id TEXT NOT NULL, route TEXT NOT NULL, model TEXT NOT NULL, cloud_model TEXT NOT NULL,"
    " finish_reason TEXT NOT NULL, prompt_tokens INTEGER NOT NULL, cached_tokens INTEGER NOT NULL,"
    " completion_tokens INTEGER NOT NULL, summary_saved_tokens INTEGER NOT NULL,"
    " early_exit_tokens INTEGER NOT NULL, latency_ms REAL NOT NULL, cost REAL NOT NULL,"
    " counterfactual_cost REAL NOT NULL, PRIMARY KEY (tenant, request_id));"
    "CREATE INDEX requests_by_time ON requests (tenant, ts);"
)


@pytest.fixture(scope="module")
def old(tiny_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server on a ledger written by the first release, keeping answers for 2 s."""
    d = tmp_path_factory.mktemp("svc-replay-old")
    (d / "state").mkdir()
    conn = sqlite3.connect(d / "state" / "ledger.sqlite")
    conn.executescript(OLD_SCHEMA)
    conn.execute(
        "INSERT INTO requests VALUES ('acme','old-1',?,'','local','m','c','stop',5,0,7,0,0,12.5,0.0,0.001)",
        (time.time() - 60,),
    )
    conn.commit()
    conn.close()
    cfg = write_config(d / "appliance.toml", tiny_model("gemma3"))
    cfg.write_text(cfg.read_text() + "[ledger]\nreplay_window_s = 2\n")
    srv = ServerProcess(cfg)
    yield srv
    assert srv.stop() == 0


def test_an_old_ledger_opens_and_migrates(old: ServerProcess) -> None:
    with old.client("acme") as c:
        assert c.usage().total.requests == 1  # the old row is still accounted
        with pytest.raises(grpc.RpcError) as e:
            c.generate(prompt="anything", max_tokens=2, request_id="old-1")
        assert _code(e) == grpc.StatusCode.ALREADY_EXISTS and _details(e).startswith("request_id:")
        r = c.generate(prompt="a new one", max_tokens=2, request_id="new-1")
    assert r.route == ROUTE_LOCAL and not r.replayed
    row = _rows(old, "new-1")[0]
    assert row["request_hash"] and row["replay"] and row["degraded"] == 0


def test_replay_after_the_window_is_refused(old: ServerProcess) -> None:
    with old.client("acme") as c:
        first = c.generate(prompt="Short lived", max_tokens=3, request_id="win-1")
        again = c.generate(prompt="Short lived", max_tokens=3, request_id="win-1")
        assert again.replayed and again.text == first.text
        time.sleep(2.2)
        with pytest.raises(grpc.RpcError) as e:
            c.generate(prompt="Short lived", max_tokens=3, request_id="win-1")
    assert _code(e) == grpc.StatusCode.ALREADY_EXISTS and "expired" in _details(e)
    assert len(_rows(old, "win-1")) == 1


def test_purge_drops_old_texts_and_keeps_the_rows(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite", "c", replay_window_s=60)
    r = Result(request_id="p-1", text="kept for a while", route="local", model="m", finish_reason="stop", usage=Usage())
    asyncio.run(ledger.record("acme", r, "h1"))
    replayed = ledger.replay("acme", "p-1", "h1")
    assert replayed is not None and replayed.replayed and replayed.text == r.text
    assert ledger.replay("globex", "p-1", "h1") is None
    with pytest.raises(InvalidArgument):
        ledger.replay("acme", "p-1", "h2")
    assert ledger.purge_replays(now=time.time() + 30) == 0
    assert ledger.purge_replays(now=time.time() + 120) == 1
    with pytest.raises(AlreadyExists, match="expired"):
        ledger.replay("acme", "p-1", "h1")
    row = ledger.rows("acme")[0]
    assert row["replay"] is None and row["finish_reason"] == "stop"
    ledger.close()
    assert Ledger(tmp_path / "ledger.sqlite", "c", replay_window_s=0).rows("acme")[0]["request_hash"] == "h1"


def test_recording_purges_expired_texts_on_its_timer(tmp_path: Path) -> None:
    """Between restarts the texts past the window go at the next record once `purge_every_s` has passed
    (300 s in the service), not only when the ledger opens."""

    def result(rid: str) -> Result:
        return Result(
            request_id=rid, text=f"answer {rid}", route="local", model="m", finish_reason="stop", usage=Usage()
        )

    ledger = Ledger(tmp_path / "ledger.sqlite", "c", replay_window_s=0.2, purge_every_s=3600)
    asyncio.run(ledger.record("acme", result("t-1"), "h"))
    time.sleep(0.3)  # t-1's text is past the window, but the timer has not run out
    asyncio.run(ledger.record("acme", result("t-2"), "h"))
    assert {r["request_id"]: r["replay"] is not None for r in ledger.rows("acme")} == {"t-1": True, "t-2": True}
    ledger.purge_every_s = 0.0  # the timer has run out
    time.sleep(0.3)
    asyncio.run(ledger.record("acme", result("t-3"), "h"))
    kept = {r["request_id"]: r["replay"] is not None for r in ledger.rows("acme")}
    assert kept == {"t-1": False, "t-2": False, "t-3": True}
    ledger.close()

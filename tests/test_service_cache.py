"""The semantic cache in the service: a repeated question is answered from the cache, per tenant,
never for an opposite question, and the ledger books what it saved."""

from __future__ import annotations

import socket
import sqlite3
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_service_support import ServerProcess, write_config

ROUTE_CACHE, ROUTE_LOCAL = 1, 2


@pytest.fixture(scope="module")
def server(tiny_model: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    d = tmp_path_factory.mktemp("svc-cache")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        metrics = f"127.0.0.1:{s.getsockname()[1]}"
    srv = ServerProcess(
        write_config(d / "appliance.toml", tiny_model("gemma3"), cache=True, server={"metrics": metrics})
    )
    srv.metrics = metrics
    yield srv
    assert srv.stop() == 0


def test_repeated_question_is_served_from_the_cache(server: ServerProcess) -> None:
    with server.client("acme") as c:
        first = c.generate(prompt="How do I reset my online banking password?", max_tokens=8, temperature=0)
        again = c.generate(prompt="How can I reset my online banking password?", max_tokens=8, temperature=0)
        usage = c.usage()
    assert first.route == ROUTE_LOCAL and again.route == ROUTE_CACHE
    assert again.text == first.text
    assert again.usage.cost == 0 and again.usage.counterfactual_cost == pytest.approx(first.usage.counterfactual_cost)
    cache_row = [r for r in usage.by_route if r.route == "cache"]
    assert cache_row and cache_row[0].requests >= 1 and cache_row[0].counterfactual_cost > 0


def test_cache_never_crosses_tenants_or_meanings(server: ServerProcess) -> None:
    with server.client("acme") as c:
        c.generate(prompt="Please enable two factor authentication on my account", max_tokens=6, temperature=0)
        opposite = c.generate(
            prompt="Please disable two factor authentication on my account", max_tokens=6, temperature=0
        )
        skipped = c.generate(
            prompt="Please enable two factor authentication on my account", max_tokens=6, temperature=0, cache_policy=1
        )
    with server.client("globex") as g:
        other = g.generate(prompt="Please enable two factor authentication on my account", max_tokens=6, temperature=0)
    assert opposite.route == ROUTE_LOCAL
    assert other.route == ROUTE_LOCAL  # another tenant's cached answer is never served
    assert skipped.route == ROUTE_LOCAL


def test_embed_returns_unit_vectors_and_checks_input(server: ServerProcess) -> None:
    import grpc
    import numpy as np

    with server.client("acme") as c:
        r = c.embed(["My card has not arrived yet", "I am still waiting on my card?", "enable 2FA"])
        with pytest.raises(grpc.RpcError) as e:
            c.embed(["fine", "   "])
    vecs = np.array([list(v.values) for v in r.embeddings])
    assert vecs.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)
    assert float(vecs[0] @ vecs[1]) > float(vecs[0] @ vecs[2])  # a paraphrase is nearer than another topic
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "texts[1]" in (e.value.details() or "")


def _session(srv: ServerProcess, session_id: str) -> list[tuple[str, str]]:
    conn = sqlite3.connect(srv.config.parent / "state" / "history.sqlite")
    try:
        rows = conn.execute(
            "SELECT role, content FROM messages WHERE tenant='acme' AND session_id=? ORDER BY idx", (session_id,)
        ).fetchall()
    finally:
        conn.close()
    return [(str(r[0]), str(r[1])) for r in rows]


def _ledger_route(srv: ServerProcess, request_id: str) -> str:
    conn = sqlite3.connect(srv.config.parent / "state" / "ledger.sqlite")
    try:
        (route,) = conn.execute("SELECT route FROM requests WHERE request_id=?", (request_id,)).fetchone()
    finally:
        conn.close()
    return str(route)


def test_session_turns_are_cached_under_the_conversation_state(server: ServerProcess) -> None:
    first_q, follow_up = "What are your branch opening hours on Saturday?", "And on Sunday?"

    def turn(c: Any, session: str, text: str, rid: str) -> Any:
        return list(c.chat(session_id=session, messages=[("user", text)], max_tokens=8, temperature=0, request_id=rid))[
            -1
        ].final

    with server.client("acme") as c:
        a1 = turn(c, "hours-a", first_q, "ha-1")
        b1 = turn(c, "hours-b", first_q, "hb-1")  # another session, same (empty) state: a hit
        a2 = turn(c, "hours-a", follow_up, "ha-2")
        b2 = turn(c, "hours-b", follow_up, "hb-2")  # same previous exchange as hours-a: a hit
        c1 = turn(c, "cards-c", "How do I order a new debit card?", "hc-1")
        c2 = turn(c, "cards-c", follow_up, "hc-2")  # another previous exchange: no hit
    assert a1.route == ROUTE_LOCAL and b1.route == ROUTE_CACHE and b1.text == a1.text
    assert b1.session_id == "hours-b" and _ledger_route(server, "hb-1") == "cache"
    assert a2.route == ROUTE_LOCAL and b2.route == ROUTE_CACHE and b2.text == a2.text
    assert c1.route == ROUTE_LOCAL and c2.route == ROUTE_LOCAL
    # the cached turns are in the second session's history, so the conversation goes on from them
    assert _session(server, "hours-b") == [
        ("user", first_q),
        ("assistant", a1.text),
        ("user", follow_up),
        ("assistant", a2.text),
    ]


def _embeddings(server: ServerProcess) -> tuple[float, float]:
    body = urllib.request.urlopen(f"http://{server.metrics}/metrics", timeout=5).read().decode()
    values = {line.split()[0]: float(line.split()[1]) for line in body.splitlines() if line.startswith("appliance_emb")}
    return values["appliance_embeddings_requested_total"], values["appliance_embeddings_computed_total"]


def test_a_missed_question_is_embedded_once(server: ServerProcess) -> None:
    """Cache lookup, router and cache store all need the question's vector; the model runs once."""
    requested0, computed0 = _embeddings(server)
    with server.client("acme") as c:
        first = c.generate(prompt="Which documents do I need to open a savings account?", max_tokens=4, temperature=0)
        requested1, computed1 = _embeddings(server)
        again = c.generate(prompt="Which documents do I need to open a savings account?", max_tokens=4, temperature=0)
    requested2, computed2 = _embeddings(server)
    assert first.route == ROUTE_LOCAL and again.route == ROUTE_CACHE
    assert requested1 - requested0 == 3  # lookup, router, store
    assert computed1 - computed0 == 1
    assert (requested2 - requested1, computed2 - computed1) == (1, 0)  # the hit's lookup, from memory


def test_another_gguf_embedding_model_with_its_own_threshold(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    """`[cache] embedding_model` takes any GGUF embedding model (here the default MiniLM quantized to
    Q8_0 by llama.cpp, another file and version); without a calibrated threshold for it the cache stays
    off and says why, with `[cache] threshold` it serves."""
    import ctypes

    import llama_cpp

    from appliance.models.modelref import resolve_model

    other = tmp_path / "minilm-q8_0.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    src = str(resolve_model(None, role="embedding")).encode()
    assert llama_cpp.llama_model_quantize(src, str(other).encode(), ctypes.byref(params)) == 0
    question = "Why was my card payment declined at the shop?"

    uncalibrated = tmp_path / "a"
    uncalibrated.mkdir()
    cfg = write_config(uncalibrated / "appliance.toml", tiny_model("gemma3"), cache={"embedding_model": str(other)})
    srv = ServerProcess(cfg)
    try:
        with srv.client("acme") as c:
            routes = [c.generate(prompt=question, max_tokens=4, temperature=0).route for _ in range(2)]
        assert routes == [ROUTE_LOCAL, ROUTE_LOCAL]  # no cache, still serving
    finally:
        assert srv.stop() == 0
    log = srv.log.read_text()
    assert "semantic cache disabled: no calibrated cache threshold ships for embedder 'minilm-q8_0.gguf:" in log
    assert "[cache] threshold" in log

    calibrated = tmp_path / "b"
    calibrated.mkdir()
    settings = {"embedding_model": str(other), "threshold": 0.9}
    srv = ServerProcess(write_config(calibrated / "appliance.toml", tiny_model("gemma3"), cache=settings))
    try:
        with srv.client("acme") as c:
            routes = [c.generate(prompt=question, max_tokens=4, temperature=0).route for _ in range(2)]
            embedded = c.embed([question])
        assert routes == [ROUTE_LOCAL, ROUTE_CACHE]
        assert embedded.model.startswith("minilm-q8_0.gguf:") and len(embedded.embeddings[0].values) == 384
    finally:
        assert srv.stop() == 0


def test_a_missing_or_corrupt_embedding_model_turns_the_cache_off_and_says_so(
    tiny_model: Callable[..., Path], tmp_path: Path
) -> None:
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    cases = {tmp_path / "missing.gguf": "does not exist", corrupt: "could not load"}
    for i, (model, why) in enumerate(cases.items()):
        d = tmp_path / str(i)
        d.mkdir()
        srv = ServerProcess(
            write_config(d / "appliance.toml", tiny_model("gemma3"), cache={"embedding_model": str(model)})
        )
        try:
            with srv.client("acme") as c:
                assert c.generate(prompt="hello", max_tokens=2, temperature=0).route == ROUTE_LOCAL
        finally:
            assert srv.stop() == 0
        log = srv.log.read_text()
        assert "semantic cache disabled:" in log and str(model) in log and why in log, log

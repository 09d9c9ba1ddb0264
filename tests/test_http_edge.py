"""The HTTP edge (OpenAI-compatible /v1 and Ollama's /api) of a real `appliance serve` child process on a
tiny model, through the official `openai` and `ollama` client packages, plus raw HTTP for bad bodies."""

from __future__ import annotations

import base64
import json
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ollama
import openai
import pytest
from test_service_support import TOKENS, ServerProcess, write_config

from appliance.common.errors import Overloaded, Unavailable
from appliance.edge.http.errors import openai_error


@pytest.fixture(scope="module")
def tiny(tiny_model: Any) -> Path:
    path: Path = tiny_model("gemma3", n_ctx_train=8192)
    return path


def with_http(cfg: Path, listen: str = "127.0.0.1:0") -> Path:
    """`cfg` (tests' write_config) with the HTTP edge on `listen`."""
    with cfg.open("a") as f:
        f.write(f'[http]\nlisten = "{listen}"\n')
    return cfg


@pytest.fixture(scope="module")
def server(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """No semantic cache (answers come from the model every time); one request at a time, none queued."""
    d = tmp_path_factory.mktemp("http")
    cfg = with_http(write_config(d / "appliance.toml", tiny, server={"max_concurrent": 1, "max_queue": 0}))
    srv = ServerProcess(cfg)
    assert srv.http_port
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def cached(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """With the semantic cache and its embedding model (embeddings, cache hits)."""
    d = tmp_path_factory.mktemp("http-cache")
    srv = ServerProcess(with_http(write_config(d / "appliance.toml", tiny, cache=True)))
    yield srv
    assert srv.stop() == 0


def _base(srv: ServerProcess) -> str:
    return f"http://127.0.0.1:{srv.http_port}"


def _oa(srv: ServerProcess, tenant: str = "acme", **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=_base(srv) + "/v1", api_key=TOKENS.get(tenant, tenant), max_retries=0, **kw)


def _local(srv: ServerProcess) -> str:
    return next(m.id for m in _oa(srv).models.list().data if m.id not in ("appliance",) and "MiniLM" not in m.id)


def _raw(
    srv: ServerProcess, path: str, body: bytes | dict[str, Any] | None = None, token: str | None = TOKENS["acme"]
) -> tuple[int, dict[str, str], Any]:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(_base(srv) + path, data=data, method="POST" if data is not None else "GET")
    req.add_header("content-type", "application/json")
    if token:
        req.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            raw = r.read()
            return r.status, dict(r.headers), json.loads(raw) if raw.startswith(b"{") else raw.decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


# ------------------------------------------------------------------ OpenAI


def test_models_list_and_get(server: ServerProcess) -> None:
    client = _oa(server)
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "appliance" and len(ids) == 2  # routed, and the local model (no cloud, no embedder here)
    assert client.models.retrieve(ids[1]).id == ids[1]
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-nonexistent")
    assert e.value.status_code == 404


def test_chat_streamed_and_not_give_the_same_greedy_text_and_usage(server: ServerProcess) -> None:
    client = _oa(server)
    msgs: Any = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the sky over the sea"}]
    whole = client.chat.completions.create(model="appliance", messages=msgs, max_tokens=12, temperature=0)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.choices[0].finish_reason == "length" and whole.usage is not None
    assert whole.usage.completion_tokens == 12 and whole.usage.prompt_tokens > 0
    chunks = list(
        client.chat.completions.create(
            model="appliance",
            messages=msgs,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None and last.usage.completion_tokens == 12
    assert last.usage.prompt_tokens_details is not None
    assert (last.usage.prompt_tokens_details.cached_tokens or 0) > 0  # the same prompt again: the KV prefix cache
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_streamed_and_not(server: ServerProcess) -> None:
    client = _oa(server)
    model = _local(server)
    whole = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0)
    assert whole.object == "text_completion" and whole.usage is not None and whole.usage.completion_tokens == 8
    chunks = list(
        client.completions.create(
            model=model,
            prompt="Once upon a time",
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_stop_seed_temperature_and_logprobs(server: ServerProcess) -> None:
    client = _oa(server)
    model = _local(server)
    base = client.completions.create(model=model, prompt="A B C", max_tokens=16, temperature=0).choices[0].text
    assert len(base) > 4
    stop = base[len(base) // 2 : len(base) // 2 + 2]
    cut = client.completions.create(model=model, prompt="A B C", max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == base[: base.index(stop)] and cut.choices[0].finish_reason == "stop"
    hot = [
        client.completions.create(model=model, prompt="A B C", max_tokens=16, temperature=1.5, seed=s).choices[0].text
        for s in (7, 7, 8)
    ]
    assert hot[0] == hot[1] != hot[2]
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0, logprobs=True
    )
    content = r.choices[0].logprobs.content if r.choices[0].logprobs else None
    assert content is not None and len(content) == 5 and all(t.logprob <= 0 for t in content)
    assert "".join(bytes(t.bytes or []).decode("utf-8", "replace") for t in content) == r.choices[0].message.content


def test_user_is_written_to_the_ledger(server: ServerProcess) -> None:
    _oa(server).chat.completions.create(
        model="appliance",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=2,
        user="alice@example",
        extra_headers={"x-request-id": "user-row-1"},
    )
    db = sqlite3.connect(server.config.parent / "state" / "ledger.sqlite")
    row = db.execute("SELECT tenant, user, route FROM requests WHERE request_id='user-row-1'").fetchone()
    assert row == ("acme", "alice@example", "local")


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 2.0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"seed": -5}, "seed"),
        ({"n": 2}, "n"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": []}, "messages"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
            "response_format.json_schema.schema",
        ),
        ({"top_logprobs": 3, "logprobs": True}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "word " * 9000}]}, "messages"),
    ],
)
def test_bad_parameters_are_400_naming_the_field(server: ServerProcess, kwargs: dict[str, Any], param: str) -> None:
    args: dict[str, Any] = {"model": "appliance", "messages": [{"role": "user", "content": "hi"}], **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        _oa(server).chat.completions.create(**args)
    assert e.value.status_code == 400
    body: Any = e.value.body
    assert body["param"] == param and body["message"].startswith(param + ":"), body
    assert body["type"] == "invalid_request_error"


PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 6}, "age": {"type": "integer"}, "ok": {"type": "boolean"}},
    "required": ["name", "age", "ok"],
    "additionalProperties": False,
}


def _person(text: str) -> None:
    """PERSON, checked by hand (the tiny random model may spell a character with bytes that are not UTF-8:
    the grammar counts such a run as one character, the decoder as several U+FFFD)."""
    value = json.loads(text)
    assert isinstance(value, dict) and set(value) == {"name", "age", "ok"}, value
    assert (
        isinstance(value["name"], str) and len(value["name"].replace("\ufffd" * 4, "?").replace("\ufffd" * 3, "?")) <= 6
    )
    assert type(value["age"]) is int and type(value["ok"]) is bool


def test_response_format_json_schema_and_json_object(server: ServerProcess) -> None:
    """JSON output by grammar-constrained decoding: whole and streamed, greedy and sampled."""
    client = _oa(server)
    msgs: Any = [{"role": "user", "content": "describe a person as JSON"}]
    schema: Any = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for kw in ({"temperature": 0}, {"temperature": 1.0, "seed": 3}, {"temperature": 1.0, "seed": 4}):
        r = client.chat.completions.create(
            model="appliance", messages=msgs, response_format=schema, max_tokens=300, **kw
        )
        assert r.choices[0].finish_reason == "stop"
        _person(r.choices[0].message.content or "")
    chunks = list(
        client.chat.completions.create(
            model="appliance", messages=msgs, response_format=schema, max_tokens=300, temperature=0, stream=True
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    _person(streamed)
    greedy = client.chat.completions.create(
        model="appliance", messages=msgs, response_format=schema, max_tokens=300, temperature=0
    )
    assert streamed == greedy.choices[0].message.content
    # json_object: any object; a random model may run out of tokens inside an (unbounded) string
    r = client.chat.completions.create(
        model="appliance", messages=msgs, response_format={"type": "json_object"}, max_tokens=300, temperature=0
    )
    content = r.choices[0].message.content or ""
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)
    else:
        assert content.startswith("{")
    # the legacy completions endpoint takes it too
    done = client.completions.create(
        model="appliance", prompt="a person:", max_tokens=300, temperature=0, extra_body={"response_format": schema}
    )
    _person(done.choices[0].text)


def test_auth_and_unknown_model(server: ServerProcess) -> None:
    for key in ("wrong-token",):
        with pytest.raises(openai.AuthenticationError) as e:
            _oa(server, key).models.list()
        assert e.value.status_code == 401
    status, _, body = _raw(server, "/v1/models", token=None)
    assert status == 401 and "bearer" in body["error"]["message"]
    req = urllib.request.Request(_base(server) + "/v1/models", headers={"x-api-key": TOKENS["globex"]})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200
    with pytest.raises(openai.NotFoundError) as e2:
        _oa(server).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert e2.value.code == "model_not_found"


def test_overload_is_429_with_retry_after(server: ServerProcess) -> None:
    """max_concurrent 1, max_queue 0: a second request while one streams is refused at once."""
    client = _oa(server)
    stream = client.completions.create(model="appliance", prompt="hello", max_tokens=3000, temperature=0, stream=True)
    next(iter(stream))
    try:
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model="appliance", prompt="hello", max_tokens=2)
        assert e.value.status_code == 429 and e.value.response.headers["retry-after"] == "1"
    finally:
        stream.close()  # the disconnect cancels the long generation
    deadline = time.monotonic() + 5
    while True:  # its slot comes back once the engine has dropped it
        try:
            client.completions.create(model="appliance", prompt="hello", max_tokens=1)
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def _metric(srv: ServerProcess, name: str) -> float:
    status, _, body = _raw(srv, "/metrics", token=None)
    assert status == 200
    return float(next(line.split()[-1] for line in body.splitlines() if line.startswith(name + " ")))


def test_a_disconnect_frees_the_kv_cache(server: ServerProcess) -> None:
    total = _metric(server, "appliance_kv_blocks_total")
    client = _oa(server, timeout=0.5)
    with pytest.raises(openai.APITimeoutError):  # not streamed: the client gives up and disconnects
        client.completions.create(model="appliance", prompt="hello", max_tokens=5000, temperature=0)
    deadline = time.monotonic() + 5
    while _metric(server, "appliance_kv_blocks_free") < total and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _metric(server, "appliance_kv_blocks_free") == total
    assert _metric(server, "appliance_engine_sequences_running") == 0


def test_health_and_metrics(server: ServerProcess) -> None:
    status, _, body = _raw(server, "/health", token=None)
    assert status == 200 and body["status"] == "ok"
    _, _, text = _raw(server, "/metrics", token=None)
    assert 'method="http.chat.completions",route="local",code="OK"' in text


def test_errors_in_openai_shape_with_retry_after() -> None:
    busy = openai_error(Overloaded("overloaded", 1500), {}, 1000)
    assert busy.status_code == 429 and busy.headers["retry-after"] == "2"
    down = openai_error(Unavailable("the model is loading"), {}, 1000)
    assert down.status_code == 503 and down.headers["retry-after"] == "1"
    err = json.loads(bytes(down.body))["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] is None


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"", None),
        (b"[1, 2]", None),
        ({"model": "appliance", "messages": "hi"}, "messages"),
        ({"model": "appliance", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"model": "appliance", "messages": [{"role": "user", "content": "x"}], "max_tokens": "9"}, "max_tokens"),
        ({"model": "appliance", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**30}, "max_tokens"),
        ({"model": "appliance", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2**40}, "max_tokens"),
        ({"model": "appliance", "messages": [{"role": "user", "content": "x"}], "temperature": 1e308}, "temperature"),
        ({"model": "appliance", "messages": [{"role": "user", "content": "x"}], "seed": 2**64}, "seed"),
        ({"model": "appliance", "messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 40}, "stop"),
        ({"model": "appliance", "messages": [{"role": "user", "content": "x\ud800"}]}, None),  # a lone surrogate
        (b'{"model": "appliance", "messages": [{"role": "user", "content": "x\xff"}]}', None),  # not UTF-8
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    ],
)
def test_bad_bodies_get_clear_400s(server: ServerProcess, body: Any, param: str | None) -> None:
    status, _, answer = _raw(server, "/v1/chat/completions", body)
    assert status == 400, answer
    assert answer["error"]["param"] == param, answer
    assert answer["error"]["message"]


def test_a_huge_body_is_413(server: ServerProcess) -> None:
    big = {"model": "appliance", "messages": [{"role": "user", "content": "x" * (5 * 1024 * 1024)}]}
    status, _, answer = _raw(server, "/v1/chat/completions", big)
    assert status == 413 and "max_message_bytes" in answer["error"]["message"]


# ------------------------------------------------------------------ embeddings and the semantic cache


def test_embeddings_float_and_base64(cached: ServerProcess) -> None:
    client = _oa(cached)
    model = next(m.id for m in client.models.list().data if "MiniLM" in m.id)
    floats = client.embeddings.create(model=model, input=["a cat", "a dog"], encoding_format="float")
    assert len(floats.data) == 2 and len(floats.data[0].embedding) == 384
    assert floats.usage.prompt_tokens > 0
    # what the OpenAI Node SDK sends by default: base64 of little-endian float32
    status, _, raw = _raw(cached, "/v1/embeddings", {"model": model, "input": "a cat", "encoding_format": "base64"})
    assert status == 200
    decoded = struct.unpack("<384f", base64.b64decode(raw["data"][0]["embedding"]))
    assert max(abs(a - b) for a, b in zip(decoded, floats.data[0].embedding, strict=True)) < 1e-6
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=model, input=[""])
    assert e.value.body["param"] == "input[0]"  # type: ignore[index]


def test_a_semantic_cache_hit_shows_as_cached_tokens(cached: ServerProcess) -> None:
    client = _oa(cached)
    msgs: Any = [{"role": "user", "content": "What is the capital of France?"}]
    first = client.chat.completions.create(model="appliance", messages=msgs, max_tokens=6, temperature=0)
    again = client.chat.completions.create(model="appliance", messages=msgs, max_tokens=6, temperature=0)
    assert again.choices[0].message.content == first.choices[0].message.content
    assert again.model_extra is not None and again.model_extra["appliance"]["route"] == "cache"
    assert again.usage is not None and again.usage.prompt_tokens_details is not None
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens > 0
    streamed = list(
        client.chat.completions.create(model="appliance", messages=msgs, max_tokens=6, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == first.choices[0].message.content
    lines = list(_ol(cached).chat(model="appliance", messages=msgs, options={"num_predict": 6}, stream=True))
    assert "".join(p.message.content or "" for p in lines) == first.choices[0].message.content


# ------------------------------------------------------------------ Ollama


def _ol(srv: ServerProcess, tenant: str = "acme") -> ollama.Client:
    return ollama.Client(host=_base(srv), headers={"Authorization": f"Bearer {TOKENS[tenant]}"})


def test_ollama_version_tags_show(server: ServerProcess) -> None:
    client = _ol(server)
    status, _, version = _raw(server, "/api/version", token=None)
    assert status == 200 and version["version"]
    names = [m.model or "" for m in client.list().models]
    assert "appliance:latest" in names
    local = next(n for n in names if n != "appliance:latest")
    shown = client.show(local)
    assert shown.capabilities == ["completion"] and shown.modelinfo is not None
    assert shown.modelinfo["general.architecture"] == "gemma3"
    with pytest.raises(ollama.ResponseError) as e:
        client.show("nothing-here")
    assert e.value.status_code == 404


def test_ollama_chat_and_generate(server: ServerProcess) -> None:
    client = _ol(server)
    opts = {"temperature": 0, "num_predict": 6}
    whole = client.chat(model="appliance", messages=[{"role": "user", "content": "hi there"}], options=opts)
    assert whole.done and whole.eval_count == 6 and whole.message.role == "assistant"
    parts = list(
        client.chat(model="appliance", messages=[{"role": "user", "content": "hi there"}], options=opts, stream=True)
    )
    assert "".join(p.message.content or "" for p in parts) == whole.message.content
    assert parts[-1].done and parts[-1].done_reason == "length" and not any(p.done for p in parts[:-1])
    gen = client.generate(model="appliance:latest", prompt="hi there", options=opts)
    assert gen.response == whole.message.content  # generate applies the chat template, as Ollama does
    raw = list(client.generate(model="appliance", prompt="hi there", raw=True, options=opts, stream=True))
    assert raw[-1].done and raw[-1].eval_count == 6
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="appliance", messages=[{"role": "user", "content": "x"}], options={"temperature": -2})
    assert e.value.status_code == 400 and "options.temperature" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="appliance", messages=[{"role": "user", "content": "x"}], format={"type": "nope"})
    assert e.value.status_code == 400 and "format" in e.value.error


def test_ollama_format_json_and_schema(server: ServerProcess) -> None:
    client = _ol(server)
    msgs = [{"role": "user", "content": "describe a person as JSON"}]
    for opts in ({"temperature": 0, "num_predict": 300}, {"temperature": 1.0, "seed": 5, "num_predict": 300}):
        r = client.chat(model="appliance", messages=msgs, format=PERSON, options=opts)
        assert r.done_reason == "stop"
        _person(r.message.content or "")
    parts = list(
        client.generate(
            model="appliance",
            prompt="a person",
            format=PERSON,
            options={"temperature": 0, "num_predict": 300},
            stream=True,
        )
    )
    _person("".join(p.response for p in parts))
    r2 = client.generate(
        model="appliance", prompt="a person", format="json", options={"temperature": 0, "num_predict": 300}
    )
    if r2.done_reason == "stop":
        assert isinstance(json.loads(r2.response), dict)
    else:
        assert r2.response.startswith("{")


def test_ollama_embed(cached: ServerProcess) -> None:
    client = _ol(cached)
    name = next(m.model for m in client.list().models if m.model and "MiniLM" in m.model)
    r = client.embed(model=name, input=["one", "two"])
    assert len(r.embeddings) == 2 and len(r.embeddings[0]) == 384
    assert client.show(name).capabilities == ["embedding"]


def test_ollama_needs_a_token_when_tenants_exist(server: ServerProcess) -> None:
    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(host=_base(server)).list()
    assert e.value.status_code == 401


# ------------------------------------------------------------------ start-up rules


def test_a_non_loopback_listener_needs_tenants(tiny: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "a.toml"
    cfg.write_text(f'[model]\npath = "{tiny}"\n')
    argv = [sys.executable, "-m", "appliance.cli.serve", "serve", "-c", str(cfg), "--check-config"]
    bad = subprocess.run([*argv, "--http", "0.0.0.0:8080"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "$.http.listen" in bad.stderr
    ok = subprocess.run([*argv, "--http", "127.0.0.1:8080"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and '"http":{"listen":"127.0.0.1:8080"}' in ok.stdout


def test_http_listen_and_its_deprecated_spelling(caplog: pytest.LogCaptureFixture) -> None:
    """`[http] listen` is the key; `[server] http` still works, read as it with a warning; both at once
    must agree; a bad address names the field."""
    from appliance.common.config import ConfigError, parse_config

    assert parse_config('[http]\nlisten = "127.0.0.1:8080"\n').http.listen == "127.0.0.1:8080"
    assert parse_config("").http.listen == ""  # off unless set (`make serve` sets 127.0.0.1:8080)
    with caplog.at_level("WARNING", logger="appliance.config"):
        old = parse_config('[server]\nhttp = "127.0.0.1:9090"\n')
    assert old.http.listen == "127.0.0.1:9090" and old.server.http == ""
    assert "[server] http is deprecated" in caplog.text
    same = parse_config('[server]\nhttp = "127.0.0.1:9090"\n[http]\nlisten = "127.0.0.1:9090"\n')
    assert same.http.listen == "127.0.0.1:9090"
    with pytest.raises(ConfigError, match=r"\$\.http: \[server\] http .* is the old name of \[http\] listen"):
        parse_config('[server]\nhttp = "127.0.0.1:9090"\n[http]\nlisten = "127.0.0.1:8080"\n')
    with pytest.raises(ConfigError, match=r"\$\.http\.listen: 'nowhere' is not host:port"):
        parse_config('[http]\nlisten = "nowhere"\n')


def test_the_deprecated_server_http_still_serves(tiny: Path, tmp_path: Path) -> None:
    srv = ServerProcess(write_config(tmp_path / "appliance.toml", tiny, server={"http": "127.0.0.1:0"}))
    try:
        assert srv.http_port and urllib.request.urlopen(_base(srv) + "/health", timeout=10).status == 200
        assert "[server] http is deprecated" in srv.log.read_text()
    finally:
        assert srv.stop() == 0


def test_concurrent_streams_do_not_mix(cached: ServerProcess) -> None:
    """Two clients at once on the server that admits several: each gets its own whole answer."""
    client = _oa(cached)
    out: dict[str, str] = {}

    def one(prompt: str) -> None:
        s = client.completions.create(model="appliance", prompt=prompt, max_tokens=10, temperature=0, stream=True)
        out[prompt] = "".join(c.choices[0].text for c in s if c.choices)

    threads = [threading.Thread(target=one, args=(p,)) for p in ("red green", "one two three")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for p, text in out.items():
        alone = client.completions.create(model=_local(cached), prompt=p, max_tokens=10, temperature=0)
        assert alone.choices[0].text == text

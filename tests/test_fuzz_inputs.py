"""Property-based fuzzing (hypothesis) of every input a user or client controls: the TOML config, the
model manifest, distillation JSONL, the cache's CSV, gRPC GenerateRequest bytes and fields, and the
HTTP edge's request bodies (OpenAI and Ollama). Each target feeds generated input -- near-valid
documents with adversarial values (NaN, inf, negative and huge numbers, lone surrogates, empty and
oversized strings, unknown keys, wrong types) and raw bytes -- to the function the service calls, and
accepts exactly two outcomes: a result, or the module's own error type naming what was wrong. Any
other exception is a finding.

`make test` runs a smoke of APPLIANCE_FUZZ_EXAMPLES (default 100) examples per target; `make fuzz`
runs 100,000 per target.
"""

from __future__ import annotations

import json
import math
import os
import string
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.cache.errors import CacheError
from appliance.cache.replay import read_csv
from appliance.common.config import Config, ConfigError, parse_config
from appliance.common.errors import RequestError
from appliance.common.types import ChatMessage, GenerateInput, Passage, SamplingInput
from appliance.distill.data import DataError, read_jsonl
from appliance.edge.grpc.proto import pb2
from appliance.edge.grpc.server import input_from_proto
from appliance.edge.http import ollama, openai
from appliance.edge.http.app import Model
from appliance.edge.http.errors import body_error
from appliance.models.manifest import Manifest, ManifestError, parse_manifest
from appliance.service.normalize import normalize

EXAMPLES = int(os.environ.get("APPLIANCE_FUZZ_EXAMPLES", "100"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)

# ------------------------------------------------------------------ adversarial values

TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "\x00", "\ud800", "a\udfffb", "auto", "local_only", "skip", "user", "x" * 5000]),
)
INTS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64]),
)
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, -1.0, 1e308, 5e-324]))
SCALARS = st.one_of(st.none(), st.booleans(), INTS, FLOATS, TEXT)
JSON = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4), max_leaves=12
)


def struct_keys(t: Any) -> list[str]:
    return (
        [f.encode_name for f in msgspec.structs.fields(t)]
        if isinstance(t, type) and issubclass(t, msgspec.Struct)
        else []
    )


def near_valid(struct: type[msgspec.Struct], values: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Dicts mostly keyed by the struct's own field names (a few unknown ones) with adversarial values."""
    keys = st.sampled_from(struct_keys(struct) or ["x"]) | st.text(
        string.ascii_lowercase + "_", min_size=1, max_size=12
    )
    return st.dictionaries(keys, values, max_size=6)


# ------------------------------------------------------------------ TOML


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string, except where JSON's escapes are not TOML's (a finding either way)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v if x is not None) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items() if x is not None) + "}"
    return '""'


def toml_doc(top: dict[str, Any], tables: dict[str, dict[str, Any]], arrays: dict[str, list[dict[str, Any]]]) -> str:
    lines = [f"{json.dumps(k)} = {toml_value(v)}" for k, v in top.items() if v is not None]
    for name, body in tables.items():
        lines.append(f"[{json.dumps(name)}]")
        lines += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in body.items() if v is not None]
    for name, items in arrays.items():
        for body in items:
            lines.append(f"[[{json.dumps(name)}]]")
            lines += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in body.items() if v is not None]
    return "\n".join(lines) + "\n"


def _section_type(root: type[msgspec.Struct], name: str) -> Any:
    for f in msgspec.structs.fields(root):
        if f.encode_name == name:
            t = f.type
            args = getattr(t, "__args__", ())
            return next((a for a in (t, *args) if isinstance(a, type) and issubclass(a, msgspec.Struct)), None)
    return None


def toml_for(root: type[msgspec.Struct]) -> st.SearchStrategy[str]:
    sections = [*struct_keys(root), "bogus"]

    @st.composite
    def doc(draw: st.DrawFn) -> str:
        values = JSON
        tables: dict[str, dict[str, Any]] = {}
        arrays: dict[str, list[dict[str, Any]]] = {}
        for name in draw(st.lists(st.sampled_from(sections), max_size=5, unique=True)):
            sub = _section_type(root, name)
            body = draw(near_valid(sub, values)) if sub is not None else draw(st.dictionaries(TEXT, values, max_size=3))
            if draw(st.booleans()):
                arrays[name] = [body, *draw(st.lists(near_valid(sub, values) if sub else st.just({}), max_size=2))]
            else:
                tables[name] = body
        return toml_doc(draw(st.dictionaries(TEXT, SCALARS, max_size=2)), tables, arrays)

    return doc() | st.text(max_size=200)


def expect(fn: Callable[[], Any], *errors: type[BaseException]) -> None:
    """fn returns, or raises one of `errors` with a message (never another exception)."""
    try:
        fn()
    except errors as e:
        assert str(e).strip(), f"{type(e).__name__} without a message"


@FUZZ
@given(toml_for(Config))
def test_config_toml(text: str) -> None:
    expect(lambda: parse_config(text, "fuzz.toml"), ConfigError)


@FUZZ
@given(toml_for(Manifest))
def test_model_manifest(text: str) -> None:
    expect(lambda: parse_manifest(text, "fuzz-manifest.toml"), ManifestError)


# ------------------------------------------------------------------ files: distillation JSONL, cache CSV

MESSAGE = st.fixed_dictionaries(
    {}, optional={"role": TEXT | st.sampled_from(["user", "assistant", "system"]), "content": JSON}
)
JSONL_LINE = st.one_of(
    st.fixed_dictionaries({}, optional={"prompt": JSON, "completion": JSON, "extra": JSON}).map(json.dumps),
    st.fixed_dictionaries({"messages": st.lists(MESSAGE, max_size=4) | JSON}).map(json.dumps),
    JSON.map(json.dumps),
    st.text(max_size=60),
)


def _tmp(data: bytes, suffix: str) -> Path:
    fd, name = tempfile.mkstemp(suffix=suffix)
    os.write(fd, data)
    os.close(fd)
    return Path(name)


@FUZZ
@given(st.lists(JSONL_LINE, max_size=6), st.binary(max_size=40), st.booleans())
def test_distill_jsonl(lines: list[str], junk: bytes, with_junk: bool) -> None:
    data = "\n".join(lines).encode("utf-8", "surrogatepass") + (b"\n" + junk if with_junk else b"")
    path = _tmp(data, ".jsonl")
    try:
        expect(lambda: read_jsonl(path), DataError)
    finally:
        path.unlink()


CSV_CELL = st.one_of(TEXT, st.sampled_from(['"', '""', "a,b", "\n", "\r\n", '"unterminated']))


@FUZZ
@given(
    st.lists(st.sampled_from(["text", "category", "other", ""]), min_size=0, max_size=3),
    st.lists(st.lists(CSV_CELL, max_size=4), max_size=5),
    st.binary(max_size=30),
)
def test_cache_csv(header: list[str], rows: list[list[str]], junk: bytes) -> None:
    text = "\n".join(",".join(r) for r in [header, *rows])
    path = _tmp(text.encode("utf-8", "surrogatepass") + junk, ".csv")
    try:
        expect(lambda: read_csv(path), CacheError)
    finally:
        path.unlink()


# ------------------------------------------------------------------ gRPC: bytes on the wire, then the fields


def _normalize(inp: GenerateInput, chat: bool) -> None:
    normalize(inp, "fuzz-tenant", chat=chat, default_max_tokens=64, default_exit=None)


@FUZZ
@given(st.binary(max_size=300), st.booleans())
def test_grpc_request_bytes(data: bytes, chat: bool) -> None:
    """What grpc hands the servicer: a GenerateRequest decoded from the wire (DecodeError is grpc's
    INVALID/INTERNAL before our code runs), converted and normalized."""
    try:
        msg = pb2().GenerateRequest.FromString(data)
    except DecodeError:
        return
    expect(lambda: _normalize(input_from_proto(msg), chat), RequestError)


SAMPLING = st.fixed_dictionaries(
    {},
    optional={
        "max_tokens": INTS,
        "temperature": FLOATS,
        "top_k": INTS,
        "top_p": FLOATS,
        "min_p": FLOATS,
        "repeat_penalty": FLOATS,
        "seed": INTS,
        "stop": st.lists(TEXT, max_size=40),
        "early_exit": st.sampled_from(["", "off", "lossless", "adaptive", "bogus"]),
        "exit_threshold": FLOATS,
        "logprobs": st.booleans(),
        "grammar": TEXT | st.sampled_from(['root ::= "a"', "root ::= (", "x ::= y"]),
    },
)


@FUZZ
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "request_id": TEXT,
            "prompt": TEXT,
            "messages": st.lists(st.tuples(TEXT, TEXT), max_size=4),
            "session_id": TEXT,
            "context": st.lists(st.tuples(TEXT, FLOATS), max_size=3),
            "cache_policy": st.sampled_from(["auto", "skip", "read_only", "7", ""]),
            "route_policy": st.sampled_from(["auto", "local_only", "cloud_only", "9", ""]),
            "max_cost": FLOATS,
            "user": TEXT,
        },
    ),
    SAMPLING,
    st.booleans(),
)
def test_grpc_request_fields(fields: dict[str, Any], sampling: dict[str, Any], chat: bool) -> None:
    """Every GenerateRequest field at its adversarial values (NaN/inf/negative sampling values, huge
    counts, lone surrogates -- what invalid UTF-8 becomes -- empty and oversized strings)."""
    fields = dict(fields)
    fields["messages"] = tuple(ChatMessage(r, c) for r, c in fields.get("messages", ()))
    fields["context"] = tuple(Passage(t, s) for t, s in fields.get("context", ()))
    inp = GenerateInput(**fields, sampling=SamplingInput(**{**sampling, "stop": tuple(sampling.get("stop", ()))}))
    expect(lambda: _normalize(inp, chat), RequestError)


# ------------------------------------------------------------------ HTTP bodies (OpenAI and Ollama)

AUTO = Model("appliance", "generation")
OPENAI_MESSAGE = st.fixed_dictionaries(
    {}, optional={"role": st.sampled_from(["user", "assistant", "system", "tool", "x"]), "content": JSON, "name": JSON}
)


def http_body(struct: type[msgspec.Struct], extra: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[bytes]:
    fields = {k: JSON for k in struct_keys(struct)} | extra
    doc = st.fixed_dictionaries({}, optional=fields).map(lambda d: json.dumps(d).encode())
    return doc | JSON.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=80)


def decode(body: bytes, struct: type[Any]) -> Any:
    """The edge's body(): msgspec decode; its errors become InvalidArgument naming the field."""
    try:
        return msgspec.json.decode(body, type=struct)
    except msgspec.MsgspecError as e:
        raise body_error(e) from None


SAMPLING_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "max_tokens": INTS | JSON,
    "max_completion_tokens": INTS,
    "temperature": FLOATS | JSON,
    "top_p": FLOATS,
    "seed": INTS,
    "stop": JSON | st.lists(TEXT, max_size=6),
    "n": INTS,
    "logprobs": JSON,
    "top_logprobs": INTS,
    "stream": JSON,
    "response_format": JSON
    | st.sampled_from(
        [{"type": "json_object"}, {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}]
    ),
}


@FUZZ
@given(http_body(openai.ChatBody, {"messages": st.lists(OPENAI_MESSAGE, max_size=4), **SAMPLING_FIELDS}))
def test_http_openai_chat(body: bytes) -> None:
    expect(lambda: _normalize(openai.chat_input(decode(body, openai.ChatBody), "rid-1", AUTO, {}), False), RequestError)


@FUZZ
@given(http_body(openai.CompletionBody, {"prompt": JSON | TEXT, **SAMPLING_FIELDS}))
def test_http_openai_completion(body: bytes) -> None:
    expect(
        lambda: _normalize(openai.completion_input(decode(body, openai.CompletionBody), "rid-1", AUTO), False),
        RequestError,
    )


@FUZZ
@given(http_body(openai.EmbeddingsBody, {"input": JSON | st.lists(TEXT, max_size=4)}))
def test_http_openai_embeddings(body: bytes) -> None:
    expect(lambda: decode(body, openai.EmbeddingsBody), RequestError)


OLLAMA_OPTIONS = st.fixed_dictionaries({}, optional={k: INTS | FLOATS | JSON for k in struct_keys(ollama.Options)})


@FUZZ
@given(
    http_body(
        ollama.ChatBody,
        {"messages": st.lists(OPENAI_MESSAGE, max_size=4), "options": OLLAMA_OPTIONS | JSON, "format": JSON},
    )
)
def test_http_ollama_chat(body: bytes) -> None:
    expect(lambda: ollama_input(decode(body, ollama.ChatBody)), RequestError)


@FUZZ
@given(http_body(ollama.GenerateBody, {"prompt": TEXT | JSON, "options": OLLAMA_OPTIONS | JSON, "format": JSON}))
def test_http_ollama_generate(body: bytes) -> None:
    expect(lambda: ollama_input(decode(body, ollama.GenerateBody)), RequestError)


def ollama_input(b: Any) -> None:
    """What the Ollama routes validate: the options and format (ollama._sampling), the messages or the
    prompt, then normalize."""
    sampling = ollama._sampling(b.options, b.format)
    if isinstance(b, ollama.ChatBody):
        messages = tuple(ChatMessage(m.role, m.content) for m in b.messages)
    else:
        messages = (ChatMessage("user", b.prompt),)
    if messages:
        _normalize(GenerateInput(request_id="rid-1", messages=messages, sampling=sampling), False)

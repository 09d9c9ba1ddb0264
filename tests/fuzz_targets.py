"""The Python fuzz targets: every input a user or client controls, as the bytes that arrive -- the TOML
config, the model manifest, distillation JSONL, the cache's CSV, a gRPC GenerateRequest on the wire,
and the HTTP edge's request bodies (OpenAI and Ollama). Each target feeds its bytes to the function
the service calls and accepts exactly two outcomes: a result, or the module's own error type with a
message naming what was wrong. Any other exception is a finding.

Two drivers share them (`TARGETS`: name -> Target):
- hypothesis (`tests/test_fuzz_inputs.py`, a smoke in `make test`): each target's `strategy` draws
  near-valid documents with adversarial values (NaN, inf, negative and huge numbers, lone surrogates,
  empty and oversized strings, unknown keys, wrong types) and raw bytes;
- libFuzzer through atheris (`tests/fuzz_run.py`, `make fuzz`): coverage-guided mutation of the same
  bytes, seeded with documents drawn from those strategies and the regression inputs of past findings
  (`tests/data/fuzz/TARGET/`).
"""

from __future__ import annotations

import json
import math
import os
import string
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from google.protobuf.message import DecodeError
from hypothesis import strategies as st

from appliance.cache.errors import CacheError
from appliance.cache.replay import read_csv
from appliance.common.config import Config, ConfigError, parse_config
from appliance.common.errors import RequestError
from appliance.common.types import ChatMessage, GenerateInput
from appliance.distill.data import DataError, read_jsonl
from appliance.edge.grpc.proto import pb2
from appliance.edge.grpc.server import input_from_proto
from appliance.edge.http import ollama, openai
from appliance.edge.http.app import Model, decode_body
from appliance.models.manifest import Manifest, ManifestError, parse_manifest
from appliance.service.normalize import normalize


@dataclass(frozen=True)
class Target:
    run: Callable[[bytes], None]  # raises only on a finding
    generated: st.SearchStrategy[bytes]  # near-valid and adversarial inputs
    valid: tuple[bytes, ...] = ()  # well-formed inputs that reach past the parsers

    @property
    def strategy(self) -> st.SearchStrategy[bytes]:
        """What hypothesis draws, and atheris' seeds: the valid inputs and the generated ones."""
        return st.sampled_from(self.valid) | self.generated if self.valid else self.generated


def expect(fn: Callable[[], Any], *errors: type[BaseException]) -> None:
    """fn returns, or raises one of `errors` with a message (never another exception)."""
    try:
        fn()
    except errors as e:
        assert str(e).strip(), f"{type(e).__name__} without a message"


def utf8(text: str) -> bytes:
    """Text as bytes, lone surrogates included (they become invalid UTF-8, which clients can send)."""
    return text.encode("utf-8", "surrogatepass")


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


# ------------------------------------------------------------------ TOML: config and model manifest


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


def toml_for(root: type[msgspec.Struct]) -> st.SearchStrategy[bytes]:
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

    return (doc() | st.text(max_size=200)).map(utf8) | st.binary(max_size=80)


def config_toml(data: bytes) -> None:
    expect(lambda: parse_config(data, "fuzz.toml"), ConfigError)


def model_manifest(data: bytes) -> None:
    expect(lambda: parse_manifest(data, "fuzz-manifest.toml"), ManifestError)


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
JSONL = st.builds(
    lambda lines, junk: utf8("\n".join(lines)) + junk,
    st.lists(JSONL_LINE, max_size=6),
    st.just(b"") | st.binary(max_size=40).map(lambda b: b"\n" + b),
)
CSV_CELL = st.one_of(TEXT, st.sampled_from(['"', '""', "a,b", "\n", "\r\n", '"unterminated']))
CSV = st.builds(
    lambda header, rows, junk: utf8("\n".join(",".join(r) for r in [header, *rows])) + junk,
    st.lists(st.sampled_from(["text", "category", "other", ""]), min_size=0, max_size=3),
    st.lists(st.lists(CSV_CELL, max_size=4), max_size=5),
    st.binary(max_size=30),
)


def _file(data: bytes, suffix: str, read: Callable[[Path], Any], error: type[BaseException]) -> None:
    """`read` the bytes as a file on disk, as the service reads them."""
    fd, name = tempfile.mkstemp(suffix=suffix)
    try:
        os.write(fd, data)
        os.close(fd)
        expect(lambda: read(Path(name)), error)
    finally:
        os.unlink(name)


def distill_jsonl(data: bytes) -> None:
    _file(data, ".jsonl", read_jsonl, DataError)


def cache_csv(data: bytes) -> None:
    _file(data, ".csv", read_csv, CacheError)


# ------------------------------------------------------------------ gRPC: a GenerateRequest on the wire


def _normalize(inp: GenerateInput, chat: bool) -> None:
    normalize(inp, "fuzz-tenant", chat=chat, default_max_tokens=64, default_exit=None)


def grpc_request(data: bytes) -> None:
    """What grpc hands the servicer: a GenerateRequest decoded from the wire (DecodeError is grpc's
    INVALID/INTERNAL before our code runs), converted and normalized, as Generate (first byte even)
    or Chat (odd) would."""
    chat = bool(data[:1]) and data[0] % 2 == 1
    try:
        msg = pb2().GenerateRequest.FromString(data[1:])
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
        "early_exit": INTS,
        "exit_threshold": FLOATS,
        "grammar": TEXT | st.sampled_from(['root ::= "a"', "root ::= (", "x ::= y"]),
        "json_schema": TEXT | st.sampled_from(['{"type": "object"}', "{", "[]", '{"type": "nope"}']),
    },
)
FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "request_id": TEXT,
        "prompt": TEXT,
        "messages": st.lists(st.tuples(TEXT, TEXT), max_size=4),
        "session_id": TEXT,
        "context": st.lists(st.tuples(TEXT, FLOATS), max_size=3),
        "cache_policy": INTS,
        "route_policy": INTS,
        "max_cost": FLOATS,
        "model": TEXT,
        "tenant": TEXT,
    },
)


def _set(msg: Any, name: str, value: Any) -> None:
    """Set a field to `value` where protobuf can carry it (an int out of the field's range or a lone
    surrogate cannot be sent: skipped)."""
    try:
        if isinstance(value, list):
            getattr(msg, name).extend(value)
        else:
            setattr(msg, name, value)
    except (ValueError, TypeError, UnicodeError):
        pass


def request_bytes(fields: dict[str, Any], sampling: dict[str, Any], chat: bool) -> bytes:
    """A GenerateRequest with every field at adversarial values, serialized (first byte: Chat or not)."""
    msg = pb2().GenerateRequest()
    for name, value in fields.items():
        if name == "messages":
            for role, content in value:
                m = msg.messages.add()
                _set(m, "role", role)
                _set(m, "content", content)
        elif name == "context":
            for text, score in value:
                c = msg.context.add()
                _set(c, "text", text)
                _set(c, "score", score)
        else:
            _set(msg, name, value)
    for name, value in sampling.items():
        _set(msg.sampling, name, value)
    return bytes([int(chat)]) + msg.SerializeToString()


GRPC = st.builds(request_bytes, FIELDS, SAMPLING, st.booleans()) | st.binary(max_size=300)


# ------------------------------------------------------------------ HTTP bodies (OpenAI and Ollama)

AUTO = Model("appliance", "generation")
OPENAI_MESSAGE = st.fixed_dictionaries(
    {}, optional={"role": st.sampled_from(["user", "assistant", "system", "tool", "x"]), "content": JSON, "name": JSON}
)


def http_body(struct: type[msgspec.Struct], extra: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[bytes]:
    fields = {k: JSON for k in struct_keys(struct)} | extra
    doc = st.fixed_dictionaries({}, optional=fields).map(lambda d: utf8(json.dumps(d)))
    return doc | JSON.map(lambda v: utf8(json.dumps(v))) | st.binary(max_size=80)


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


def openai_chat(body: bytes) -> None:
    expect(
        lambda: _normalize(openai.chat_input(decode_body(body, openai.ChatBody), "rid-1", AUTO, {}), False),
        RequestError,
    )


def openai_completion(body: bytes) -> None:
    expect(
        lambda: _normalize(openai.completion_input(decode_body(body, openai.CompletionBody), "rid-1", AUTO), False),
        RequestError,
    )


def openai_embeddings(body: bytes) -> None:
    expect(lambda: decode_body(body, openai.EmbeddingsBody), RequestError)


def _ollama(b: Any) -> None:
    """What the Ollama routes validate: the options and format (ollama._sampling), the messages or the
    prompt, then normalize."""
    sampling = ollama._sampling(b.options, b.format)
    if isinstance(b, ollama.ChatBody):
        messages = tuple(ChatMessage(m.role, m.content) for m in b.messages)
    else:
        messages = (ChatMessage("user", b.prompt),)
    if messages:
        _normalize(GenerateInput(request_id="rid-1", messages=messages, sampling=sampling), False)


def ollama_chat(body: bytes) -> None:
    expect(lambda: _ollama(decode_body(body, ollama.ChatBody)), RequestError)


def ollama_generate(body: bytes) -> None:
    expect(lambda: _ollama(decode_body(body, ollama.GenerateBody)), RequestError)


OLLAMA_OPTIONS = st.fixed_dictionaries({}, optional={k: INTS | FLOATS | JSON for k in struct_keys(ollama.Options)})


def _json(*docs: dict[str, Any]) -> tuple[bytes, ...]:
    return tuple(json.dumps(d).encode() for d in docs)


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
ROOT = Path(__file__).parents[1]
VALID_CONFIG = (
    (ROOT / "packaging" / "appliance.toml").read_bytes(),
    b"""[cloud]
provider = "openai"
base_url = "http://127.0.0.1:9/v1"
model = "m"
api_key_env = "CLOUD_API_KEY"
timeout_s = 60
[pricing]
input_per_mtok = 3.0
output_per_mtok = 15.0
[route]
policy = "auto"
threshold = 0.5
cascade = true
[budget]
monthly = 50.0
per_request = 0.05
[distill]
capture = true
tasks = ["ticket-triage"]
[[tenants]]
name = "acme"
token_sha256 = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
tasks = ["invoice-fields"]
""",
)
VALID_MANIFEST = ((ROOT / "models" / "manifest.toml").read_bytes(),)
VALID_JSONL = (
    b'{"prompt": "Customer message: my card is lost\nIntent:", "completion": " lost_card"}\n'
    b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n',
)
VALID_CSV = (b'text,category\nmy card is lost,lost_card\n"where, exactly, is it?",card_arrival\n',)
VALID_GRPC = (
    request_bytes(
        {"prompt": "Hello", "request_id": "r1", "max_cost": 0.5}, {"max_tokens": 8, "temperature": 0.7}, False
    ),
    request_bytes(
        {"messages": [("user", "hi")], "session_id": "s1", "context": [("a passage", 0.9)], "model": "triage"},
        {"stop": ["\n"], "top_k": 40, "top_p": 0.9, "seed": 7, "grammar": 'root ::= "a" | "b"'},
        True,
    ),
    request_bytes({"prompt": "{", "cache_policy": 1, "route_policy": 2}, {"json_schema": '{"type": "object"}'}, False),
)
VALID_OPENAI_CHAT = _json(
    {"model": "appliance", "messages": CHAT, "max_tokens": 16, "temperature": 0.2, "stop": ["\n"], "seed": 1},
    {
        "model": "appliance",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "stream": True,
        "logprobs": True,
        "top_logprobs": 2,
        "response_format": {"type": "json_object"},
        "user": "u1",
    },
)
VALID_OPENAI_COMPLETION = _json(
    {"model": "appliance", "prompt": "Once upon", "max_tokens": 8, "top_p": 0.9, "stop": "\n"},
    {"model": "appliance", "prompt": ["a", "b"], "stream": True, "logprobs": 1},
)
VALID_OPENAI_EMBEDDINGS = _json(
    {"model": "all-minilm-l6-v2", "input": "hello"},
    {"model": "all-minilm-l6-v2", "input": ["a", "b"], "encoding_format": "base64", "dimensions": 384},
)
VALID_OLLAMA_CHAT = _json(
    {"model": "appliance", "messages": CHAT, "stream": False, "options": {"temperature": 0.1, "num_predict": 8}},
    {"model": "appliance", "messages": CHAT, "format": "json", "options": {"top_k": 5, "stop": ["x"], "seed": 3}},
)
VALID_OLLAMA_GENERATE = _json(
    {"model": "appliance", "prompt": "Why is the sky blue?", "options": {"num_predict": 8, "top_p": 0.5}},
    {"model": "appliance", "prompt": "x", "format": {"type": "object"}, "stream": True},
)

TARGETS: dict[str, Target] = {
    "config_toml": Target(config_toml, toml_for(Config), VALID_CONFIG),
    "model_manifest": Target(model_manifest, toml_for(Manifest), VALID_MANIFEST),
    "distill_jsonl": Target(distill_jsonl, JSONL, VALID_JSONL),
    "cache_csv": Target(cache_csv, CSV, VALID_CSV),
    "grpc_request": Target(grpc_request, GRPC, VALID_GRPC),
    "http_openai_chat": Target(
        openai_chat,
        http_body(openai.ChatBody, {"messages": st.lists(OPENAI_MESSAGE, max_size=4), **SAMPLING_FIELDS}),
        VALID_OPENAI_CHAT,
    ),
    "http_openai_completion": Target(
        openai_completion,
        http_body(openai.CompletionBody, {"prompt": JSON | TEXT, **SAMPLING_FIELDS}),
        VALID_OPENAI_COMPLETION,
    ),
    "http_openai_embeddings": Target(
        openai_embeddings,
        http_body(openai.EmbeddingsBody, {"input": JSON | st.lists(TEXT, max_size=4)}),
        VALID_OPENAI_EMBEDDINGS,
    ),
    "http_ollama_chat": Target(
        ollama_chat,
        http_body(
            ollama.ChatBody,
            {"messages": st.lists(OPENAI_MESSAGE, max_size=4), "options": OLLAMA_OPTIONS | JSON, "format": JSON},
        ),
        VALID_OLLAMA_CHAT,
    ),
    "http_ollama_generate": Target(
        ollama_generate,
        http_body(ollama.GenerateBody, {"prompt": TEXT | JSON, "options": OLLAMA_OPTIONS | JSON, "format": JSON}),
        VALID_OLLAMA_GENERATE,
    ),
}

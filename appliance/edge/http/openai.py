"""The OpenAI-compatible API: POST /v1/chat/completions, /v1/completions, /v1/embeddings; GET
/v1/models and /v1/models/{id}. Bodies are decoded into the structs below (a wrong type names the
field), turned into the pipeline's `GenerateInput` and validated by its normalize stage like gRPC's."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from typing import Any, Literal

import msgspec
import numpy as np
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from appliance.common.errors import InvalidArgument, RequestError
from appliance.common.types import ChatMessage, Delta, GenerateInput, Result, SamplingInput, TokenLogprob
from appliance.edge.http.app import Edge, Model
from appliance.edge.http.errors import ClientGone, NotFound, field_of, openai_error
from appliance.edge.http.streaming import sse
from appliance.engine.grammar import json_grammar

# ------------------------------------------------------------------ bodies


class ContentPart(msgspec.Struct):
    type: str
    text: str | None = None


class MessageBody(msgspec.Struct):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class ResponseFormat(msgspec.Struct):
    type: str
    json_schema: Any = None


class _Sampling(msgspec.Struct, kw_only=True):
    """What both completion endpoints take."""

    model: str = ""
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # vLLM's: -1 (or 0) is off
    min_p: float | None = None
    repeat_penalty: float | None = None  # llama.cpp's
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None


class ChatBody(_Sampling, kw_only=True):
    messages: list[MessageBody] = msgspec.field(default_factory=list)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None


class CompletionBody(_Sampling, kw_only=True):
    prompt: str | list[str] = ""
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class EmbeddingsBody(msgspec.Struct, kw_only=True):
    model: str = ""
    input: str | list[Any] = ""
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


# ------------------------------------------------------------------ body -> GenerateInput

_FINISH = {"stop": "stop", "length": "length", "oom": "length", "loop": "length", "tool_calls": "tool_calls"}
_RENAME = {"sampling.grammar": "response_format"}  # the pipeline's field names -> OpenAI's


def _unsupported(b: _Sampling) -> None:
    if b.n not in (None, 1):
        raise InvalidArgument("n", "only n = 1 is supported; send one request per completion")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(b, name):
            raise InvalidArgument(name, "is not supported (use repeat_penalty); send 0 or leave it out")
    if b.logit_bias:
        raise InvalidArgument("logit_bias", "is not supported")


def _grammar(rf: ResponseFormat | None) -> str:
    """response_format as the grammar the local model decodes under: json_object any JSON object,
    json_schema the values its `schema` accepts (any object when it has none); text none."""
    if rf is None or rf.type == "text":
        return ""
    if rf.type == "json_object":
        return json_grammar(None)
    if rf.type != "json_schema":
        raise InvalidArgument("response_format.type", f"must be text, json_object or json_schema, got '{rf.type}'")
    spec = rf.json_schema
    if not isinstance(spec, dict):
        raise InvalidArgument("response_format.json_schema", "must be an object with a name and a schema")
    schema = spec.get("schema")
    if schema is not None and not isinstance(schema, dict):
        raise InvalidArgument("response_format.json_schema.schema", "must be a JSON Schema object")
    try:
        return json_grammar(schema)
    except ValueError as e:
        raise InvalidArgument("response_format.json_schema.schema", str(e)) from None


def _sampling(b: _Sampling, max_tokens: int | None, logprobs: bool) -> SamplingInput:
    stop = (b.stop,) if isinstance(b.stop, str) else tuple(b.stop or ())
    return SamplingInput(
        max_tokens=max_tokens,
        temperature=b.temperature,
        top_p=b.top_p,
        top_k=0 if b.top_k == -1 else b.top_k,
        min_p=b.min_p,
        repeat_penalty=b.repeat_penalty,
        seed=b.seed,
        stop=stop,
        logprobs=logprobs,
        grammar=_grammar(b.response_format),
    )


def _text(content: str | list[ContentPart] | None, field: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for i, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise InvalidArgument(f"{field}[{i}].type", f"only text parts are supported, got '{part.type}'")
        parts.append(part.text)
    return "".join(parts)


def _tools(b: ChatBody, cloud: bool) -> str:
    """A tool request (tools, tool_choice, tool calls and results among the messages) as the JSON the
    cloud gets verbatim; "" for none. Without a cloud for the tenant it is refused: the local model
    calls no tools."""
    tooled = [i for i, m in enumerate(b.messages) if m.tool_calls or m.role in ("tool", "function")]
    if b.functions:
        raise InvalidArgument("functions", "the legacy functions are not supported; send tools")
    if not b.tools and b.tool_choice in (None, "none") and not tooled:
        return ""
    if not cloud:
        field = "tools" if b.tools or b.tool_choice not in (None, "none") else f"messages[{tooled[0]}].role"
        raise InvalidArgument(field, "tool calling needs a cloud ([cloud]); this server's local model calls no tools")
    raw = msgspec.to_builtins(b.messages)
    passed: dict[str, Any] = {"messages": [{k: v for k, v in m.items() if v is not None} for m in raw]}
    if b.tools:
        passed["tools"] = b.tools
    if b.tool_choice is not None:
        passed["tool_choice"] = b.tool_choice
    return msgspec.json.encode(passed).decode()


def chat_input(
    b: ChatBody, request_id: str, model: Model, rename: dict[str, str], *, cloud: bool = False
) -> GenerateInput:
    """`cloud`: the tenant has a cloud (tool requests pass through to it)."""
    _unsupported(b)
    tools = _tools(b, cloud and model.route_policy != "local_only")
    if b.top_logprobs:
        raise InvalidArgument("top_logprobs", "alternative tokens are not available; send 0 or leave it out")
    messages = []
    for i, m in enumerate(b.messages):
        if m.tool_calls or m.role in ("tool", "function"):
            continue  # the cloud gets them in `tools`, verbatim
        role = "system" if m.role == "developer" else m.role
        messages.append(ChatMessage(role, _text(m.content, f"messages[{i}].content")))
    if b.max_completion_tokens is not None:
        rename["sampling.max_tokens"] = "max_completion_tokens"
    max_tokens = b.max_completion_tokens if b.max_completion_tokens is not None else b.max_tokens
    return GenerateInput(
        request_id=request_id,
        messages=tuple(messages),
        sampling=_sampling(b, max_tokens, bool(b.logprobs)),
        route_policy=model.route_policy,
        user=b.user or "",
        model=model.task,
        tools=tools,
    )


def completion_input(b: CompletionBody, request_id: str, model: Model) -> GenerateInput:
    _unsupported(b)
    if isinstance(b.prompt, list):
        if len(b.prompt) != 1:
            raise InvalidArgument("prompt", "give one prompt (a string, or a list of one); send one request per prompt")
        prompt = b.prompt[0]
    else:
        prompt = b.prompt
    if b.echo:
        raise InvalidArgument("echo", "is not supported")
    if b.suffix:
        raise InvalidArgument("suffix", "is not supported")
    if b.best_of not in (None, 1):
        raise InvalidArgument("best_of", "only 1 is supported")
    if b.logprobs:
        raise InvalidArgument("logprobs", "alternative tokens are not available; send 0 for the tokens' own")
    return GenerateInput(
        request_id=request_id,
        prompt=prompt,
        sampling=_sampling(b, b.max_tokens, b.logprobs is not None),
        route_policy=model.route_policy,
        user=b.user or "",
        model=model.task,
    )


# ------------------------------------------------------------------ answers


def _extension(r: Result) -> dict[str, Any]:
    """What the appliance adds to OpenAI's shape: how the request was answered."""
    return {
        "route": r.route,
        "route_reason": r.route_reason,
        "degraded": r.degraded,
        "replayed": r.replayed,
        "cost": r.usage.cost,
        "counterfactual_cost": r.usage.counterfactual_cost,
    }


class _Shape:
    """One request's answer in OpenAI's shape (chat or legacy completion)."""

    def __init__(self, edge: Edge, chat: bool, model: str, request_id: str, prompt_texts: list[str]) -> None:
        self.edge = edge
        self.chat = chat
        self.model = model
        self.id = ("chatcmpl-" if chat else "cmpl-") + request_id
        self.created = int(time.time())
        self.prompt_texts = prompt_texts
        self.offset = 0  # legacy logprobs: text_offset

    def usage(self, r: Result) -> dict[str, Any]:
        u = r.usage
        prompt, cached, completion = u.prompt_tokens, u.cached_tokens, u.completion_tokens
        if r.route == "cache":  # the whole prompt was served from the semantic cache
            prompt = cached = self.edge.count_tokens(self.prompt_texts)
            completion = self.edge.count_tokens([r.text])
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    def logprobs(self, tokens: list[TokenLogprob] | tuple[TokenLogprob, ...]) -> dict[str, Any]:
        if self.chat:
            return {
                "content": [
                    {
                        "token": t.piece.decode("utf-8", "replace"),
                        "logprob": t.logprob,
                        "bytes": list(t.piece),
                        "top_logprobs": [],
                    }
                    for t in tokens
                ]
            }
        texts = [t.piece.decode("utf-8", "replace") for t in tokens]
        offsets = []
        for text in texts:
            offsets.append(self.offset)
            self.offset += len(text)
        logprobs = [t.logprob for t in tokens]
        return {"tokens": texts, "token_logprobs": logprobs, "top_logprobs": None, "text_offset": offsets}

    def whole(self, r: Result, tokens: list[TokenLogprob] | None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": r.text}
            if r.tool_calls:
                choice["message"].update(content=r.text or None, tool_calls=json.loads(r.tool_calls))
        else:
            choice["text"] = r.text
        choice["logprobs"] = self.logprobs(tokens) if tokens is not None else None
        choice["finish_reason"] = _FINISH.get(r.finish_reason, "stop")
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": r.model,
            "choices": [choice],
            "usage": self.usage(r),
            "appliance": _extension(r),
        }

    def chunk(self, text: str | None, finish: str | None, tokens: tuple[TokenLogprob, ...] | None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0}
        if self.chat:
            choice["delta"] = {} if text is None else {"content": text}
        else:
            choice["text"] = text or ""
        choice["logprobs"] = self.logprobs(tokens) if tokens is not None else None
        choice["finish_reason"] = finish
        return {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }


async def _stream(
    shape: _Shape,
    head: Delta | Result,
    events: AsyncGenerator[Delta | Result, None],
    *,
    include_usage: bool,
    logprobs: bool,
    rename: dict[str, str],
) -> AsyncGenerator[Any, None]:
    def with_usage(chunk: dict[str, Any]) -> dict[str, Any]:
        if include_usage:
            chunk["usage"] = None
        return chunk

    if shape.chat:
        first = shape.chunk("", None, None)
        first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
        yield with_usage(first)
    result: Result | None = None
    sent = False
    try:
        event: Delta | Result | None = head
        while event is not None:
            if isinstance(event, Result):
                result = event
                if not sent and result.text:  # a semantic-cache hit comes whole, as the Result alone
                    yield with_usage(shape.chunk(result.text, None, None))
                break
            if event.text or event.logprobs:
                sent = sent or bool(event.text)
                yield with_usage(shape.chunk(event.text, None, event.logprobs if logprobs else None))
            event = await anext(events, None)
    except RequestError as e:  # after the status line: OpenAI's in-stream error event
        param, message = field_of(e, rename)
        yield {"error": {"message": message, "type": "server_error", "param": param, "code": e.code.lower()}}
        return
    if result is None:
        return
    if result.tool_calls:  # the cloud's calls come whole with its answer: one delta carries them
        calls = shape.chunk(None, None, None)
        tool_calls = [{"index": i, **c} for i, c in enumerate(json.loads(result.tool_calls))]
        calls["choices"][0]["delta"] = {"tool_calls": tool_calls}
        yield with_usage(calls)
    final = shape.chunk(None, _FINISH.get(result.finish_reason, "stop"), None)
    final["appliance"] = _extension(result)
    yield with_usage(final)
    if include_usage:
        yield {
            "id": shape.id,
            "object": final["object"],
            "created": shape.created,
            "model": shape.model,
            "choices": [],
            "usage": shape.usage(result),
        }
    yield "[DONE]"


# ------------------------------------------------------------------ endpoints

Endpoint = Callable[[HttpRequest, dict[str, str]], Awaitable[Response]]


def routes(edge: Edge) -> list[Route]:
    def handler(fn: Endpoint, rename: dict[str, str] | None = None) -> Callable[[HttpRequest], Awaitable[Response]]:
        async def handle(request: HttpRequest) -> Response:
            names = dict(rename or {})
            try:
                return await fn(request, names)
            except RequestError as e:
                return openai_error(e, names, edge.retry_after_ms)
            except ClientGone:
                return Response(status_code=499)

        return handle

    async def generate(request: HttpRequest, rename: dict[str, str], chat: bool, method: str) -> Response:
        tenant = edge.tenant(request)
        request_id = edge.request_id(request)
        body: ChatBody | CompletionBody
        if chat:
            body = await edge.body(request, ChatBody)
            model = edge.model(body.model, tenant, "generation")
            cloud = edge.service.cfg.cloud_for(tenant).configured
            inp = chat_input(body, request_id, model, rename, cloud=cloud)
            prompt_texts = [m.content for m in inp.messages]
            logprobs = bool(body.logprobs)
        else:
            body = await edge.body(request, CompletionBody)
            model = edge.model(body.model, tenant, "generation")
            inp = completion_input(body, request_id, model)
            prompt_texts = [inp.prompt]
            logprobs = body.logprobs is not None
        shape = _Shape(edge, chat, body.model, request_id, prompt_texts)
        if not body.stream:
            result, tokens = await edge.complete(request, inp, tenant, method)
            return JSONResponse(shape.whole(result, tokens if logprobs and result.route == "local" else None))
        events = edge.events(inp, tenant, method, streamed=True)
        head, events = await edge.first(request, events)
        include_usage = body.stream_options is not None and body.stream_options.include_usage

        async def items() -> AsyncGenerator[Any, None]:
            stream = _stream(shape, head, events, include_usage=include_usage, logprobs=logprobs, rename=rename)
            async with aclosing(events), aclosing(stream):  # a disconnect cancels the generation
                async for item in stream:
                    yield item

        return sse(items())

    async def chat_completions(request: HttpRequest, rename: dict[str, str]) -> Response:
        return await generate(request, rename, True, "http.chat.completions")

    async def completions(request: HttpRequest, rename: dict[str, str]) -> Response:
        return await generate(request, rename, False, "http.completions")

    async def embeddings(request: HttpRequest, rename: dict[str, str]) -> Response:
        tenant = edge.tenant(request)
        body = await edge.body(request, EmbeddingsBody)
        model = edge.model(body.model, tenant, "embedding")
        if isinstance(body.input, str):
            texts = [body.input]
        else:
            texts = []
            for i, item in enumerate(body.input):
                if not isinstance(item, str):
                    raise InvalidArgument(f"input[{i}]", "must be a string (token arrays are not supported)")
                texts.append(item)
        vectors = await edge.service.embed(texts, field="input")
        if body.dimensions is not None and vectors and body.dimensions != len(vectors[0]):
            raise InvalidArgument("dimensions", f"this model's embeddings have {len(vectors[0])} dimensions")
        data = []
        for i, v in enumerate(vectors):
            value: list[float] | str = v
            if body.encoding_format == "base64":
                value = base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode()
            data.append({"object": "embedding", "index": i, "embedding": value})
        tokens = edge.service.embed_token_count(texts)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return JSONResponse({"object": "list", "data": data, "model": model.id, "usage": usage})

    def describe(m: Model) -> dict[str, Any]:
        return {"id": m.id, "object": "model", "created": 0, "owned_by": m.owned_by}

    async def list_models(request: HttpRequest, rename: dict[str, str]) -> Response:
        tenant = edge.tenant(request)
        return JSONResponse({"object": "list", "data": [describe(m) for m in edge.models(tenant)]})

    async def get_model(request: HttpRequest, rename: dict[str, str]) -> Response:
        tenant = edge.tenant(request)
        name = request.path_params["model"]
        for m in edge.models(tenant):
            if m.id == name:
                return JSONResponse(describe(m))
        raise NotFound(f"the model '{name}' does not exist (GET /v1/models lists them)")

    return [
        Route("/v1/chat/completions", handler(chat_completions, {"prompt": "messages", **_RENAME}), methods=["POST"]),
        Route("/v1/completions", handler(completions, _RENAME), methods=["POST"]),
        Route("/v1/embeddings", handler(embeddings, {"texts": "input"}), methods=["POST"]),
        Route("/v1/models", handler(list_models), methods=["GET"]),
        Route("/v1/models/{model:path}", handler(get_model), methods=["GET"]),
    ]

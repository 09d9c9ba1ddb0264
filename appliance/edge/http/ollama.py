"""Ollama's native API: GET /api/version, /api/tags; POST /api/show, /api/chat, /api/generate,
/api/embed and the older /api/embeddings. Answers stream as newline-delimited JSON unless the body
says `"stream": false` (Ollama's default is to stream); errors are `{"error": "..."}`."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from datetime import UTC, datetime
from typing import Any

import msgspec
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from appliance.common.errors import InvalidArgument, RequestError
from appliance.common.types import ChatMessage, Delta, GenerateInput, Result, SamplingInput
from appliance.edge.http.app import Edge, Model
from appliance.edge.http.errors import ClientGone, field_of, ollama_error
from appliance.edge.http.streaming import ndjson
from appliance.engine.grammar import json_grammar

VERSION = "0.12.0"  # the Ollama API level this edge answers as (clients check it)
# the pipeline's field names -> Ollama's
RENAME = {
    "sampling.max_tokens": "options.num_predict",
    "sampling.temperature": "options.temperature",
    "sampling.top_k": "options.top_k",
    "sampling.top_p": "options.top_p",
    "sampling.min_p": "options.min_p",
    "sampling.seed": "options.seed",
    "sampling.stop": "options.stop",
    "sampling.repeat_penalty": "options.repeat_penalty",
    "sampling.grammar": "format",
    "texts": "input",
}


class Options(msgspec.Struct, kw_only=True):
    num_predict: int | None = None  # -1: no limit (the server's default), -2: fill the context
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    repeat_penalty: float | None = None


class MessageBody(msgspec.Struct, kw_only=True):
    role: str
    content: str = ""
    images: list[Any] | None = None
    tool_calls: list[Any] | None = None


class _Body(msgspec.Struct, kw_only=True):
    model: str = ""
    stream: bool = True
    format: Any = None
    options: Options | None = None
    keep_alive: Any = None
    think: Any = None


class ChatBody(_Body, kw_only=True):
    messages: list[MessageBody] = msgspec.field(default_factory=list)
    tools: list[Any] | None = None


class GenerateBody(_Body, kw_only=True):
    prompt: str = ""
    system: str = ""
    suffix: str = ""
    raw: bool = False
    images: list[Any] | None = None
    template: str = ""
    context: list[int] | None = None


class EmbedBody(msgspec.Struct, kw_only=True):
    model: str = ""
    input: str | list[str] = ""
    truncate: bool = True
    options: Any = None
    keep_alive: Any = None
    dimensions: int | None = None


class EmbeddingsBody(msgspec.Struct, kw_only=True):
    model: str = ""
    prompt: str = ""


class ShowBody(msgspec.Struct, kw_only=True):
    model: str = ""
    name: str = ""  # older clients
    verbose: bool = False


def _sampling(options: Options | None, fmt: Any = None) -> SamplingInput:
    o = options or Options()
    stop = (o.stop,) if isinstance(o.stop, str) else tuple(o.stop or ())
    return SamplingInput(
        max_tokens=None if o.num_predict is not None and o.num_predict in (-1, -2) else o.num_predict,
        temperature=o.temperature,
        top_k=o.top_k,
        top_p=o.top_p,
        min_p=o.min_p,
        seed=o.seed,
        stop=stop,
        repeat_penalty=o.repeat_penalty,
        grammar=_grammar(fmt),
    )


def _grammar(fmt: Any) -> str:
    """Ollama's `format` as the grammar the local model decodes under: "json" any JSON object, a JSON
    Schema (an object) the values it accepts; none when absent."""
    if fmt in (None, ""):
        return ""
    if fmt == "json":
        return json_grammar(None)
    if not isinstance(fmt, dict):
        raise InvalidArgument("format", 'must be "json" or a JSON Schema object')
    try:
        return json_grammar(fmt)
    except ValueError as e:
        raise InvalidArgument("format", str(e)) from None


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _done(r: Result) -> dict[str, Any]:
    u = r.usage
    total = int(u.latency_ms * 1e6)
    prompt_ns = int(u.first_token_ms * 1e6)
    return {
        "done": True,
        "done_reason": "length" if r.finish_reason in ("length", "oom", "loop") else "stop",
        "total_duration": total,
        "load_duration": 0,
        "prompt_eval_count": u.prompt_tokens,
        "prompt_eval_duration": prompt_ns,
        "eval_count": u.completion_tokens,
        "eval_duration": max(0, total - prompt_ns),
    }


Endpoint = Callable[[HttpRequest], Awaitable[Response]]


def routes(edge: Edge) -> list[Route]:
    def handler(fn: Endpoint) -> Endpoint:
        async def handle(request: HttpRequest) -> Response:
            try:
                return await fn(request)
            except RequestError as e:
                return ollama_error(e, RENAME, edge.retry_after_ms)
            except ClientGone:
                return Response(status_code=499)

        return handle

    async def answer(
        request: HttpRequest, inp: GenerateInput, tenant: str, name: str, stream: bool, chat: bool, method: str
    ) -> Response:
        def piece(text: str) -> dict[str, Any]:
            if chat:
                return {"message": {"role": "assistant", "content": text}}
            return {"response": text}

        if not stream:
            result, _ = await edge.complete(request, inp, tenant, method)
            return JSONResponse({"model": name, "created_at": _now(), **piece(result.text), **_done(result)})
        events = edge.events(inp, tenant, method, streamed=True)
        head, events = await edge.first(request, events)

        async def lines() -> AsyncGenerator[dict[str, Any], None]:
            async with aclosing(events):  # a disconnect cancels the generation
                event: Delta | Result | None = head
                sent = False
                try:
                    while event is not None:
                        if isinstance(event, Result):
                            if not sent and event.text:  # a semantic-cache hit comes whole, as the Result alone
                                yield {"model": name, "created_at": _now(), **piece(event.text), "done": False}
                            yield {"model": name, "created_at": _now(), **piece(""), **_done(event)}
                            return
                        if event.text:
                            sent = True
                            yield {"model": name, "created_at": _now(), **piece(event.text), "done": False}
                        event = await anext(events, None)
                except RequestError as e:
                    yield {"error": field_of(e, RENAME)[1]}

        return ndjson(lines())

    async def chat(request: HttpRequest) -> Response:
        tenant = edge.tenant(request)
        b = await edge.body(request, ChatBody)
        model = edge.model(b.model, tenant, "generation")
        if b.tools:
            raise InvalidArgument("tools", "tool calling is not supported by this server")
        if not b.messages:  # Ollama: an empty chat loads the model
            return JSONResponse(
                {
                    "model": b.model,
                    "created_at": _now(),
                    "message": {"role": "assistant", "content": ""},
                    "done": True,
                    "done_reason": "load",
                }
            )
        messages = []
        for i, m in enumerate(b.messages):
            if m.images:
                raise InvalidArgument(f"messages[{i}].images", "images are not supported")
            if m.tool_calls or m.role == "tool":
                raise InvalidArgument(f"messages[{i}].role", "tool messages are not supported")
            messages.append(ChatMessage(m.role, m.content))
        inp = GenerateInput(
            request_id=edge.request_id(request),
            messages=tuple(messages),
            sampling=_sampling(b.options, b.format),
            route_policy=model.route_policy,
            model=model.task,
        )
        return await answer(request, inp, tenant, b.model, b.stream, True, "ollama.chat")

    async def generate(request: HttpRequest) -> Response:
        tenant = edge.tenant(request)
        b = await edge.body(request, GenerateBody)
        model = edge.model(b.model, tenant, "generation")
        sampling = _sampling(b.options, b.format)
        for name in ("suffix", "template", "images"):
            if getattr(b, name):
                raise InvalidArgument(name, "is not supported")
        if not b.prompt:  # Ollama: an empty prompt loads the model
            return JSONResponse(
                {"model": b.model, "created_at": _now(), "response": "", "done": True, "done_reason": "load"}
            )
        if b.raw:
            inp = GenerateInput(prompt=b.prompt, request_id=edge.request_id(request))
        else:  # Ollama applies the model's template: as a chat turn
            system = (ChatMessage("system", b.system),) if b.system else ()
            inp = GenerateInput(messages=(*system, ChatMessage("user", b.prompt)), request_id=edge.request_id(request))
        inp = msgspec.structs.replace(inp, sampling=sampling, route_policy=model.route_policy, model=model.task)
        return await answer(request, inp, tenant, b.model, b.stream, False, "ollama.generate")

    async def embed(request: HttpRequest) -> Response:
        tenant = edge.tenant(request)
        b = await edge.body(request, EmbedBody)
        edge.model(b.model, tenant, "embedding")
        texts = [b.input] if isinstance(b.input, str) else b.input
        t0 = time.perf_counter()
        vectors = await edge.service.embed(texts, field="input")
        if b.dimensions is not None and vectors and b.dimensions != len(vectors[0]):
            raise InvalidArgument("dimensions", f"this model's embeddings have {len(vectors[0])} dimensions")
        return JSONResponse(
            {
                "model": b.model,
                "embeddings": vectors,
                "total_duration": int((time.perf_counter() - t0) * 1e9),
                "load_duration": 0,
                "prompt_eval_count": edge.service.embed_token_count(texts),
            }
        )

    async def embeddings(request: HttpRequest) -> Response:
        tenant = edge.tenant(request)
        b = await edge.body(request, EmbeddingsBody)
        edge.model(b.model, tenant, "embedding")
        vectors = await edge.service.embed([b.prompt], field="prompt")
        return JSONResponse({"embedding": vectors[0]})

    def entry(m: Model) -> dict[str, Any]:
        pipeline = edge.service.pipeline
        local = pipeline is not None and m.route_policy != "cloud_only" and m.kind == "generation"
        arch = str(pipeline.backend.engine.model.arch) if local and pipeline is not None else ""
        return {
            "name": f"{m.id}:latest",
            "model": f"{m.id}:latest",
            "modified_at": _now(),
            "size": 0,
            "digest": "",
            "details": {
                "parent_model": "",
                "format": "gguf" if local or m.kind == "embedding" else "",
                "family": arch,
                "families": [arch] if arch else None,
                "parameter_size": "",
                "quantization_level": "",
            },
        }

    async def version(request: HttpRequest) -> Response:
        return JSONResponse({"version": VERSION})

    async def tags(request: HttpRequest) -> Response:
        tenant = edge.tenant(request)
        return JSONResponse({"models": [entry(m) for m in edge.models(tenant)]})

    async def show(request: HttpRequest) -> Response:
        tenant = edge.tenant(request)
        b = await edge.body(request, ShowBody)
        name = b.model or b.name
        try:
            m = edge.model(name, tenant, "generation")
            capabilities = ["completion"]
        except RequestError:
            m = edge.model(name, tenant, "embedding")
            capabilities = ["embedding"]
        info = entry(m)
        model_info: dict[str, Any] = {}
        pipeline = edge.service.pipeline
        if pipeline is not None and m.kind == "generation" and m.route_policy != "cloud_only":
            arch = str(pipeline.backend.engine.model.arch)
            model_info = {"general.architecture": arch, f"{arch}.context_length": pipeline.backend.n_ctx}
        return JSONResponse(
            {
                "license": "",
                "modelfile": "",
                "parameters": "",
                "template": "",
                "details": info["details"],
                "model_info": model_info,
                "capabilities": capabilities,
                "modified_at": info["modified_at"],
            }
        )

    return [
        Route("/api/version", handler(version), methods=["GET"]),
        Route("/api/tags", handler(tags), methods=["GET"]),
        Route("/api/show", handler(show), methods=["POST"]),
        Route("/api/chat", handler(chat), methods=["POST"]),
        Route("/api/generate", handler(generate), methods=["POST"]),
        Route("/api/embed", handler(embed), methods=["POST"]),
        Route("/api/embeddings", handler(embeddings), methods=["POST"]),
    ]

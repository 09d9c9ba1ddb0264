"""The HTTP face's application: routes, and what every endpoint shares (`Edge`): the caller's tenant
from its bearer token, a size-limited JSON body decoded into a typed struct (an error names the
field), the models a request may name, and a pipeline run that a disconnecting client cancels."""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from appliance.common.errors import InvalidArgument, RequestError
from appliance.common.types import Delta, GenerateInput, Result, TokenLogprob
from appliance.edge.http.errors import ClientGone, NotFound, TooLarge, body_error
from appliance.service.app import Service

T = TypeVar("T")
Kind = Literal["generation", "embedding"]
AUTO_MODEL = "appliance"  # the model id that lets the service route (cache, local model, cloud)
DISCARD_FACTOR = 4  # a body up to this many times the limit is read (and dropped) so the 413 arrives
_REQUEST_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


@dataclass(frozen=True)
class Model:
    """A model id a request may name: a generation model and the route it implies, or the embedder."""

    id: str
    kind: Kind
    route_policy: str = "auto"
    owned_by: str = "appliance"
    task: str = ""  # a task name: its task model (distillation) answers, or the cloud until one is promoted


def decode_body(data: bytes, type_: type[T]) -> T:
    """A request body's JSON as `type_`; InvalidArgument names the field, or says what is wrong with
    the body (empty, not JSON, not UTF-8)."""
    if not data.strip():
        raise InvalidArgument("body", "a JSON object is required")
    try:
        return msgspec.json.decode(data, type=type_)
    except msgspec.MsgspecError as e:
        raise body_error(e) from None
    except UnicodeDecodeError as e:  # msgspec checks a string's UTF-8 as it decodes it
        raise InvalidArgument("body", f"not UTF-8 text (byte {e.start}: {e.reason})") from None


class Edge:
    def __init__(self, service: Service) -> None:
        self.service = service
        self.retry_after_ms = service.cfg.server.retry_after_ms

    # ------------------------------------------------------------------ who, what

    def tenant(self, request: HttpRequest) -> str:
        """The caller's tenant: `Authorization: Bearer` or `X-Api-Key`, through the same Authenticator
        (hashed tokens) as gRPC's TCP callers. Without [[tenants]] (only allowed on loopback) every
        caller is the default tenant."""
        cfg = self.service.cfg
        if not cfg.tenants:
            return cfg.default_tenant
        metadata: list[tuple[str, str | bytes]] = []
        if "authorization" in request.headers:
            metadata.append(("authorization", request.headers["authorization"]))
        elif "x-api-key" in request.headers:
            metadata.append(("authorization", f"Bearer {request.headers['x-api-key']}"))
        client = request.client.host if request.client is not None else "unknown"
        return self.service.auth.tenant_for(f"http:{client}", metadata, "")

    @staticmethod
    def request_id(request: HttpRequest) -> str:
        """`X-Request-Id` or `Idempotency-Key` (a retry with the same one gets the stored answer), else new."""
        given = request.headers.get("x-request-id") or request.headers.get("idempotency-key") or ""
        if given and not _REQUEST_ID.fullmatch(given):
            raise InvalidArgument("request_id", "the X-Request-Id header must be 1-128 characters of [A-Za-z0-9_.:-]")
        return given or uuid.uuid4().hex

    async def body(self, request: HttpRequest, type_: type[T]) -> T:
        """The JSON body as `type_`; InvalidArgument names the field, TooLarge past max_message_bytes."""
        limit = self.service.cfg.server.max_message_bytes
        too_large = TooLarge(f"the body is larger than {limit} bytes ([server] max_message_bytes)")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > DISCARD_FACTOR * limit:
            raise too_large  # not worth reading: the client sees the answer or a reset
        data = bytearray()
        seen = 0
        async for chunk in request.stream():  # past the limit: read on, keeping nothing, to answer 413
            seen += len(chunk)
            if seen > DISCARD_FACTOR * limit:
                raise too_large
            if seen <= limit:
                data += chunk
        if seen > limit:
            raise too_large
        return decode_body(bytes(data), type_)

    def models(self, tenant: str) -> list[Model]:
        """The routed id, the local model (local only), the tenant's cloud model (cloud only) when one is
        configured, the tenant's task names (task models), and the embedding model when it is loaded."""
        pipeline = self.service.ready()
        out = [Model(AUTO_MODEL, "generation"), Model(pipeline.backend.name, "generation", "local_only")]
        cloud = self.service.cfg.cloud_for(tenant)
        if cloud.configured:
            out.append(Model(cloud.model, "generation", "cloud_only", owned_by=cloud.provider))
        names = {m.id for m in out}
        tasks = pipeline.tasks.names(tenant) if pipeline.tasks is not None else self.service.cfg.tasks_for(tenant)
        out += [Model(t, "generation", owned_by=tenant, task=t) for t in tasks if t not in names]
        with contextlib.suppress(RequestError):
            out.append(Model(embedding_id(self.service.embedder().version), "embedding"))
        return out

    def model(self, name: str, tenant: str, kind: Kind, field: str = "model") -> Model:
        """The model `name` names (Ollama's `:latest` tag is optional), or NotFound."""
        if not name:
            raise InvalidArgument(field, "is required")
        bare = name.removesuffix(":latest")
        models = self.models(tenant)
        for m in models:
            if m.id == bare and m.kind == kind:
                return m
        if kind == "embedding":  # the embedder's full version string names it too
            with contextlib.suppress(RequestError):
                if name == self.service.embedder().version:
                    return Model(embedding_id(name), "embedding")
        names = ", ".join(m.id for m in models if m.kind == kind)
        raise NotFound(f"the model '{name}' does not exist; the {kind} models are: {names} (GET /v1/models)")

    # ------------------------------------------------------------------ running a request

    async def events(
        self, inp: GenerateInput, tenant: str, method: str, *, streamed: bool
    ) -> AsyncGenerator[Delta | Result, None]:
        """The pipeline's events for one request, with metrics; errors come out as RequestError."""
        try:
            pipeline = self.service.ready()
            async for event in pipeline.run(inp, tenant, chat=False, streamed=streamed):
                if isinstance(event, Result):
                    self.service.metrics.observe(method, event)
                yield event
        except RequestError as e:
            self.service.metrics.count_error(method, e.code)
            raise
        except ValueError as e:  # the engine refused the input
            self.service.metrics.count_error(method, "INVALID_ARGUMENT")
            raise InvalidArgument("body", str(e)) from None

    async def complete(
        self, request: HttpRequest, inp: GenerateInput, tenant: str, method: str
    ) -> tuple[Result, list[TokenLogprob]]:
        """A whole answer and its tokens' log-probabilities; a client that disconnects first cancels it."""

        async def collect() -> tuple[Result, list[TokenLogprob]]:
            logprobs: list[TokenLogprob] = []
            async for event in self.events(inp, tenant, method, streamed=False):
                if isinstance(event, Result):
                    return event, logprobs if event.route == "local" else []
                logprobs.extend(event.logprobs)
            raise RuntimeError("the pipeline ended without a result")

        return await until_disconnect(request, collect())

    async def first(
        self, request: HttpRequest, events: AsyncGenerator[Delta | Result, None]
    ) -> tuple[Delta | Result, AsyncGenerator[Delta | Result, None]]:
        """The first event of a stream before any byte is sent (so a refused request still gets its
        status code); a client that disconnects while it waits cancels it."""
        head = await until_disconnect(request, anext_(events))
        return head, events

    def count_tokens(self, texts: list[str]) -> int:
        pipeline = self.service.pipeline
        return sum(pipeline.backend.count_tokens(t) for t in texts) if pipeline is not None else 0


async def anext_(it: AsyncIterator[T]) -> T:
    return await it.__anext__()


def embedding_id(version: str) -> str:
    """all-MiniLM-L6-v2.gguf:0123abcd -> all-MiniLM-L6-v2"""
    return version.split(":")[0].removesuffix(".gguf")


async def until_disconnect(request: HttpRequest, work: Coroutine[Any, Any, T]) -> T:
    """Run `work`, cancelling it (and so its generation: the engine frees its KV blocks) when the
    client disconnects first; then ClientGone."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watch.cancel()
        raise
    if task.done():
        watch.cancel()
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise ClientGone()


Handler = Callable[[HttpRequest], Awaitable[Response]]


def build_app(service: Service) -> Starlette:
    from appliance.edge.http import ollama, openai

    edge = Edge(service)

    async def health(request: HttpRequest) -> Response:
        try:
            service.ready()
        except RequestError as e:
            return JSONResponse({"status": "unavailable", "reason": str(e)}, 503)
        return JSONResponse({"status": "ok"})

    async def metrics(request: HttpRequest) -> Response:
        return PlainTextResponse(service.metrics.render(service.gauges()), media_type="text/plain; version=0.0.4")

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        *openai.routes(edge),
        *ollama.routes(edge),
    ]
    return Starlette(routes=routes)

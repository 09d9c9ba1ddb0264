"""The gRPC face (grpc.aio): the Appliance service, grpc.health.v1 and server reflection, on a Unix
socket and optionally TCP, over the assembled `Service`. Health is NOT_SERVING while the model loads
and while draining."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from appliance.common.config import hostport
from appliance.common.errors import InvalidArgument, Overloaded, RequestError
from appliance.common.ledger import sum_totals
from appliance.common.types import ChatMessage, Delta, GenerateInput, Passage, Result, SamplingInput
from appliance.edge.grpc.proto import SERVICE, pb2
from appliance.engine.grammar import json_grammar
from appliance.service.app import Service

_ROUTE_ENUM = {"cache": 1, "local": 2, "cloud": 3}
_CACHE_NAMES = {0: "auto", 1: "skip", 2: "read_only"}
_ROUTE_NAMES = {0: "auto", 1: "local_only", 2: "cloud_only"}
_EXIT_NAMES = {0: "", 1: "off", 2: "lossless", 3: "adaptive"}


def _grammar(gbnf: str, json_schema: str) -> str:
    """Sampling's grammar: its GBNF as given, or its JSON Schema's."""
    if not json_schema:
        return gbnf
    if gbnf:
        raise InvalidArgument("sampling.json_schema", "give a grammar or a json_schema, not both")
    try:
        schema = json.loads(json_schema)
    except ValueError as e:
        raise InvalidArgument("sampling.json_schema", f"is not JSON: {e}") from None
    try:
        return json_grammar(schema or None)
    except ValueError as e:
        raise InvalidArgument("sampling.json_schema", str(e)) from None


def input_from_proto(msg: Any) -> GenerateInput:
    """A GenerateRequest as the pipeline's plain input (unset optional fields: None; an unknown enum
    value keeps its number, which normalize refuses naming the field)."""
    s = msg.sampling

    def opt(name: str) -> Any:
        return getattr(s, name) if s.HasField(name) else None

    sampling = SamplingInput(
        max_tokens=opt("max_tokens"),
        temperature=opt("temperature"),
        top_k=opt("top_k"),
        top_p=opt("top_p"),
        min_p=opt("min_p"),
        repeat_penalty=opt("repeat_penalty"),
        seed=opt("seed"),
        stop=tuple(s.stop),
        early_exit=_EXIT_NAMES.get(s.early_exit, str(s.early_exit)),
        exit_threshold=opt("exit_threshold"),
        grammar=_grammar(s.grammar, s.json_schema),
    )
    return GenerateInput(
        request_id=msg.request_id,
        prompt=msg.prompt,
        messages=tuple(ChatMessage(m.role, m.content) for m in msg.messages),
        session_id=msg.session_id,
        context=tuple(Passage(c.text, c.score) for c in msg.context),
        sampling=sampling,
        cache_policy=_CACHE_NAMES.get(msg.cache_policy, str(msg.cache_policy)),
        route_policy=_ROUTE_NAMES.get(msg.route_policy, str(msg.route_policy)),
        max_cost=msg.max_cost if msg.HasField("max_cost") else None,
        model=msg.model,
    )


def result_to_proto(r: Result) -> Any:
    u = r.usage
    pb = pb2()
    return pb.GenerateResponse(
        request_id=r.request_id,
        text=r.text,
        route=_ROUTE_ENUM[r.route],
        model=r.model,
        finish_reason=r.finish_reason,
        session_id=r.session_id,
        degraded=r.degraded,
        route_reason=r.route_reason,
        replayed=r.replayed,
        usage=pb.Usage(
            prompt_tokens=u.prompt_tokens,
            cached_tokens=u.cached_tokens,
            completion_tokens=u.completion_tokens,
            cost=u.cost,
            counterfactual_cost=u.counterfactual_cost,
            summary_saved_tokens=u.summary_saved_tokens,
            early_exit_tokens=u.early_exit_tokens,
            layers_per_token=u.layers_per_token,
            draft_acceptance=u.draft_acceptance,
            latency_ms=u.latency_ms,
            first_token_ms=u.first_token_ms,
            cache_write_tokens=u.cache_write_tokens,
        ),
    )


def unix_socket_in_use(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
        return True


class GrpcServer:
    def __init__(self, service: Service) -> None:
        self.service = service
        self.health = health.aio.HealthServicer()
        self.tcp_port: int | None = None
        self.socket_path = service.cfg.server.socket_path()
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        s = self.service.cfg.server
        limits = [
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
        ]
        server = grpc.aio.server(options=limits)
        server.add_generic_rpc_handlers((self._handlers(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
        await self._set_health(False)
        self.service.on_serving(self._set_health)
        path = self.socket_path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            if unix_socket_in_use(path):
                raise OSError(f"another server is listening on {path}")
            path.unlink()
        server.add_insecure_port(f"unix:{path}")
        if s.tcp:
            host, port = hostport(s.tcp)
            self.tcp_port = server.add_insecure_port(f"{host}:{port}")
            if self.tcp_port == 0:
                raise OSError(f"cannot listen on TCP {s.tcp}")
        await server.start()
        os.chmod(path, s.socket_mode)
        self._server = server

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE):
            await self.health.set(name, status)

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=0.5)
        if self.socket_path.exists():
            self.socket_path.unlink()

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    # ------------------------------------------------------------------ RPCs

    def _handlers(self) -> grpc.GenericRpcHandler:
        pb = pb2()
        req = pb.GenerateRequest.FromString
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Generate": grpc.unary_unary_rpc_method_handler(
                    self.generate, request_deserializer=req, response_serializer=pb.GenerateResponse.SerializeToString
                ),
                "GenerateStream": grpc.unary_stream_rpc_method_handler(
                    self.generate_stream,
                    request_deserializer=req,
                    response_serializer=pb.GenerateChunk.SerializeToString,
                ),
                "Chat": grpc.unary_stream_rpc_method_handler(
                    self.chat, request_deserializer=req, response_serializer=pb.GenerateChunk.SerializeToString
                ),
                "Embed": grpc.unary_unary_rpc_method_handler(
                    self.embed,
                    request_deserializer=pb.EmbedRequest.FromString,
                    response_serializer=pb.EmbedResponse.SerializeToString,
                ),
                "GetUsage": grpc.unary_unary_rpc_method_handler(
                    self.get_usage,
                    request_deserializer=pb.UsageRequest.FromString,
                    response_serializer=pb.UsageResponse.SerializeToString,
                ),
            },
        )

    async def _abort(self, context: grpc.aio.ServicerContext[Any, Any], e: RequestError, method: str) -> None:
        self.service.metrics.count_error(method, e.code)
        trailing: tuple[tuple[str, str], ...] = ()
        if isinstance(e, Overloaded):
            trailing = (("retry-after-ms", str(e.retry_after_ms)),)
        await context.abort(grpc.StatusCode[e.code], str(e), trailing_metadata=trailing)

    async def _events(
        self,
        request: Any,
        context: grpc.aio.ServicerContext[Any, Any],
        *,
        chat: bool,
        method: str,
        streamed: bool = True,
    ) -> AsyncIterator[Delta | Result]:
        try:
            tenant = self.service.auth.tenant_for(context.peer(), context.invocation_metadata() or (), request.tenant)
            pipeline = self.service.ready()
            async for event in pipeline.run(input_from_proto(request), tenant, chat=chat, streamed=streamed):
                if isinstance(event, Result):
                    self.service.metrics.observe(method, event)
                yield event
        except RequestError as e:
            await self._abort(context, e, method)
        except ValueError as e:  # the engine refused the input
            self.service.metrics.count_error(method, "INVALID_ARGUMENT")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    async def generate(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        async for event in self._events(request, context, chat=False, method="Generate", streamed=False):
            if isinstance(event, Result):
                return result_to_proto(event)
        raise RuntimeError("the pipeline ended without a result")

    async def generate_stream(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        async for chunk in self._stream(request, context, chat=False, method="GenerateStream"):
            yield chunk

    async def chat(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        async for chunk in self._stream(request, context, chat=True, method="Chat"):
            yield chunk

    async def _stream(
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any], *, chat: bool, method: str
    ) -> AsyncIterator[Any]:
        pb = pb2()
        async for event in self._events(request, context, chat=chat, method=method):
            if isinstance(event, Delta):
                yield pb.GenerateChunk(request_id=event.request_id, delta=event.text)
            else:
                yield pb.GenerateChunk(request_id=event.request_id, done=True, final=result_to_proto(event))

    async def embed(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        """Sentence embeddings from the semantic cache's embedding model (unit length)."""
        pb = pb2()
        try:
            self.service.auth.tenant_for(context.peer(), context.invocation_metadata() or (), request.tenant)
            vectors = await self.service.embed(list(request.texts))
            version = self.service.embedder().version
        except RequestError as e:
            await self._abort(context, e, "Embed")
        return pb.EmbedResponse(embeddings=[pb.Embedding(values=v) for v in vectors], model=version)

    async def get_usage(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        pb = pb2()
        try:
            tenant = self.service.auth.tenant_for(context.peer(), context.invocation_metadata() or (), request.tenant)
            parts = await self.service.usage(tenant, float(request.since_unix), float(request.until_unix))
        except RequestError as e:
            await self._abort(context, e, "GetUsage")
        return pb.UsageResponse(
            tenant=tenant,
            by_route=[_totals_proto(p) for p in parts],
            total=_totals_proto(sum_totals(parts)),
            currency=self.service.cfg.pricing.currency,
            cloud_model=self.service.cfg.pricing.cloud_model,
        )


def _totals_proto(t: Any) -> Any:
    return pb2().UsageTotals(
        route=t.route,
        requests=t.requests,
        prompt_tokens=t.prompt_tokens,
        cached_tokens=t.cached_tokens,
        completion_tokens=t.completion_tokens,
        cost=t.cost,
        counterfactual_cost=t.counterfactual_cost,
        summary_saved_tokens=t.summary_saved_tokens,
    )

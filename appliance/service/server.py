"""The gRPC server (grpc.aio): the Appliance service, grpc.health.v1 and server reflection, on a Unix
socket and optionally TCP. Health is NOT_SERVING while the model loads and while draining."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from appliance.cache import CacheConfig as SemanticCacheConfig
from appliance.cache import CacheError, GgufEmbedder, SemanticCache
from appliance.cloud.pool import CloudPool
from appliance.engine import default_threads
from appliance.manifest import UnknownModelError
from appliance.modelref import resolve_model
from appliance.pipeline import Pipeline
from appliance.route.budget import Budget
from appliance.route.router import Router, load_model
from appliance.route.stage import Routing
from appliance.service.admission import Admission
from appliance.service.auth import Authenticator
from appliance.service.cache_stage import PassThroughCache, SemanticCacheStage
from appliance.service.config import Config, hostport
from appliance.service.errors import FailedPrecondition, InvalidArgument, Overloaded, RequestError, Unavailable
from appliance.service.history import HistoryStore
from appliance.service.ledger import Ledger, sum_totals
from appliance.service.local_backend import LocalBackend
from appliance.service.metrics import Metrics
from appliance.service.prefixes import HotPrefixes, load_hot, save_hot
from appliance.service.proto import SERVICE, pb2
from appliance.service.types import Delta, Result

log = logging.getLogger("appliance.server")
_ROUTE_ENUM = {"cache": 1, "local": 2, "cloud": 3}


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


class ApplianceServer:
    def __init__(self, cfg: Config, load_backend: Callable[[], LocalBackend]) -> None:
        self.cfg = cfg
        self._load_backend = load_backend
        self.auth = Authenticator(cfg.tenants, cfg.default_tenant)
        srv = cfg.server
        self.admission = Admission(srv.max_concurrent, srv.max_queue, srv.retry_after_ms, srv.max_cloud_concurrent)
        self.metrics = Metrics()
        self.pipeline: Pipeline | None = None
        self.ledger: Ledger | None = None
        self.history: HistoryStore | None = None
        self.health = health.aio.HealthServicer()
        self.tcp_port: int | None = None
        self.socket_path = cfg.server.socket_path()
        self._server: grpc.aio.Server | None = None
        self._metrics_server: asyncio.Server | None = None
        self._load_error: BaseException | None = None
        self.loaded = asyncio.Event()  # set when loading ends, served or failed (see load_error)
        self.clouds = CloudPool(cfg)  # ConfigError here (a missing key) stops the start, naming the field

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        s = self.cfg.server
        limits = [
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
        ]
        server = grpc.aio.server(options=limits)
        server.add_generic_rpc_handlers((self._handlers(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
        await self._set_health(serving=False)
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
        if s.metrics:
            self._metrics_server = await self.metrics.serve(*hostport(s.metrics), self._gauges)
        asyncio.get_running_loop().create_task(self._load())

    async def _load(self) -> None:
        t0 = time.perf_counter()
        try:
            state = self.cfg.storage.path()
            self.ledger = Ledger(state / "ledger.sqlite", self.cfg.pricing.cloud_model, self.cfg.ledger.replay_window_s)
            self.history = HistoryStore(state / "history.sqlite")
            backend = await asyncio.to_thread(self._load_backend)
            if self.cfg.model.hot_prefixes:
                loaded = await asyncio.to_thread(load_hot, backend.engine, state / "prefixes")
                if loaded:
                    log.info("loaded %d tokens of saved hot prefixes into the prefix cache", loaded)
            cache = await asyncio.to_thread(self._open_cache, backend)
            routing = await asyncio.to_thread(self._routing, cache, self.ledger)
        except Exception as e:  # reported by every request and by health staying NOT_SERVING
            log.error("loading failed: %s", e)
            self._load_error = e
            self.loaded.set()
            return
        self.pipeline = Pipeline(
            backend=backend,
            admission=self.admission,
            ledger=self.ledger,
            history=self.history,
            model=self.cfg.model,
            pricing=self.cfg.pricing,
            cache=cache,
            routing=routing,
            prefixes=HotPrefixes(backend.engine.block_size) if self.cfg.model.hot_prefixes else None,
        )
        log.info("model %s loaded in %.1f s; serving", backend.name, time.perf_counter() - t0)
        if backend.default_exit(self.cfg.model.early_exit) is None and self.cfg.model.early_exit != "off":
            log.warning(
                "early exit (%s) is off: %s has no calibration; run `appliance models calibrate-exit`",
                self.cfg.model.early_exit,
                backend.name,
            )
        if not self.admission.closed:
            await self._set_health(serving=True)
        self.loaded.set()

    @property
    def load_error(self) -> BaseException | None:
        return self._load_error

    async def _set_health(self, *, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE):
            await self.health.set(name, status)

    def _open_cache(self, backend: LocalBackend) -> SemanticCacheStage | PassThroughCache:
        """The semantic cache, or a pass-through when it is disabled or its embedder is missing."""
        c = self.cfg.cache
        if not c.enabled:
            return PassThroughCache()
        embedder: GgufEmbedder | None = None
        try:
            path = resolve_model(c.embedding_model or None, role="embedding")
            if c.embed_threads:
                embedder = GgufEmbedder(path, n_threads=c.embed_threads)
            else:
                idle = min(4, default_threads())
                embedder = GgufEmbedder(path, n_threads=1, n_threads_idle=idle, busy=lambda: backend.engine.busy)
            config = SemanticCacheConfig(threshold=c.threshold or None)
            cache = SemanticCache(c.path(), embedder, config, owns_embedder=True)
        except (CacheError, OSError, UnknownModelError) as e:
            if embedder is not None:
                embedder.close()
            log.warning("semantic cache disabled: %s", e)
            return PassThroughCache()
        return SemanticCacheStage(cache, backend.name, c.ttl_s or None)

    def _routing(self, cache: SemanticCacheStage | PassThroughCache, ledger: Ledger) -> Routing:
        """The router on the semantic cache's embedding model (features only when it is not loaded)."""
        embedder = cache.cache.embedder if isinstance(cache, SemanticCacheStage) else None
        model = load_model(self.cfg.route.classifier, embedder)
        router = Router(model, embedder, self.cfg.route.threshold)
        return Routing(self.cfg, router, self.clouds, Budget(ledger, self.cfg.pricing))

    def _save_hot_prefixes(self, pipeline: Pipeline) -> None:
        if pipeline.prefixes is None:
            return
        hot = pipeline.prefixes.hottest(self.cfg.model.hot_prefixes)
        if not hot:
            log.info("no prompt prefix was shared this run; the hot prefixes saved before stay")
            return
        try:
            saved = save_hot(pipeline.backend.engine, hot, self.cfg.storage.path() / "prefixes")
        except OSError as e:
            log.warning("hot prefixes not saved: %s", e)
            return
        log.info("saved %d hot prefix(es), %d tokens, for the next start", len(hot), saved)

    async def stop(self, drain_timeout: float | None = None) -> None:
        """Graceful: NOT_SERVING, refuse new requests, let in-flight ones finish within the timeout,
        then cancel what is left and close the databases."""
        timeout = self.cfg.server.drain_timeout_s if drain_timeout is None else drain_timeout
        self.admission.close()
        await self._set_health(serving=False)
        try:
            await asyncio.wait_for(self.admission.wait_idle(), timeout)
        except TimeoutError:
            log.warning("drain timeout: cancelling %d in-flight request(s)", self.admission.running)
        if self._server is not None:
            await self._server.stop(grace=0.5)
        if self._metrics_server is not None:
            self._metrics_server.close()
        for db in (self.ledger, self.history):
            if db is not None:
                db.close()
        await self.clouds.aclose()
        if self.pipeline is not None:
            await asyncio.to_thread(self._save_hot_prefixes, self.pipeline)
            self.pipeline.backend.close()
            self.pipeline.cache.close()
        if self.socket_path.exists():
            self.socket_path.unlink()

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    def _gauges(self) -> dict[str, float]:
        gauges: dict[str, float] = {
            "appliance_requests_running": self.admission.running,
            "appliance_requests_queued": self.admission.waiting,
            "appliance_ready": 1.0 if self.pipeline is not None and not self.admission.closed else 0.0,
        }
        if self.pipeline is not None:
            engine = self.pipeline.backend.engine.stats()
            gauges["appliance_engine_sequences_running"] = engine["n_running"]
            gauges["appliance_engine_sequences_waiting"] = engine["n_waiting"]
            gauges["appliance_kv_blocks_total"] = engine["n_blocks"]
            gauges["appliance_kv_blocks_free"] = engine["n_free_blocks"]
            # the sliding-window layers' pool (Gemma 3): 0 and 0 for models without one
            gauges["appliance_kv_window_blocks_total"] = engine["n_blocks_swa"]
            gauges["appliance_kv_window_blocks_free"] = engine["n_free_blocks_swa"]
            gauges["appliance_prefix_cache_hits_total"] = engine["prefix_hits"]
            gauges["appliance_engine_preemptions_total"] = engine["n_preemptions"]
            cache = self.pipeline.cache
            if isinstance(cache, SemanticCacheStage):  # cache lookup, router, cache store share the vectors
                gauges["appliance_embeddings_requested_total"] = cache.cache.embedder.requests
                gauges["appliance_embeddings_computed_total"] = cache.cache.embedder.computed
        return gauges

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

    def _ready(self) -> Pipeline:
        if self.admission.closed:
            raise Unavailable("the server is shutting down")
        if self._load_error is not None:
            raise Unavailable(f"the model failed to load: {self._load_error}")
        if self.pipeline is None:
            raise Unavailable("the model is loading; retry shortly (health says SERVING when ready)")
        return self.pipeline

    async def _abort(self, context: grpc.aio.ServicerContext[Any, Any], e: RequestError, method: str) -> None:
        self.metrics.count_error(method, e.code)
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
            tenant = self.auth.tenant_for(context.peer(), context.invocation_metadata() or (), request.tenant)
            pipeline = self._ready()
            async for event in pipeline.run(request, tenant, chat=chat, streamed=streamed):
                if isinstance(event, Result):
                    self.metrics.observe(method, event)
                yield event
        except RequestError as e:
            await self._abort(context, e, method)
        except ValueError as e:  # the engine refused the input
            self.metrics.count_error(method, "INVALID_ARGUMENT")
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
            self.auth.tenant_for(context.peer(), context.invocation_metadata() or (), request.tenant)
            stage = self.pipeline.cache if self.pipeline is not None else None
            if not isinstance(stage, SemanticCacheStage):
                raise FailedPrecondition(
                    "Embed: no embedding model is loaded (the semantic cache is disabled or unprovisioned)"
                )
            texts = list(request.texts)
            if not texts or len(texts) > 256:
                raise InvalidArgument("texts", "give 1 to 256 texts")
            for i, t in enumerate(texts):
                if not t.strip() or len(t) > 32768:
                    raise InvalidArgument(f"texts[{i}]", "must be non-empty and at most 32768 characters")
            embedder = stage.cache.embedder
            vectors = await asyncio.to_thread(lambda: [embedder.embed(t) for t in texts])
        except RequestError as e:
            await self._abort(context, e, "Embed")
        except CacheError as e:
            await self._abort(context, InvalidArgument("texts", str(e)), "Embed")
        return pb.EmbedResponse(
            embeddings=[pb.Embedding(values=[float(x) for x in v]) for v in vectors], model=embedder.version
        )

    async def get_usage(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        pb = pb2()
        try:
            tenant = self.auth.tenant_for(context.peer(), context.invocation_metadata() or (), request.tenant)
            self._ready()
            assert self.ledger is not None
            parts = await asyncio.to_thread(
                self.ledger.totals, tenant, float(request.since_unix), float(request.until_unix)
            )
        except RequestError as e:
            await self._abort(context, e, "GetUsage")
        return pb.UsageResponse(
            tenant=tenant,
            by_route=[_totals_proto(p) for p in parts],
            total=_totals_proto(sum_totals(parts)),
            currency=self.cfg.pricing.currency,
            cloud_model=self.cfg.pricing.cloud_model,
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


async def serve(
    cfg: Config, load_backend: Callable[[], LocalBackend], ready: Callable[[ApplianceServer], None]
) -> None:
    """Run until SIGTERM/SIGINT, then drain. Under systemd (Type=notify) it tells the manager:
    READY=1 once serving, WATCHDOG=1 pings while the loop runs, STOPPING=1 when draining."""
    import signal

    from appliance.service.sdnotify import Notifier, watchdog_interval

    notifier = Notifier.from_env()
    pings: asyncio.Task[None] | None = None
    interval = watchdog_interval()
    if notifier.enabled and interval is not None:
        pings = asyncio.get_running_loop().create_task(notifier.watchdog_loop(interval))
    server = ApplianceServer(cfg, load_backend)
    await server.start()
    ready(server)
    notifier.status(f"loading the model; listening on unix:{server.socket_path}")

    async def announce() -> None:
        await server.loaded.wait()
        if server.load_error is not None:
            # no READY=1: systemd fails the start after TimeoutStartSec and Restart= applies
            notifier.status(f"loading failed: {server.load_error}".replace("\n", " "))
        elif not server.admission.closed:
            notifier.ready(f"serving on unix:{server.socket_path}")

    announcing = asyncio.get_running_loop().create_task(announce())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining (up to %.0f s)", cfg.server.drain_timeout_s)
    announcing.cancel()
    notifier.stopping(f"draining (up to {cfg.server.drain_timeout_s:.0f} s)")
    try:
        await server.stop()
    finally:
        if pings is not None:
            pings.cancel()
        notifier.close()

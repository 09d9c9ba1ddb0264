"""The assembled service, whatever face applications reach it through: it loads the local model, opens
the databases, the semantic cache and the router, builds the `Pipeline`, admits requests, keeps the
metrics, and drains and closes in order. The faces (appliance/edge) turn their protocol into calls on
it; `appliance.edge.run.serve` runs it with its faces under systemd."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from appliance.cache import CacheConfig as SemanticCacheConfig
from appliance.cache import CacheError, GgufEmbedder, SemanticCache
from appliance.cache.embedder import MemoEmbedder
from appliance.cache.names import resolve_embedder
from appliance.cache.stage import PassThroughCache, SemanticCacheStage
from appliance.cloud.pool import CloudPool
from appliance.common.config import Config, hostport
from appliance.common.errors import FailedPrecondition, InvalidArgument, Unavailable
from appliance.common.history import HistoryStore
from appliance.common.ledger import Ledger
from appliance.distill.capture import TeacherStore, store_for
from appliance.engine.core import default_threads
from appliance.engine.local_backend import LocalBackend
from appliance.models.manifest import UnknownModelError
from appliance.route.budget import Budget
from appliance.route.router import Router, load_model
from appliance.route.stage import Routing
from appliance.service.admission import Admission
from appliance.service.auth import Authenticator
from appliance.service.metrics import Metrics, early_exit_gauges
from appliance.service.pipeline import Pipeline
from appliance.service.prefixes import HotPrefixes, load_hot, save_hot
from appliance.service.tasks import TaskModels

log = logging.getLogger("appliance.service")

MAX_EMBED_TEXTS = 256
MAX_EMBED_CHARS = 32768


class Service:
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
        self.teacher: TeacherStore | None = None
        self.tasks: TaskModels | None = None
        self._metrics_server: asyncio.Server | None = None
        self._load_error: BaseException | None = None
        self._serving_listeners: list[Callable[[bool], Awaitable[None]]] = []
        self.loaded = asyncio.Event()  # set when loading ends, served or failed (see load_error)
        self.clouds = CloudPool(cfg)  # ConfigError here (a missing key) stops the start, naming the field

    # ------------------------------------------------------------------ lifecycle

    def on_serving(self, listener: Callable[[bool], Awaitable[None]]) -> None:
        """`listener(True)` once the model has loaded and requests are served, `listener(False)` when
        draining starts (a face's health status)."""
        self._serving_listeners.append(listener)

    async def _set_serving(self, serving: bool) -> None:
        for listener in self._serving_listeners:
            await listener(serving)

    async def start(self) -> None:
        """The metrics port now; the model and the rest load in the background (`loaded`)."""
        if self.cfg.server.metrics:
            self._metrics_server = await self.metrics.serve(*hostport(self.cfg.server.metrics), self.gauges)
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
            self.teacher, self.tasks = await asyncio.to_thread(self._open_distill, backend)
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
            tasks=self.tasks,
            teacher=self.teacher,
        )
        log.info("model %s loaded in %.1f s; serving", backend.name, time.perf_counter() - t0)
        if backend.default_exit(self.cfg.model.early_exit) is None and self.cfg.model.early_exit != "off":
            log.warning(
                "early exit (%s) is off: %s has no calibration; run `appliance models calibrate-exit`",
                self.cfg.model.early_exit,
                backend.name,
            )
        if not self.admission.closed:
            await self._set_serving(True)
        self.loaded.set()

    @property
    def load_error(self) -> BaseException | None:
        return self._load_error

    def _open_cache(self, backend: LocalBackend) -> SemanticCacheStage | PassThroughCache:
        """The semantic cache, or a pass-through when it is disabled or its embedder is missing."""
        c = self.cfg.cache
        if not c.enabled:
            return PassThroughCache()
        embedder: GgufEmbedder | None = None
        try:
            path = resolve_embedder(c.embedding_model or None)  # a tuned embedder's name, a manifest name, a path
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

    def _open_distill(self, backend: LocalBackend) -> tuple[TeacherStore, TaskModels]:
        """The teacher examples (expired ones dropped) and the task models, promoted adapters loaded."""
        directory = self.cfg.distill.path(self.cfg.storage)
        teacher = store_for(self.cfg)
        dropped = teacher.expire()
        if dropped:
            log.info("dropped %d teacher example(s) past the retention or size budget", dropped)
        tasks = TaskModels(self.cfg, directory, backend.engine)
        tasks.load()
        return teacher, tasks

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

    async def drain(self, timeout: float | None = None) -> None:
        """Refuse new requests (faces say not serving) and let in-flight ones finish within the timeout."""
        timeout = self.cfg.server.drain_timeout_s if timeout is None else timeout
        self.admission.close()
        await self._set_serving(False)
        try:
            await asyncio.wait_for(self.admission.wait_idle(), timeout)
        except TimeoutError:
            log.warning("drain timeout: cancelling %d in-flight request(s)", self.admission.running)

    async def close(self) -> None:
        """After the faces stopped: close the metrics port and the databases, save the hot prefixes,
        free the model and the cache."""
        if self._metrics_server is not None:
            self._metrics_server.close()
        for db in (self.ledger, self.history, self.teacher, self.tasks):
            if db is not None:
                db.close()
        await self.clouds.aclose()
        if self.pipeline is not None:
            await asyncio.to_thread(self._save_hot_prefixes, self.pipeline)
            self.pipeline.backend.close()
            self.pipeline.cache.close()

    # ------------------------------------------------------------------ what the faces call

    def ready(self) -> Pipeline:
        """The pipeline, or Unavailable while loading, after a failed load and while draining."""
        if self.admission.closed:
            raise Unavailable("the server is shutting down")
        if self._load_error is not None:
            raise Unavailable(f"the model failed to load: {self._load_error}")
        if self.pipeline is None:
            raise Unavailable("the model is loading; retry shortly (health says SERVING when ready)")
        return self.pipeline

    def embedder(self) -> MemoEmbedder:
        """The semantic cache's embedding model, or FailedPrecondition when none is loaded."""
        stage = self.pipeline.cache if self.pipeline is not None else None
        if not isinstance(stage, SemanticCacheStage):
            raise FailedPrecondition(
                "Embed: no embedding model is loaded (the semantic cache is disabled or unprovisioned)"
            )
        return stage.cache.embedder

    async def embed(self, texts: Sequence[str], field: str = "texts") -> list[list[float]]:
        """Unit-length sentence embeddings from the semantic cache's embedding model."""
        embedder = self.embedder()
        if not texts or len(texts) > MAX_EMBED_TEXTS:
            raise InvalidArgument(field, f"give 1 to {MAX_EMBED_TEXTS} texts")
        for i, t in enumerate(texts):
            if not t.strip() or len(t) > MAX_EMBED_CHARS:
                raise InvalidArgument(f"{field}[{i}]", f"must be non-empty and at most {MAX_EMBED_CHARS} characters")
        try:
            vectors = await asyncio.to_thread(lambda: [embedder.embed(t) for t in texts])
        except CacheError as e:
            raise InvalidArgument(field, str(e)) from None
        return [[float(x) for x in v] for v in vectors]

    def embed_token_count(self, texts: Sequence[str]) -> int:
        """The embedding model's tokens in `texts` (0 when its tokenizer is not at hand)."""
        inner = self.embedder().inner
        if not isinstance(inner, GgufEmbedder):
            return 0
        return sum(len(inner.tokenize(t)) for t in texts)

    async def usage(self, tenant: str, since: float, until: float) -> list[Any]:
        """The ledger's totals per route for the tenant and period."""
        self.ready()
        assert self.ledger is not None
        return await asyncio.to_thread(self.ledger.totals, tenant, since, until)

    def gauges(self) -> dict[str, float]:
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
            gauges.update(early_exit_gauges(engine))
            if self.tasks is not None:
                gauges["appliance_task_models_loaded"] = len(self.tasks.loaded())
            cache = self.pipeline.cache
            if isinstance(cache, SemanticCacheStage):  # cache lookup, router, cache store share the vectors
                gauges["appliance_embeddings_requested_total"] = cache.cache.embedder.requests
                gauges["appliance_embeddings_computed_total"] = cache.cache.embedder.computed
        return gauges

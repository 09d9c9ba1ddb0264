"""The request path, in one function: normalize -> replay of a retried request_id (ledger) -> session
load (Chat) -> semantic cache lookup -> route -> build context -> backend (local engine or cloud; a
checked local answer may escalate to the cloud) -> history and ledger -> cache store. Each stage is a
small module under appliance/service/ and appliance/route/; `Pipeline.run` is where to read how a
request is served."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator

import msgspec

from appliance.cache.stage import PassThroughCache, SemanticCacheStage
from appliance.cloud.client import CloudBackend
from appliance.cloud.types import CloudError, Reply
from appliance.common.config import Config, ModelConfig, PricingConfig
from appliance.common.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from appliance.common.history import HistoryStore, Session, StoredMessage
from appliance.common.ledger import Ledger
from appliance.common.types import Delta, GenerateInput, Request, Result, TokenLogprob
from appliance.distill.capture import TeacherStore
from appliance.engine.local_backend import LocalBackend
from appliance.route.budget import Budget
from appliance.route.cascade import CHECK_EVERY, assess
from appliance.route.stage import Routed, Routing
from appliance.service.admission import Admission, Lane
from appliance.service.context import Built, ContextBuilder, with_passages
from appliance.service.loops import LoopCheck
from appliance.service.normalize import normalize, request_hash
from appliance.service.prefixes import HotPrefixes
from appliance.service.served import Served
from appliance.service.summarizer import Summarizer
from appliance.service.tasks import Serving, TaskModels

log = logging.getLogger("appliance.service.pipeline")
AUTO_MODEL = "appliance"  # the model name that lets the service route (as an empty one does)


class Pipeline:
    def __init__(
        self,
        *,
        backend: LocalBackend,
        admission: Admission,
        ledger: Ledger,
        history: HistoryStore,
        model: ModelConfig,
        pricing: PricingConfig,
        cache: SemanticCacheStage | PassThroughCache | None = None,
        routing: Routing | None = None,
        prefixes: HotPrefixes | None = None,
        tasks: TaskModels | None = None,
        teacher: TeacherStore | None = None,
    ) -> None:
        self.backend = backend
        self.admission = admission
        self.ledger = ledger
        self.history = history
        self.model = model
        self.pricing = pricing
        self.cache = cache or PassThroughCache()
        self.prefixes = prefixes  # counts local prompts' prefixes, to keep the hottest across restarts
        self.tasks = tasks  # task names and the promoted task models (adapters) serving them
        self.teacher = teacher  # where cloud answers are captured as teacher examples (opted-in tenants)
        self.routing = routing or Routing(Config(pricing=pricing), None, None, Budget(ledger, pricing))
        summarizer = Summarizer(backend.generate, backend.tokenize, model.summary_max_tokens)
        self.context = ContextBuilder(backend.count_tokens, summarizer.fold, model.context_budget, model.keep_turns)
        self._serving: set[tuple[str, str]] = set()  # (tenant, request_id) being served now

    async def run(
        self, raw: GenerateInput, tenant: str, *, chat: bool, streamed: bool = True
    ) -> AsyncIterator[Delta | Result]:
        """Serve one request (as a face received it; normalize validates it): yields text deltas, then
        the Result once its ledger row is committed.
        A retry of a request_id already served for the tenant yields its stored answer instead (one
        delta with the whole text, then the Result marked replayed): nothing generated, charged or
        committed again. `streamed`: the caller sends the deltas on as they come (else only the Result
        counts, so a cloud answer that breaks off can still be replaced by a local one)."""
        t0 = time.perf_counter()
        req = normalize(
            raw,
            tenant,
            chat=chat,
            default_max_tokens=self.model.default_max_tokens,
            default_exit=self.backend.default_exit(self.model.early_exit),
        )
        if raw.model and raw.model != AUTO_MODEL and self.tasks is not None:
            await self.tasks.refresh()  # a task registered while running is known within reload_s
        req = self._resolve_model(raw.model, req)
        digest = request_hash(req)
        with self._claim(req):
            stored = await asyncio.to_thread(self.ledger.replay, req.tenant, req.request_id, digest)
            if stored is not None:
                if stored.text:
                    yield Delta(req.request_id, stored.text)
                yield stored
                return

            session = await asyncio.to_thread(self.history.load, req.tenant, req.session_id) if req.chat else None
            if session is not None:
                self._set_system(req, session)
            # a task's answers are its own: the semantic cache neither serves nor keeps them
            key = self.cache.key(req, session) if req.cache_policy != "skip" and not req.task else None
            hit = await self.cache.lookup(req, key)
            if hit is not None:
                if session is not None:  # the conversation goes on from the cached answer
                    await self._commit_turn(req, session, hit.text)
                await self.ledger.record(req.tenant, hit, digest, user=req.user)
                yield hit
                return

            serving: Serving | None = None
            if req.task and self.tasks is not None:
                serving = self.tasks.serving(req.tenant, req.task)
            if req.task_model:
                serving = await self._named_model(req)
                routed = Routed(route="local", reason="task_model_named", policy="local_only")
            else:
                routed = await (self._task_route(req, serving) if req.task else self.routing.decide(req))
            cloud = self.routing.cloud(req.tenant)
            # a cloud answer waits in the cloud lane, holding none of the local engine's slots; a route
            # that changes later (an overflow, a budget, a cascade escalating, a cloud failing) moves
            # the request to the other lane as _local / _cloud start
            lane: Lane = "cloud" if routed.route == "cloud" and cloud is not None else "local"
            async with self.admission.slot(lane) as slot:
                built = await self._build_context(req, session)
                tokens = self._tokenize(req, built)
                routed = await self.routing.within_budget(req, self._overflow(routed, tokens, cloud), len(tokens))
                self._check_fits(req, routed, tokens)
                if req.tools and routed.route != "cloud":
                    raise FailedPrecondition(f"tools: the cloud answers them but cannot take this ({routed.reason})")
                out = Served(routed, self.backend.name, len(tokens), streamed=streamed, slot=slot)
                try:
                    if routed.route == "cloud" and cloud is not None:
                        async for delta in self._cloud_or_local(req, built, tokens, cloud, out, t0):
                            yield delta
                    else:
                        self._check_cost(req, len(tokens))
                        adapter = 0
                        if serving is not None:  # the task model answers (under its adapter)
                            out.model, adapter = serving.model.name, serving.adapter
                        if serving is not None and routed.reason == "task_model":
                            stream = self._task_local(req, built, tokens, cloud, out, t0, serving)
                        elif self.routing.cascades(routed, cloud):
                            stream = self._cascade(req, built, tokens, cloud, out, t0)
                        else:
                            choices = serving.choices if serving is not None else ()
                            stream = self._local(req, tokens, out, t0, adapter=adapter, choices=choices)
                        async for delta in stream:
                            yield delta
                except Exception:
                    out.finish = "error"
                    raise
                finally:  # also on cancel/deadline: the work done is recorded
                    result = self._result(req, built, out, t0)
                    if session is not None and out.finish in ("stop", "length"):
                        await self._commit_turn(req, session, result.text)
                    await self.ledger.record(req.tenant, result, digest, user=req.user)

            if result.route == "cloud" and result.finish_reason == "stop":
                await self._capture(req, built, result)
            if req.cache_policy == "auto" and not req.task:
                await self.cache.store(req, key, result)
            yield result

    @contextlib.contextmanager
    def _claim(self, req: Request) -> Iterator[None]:
        """One request per (tenant, request_id) at a time: a retry that arrives while the original is
        still being served is refused with ABORTED (never run twice); once the original's ledger row
        commits, a retry gets its stored answer."""
        key = (req.tenant, req.request_id)
        if key in self._serving:
            raise Aborted(
                f"request_id: '{req.request_id}' is still being served; retry after it finishes to get its answer"
            )
        self._serving.add(key)
        try:
            yield
        finally:
            self._serving.discard(key)

    # ------------------------------------------------------------------ backends

    async def _local(
        self,
        req: Request,
        tokens: list[int],
        out: Served,
        t0: float,
        *,
        scored: bool = False,
        adapter: int = 0,
        choices: tuple[tuple[int, ...], ...] = (),
    ) -> AsyncGenerator[Delta, None]:
        """The local model's answer, streamed into `out` (which says "cancelled" until it finishes).
        `scored`: the engine scores each token for the cascade (out.scores, out.sure); `adapter`: under
        a task model's LoRA adapter (0: the base model); `choices`: the task's known answers, which
        decoding keeps to unless the request brings its own grammar (JSON output)."""
        out.finish = "cancelled"
        if out.slot is not None:
            await out.slot.move("local")
        if self.prefixes is not None:
            self.prefixes.note(req.tenant, tokens)
        options = msgspec.structs.replace(req.sampling, logprobs=True) if scored else req.sampling
        if choices and not options.grammar:
            options = msgspec.structs.replace(options, choices=choices)
        pending: list[TokenLogprob] = []  # the caller asked for log-probabilities: those of the tokens so far
        generation = self.backend.generate(tokens, options, tenant=req.tenant, adapter=adapter)
        loop = LoopCheck() if self.model.cut_loops else None
        async with contextlib.aclosing(generation) as chunks:
            async for chunk in chunks:
                if chunk.token is not None:
                    out.usage.completion_tokens += 1
                    out.scores.add(chunk.logprob, chunk.entropy)
                    out.sure.add(chunk.logprob, chunk.margin)
                    if out.usage.completion_tokens == 1:
                        out.usage.first_token_ms = (time.perf_counter() - t0) * 1e3
                    if req.sampling.logprobs and chunk.logprob is not None:
                        pending.append(TokenLogprob(self.backend.piece(chunk.token), chunk.logprob))
                out.finish = chunk.finish_reason or out.finish
                if chunk.text or (pending and chunk.finish_reason):
                    if chunk.text:
                        out.parts.append(chunk.text)
                    yield Delta(req.request_id, chunk.text, tuple(pending))
                    pending.clear()
                out.usage.cached_tokens = chunk.cached_tokens or out.usage.cached_tokens
                if chunk.decode is not None:
                    out.usage.early_exit_tokens = chunk.decode.early_tokens(self.backend.n_layer)
                    out.usage.layers_per_token = round(chunk.decode.mean_layers, 3)
                    out.usage.draft_acceptance = round(chunk.decode.acceptance, 3)
                if loop is not None and chunk.token is not None and not chunk.finish_reason and loop.add(chunk.token):
                    out.finish = "loop"  # cut: closing the stream cancels the generation
                    log.info("request %s: the local answer loops (period %d tokens); cut", req.request_id, loop.period)
                    break

    async def _cloud(
        self, req: Request, built: Built, cloud: CloudBackend, out: Served, t0: float
    ) -> AsyncGenerator[Delta, None]:
        """The cloud's answer, streamed into `out`. A CloudError before any text leaves `out` as it was,
        marked degraded (reason cloud_error), and ends quietly, as does one after text that the client
        has not seen (a unary call); after streamed text it is Unavailable."""
        if out.slot is not None:
            await out.slot.move("cloud")
        messages = built.messages or [{"role": "user", "content": with_passages(req.prompt, built.passages)}]
        sent = False
        try:
            async for item in cloud.stream(messages, req.sampling, req.tools):
                if isinstance(item, Reply):
                    out.take_cloud(item, self.backend.count_tokens, self.pricing)
                    continue
                if not sent:
                    out.usage.first_token_ms = (time.perf_counter() - t0) * 1e3
                sent = True
                yield Delta(req.request_id, item)
        except CloudError as e:
            if sent and out.streamed:
                raise Unavailable(f"the cloud stream broke after the answer had started: {e}") from None
            log.warning("cloud failed for %s/%s; answering locally: %s", req.tenant, req.request_id, e)
            Routing.downgrade(out.routed, "cloud_error")

    async def _cloud_or_local(
        self, req: Request, built: Built, tokens: list[int], cloud: CloudBackend, out: Served, t0: float
    ) -> AsyncGenerator[Delta, None]:
        async for delta in self._cloud(req, built, cloud, out, t0):
            yield delta
        if out.route != "cloud":
            if req.tools:
                raise Unavailable("the cloud could not answer a request with tools (the local model calls none)")
            if len(tokens) >= self.backend.n_ctx:
                raise Unavailable(
                    f"the cloud could not answer and {len(tokens)} tokens do not fit the local model's context"
                )
            self._check_cost(req, len(tokens))
            async for delta in self._local(req, tokens, out, t0):
                yield delta

    async def _cascade(
        self, req: Request, built: Built, tokens: list[int], cloud: CloudBackend | None, out: Served, t0: float
    ) -> AsyncGenerator[Delta, None]:
        """A local answer checked before it is sent. It is held back and assessed every
        CHECK_EVERY tokens as it grows: an unsure start is cancelled there (the local model
        stops spending on it) and the cloud answers instead. A whole answer gets the full check
        (truncation, emptiness too). With `[route] cascade_window` N > 0, an answer still confident
        after N tokens is sent and streams on unchecked (sooner text, but a loop that starts later
        gets through). Should the cloud fail, the local answer is generated in full and sent (degraded)."""
        window = self.routing.cfg.route.cascade_window
        held: list[Delta] = []
        streaming = escalate = False
        next_check = CHECK_EVERY
        async with contextlib.aclosing(self._local(req, tokens, out, t0, scored=True)) as local:
            async for delta in local:
                if streaming:
                    yield delta
                    continue
                held.append(delta)
                n = out.usage.completion_tokens
                if out.finish != "cancelled" or not (n >= next_check or 0 < window <= n):
                    continue  # finished (the full check follows), or no check due yet
                next_check = n + CHECK_EVERY
                escalate = await self._escalates(req, tokens, cloud, out, partial=True)
                if escalate:
                    break  # closing the stream cancels the local generation
                if 0 < window <= n or out.routed.degraded:  # confident past the window, or no cloud to ask
                    streaming = True
                    for d in held:
                        yield d
        if not streaming and not escalate:
            escalate = await self._escalates(req, tokens, cloud, out, partial=False)
            if not escalate:
                for d in held:
                    yield d
        if not escalate or cloud is None:
            return
        async for delta in self._escalate(req, built, tokens, cloud, out, t0, held):
            yield delta

    async def _task_local(
        self,
        req: Request,
        built: Built,
        tokens: list[int],
        cloud: CloudBackend | None,
        out: Served,
        t0: float,
        serving: Serving,
    ) -> AsyncGenerator[Delta, None]:
        """A promoted task model's answer, held back until the confidence rule has judged it: sent
        when its confidence signal (distill.rule: the smallest logit margin over its tokens, or for older
        models the least likely token's log-probability) is at least the model's calibrated threshold
        and the answer ended by itself (not empty, not cut by max_tokens); otherwise the cloud answers
        instead (route_reason task_unsure) and that answer is captured for the task's next round.
        The rule's minimum can only fall as the answer grows, so the local generation is cancelled
        at the first token below the threshold. Without a cloud to ask (none, circuit open, over
        budget), the answer is sent anyway, degraded, and not counted as a saving."""
        threshold, signal = serving.model.figures.threshold, serving.model.figures.signal
        why = self.routing.unavailable(cloud) or await self.routing.refusal(req, len(tokens))
        held: list[Delta] = []
        async with contextlib.aclosing(
            self._local(req, tokens, out, t0, scored=True, adapter=serving.adapter, choices=serving.choices)
        ) as local:
            async for delta in local:
                held.append(delta)
                if out.sure.value(signal) < threshold and not why:
                    break  # unsure already: stop spending on it
        out.confident = out.finish == "stop" and bool(out.text.strip()) and out.sure.value(signal) >= threshold
        if out.confident or why or cloud is None:
            if not out.confident:
                Routing.downgrade(out.routed, why or "no_cloud")
            for d in held:
                yield d
            return
        out.routed.reason = "task_unsure"
        log.info(
            "task %s/%s: %s unsure (%s %.3f < %.3f); the cloud answers",
            req.tenant,
            req.task,
            serving.model.name,
            signal,
            out.sure.value(signal),
            threshold,
        )
        async for delta in self._escalate(req, built, tokens, cloud, out, t0, held, serving.adapter):
            yield delta

    async def _escalate(
        self,
        req: Request,
        built: Built,
        tokens: list[int],
        cloud: CloudBackend,
        out: Served,
        t0: float,
        held: list[Delta],
        adapter: int = 0,
    ) -> AsyncGenerator[Delta, None]:
        """The cloud answers instead of the held local answer. If the cloud fails, the local answer
        is sent after all (degraded, cloud_error): generated again when it had been cut short."""
        local_cost = self.pricing.local_cost(out.usage.prompt_tokens, out.usage.completion_tokens)
        async for delta in self._cloud(req, built, cloud, out, t0):
            yield delta
        if out.route == "cloud":
            out.local_cost = local_cost
            return
        if out.finish == "cancelled":
            out.parts.clear()
            out.usage.completion_tokens = 0
            async for delta in self._local(req, tokens, out, t0, adapter=adapter):
                yield delta
        else:
            for d in held:
                yield d

    async def _escalates(
        self, req: Request, tokens: list[int], cloud: CloudBackend | None, out: Served, *, partial: bool
    ) -> bool:
        """Does the (start of the) local answer in `out` go to the cloud instead? Sets the route reason."""
        conf = assess(out.text, out.finish, self.routing.cfg.route, out.scores, partial=partial)
        if not conf.escalate or cloud is None:
            return False
        refusal = await self.routing.refusal(req, len(tokens))
        if refusal:
            Routing.downgrade(out.routed, refusal)
            return False
        out.routed.reason = "cascade"
        log.info("escalating %s/%s to the cloud: %s", req.tenant, req.request_id, conf.why)
        return True

    # ------------------------------------------------------------------ stage helpers

    def _resolve_model(self, name: str, req: Request) -> Request:
        """The request's `model` (none: the tenant's configured default): "" or "appliance" route as
        usual; a task name sets `task`; a registered task model's own name sets `task_model` (served
        under that adapter, locally); the local model's name means local only and the tenant's cloud
        model's cloud only (unless the request chose a route policy itself). Anything else is NOT_FOUND,
        listing the names that exist."""
        name = name or self.routing.cfg.model_for(req.tenant)
        if not name or name == AUTO_MODEL:
            return req
        tasks = self.tasks.names(req.tenant) if self.tasks is not None else self.routing.cfg.tasks_for(req.tenant)
        if name in tasks:
            return msgspec.structs.replace(req, task=name)
        named = self.tasks.model_names(req.tenant) if self.tasks is not None else []
        if name in named:  # a task model by its own name: that adapter, locally, as asked
            return msgspec.structs.replace(req, task_model=name)
        cloud = self.routing.cfg.cloud_for(req.tenant)
        implied = {self.backend.name: "local_only"}
        if cloud.configured:
            implied[cloud.model] = "cloud_only"
        if name in implied:
            if req.route_policy != "auto":
                return req
            policy = "local_only" if implied[name] == "local_only" else "cloud_only"
            return msgspec.structs.replace(req, route_policy=policy)
        known = [AUTO_MODEL, *implied, *tasks, *named]
        raise NotFound(f"model: '{name}' does not exist; this tenant may name: {', '.join(known)}")

    async def _named_model(self, req: Request) -> Serving:
        assert self.tasks is not None
        try:
            return await self.tasks.named(req.tenant, req.task_model)
        except LookupError as e:
            raise NotFound(f"model: {e}") from None

    async def _task_route(self, req: Request, serving: Serving | None) -> Routed:
        """Where a task request goes: to its promoted task model (checked by the confidence rule), or,
        before one is promoted, to the cloud (whose answers are captured for the task). A request's own
        route policy still wins; a cloud that cannot take it leaves the base model, degraded."""
        policy = self.routing.policy(req)
        cloud = self.routing.cloud(req.tenant)
        if policy == "cloud_only" and cloud is None:
            raise FailedPrecondition("route_policy: cloud_only, but no cloud backend is configured for this tenant")
        if policy == "local_only":
            return Routed(route="local", reason="policy", policy=policy)
        if serving is not None and policy == "auto":
            return Routed(route="local", reason="task_model", policy=policy)
        routed = Routed(route="cloud", reason="policy" if policy == "cloud_only" else "task", policy=policy)
        why = self.routing.unavailable(cloud)
        return Routing.downgrade(routed, why) if why else routed

    async def _capture(self, req: Request, built: Built, result: Result) -> None:
        """A cloud answer becomes a teacher example of the tenant (when it opted in), under the task
        the request named: the prompt as the local model would continue it, or the messages it would
        be sent. A failure to store it is logged; the answer has been served regardless."""
        if self.teacher is None or not self.routing.cfg.captures(req.tenant):
            return
        teacher = self.teacher
        prompt = None if built.messages else with_passages(req.prompt, built.passages)
        try:
            await asyncio.to_thread(
                lambda: teacher.add(
                    req.tenant,
                    result.text,
                    task=req.task,
                    prompt=prompt,
                    messages=built.messages or (),
                    request_id=req.request_id,
                    model=result.model,
                )
            )
        except Exception as e:  # a full disk, a locked database: the request itself succeeded
            log.warning("teacher example of %s/%s not stored: %s", req.tenant, req.request_id, e)

    def _result(self, req: Request, built: Built, out: Served, t0: float) -> Result:
        usage = out.usage
        usage.summary_saved_tokens = max(0, built.unmanaged_tokens - built.budget_tokens)
        if out.route == "cloud":
            usage.counterfactual_cost = self.pricing.cloud_cost(
                usage.prompt_tokens + usage.summary_saved_tokens, 0, usage.completion_tokens
            )
            usage.cost = out.cloud_cost + out.local_cost
        else:
            usage.cost = self.pricing.local_cost(usage.prompt_tokens, usage.completion_tokens)
            usage.counterfactual_cost = self.pricing.cloud_cost(
                usage.prompt_tokens + usage.summary_saved_tokens, 0, usage.completion_tokens
            )
        usage.latency_ms = (time.perf_counter() - t0) * 1e3
        return Result(
            request_id=req.request_id,
            text=out.text,
            route=out.route,
            model=out.model,
            finish_reason=out.finish,
            usage=usage,
            session_id=req.session_id,
            degraded=out.routed.degraded,
            route_reason=out.routed.reason,
            task=req.task,
            confident=out.confident if out.route == "local" else None,
            tool_calls=out.tool_calls,
        )

    @staticmethod
    def _set_system(req: Request, session: Session) -> None:
        """A Chat request's system message replaces the session's system prompt."""
        system = [m for m in req.messages if m.role == "system"]
        if system:
            session.system = system[-1].content

    async def _commit_turn(self, req: Request, session: Session, answer: str) -> None:
        reply = StoredMessage("assistant", answer, self.backend.count_tokens(answer))
        await self.history.commit_turn_async(session, [*self._stored(req), reply])

    async def _build_context(self, req: Request, session: Session | None) -> Built:
        if session is not None:
            turn = [m for m in req.messages if m.role != "system"]
            return await self.context.chat(session, turn, req.context)
        return self.context.single(req.messages, req.prompt, req.context, self.model.context_budget)

    def _tokenize(self, req: Request, built: Built) -> list[int]:
        if built.messages:
            tokens = self.backend.tokenize_chat(self.backend.render_chat(built.messages))
        else:
            tokens = self.backend.tokenize(with_passages(req.prompt, built.passages))
        return tokens

    def _overflow(self, routed: Routed, tokens: list[int], cloud: CloudBackend | None) -> Routed:
        """A prompt too long for the local model goes to the cloud when it may."""
        if len(tokens) < self.backend.n_ctx or routed.route == "cloud" or routed.policy == "local_only":
            return routed
        if self.routing.unavailable(cloud):
            return routed
        return Routed(route="cloud", reason="context_overflow", p_cloud=routed.p_cloud, policy=routed.policy)

    def _check_fits(self, req: Request, routed: Routed, tokens: list[int]) -> None:
        if routed.route == "local" and len(tokens) >= self.backend.n_ctx:
            field = "messages" if req.messages else "prompt"
            raise InvalidArgument(field, f"{len(tokens)} tokens do not fit the model's context of {self.backend.n_ctx}")

    def _check_cost(self, req: Request, prompt_tokens: int) -> None:
        worst = self.pricing.local_cost(prompt_tokens, req.sampling.max_tokens)
        if req.max_cost is not None and worst > req.max_cost:
            raise FailedPrecondition(f"max_cost: this request may cost up to {worst:.6f}, above {req.max_cost}")

    def _stored(self, req: Request) -> list[StoredMessage]:
        return [
            StoredMessage(m.role, m.content, self.backend.count_tokens(m.content))
            for m in req.messages
            if m.role != "system"
        ]

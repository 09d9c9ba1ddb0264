"""The request path, in one function: normalize -> semantic cache lookup -> route -> build context ->
backend (local engine or cloud) -> ledger -> cache store. Each stage is a small module under
appliance/service/; `Pipeline.run` is where to read how a request is served."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from appliance.service.admission import Admission
from appliance.service.cache_stage import PassThroughCache, SemanticCacheStage
from appliance.service.config import ModelConfig, PricingConfig
from appliance.service.context import Built, ContextBuilder, with_passages
from appliance.service.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from appliance.service.history import HistoryStore, Session, StoredMessage
from appliance.service.ledger import Ledger
from appliance.service.local_backend import LocalBackend
from appliance.service.normalize import normalize
from appliance.service.router import LocalRouter
from appliance.service.summarizer import Summarizer
from appliance.service.types import Delta, Request, Result, Usage


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
    ) -> None:
        self.backend = backend
        self.admission = admission
        self.ledger = ledger
        self.history = history
        self.model = model
        self.pricing = pricing
        self.cache = cache or PassThroughCache()
        self.router = LocalRouter()
        summarizer = Summarizer(backend.generate, backend.tokenize, model.summary_max_tokens)
        self.context = ContextBuilder(backend.count_tokens, summarizer.fold, model.context_budget, model.keep_turns)

    async def run(self, raw: Any, tenant: str, *, chat: bool) -> AsyncIterator[Delta | Result]:
        """Serve one request: yields text deltas, then the Result once its ledger row is committed."""
        t0 = time.perf_counter()
        req = normalize(
            raw,
            tenant,
            chat=chat,
            default_max_tokens=self.model.default_max_tokens,
            default_exit=self.backend.default_exit(self.model.early_exit),
        )
        if await asyncio.to_thread(self.ledger.exists, req.tenant, req.request_id):
            raise AlreadyExists(f"request_id: '{req.request_id}' was already served for this tenant")

        hit = await self.cache.lookup(req) if req.cache_policy != "skip" else None
        if hit is not None:
            await self.ledger.record(req.tenant, hit)
            yield hit
            return

        self.router.choose(req)  # only "local" until routing and a cloud backend land
        async with self.admission.slot():
            session = await asyncio.to_thread(self.history.load, req.tenant, req.session_id) if req.chat else None
            built = await self._build_context(req, session)
            tokens = self._tokenize(req, built)
            self._check_cost(req, len(tokens))

            parts: list[str] = []
            usage = Usage(prompt_tokens=len(tokens))
            finish = "cancelled"
            try:
                async for chunk in self.backend.generate(tokens, req.sampling, tenant=req.tenant):
                    if chunk.token is not None:
                        usage.completion_tokens += 1
                        if usage.completion_tokens == 1:
                            usage.first_token_ms = (time.perf_counter() - t0) * 1e3
                    if chunk.text:
                        parts.append(chunk.text)
                        yield Delta(req.request_id, chunk.text)
                    finish = chunk.finish_reason or finish
                    usage.cached_tokens = chunk.cached_tokens or usage.cached_tokens
                    if chunk.decode is not None:
                        usage.early_exit_tokens = chunk.decode.early_tokens(self.backend.n_layer)
                        usage.layers_per_token = round(chunk.decode.mean_layers, 3)
                        usage.draft_acceptance = round(chunk.decode.acceptance, 3)
            except Exception:
                finish = "error"
                raise
            finally:  # also on cancel/deadline: the work done is recorded
                usage.summary_saved_tokens = max(0, built.unmanaged_tokens - built.budget_tokens)
                usage.cost = self.pricing.local_cost(usage.prompt_tokens, usage.completion_tokens)
                usage.counterfactual_cost = self.pricing.cloud_cost(
                    usage.prompt_tokens + usage.summary_saved_tokens, 0, usage.completion_tokens
                )
                usage.latency_ms = (time.perf_counter() - t0) * 1e3
                result = Result(
                    request_id=req.request_id,
                    text="".join(parts),
                    route="local",
                    model=self.backend.name,
                    finish_reason=finish,
                    usage=usage,
                    session_id=req.session_id,
                )
                if session is not None and finish in ("stop", "length"):
                    answer = StoredMessage("assistant", result.text, self.backend.count_tokens(result.text))
                    await self.history.commit_turn_async(session, [*self._stored(req), answer])
                await self.ledger.record(req.tenant, result)

        if req.cache_policy == "auto":
            await self.cache.store(req, result)
        yield result

    # ------------------------------------------------------------------ stage helpers

    async def _build_context(self, req: Request, session: Session | None) -> Built:
        if session is not None:
            system = [m for m in req.messages if m.role == "system"]
            if system:
                session.system = system[-1].content
            turn = [m for m in req.messages if m.role != "system"]
            return await self.context.chat(session, turn, req.context)
        return self.context.single(req.messages, req.prompt, req.context, self.model.context_budget)

    def _tokenize(self, req: Request, built: Built) -> list[int]:
        field = "messages" if req.messages else "prompt"
        if built.messages:
            tokens = self.backend.tokenize_chat(self.backend.render_chat(built.messages))
        else:
            tokens = self.backend.tokenize(with_passages(req.prompt, built.passages))
        if len(tokens) >= self.backend.n_ctx:
            raise InvalidArgument(field, f"{len(tokens)} tokens do not fit the model's context of {self.backend.n_ctx}")
        return tokens

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

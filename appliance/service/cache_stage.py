"""Semantic-cache stage of the pipeline: answers a question that means the same as one the tenant
asked before, from appliance.cache (per-tenant namespaces, guards against opposite meanings).

What is cached: completion prompts, and chat requests made of an optional system prompt and one
user message; the fingerprint covers the model, the system prompt and the answer-changing
parameters. Session turns and requests with context passages pass through (their answer depends on
more than the question). Local and cloud answers that ended normally ("stop", or "length" at the same
max_tokens, which the fingerprint covers) are stored, unless degraded (a local answer standing in for
the cloud's); a hit is recorded
in the ledger as route "cache" with the cloud cost the original answer stood for.
"""

from __future__ import annotations

import asyncio
import logging

from appliance.cache import CacheError, SemanticCache, fingerprint
from appliance.service.types import Request, Result, Usage

log = logging.getLogger("appliance.cache")

_POLICY = {"auto": "auto", "read_only": "read-only", "skip": "skip"}


class PassThroughCache:
    """The stage when the cache is disabled: never hits, keeps nothing."""

    async def lookup(self, req: Request) -> Result | None:
        return None

    async def store(self, req: Request, result: Result) -> None:
        return None

    def close(self) -> None:
        return None


class SemanticCacheStage:
    def __init__(self, cache: SemanticCache, model: str, ttl_s: float | None) -> None:
        self.cache = cache
        self.model = model
        self.ttl_s = ttl_s

    def _key(self, req: Request) -> tuple[str, str] | None:
        """(fingerprint, query), or None when the request is not cacheable."""
        if req.chat or req.context:
            return None
        if req.prompt:
            system, query = "", req.prompt
        else:
            system = "\n".join(m.content for m in req.messages if m.role == "system")
            turns = [m for m in req.messages if m.role != "system"]
            if len(turns) != 1 or turns[0].role != "user":
                return None
            query = turns[0].content
        s = req.sampling
        params = {"max_tokens": s.max_tokens, "stop": list(s.stop), "chat": not req.prompt}
        return fingerprint(self.model, system, params), query

    async def lookup(self, req: Request) -> Result | None:
        key = self._key(req)
        if key is None:
            return None
        try:
            hit = await asyncio.to_thread(
                self.cache.lookup, req.tenant, key[0], key[1], policy=_POLICY[req.cache_policy]
            )
        except CacheError as e:  # an unusable query is a miss, never a failed request
            log.info("cache lookup skipped: %s", e)
            return None
        if hit is None:
            return None
        usage = Usage(counterfactual_cost=hit.cost_saved, latency_ms=hit.lookup_ms, first_token_ms=hit.lookup_ms)
        return Result(
            request_id=req.request_id,
            text=hit.response,
            route="cache",
            model=hit.model,
            finish_reason="stop",
            usage=usage,
        )

    async def store(self, req: Request, result: Result) -> None:
        key = self._key(req)
        if key is None or result.route == "cache" or result.degraded or not result.text:
            return
        if result.finish_reason not in ("stop", "length"):
            return
        try:
            await asyncio.to_thread(
                self.cache.store,
                req.tenant,
                key[0],
                key[1],
                result.text,
                model=result.model,
                cost=result.usage.counterfactual_cost,
                tokens=result.usage.completion_tokens,
                ttl_s=self.ttl_s,
                policy=_POLICY[req.cache_policy],
            )
        except CacheError as e:
            log.info("cache store skipped: %s", e)

    def close(self) -> None:
        self.cache.close()

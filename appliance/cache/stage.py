"""Semantic-cache stage of the pipeline: answers a question that means the same as one the tenant
asked before, from appliance.cache (per-tenant namespaces, guards against opposite meanings).

What is cached: completion prompts, chat requests made of an optional system prompt and one user
message, and session (Chat) turns of one user message; the fingerprint covers the model, the system
prompt and the answer-changing parameters. A session turn's key also covers the conversation state
(`Context`: the session's running summary and its previous exchange, the last user message and the
assistant's answer), so a follow-up such as "and the second one?" only hits under the same state; a
session's first turn has an empty state, like a stateless request. The key is taken before the turn
is served (`key`), so that folding history into the summary while serving does not change where the
answer is stored. Requests with context passages pass through (their answer depends on more than
the question). Local and cloud answers that ended normally ("stop", or "length" at the same
max_tokens, which the fingerprint covers) are stored, unless degraded (a local answer standing in for
the cloud's); a hit is recorded
in the ledger as route "cache" with the cloud cost the original answer stood for.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from appliance.cache import CacheError, Context, SemanticCache, fingerprint
from appliance.common.history import Session
from appliance.common.types import Request, Result, Usage

log = logging.getLogger("appliance.cache")

_POLICY = {"auto": "auto", "read_only": "read-only", "skip": "skip"}


@dataclass(frozen=True)
class CacheKey:
    fingerprint: str
    query: str
    context: Context


def previous_exchange(session: Session) -> str:
    """The session's last user message and the assistant's answer to it; "" before the first turn."""
    msgs = session.messages
    for i in range(len(msgs) - 1, -1, -1):
        if msgs[i].role == "assistant":
            user = next((m.content for m in reversed(msgs[:i]) if m.role == "user"), "")
            return f"user: {user}\nassistant: {msgs[i].content}"
    return ""


class PassThroughCache:
    """The stage when the cache is disabled: never hits, keeps nothing."""

    def key(self, req: Request, session: Session | None) -> CacheKey | None:
        return None

    async def lookup(self, req: Request, key: CacheKey | None) -> Result | None:
        return None

    async def store(self, req: Request, key: CacheKey | None, result: Result) -> None:
        return None

    def close(self) -> None:
        return None


class SemanticCacheStage:
    def __init__(self, cache: SemanticCache, model: str, ttl_s: float | None) -> None:
        self.cache = cache
        self.model = model
        self.ttl_s = ttl_s

    def key(self, req: Request, session: Session | None) -> CacheKey | None:
        """The request's cache key, or None when it is not cacheable. `session`: a Chat request's
        session as loaded (its system prompt already set from the request), before this turn."""
        if req.context or (req.chat and session is None):
            return None
        if req.prompt:
            system, query = "", req.prompt
        else:
            system = "\n".join(m.content for m in req.messages if m.role == "system")
            turns = [m for m in req.messages if m.role != "system"]
            if len(turns) != 1 or turns[0].role != "user":
                return None
            query = turns[0].content
        context = Context()
        if session is not None:
            system = session.system
            context = Context(summary=session.summary, previous_turn=previous_exchange(session))
        s = req.sampling
        params: dict[str, object] = {"max_tokens": s.max_tokens, "stop": list(s.stop), "chat": not req.prompt}
        if s.grammar:  # an answer made under a grammar serves only requests with the same one
            params["grammar"] = s.grammar
        return CacheKey(fingerprint(self.model, system, params), query, context)

    async def lookup(self, req: Request, key: CacheKey | None) -> Result | None:
        if key is None:
            return None
        try:
            hit = await asyncio.to_thread(
                self.cache.lookup,
                req.tenant,
                key.fingerprint,
                key.query,
                context=key.context,
                policy=_POLICY[req.cache_policy],
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
            session_id=req.session_id,
        )

    async def store(self, req: Request, key: CacheKey | None, result: Result) -> None:
        if key is None or result.route == "cache" or result.degraded or not result.text:
            return
        if result.finish_reason not in ("stop", "length"):
            return
        try:
            await asyncio.to_thread(
                self.cache.store,
                req.tenant,
                key.fingerprint,
                key.query,
                result.text,
                model=result.model,
                context=key.context,
                cost=result.usage.counterfactual_cost,
                tokens=result.usage.completion_tokens,
                ttl_s=self.ttl_s,
                policy=_POLICY[req.cache_policy],
            )
        except CacheError as e:
            log.info("cache store skipped: %s", e)

    def close(self) -> None:
        self.cache.close()

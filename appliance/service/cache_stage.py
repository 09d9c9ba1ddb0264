"""Semantic-cache stage of the pipeline. Passes through until the semantic cache (appliance/cache/)
lands: lookup never hits and store keeps nothing. The cache must be keyed per tenant."""

from __future__ import annotations

from appliance.service.types import Request, Result


class PassThroughCache:
    async def lookup(self, req: Request) -> Result | None:
        return None

    async def store(self, req: Request, result: Result) -> None:
        return None

"""The routing stage of the pipeline: policy (request, then tenant), the router's decision, what the
cloud can take (configured, circuit closed, within budget), and whether a local answer is checked
by the cascade. A "cloud" decision the cloud cannot take becomes local with `degraded` set."""

from __future__ import annotations

import asyncio

from appliance.cloud.client import CloudBackend
from appliance.cloud.pool import CloudPool
from appliance.common.config import Config
from appliance.common.errors import FailedPrecondition
from appliance.common.types import Request, RoutePolicy
from appliance.route.budget import Budget
from appliance.route.router import Decision, Router, routed_text


class Routed(Decision, kw_only=True):
    degraded: bool = False
    policy: RoutePolicy = "auto"


class Routing:
    def __init__(self, cfg: Config, router: Router | None, clouds: CloudPool | None, budget: Budget) -> None:
        self.cfg = cfg
        self.router = router
        self.clouds = clouds
        self.budget = budget

    def cloud(self, tenant: str) -> CloudBackend | None:
        return self.clouds.for_tenant(tenant) if self.clouds is not None else None

    def policy(self, req: Request) -> RoutePolicy:
        return req.route_policy if req.route_policy != "auto" else self.cfg.policy_for(req.tenant)

    async def decide(self, req: Request) -> Routed:
        policy = self.policy(req)
        cloud = self.cloud(req.tenant)
        if policy == "cloud_only" and cloud is None:
            raise FailedPrecondition("route_policy: cloud_only, but no cloud backend is configured for this tenant")
        if self.router is None or policy == "local_only":
            d = Decision(route="local", reason="policy" if policy == "local_only" else "no_router")
        else:
            d = await asyncio.to_thread(self.router.decide, routed_text(req), policy)
        routed = Routed(route=d.route, reason=d.reason, p_cloud=d.p_cloud, kind=d.kind, policy=policy)
        if routed.route == "cloud":
            why = self.unavailable(cloud)
            if why:
                return self.downgrade(routed, why)
        return routed

    def unavailable(self, cloud: CloudBackend | None) -> str:
        if cloud is None:
            return "no_cloud"
        return "" if cloud.available() else "circuit_open"

    @staticmethod
    def downgrade(routed: Routed, why: str) -> Routed:
        routed.route, routed.reason, routed.degraded = "local", why, True
        return routed

    async def within_budget(self, req: Request, routed: Routed, prompt_tokens: int) -> Routed:
        """A cloud decision over a spend ceiling becomes local (degraded, reason budget_*)."""
        if routed.route != "cloud":
            return routed
        why = await self.refusal(req, prompt_tokens)
        return self.downgrade(routed, why) if why else routed

    async def refusal(self, req: Request, prompt_tokens: int) -> str | None:
        budget = self.cfg.budget_for(req.tenant)
        return await self.budget.refusal(req.tenant, budget, prompt_tokens, req.sampling.max_tokens, req.max_cost)

    def cascades(self, routed: Routed, cloud: CloudBackend | None) -> bool:
        """Is a local answer to be checked (and maybe escalated) before it is sent? Only with a cloud to
        escalate to: the answer is then held back until checked, so it is not streamed token by token."""
        on = self.cfg.route.cascade and routed.policy == "auto" and routed.reason == "router"
        return on and cloud is not None and cloud.available()

"""Spend ceilings: a monthly cloud budget per tenant (from the ledger) and a per-request ceiling on the
worst case (prompt plus max_tokens at cloud prices). A request over either is served locally."""

from __future__ import annotations

import asyncio
import datetime as dt

from appliance.common.config import BudgetConfig, PricingConfig
from appliance.common.ledger import Ledger


def month_start(now: dt.datetime | None = None) -> float:
    t = now or dt.datetime.now(dt.UTC)
    return dt.datetime(t.year, t.month, 1, tzinfo=dt.UTC).timestamp()


class Budget:
    def __init__(self, ledger: Ledger, pricing: PricingConfig) -> None:
        self.ledger = ledger
        self.pricing = pricing

    def worst_case(self, prompt_tokens: int, max_tokens: int) -> float:
        return self.pricing.cloud_cost(prompt_tokens, 0, max_tokens)

    async def refusal(
        self, tenant: str, budget: BudgetConfig, prompt_tokens: int, max_tokens: int, max_cost: float | None
    ) -> str | None:
        """Why the cloud may not take this request ("budget_request", "budget_monthly"), or None."""
        worst = self.worst_case(prompt_tokens, max_tokens)
        if (budget.per_request and worst > budget.per_request) or (max_cost is not None and worst > max_cost):
            return "budget_request"
        if budget.monthly:
            spent = await asyncio.to_thread(self.ledger.cloud_spend, tenant, month_start())
            if spent + worst > budget.monthly:
                return "budget_monthly"
        return None

"""What one request's answer became, filled in by whichever backend served it (local, then maybe the
cloud), read by the pipeline to write the Result and its ledger row."""

from __future__ import annotations

from collections.abc import Callable

from appliance.cloud.types import CloudUsage, Reply
from appliance.common.config import PricingConfig
from appliance.common.types import RouteTaken, Usage
from appliance.distill.rule import Sureness
from appliance.route.cascade import TokenScores
from appliance.route.stage import Routed
from appliance.service.admission import Held


class Served:
    def __init__(
        self, routed: Routed, local_model: str, prompt_tokens: int, *, streamed: bool = True, slot: Held | None = None
    ) -> None:
        self.routed = routed
        self.slot = slot  # its admission slot: moved to the lane of whichever backend works on it
        self.streamed = streamed  # the client sees text as it comes (else only the final answer)
        self.route: RouteTaken = "local"
        self.model = local_model
        self.parts: list[str] = []
        self.finish = "cancelled"
        self.prompt_tokens = prompt_tokens  # as the local tokenizer counts them
        self.usage = Usage(prompt_tokens=prompt_tokens)
        self.cloud_cost = 0.0
        self.local_cost = 0.0  # a local answer the cascade replaced
        self.scores = TokenScores()  # the local answer's token scores, when the cascade asked for them
        self.sure = Sureness()  # ... and their running minimums (a task model's confidence rule)
        self.confident: bool | None = None  # a task model's answer: did it pass the rule
        self.tool_calls = ""  # the cloud's calls of the request's tools (JSON)

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def take_cloud(self, reply: Reply, count_tokens: Callable[[str], int], pricing: PricingConfig) -> None:
        """The cloud's answer replaces whatever was here. A provider that reports no usage (some
        compatible servers when streaming) is billed on the local tokenizer's counts."""
        u = reply.usage
        if u.prompt_tokens == 0 and u.output_tokens == 0:
            u = CloudUsage(input_tokens=self.prompt_tokens, output_tokens=count_tokens(reply.text))
        self.route, self.model, self.finish = "cloud", reply.model, reply.finish_reason
        self.parts = [reply.text]
        self.tool_calls = reply.tool_calls
        self.usage = Usage(
            prompt_tokens=u.prompt_tokens,
            cached_tokens=u.cache_read_tokens,
            cache_write_tokens=u.cache_write_tokens,
            completion_tokens=u.output_tokens,
            first_token_ms=self.usage.first_token_ms,
        )
        self.cloud_cost = pricing.billed_cost(
            u.input_tokens, u.cache_read_tokens, u.cache_write_tokens, u.output_tokens
        )

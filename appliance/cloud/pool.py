"""The cloud backends of a config: one per distinct [cloud] section ([cloud] itself and each tenant's
own), built at start-up so a missing key or bad field is reported then, sharing one HTTP client."""

from __future__ import annotations

import httpx
import msgspec

from appliance.cloud.anthropic import AnthropicProvider
from appliance.cloud.breaker import CircuitBreaker
from appliance.cloud.client import CloudBackend, RetryPolicy
from appliance.cloud.openai import OpenAIProvider
from appliance.cloud.provider import Provider
from appliance.common.config import CloudConfig, Config


def make_provider(c: CloudConfig, where: str = "$.cloud") -> Provider:
    key = c.api_key(where)
    if c.provider == "anthropic":
        return AnthropicProvider(c.base_url, c.model, key, c.prompt_cache_min_chars)
    return OpenAIProvider(c.base_url, c.model, key)


def make_backend(c: CloudConfig, http: httpx.AsyncClient, where: str = "$.cloud") -> CloudBackend:
    return CloudBackend(
        make_provider(c, where),
        http,
        timeout=httpx.Timeout(c.timeout_s, connect=c.connect_timeout_s),
        retry=RetryPolicy(max_retries=c.max_retries, backoff_s=c.backoff_s, backoff_max_s=c.backoff_max_s),
        breaker=CircuitBreaker(c.breaker_failures, c.breaker_cooldown_s),
    )


class CloudPool:
    def __init__(self, cfg: Config) -> None:
        self._cfg = cfg
        self.http = httpx.AsyncClient(limits=httpx.Limits(max_connections=64), follow_redirects=False)
        self._by_section: dict[bytes, CloudBackend] = {}
        for where, section in cfg.cloud_sections():
            key = msgspec.json.encode(section)
            if key not in self._by_section:
                self._by_section[key] = make_backend(section, self.http, where)

    def for_tenant(self, tenant: str) -> CloudBackend | None:
        """The tenant's cloud, or None when it has none (air-gapped)."""
        return self._by_section.get(msgspec.json.encode(self._cfg.cloud_for(tenant)))

    async def aclose(self) -> None:
        await self.http.aclose()

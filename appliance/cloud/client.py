"""One cloud backend: a provider spoken over a shared httpx.AsyncClient, with per-attempt timeouts,
retries on 429/5xx and network errors (exponential backoff with full jitter, or the server's
Retry-After), and a circuit breaker. Retries happen only before the first text reaches the caller;
a stream that breaks after that raises CloudError."""

from __future__ import annotations

import asyncio
import email.utils
import functools
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import httpx
import msgspec

from appliance.cloud.breaker import CircuitBreaker
from appliance.cloud.provider import Messages, Provider, StreamParser
from appliance.cloud.sse import sse_events
from appliance.cloud.types import CloudError, Reply
from appliance.engine.sampling import SamplingOptions

T = TypeVar("T")

log = logging.getLogger("appliance.cloud")
RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504, 529})


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True):
    max_retries: int = 2
    backoff_s: float = 0.5  # first delay; doubles each retry (full jitter: uniform in [0, delay])
    backoff_max_s: float = 8.0  # cap; a server asking (Retry-After) for a longer wait is not retried

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float | None:
        """Seconds to wait before the next attempt, or None when the server asks for longer than the cap."""
        if retry_after is not None:
            return retry_after if retry_after <= self.backoff_max_s else None
        return rng.uniform(0.0, min(self.backoff_max_s, self.backoff_s * 2**attempt))


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds: delta-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def _decode(data: str) -> Any:
    if data == "[DONE]":
        return data
    try:
        value = json.loads(data)
    except json.JSONDecodeError as e:
        raise CloudError("malformed", f"cloud sent data that is not JSON ({e.msg}): {data[:120]!r}") from None
    if not isinstance(value, dict):
        raise CloudError("malformed", f"cloud sent JSON that is not an object: {data[:120]!r}")
    return value


def _shaped(what: str, read: Callable[[], T]) -> T:
    """read() of a cloud answer whose JSON has parts of the wrong type (a list where an object goes, a
    number for a string) as CloudError("malformed"), never an AttributeError up the request path."""
    try:
        return read()
    except (AttributeError, TypeError, KeyError, IndexError, ValueError) as e:
        raise CloudError("malformed", f"cloud {what} has an unexpected shape ({type(e).__name__}: {e})") from None


class CloudBackend:
    def __init__(
        self,
        provider: Provider,
        http: httpx.AsyncClient,
        *,
        timeout: httpx.Timeout,
        retry: RetryPolicy,
        breaker: CircuitBreaker,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.provider = provider
        self.http = http
        self.timeout = timeout
        self.retry = retry
        self.breaker = breaker
        self._rng = random.Random()
        self._sleep = sleep

    @property
    def name(self) -> str:
        return self.provider.model

    def available(self) -> bool:
        """False while the circuit is open (the cloud failed repeatedly and is resting)."""
        return self.breaker.state != "open"

    async def stream(self, messages: Messages, options: SamplingOptions, tools: str = "") -> AsyncIterator[str | Reply]:
        """Text pieces, then the Reply. Raises CloudError when no answer can be had. `tools`: an OpenAI
        tool request passed through (Provider.request); the Reply carries the calls."""
        attempt = 0
        while True:
            if not self.breaker.allow():
                raise CloudError(
                    "circuit_open",
                    f"cloud circuit open after repeated failures; next try in {self.breaker.retry_in():.0f} s",
                )
            sent = False
            try:
                async for item in self._attempt(messages, options, tools):
                    sent = sent or isinstance(item, str)
                    yield item
                self.breaker.success()
                return
            except CloudError as e:
                if e.kind != "config":
                    self.breaker.failure()
                if sent or not e.retryable or attempt >= self.retry.max_retries:
                    raise
                delay = self.retry.delay(attempt, e.retry_after, self._rng)
                if delay is None:
                    raise CloudError(e.kind, f"{e} (asked to retry after {e.retry_after:.0f} s)") from None
                log.info("cloud attempt %d failed (%s); retrying in %.2f s", attempt + 1, e, delay)
                attempt += 1
                await self._sleep(delay)

    async def complete(self, messages: Messages, options: SamplingOptions) -> Reply:
        async for item in self.stream(messages, options):
            if isinstance(item, Reply):
                return item
        raise CloudError("malformed", "cloud stream ended without an answer")

    async def _attempt(self, messages: Messages, options: SamplingOptions, tools: str) -> AsyncIterator[str | Reply]:
        url, headers, body = self.provider.request(messages, options, tools)
        try:
            async with self.http.stream("POST", url, headers=headers, json=body, timeout=self.timeout) as resp:
                if resp.status_code != 200:
                    raw = (await resp.aread())[:300].decode("utf-8", "replace")
                    status = resp.status_code
                    raise CloudError(
                        "http",
                        f"cloud answered HTTP {status} from {url}: {raw}",
                        retryable=status in RETRY_STATUS,
                        retry_after=retry_after_s(resp.headers.get("retry-after")),
                    )
                if "text/event-stream" in resp.headers.get("content-type", ""):
                    async for item in self._events(resp, self.provider.stream_parser()):
                        yield item
                else:  # a server that ignores "stream": one JSON answer
                    body = _decode((await resp.aread()).decode("utf-8", "replace"))
                    reply = _shaped("answer", lambda: self.provider.parse_reply(body))
                    if reply.text:
                        yield reply.text
                    yield reply
        except httpx.TimeoutException as e:
            raise CloudError("timeout", f"cloud timed out ({type(e).__name__}) on {url}", retryable=True) from None
        except httpx.TransportError as e:
            raise CloudError(
                "connect", f"cannot reach the cloud at {url}: {e or type(e).__name__}", retryable=True
            ) from None

    async def _events(self, resp: httpx.Response, parser: StreamParser) -> AsyncIterator[str | Reply]:
        parts: list[str] = []
        async for event, data in sse_events(resp.aiter_lines()):
            value = _decode(data)
            text = _shaped("stream event", functools.partial(parser.feed, event, value))
            if text:
                parts.append(text)
                yield text
            if parser.finished:
                break
        if not parser.finished:
            raise CloudError("malformed", "cloud stream ended before its end event", retryable=not parts)
        yield parser.reply("".join(parts))

"""The Anthropic Messages API (`POST {base_url}/messages`), streamed, with prompt caching: the system
prompt (with the running summary) and the conversation before the current turn are marked with
`cache_control` breakpoints when they are long enough to be cached, so repeated prefixes are billed
at the cache-read price."""

from __future__ import annotations

from typing import Any

from appliance.cloud.provider import Messages, StreamState, count, field
from appliance.cloud.types import CloudError, CloudUsage, Reply, finish_word
from appliance.engine.sampling import SamplingOptions

API_VERSION = "2023-06-01"
_BREAKPOINT = {"type": "ephemeral"}


def _usage(u: Any, into: CloudUsage | None = None) -> CloudUsage:
    out = into or CloudUsage()
    if not isinstance(u, dict):
        return out
    if "input_tokens" in u:
        out.input_tokens = count(u, "input_tokens")
    if "cache_read_input_tokens" in u:
        out.cache_read_tokens = count(u, "cache_read_input_tokens")
    if "cache_creation_input_tokens" in u:
        out.cache_write_tokens = count(u, "cache_creation_input_tokens")
    if "output_tokens" in u:
        out.output_tokens = count(u, "output_tokens")
    return out


def _text_of(content: Any) -> str:
    if not isinstance(content, list):
        raise CloudError("malformed", f"cloud answer content is not a list of blocks: {str(content)[:200]}")
    return "".join(b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text")


class AnthropicStream(StreamState):
    def feed(self, event: str, data: Any) -> str:
        kind = data.get("type", event) if isinstance(data, dict) else event
        if kind == "error":
            err = data.get("error") or {}
            retryable = err.get("type") in ("overloaded_error", "api_error", "rate_limit_error")
            raise CloudError(
                "http", f"cloud stream error: {err.get('type')}: {err.get('message')}", retryable=retryable
            )
        if kind == "message_start":
            message = field(data, "message")
            self.model = str(message.get("model") or self.model)
            _usage(message.get("usage"), self.usage)
        elif kind == "content_block_delta":
            delta = field(data, "delta")
            if delta.get("type") == "text_delta":
                return str(field(delta, "text"))
        elif kind == "message_delta":
            self.reason = (data.get("delta") or {}).get("stop_reason") or self.reason
            _usage(data.get("usage"), self.usage)
        elif kind == "message_stop":
            self.done = True
        return ""


class AnthropicProvider:
    name = "anthropic"

    def __init__(self, base_url: str, model: str, api_key: str, cache_min_chars: int = 4096) -> None:
        self.url = base_url.rstrip("/") + "/messages"
        self.model = model
        self._key = api_key
        self.cache_min_chars = cache_min_chars

    def body(self, messages: Messages, options: SamplingOptions) -> dict[str, Any]:
        """The request body. Stable prefix first: system (+ summary), earlier turns, then this turn."""
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        turns: list[dict[str, Any]] = [
            {"role": m["role"], "content": [{"type": "text", "text": m["content"]}]}
            for m in messages
            if m["role"] != "system"
        ]
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": options.max_tokens,
            "temperature": min(1.0, options.temperature),
            "messages": turns,
            "stream": True,
        }
        if options.stop:
            body["stop_sequences"] = list(options.stop)
        if system:
            block: dict[str, Any] = {"type": "text", "text": system}
            if len(system) >= self.cache_min_chars:
                block["cache_control"] = _BREAKPOINT
            body["system"] = [block]
        prefix_chars = len(system) + sum(len(t["content"][0]["text"]) for t in turns[:-1])
        if len(turns) > 1 and prefix_chars >= self.cache_min_chars:
            turns[-2]["content"][-1]["cache_control"] = _BREAKPOINT  # everything before this turn
        return body

    def request(
        self, messages: Messages, options: SamplingOptions, tools: str = ""
    ) -> tuple[str, dict[str, str], dict[str, Any]]:
        if tools:
            raise CloudError("config", "tools pass through to an OpenAI-compatible cloud only (provider = openai)")
        headers = {"content-type": "application/json", "accept": "text/event-stream", "anthropic-version": API_VERSION}
        if self._key:
            headers["x-api-key"] = self._key
        return self.url, headers, self.body(messages, options)

    def parse_reply(self, data: Any) -> Reply:
        if isinstance(data, dict) and data.get("type") == "error":
            raise CloudError("http", f"cloud error: {str(data.get('error'))[:200]}")
        text = _text_of(field(data, "content"))
        model = str(data.get("model") or self.model)
        return Reply(
            text=text, finish_reason=finish_word(data.get("stop_reason")), usage=_usage(data.get("usage")), model=model
        )

    def stream_parser(self) -> AnthropicStream:
        return AnthropicStream(self.model)

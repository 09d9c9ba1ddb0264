"""OpenAI-compatible Chat Completions (`POST {base_url}/chat/completions`), streamed with usage."""

from __future__ import annotations

import json
from typing import Any

from appliance.cloud.provider import Messages, StreamState, count, field
from appliance.cloud.types import CloudError, CloudUsage, Reply, finish_word
from appliance.engine.sampling import SamplingOptions


def _usage(u: Any) -> CloudUsage:
    if not isinstance(u, dict):
        return CloudUsage()
    prompt = count(u, "prompt_tokens")
    cached = min(prompt, count(u.get("prompt_tokens_details") or {}, "cached_tokens"))
    return CloudUsage(
        input_tokens=prompt - cached, cache_read_tokens=cached, output_tokens=count(u, "completion_tokens")
    )


class OpenAIStream(StreamState):
    def feed(self, event: str, data: Any) -> str:
        if data == "[DONE]":
            self.done = True
            return ""
        if isinstance(data, dict) and "error" in data:
            raise CloudError("http", f"cloud stream error: {str(data['error'])[:200]}")
        if data.get("usage"):
            self.usage = _usage(data["usage"])
        self.model = str(data.get("model") or self.model)
        choices = data.get("choices") or []
        if not choices:
            return ""
        choice = field(choices, 0)
        self.reason = choice.get("finish_reason") or self.reason
        delta = choice.get("delta") or {}
        if delta.get("tool_calls"):
            self.add_tool_calls(delta["tool_calls"])
        text = delta.get("content")
        return text if isinstance(text, str) else ""


class OpenAIProvider:
    name = "openai"

    def __init__(self, base_url: str, model: str, api_key: str) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self._key = api_key

    def request(
        self, messages: Messages, options: SamplingOptions, tools: str = ""
    ) -> tuple[str, dict[str, str], dict[str, Any]]:
        headers = {"content-type": "application/json", "accept": "text/event-stream"}
        if self._key:
            headers["authorization"] = f"Bearer {self._key}"
        passed = json.loads(tools) if tools else {}  # the caller's tool request, its messages verbatim
        body: dict[str, Any] = {
            "model": self.model,
            "messages": passed.pop("messages", None)
            or [{"role": m["role"], "content": m["content"]} for m in messages],
            **passed,
            "max_tokens": options.max_tokens,
            "temperature": options.temperature,
            "top_p": options.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if options.stop:
            body["stop"] = list(options.stop)
        return self.url, headers, body

    def parse_reply(self, data: Any) -> Reply:
        message = field(data, "choices", 0, "message")
        text = message.get("content") if isinstance(message, dict) else None
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        if not isinstance(text, str) and not (text is None and isinstance(calls, list) and calls):
            raise CloudError("malformed", f"cloud answer has no text content: {str(data)[:200]}")
        reason = field(data, "choices", 0).get("finish_reason")
        model = str(data.get("model") or self.model)
        return Reply(
            text=text or "",
            finish_reason=finish_word(reason),
            usage=_usage(data.get("usage")),
            model=model,
            tool_calls=json.dumps(calls) if calls else "",
        )

    def stream_parser(self) -> OpenAIStream:
        return OpenAIStream(self.model)

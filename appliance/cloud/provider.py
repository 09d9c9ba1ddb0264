"""What the HTTP client needs from a provider: how to ask (URL, headers, JSON body) and how to read
the answer, whole (JSON) or streamed (server-sent events)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from appliance.cloud.types import CloudError, CloudUsage, Reply, finish_word
from appliance.engine.sampling import SamplingOptions

Messages = Sequence[Mapping[str, str]]


class StreamParser(Protocol):
    def feed(self, event: str, data: Any) -> str:
        """Text carried by one decoded event ("" for none); raises CloudError on an error event."""
        ...

    @property
    def finished(self) -> bool:
        """The provider said the stream is over."""
        ...

    def reply(self, text: str) -> Reply: ...


class StreamState:
    """What every provider's stream parser keeps: model, usage, stop reason and whether it ended."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.usage = CloudUsage()
        self.reason: str | None = None
        self.done = False
        self.tool_calls: dict[int, dict[str, Any]] = {}  # by index, their streamed pieces joined

    def add_tool_calls(self, pieces: Any) -> None:
        """OpenAI's streamed `delta.tool_calls`: the first piece of a call brings its id, type and
        name; `function.arguments` comes in pieces to be joined."""
        for piece in pieces if isinstance(pieces, list) else []:
            index = piece.get("index", len(self.tool_calls)) if isinstance(piece, dict) else None
            if not isinstance(index, int):
                raise CloudError("malformed", f"cloud tool call without an index: {str(piece)[:200]}")
            call = self.tool_calls.setdefault(
                index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
            )
            call["id"] = piece.get("id") or call["id"]
            call["type"] = piece.get("type") or call["type"]
            fn = piece.get("function") or {}
            call["function"]["name"] += fn.get("name") or ""
            call["function"]["arguments"] += fn.get("arguments") or ""

    @property
    def finished(self) -> bool:
        return self.done

    def reply(self, text: str) -> Reply:
        calls = [self.tool_calls[i] for i in sorted(self.tool_calls)]
        return Reply(
            text=text,
            finish_reason=finish_word(self.reason),
            usage=self.usage,
            model=self.model,
            tool_calls=json.dumps(calls) if calls else "",
        )


class Provider(Protocol):
    name: str
    model: str

    def request(
        self, messages: Messages, options: SamplingOptions, tools: str = ""
    ) -> tuple[str, dict[str, str], dict[str, Any]]:
        """(url, headers, body) of a streaming request. `tools`: an OpenAI tool request passed through
        (JSON: tools, tool_choice and the caller's own messages), for providers that take one."""
        ...

    def parse_reply(self, data: Any) -> Reply:
        """A whole (non-streamed) JSON answer."""
        ...

    def stream_parser(self) -> StreamParser: ...


def field(data: Any, *path: str | int) -> Any:
    """data[path[0]][path[1]]..., or CloudError("malformed") naming the missing part."""
    cur = data
    for i, key in enumerate(path):
        try:
            cur = cur[key]
        except (KeyError, IndexError, TypeError):
            where = ".".join(str(p) for p in path[: i + 1])
            raise CloudError("malformed", f"cloud answer has no {where}: {str(data)[:200]}") from None
    return cur


def count(data: Any, key: str) -> int:
    """An optional non-negative token count (absent or null: 0)."""
    value = data.get(key) if isinstance(data, dict) else None
    if value is None:
        return 0
    if not isinstance(value, int) or value < 0:
        raise CloudError("malformed", f"cloud usage {key} is not a token count: {value!r}")
    return value

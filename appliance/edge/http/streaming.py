"""Streamed answers: server-sent events for the OpenAI API (`data: {json}` events, sse-starlette) and
newline-delimited JSON for Ollama's. A client that disconnects cancels the stream, and with it the
generation (the engine frees its KV blocks)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.responses import StreamingResponse

PING_S = 15  # a comment line while a held answer (the cascade checks it) has nothing to send yet


def sse(items: AsyncIterator[Any]) -> EventSourceResponse:
    """Each item as one `data:` event (a str is sent as it is: "[DONE]")."""

    async def events() -> AsyncIterator[ServerSentEvent]:
        async for item in items:
            data = item if isinstance(item, str) else msgspec.json.encode(item).decode()
            yield ServerSentEvent(data=data)

    return EventSourceResponse(events(), ping=PING_S, sep="\n", headers={"Cache-Control": "no-cache"})


def ndjson(items: AsyncIterator[Any]) -> StreamingResponse:
    """Each item as one JSON line."""

    async def lines() -> AsyncIterator[bytes]:
        async for item in items:
            yield msgspec.json.encode(item) + b"\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson")

"""A small real HTTP server on loopback that answers with scripted provider behaviour (no tests here):
429 with Retry-After, 500, stalls, malformed JSON, OpenAI and Anthropic JSON and SSE shapes."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Answer:
    status: int = 200
    body: bytes = b""
    events: list[str] = field(default_factory=list)  # SSE: each item is one event's text block
    headers: dict[str, str] = field(default_factory=dict)
    stall_s: float = 0.0  # sleep before answering


def sse(*events: tuple[str | None, Any]) -> list[str]:
    """SSE blocks from (event name or None, data: a JSON-able object or a raw string)."""
    out = []
    for name, data in events:
        payload = data if isinstance(data, str) else json.dumps(data)
        out.append((f"event: {name}\n" if name else "") + f"data: {payload}\n\n")
    return out


def json_answer(data: Any, status: int = 200, **headers: str) -> Answer:
    return Answer(
        status=status, body=json.dumps(data).encode(), headers={"content-type": "application/json", **headers}
    )


class FakeCloud:
    def __init__(self) -> None:
        self.script: list[Answer] = []
        self.requests: list[tuple[str, dict[str, str], Any]] = []
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return None

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with owner._lock:
                    owner.requests.append((self.path, dict(self.headers), json.loads(body or b"null")))
                    answer = owner.script.pop(0) if owner.script else Answer(status=500, body=b"script exhausted")
                time.sleep(answer.stall_s)
                try:
                    self.send_response(answer.status)
                    if answer.events:
                        self.send_header("content-type", "text/event-stream")
                    for k, v in answer.headers.items():
                        self.send_header(k, v)
                    data = "".join(answer.events).encode() if answer.events else answer.body
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def fake_cloud() -> Iterator[FakeCloud]:
    cloud = FakeCloud()
    yield cloud
    cloud.close()


def openai_stream(text_pieces: list[str], usage: dict[str, Any] | None = None, finish: str = "stop") -> list[str]:
    events: list[tuple[str | None, Any]] = [
        (None, {"model": "gpt-test", "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]})
        for p in text_pieces
    ]
    events.append((None, {"model": "gpt-test", "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}))
    if usage is not None:
        events.append((None, {"model": "gpt-test", "choices": [], "usage": usage}))
    events.append((None, "[DONE]"))
    return sse(*events)


def anthropic_stream(
    text_pieces: list[str], usage: dict[str, int], output_tokens: int, stop: str = "end_turn"
) -> list[str]:
    events: list[tuple[str | None, Any]] = [
        ("message_start", {"type": "message_start", "message": {"model": "claude-test", "usage": usage}}),
        (
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        ),
        ("ping", {"type": "ping"}),
    ]
    events += [
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}})
        for p in text_pieces
    ]
    events += [
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {"type": "message_delta", "delta": {"stop_reason": stop}, "usage": {"output_tokens": output_tokens}},
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    return sse(*events)

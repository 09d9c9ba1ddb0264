"""A misbehaving OpenAI-compatible "cloud" on loopback for `bench soak` and `bench chaos`: each POST to
/v1/chat/completions draws one behaviour from a weighted mix and acts it out on the real socket.

    ok           a streamed answer (SSE chunks, finish_reason stop, usage, [DONE])
    429          Too Many Requests with Retry-After: 0
    500          an internal error
    stall        nothing for `stall_s` (set it past the service's [cloud] timeout_s), then a good answer
    malformed    an SSE event whose data is not JSON
    wrong_shape  an SSE event whose data is JSON but not a chunk object (a list)
    disconnect   the headers and the first text chunk, then the connection is cut mid-stream

`counts` says how often each behaviour was served; `on_answer`, when set, is called (from the server
thread) right after a complete good answer has been written, with the request's JSON body: the chaos
loop times a kill -9 from it to land on the service's writes that follow a cloud answer."""

from __future__ import annotations

import json
import random
import socket
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

BEHAVIOURS = ("ok", "429", "500", "stall", "malformed", "wrong_shape", "disconnect")
SOAK_MIX: dict[str, float] = {
    "ok": 0.55,
    "429": 0.075,
    "500": 0.075,
    "stall": 0.05,
    "malformed": 0.075,
    "wrong_shape": 0.075,
    "disconnect": 0.1,
}
MODEL = "flaky-cloud"


def _event(data: Any) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data)
    return f"data: {payload}\n\n".encode()


def _chunk(text: str | None, finish: str | None = None) -> dict[str, Any]:
    delta = {"content": text} if text is not None else {}
    return {"model": MODEL, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def answer_text(body: Any) -> str:
    """The good answer to a request body: a fixed sentence naming its last message (so a test can
    tell answers apart)."""
    msgs = body.get("messages") if isinstance(body, dict) else None
    last = str(msgs[-1].get("content", "")) if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) else ""
    return f"The cloud's answer to: {last[:60]}"


class FlakyCloud:
    def __init__(
        self,
        mix: Mapping[str, float] | None = None,
        *,
        stall_s: float = 3.0,
        seed: int = 0,
        on_answer: Callable[[Any], None] | None = None,
    ) -> None:
        mix = dict(SOAK_MIX if mix is None else mix)
        unknown = sorted(set(mix) - set(BEHAVIOURS))
        if unknown or not mix or any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
            raise ValueError(f"cloud mix {mix}: weights >= 0 (not all 0) over {', '.join(BEHAVIOURS)}")
        self.mix = mix
        self.stall_s = stall_s
        self.on_answer = on_answer
        self.counts: Counter[str] = Counter()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._closing = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return None

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("content-length", 0)))
                try:
                    body = json.loads(raw or b"null")
                except ValueError:
                    body = None
                try:
                    owner._serve(self, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the service gave up first (its timeout, a cancel)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, name="flaky-cloud", daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _draw(self) -> str:
        with self._lock:
            kinds = list(self.mix)
            kind = self._rng.choices(kinds, weights=[self.mix[k] for k in kinds])[0]
            self.counts[kind] += 1
        return kind

    def _serve(self, h: BaseHTTPRequestHandler, body: Any) -> None:
        kind = self._draw()
        if kind in ("429", "500"):
            status = int(kind)
            data = json.dumps({"error": {"message": f"flaky cloud: {status}", "type": "flaky"}}).encode()
            h.send_response(status)
            h.send_header("content-type", "application/json")
            if status == 429:
                h.send_header("retry-after", "0")
            h.send_header("content-length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
            return
        if kind == "stall" and self._closing.wait(self.stall_s):
            return
        text = answer_text(body)
        words = text.split(" ")
        pieces = [w + (" " if i < len(words) - 1 else "") for i, w in enumerate(words)]
        h.send_response(200)
        h.send_header("content-type", "text/event-stream")
        h.send_header("connection", "close")
        h.end_headers()  # HTTP/1.0: the body ends when the connection closes
        h.wfile.write(_event(_chunk(pieces[0])))
        h.wfile.flush()
        if kind == "disconnect":
            h.connection.shutdown(socket.SHUT_RDWR)  # mid-stream: no end event, no [DONE]
            return
        if kind == "malformed":
            h.wfile.write(b'data: {"choices": [{"delta": {"content": "unterminated\n\n')
            return
        if kind == "wrong_shape":
            h.wfile.write(_event([1, 2, 3]))
            return
        for p in pieces[1:]:
            h.wfile.write(_event(_chunk(p)))
        h.wfile.write(_event(_chunk(None, "stop")))
        usage = {"prompt_tokens": 20, "completion_tokens": len(pieces), "total_tokens": 20 + len(pieces)}
        h.wfile.write(_event({"model": MODEL, "choices": [], "usage": usage}))
        h.wfile.write(_event("[DONE]"))
        h.wfile.flush()
        if self.on_answer is not None:
            self.on_answer(body)

    def close(self) -> None:
        self._closing.set()
        self.server.shutdown()
        self.server.server_close()

"""Bounded admission: at most `max_concurrent` requests run, at most `max_queue` wait; the rest are
refused at once with RESOURCE_EXHAUSTED and a retry hint, so memory stays bounded under overload."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from appliance.service.errors import Overloaded, Unavailable


class Admission:
    def __init__(self, max_concurrent: int, max_queue: int, retry_after_ms: int) -> None:
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self.retry_after_ms = retry_after_ms
        self._slots = asyncio.Semaphore(max_concurrent)
        self.running = 0
        self.waiting = 0
        self.closed = False  # draining: no new requests
        self._idle = asyncio.Event()
        self._idle.set()

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self.closed:
            raise Unavailable("the server is shutting down")
        if self.running >= self.max_concurrent and self.waiting >= self.max_queue:
            raise Overloaded(
                f"overloaded: {self.running} running and {self.waiting} queued; retry in {self.retry_after_ms} ms",
                self.retry_after_ms,
            )
        self.waiting += 1
        self._idle.clear()
        try:
            await self._slots.acquire()
        except BaseException:
            self.waiting -= 1
            self._update_idle()
            raise
        self.waiting -= 1
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self._slots.release()
            self._update_idle()

    def _update_idle(self) -> None:
        if self.waiting == 0 and self.running == 0:
            self._idle.set()

    def close(self) -> None:
        self.closed = True

    async def wait_idle(self) -> None:
        await self._idle.wait()

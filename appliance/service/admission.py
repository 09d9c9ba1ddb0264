"""Bounded admission: at most `max_concurrent` requests run on the local model and at most
`max_cloud` wait on a cloud answer (two lanes, so slow cloud calls never hold the local engine's
slots); a new request is refused at once with RESOURCE_EXHAUSTED and a retry hint when `max_queue`
already wait, so memory stays bounded under overload. An admitted request that changes lanes (a
cloud failure answered locally, a cascade escalating) is never refused; it waits for its new lane,
so at most max_queue + max_concurrent + max_cloud requests wait at once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal

from appliance.common.errors import Overloaded, Unavailable

Lane = Literal["local", "cloud"]


class Admission:
    def __init__(self, max_concurrent: int, max_queue: int, retry_after_ms: int, max_cloud: int = 32) -> None:
        self.limits: dict[Lane, int] = {"local": max_concurrent, "cloud": max_cloud}
        self.max_queue = max_queue
        self.retry_after_ms = retry_after_ms
        self._slots: dict[Lane, asyncio.Semaphore] = {k: asyncio.Semaphore(v) for k, v in self.limits.items()}
        self.lane_running: dict[Lane, int] = {"local": 0, "cloud": 0}
        self.waiting = 0
        self.closed = False  # draining: no new requests
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def running(self) -> int:
        return sum(self.lane_running.values())

    @asynccontextmanager
    async def slot(self, lane: Lane = "local") -> AsyncIterator[Held]:
        """A slot in `lane` for the request's lifetime; `Held.move` changes lanes when its route changes
        (a cascade escalating to the cloud, a cloud failure answered locally)."""
        if self.closed:
            raise Unavailable("the server is shutting down")
        # refused when it would have to wait and the queue is full, and also, with a free slot, while the
        # queue is full of admitted requests waiting to change lanes (cloud failures answered locally),
        # which are never refused: new requests must not keep adding to them
        full = self.waiting >= self.max_queue
        if full and (self.waiting > 0 or self.lane_running[lane] >= self.limits[lane]):
            raise Overloaded(
                f"overloaded: {self.lane_running[lane]} running ({lane}) and {self.waiting} queued; "
                f"retry in {self.retry_after_ms} ms",
                self.retry_after_ms,
            )
        self.waiting += 1
        self._idle.clear()
        try:
            await self._slots[lane].acquire()
        except BaseException:
            self.waiting -= 1
            self._update_idle()
            raise
        self.waiting -= 1
        self.lane_running[lane] += 1
        held = Held(self, lane)
        try:
            yield held
        finally:
            held.release()
            self._update_idle()

    async def _move(self, held: Held, lane: Lane) -> None:
        held.release()  # holds nothing while it waits, so two requests trading lanes cannot deadlock
        self.waiting += 1
        try:
            await self._slots[lane].acquire()
        finally:
            self.waiting -= 1
        self.lane_running[lane] += 1
        held.lane = lane

    def _update_idle(self) -> None:
        if self.waiting == 0 and self.running == 0:
            self._idle.set()

    def close(self) -> None:
        self.closed = True

    async def wait_idle(self) -> None:
        await self._idle.wait()


class Held:
    """A request's admission slot: the lane it holds (None while it waits to move)."""

    def __init__(self, admission: Admission, lane: Lane) -> None:
        self._admission = admission
        self.lane: Lane | None = lane

    async def move(self, lane: Lane) -> None:
        """Hold a slot of `lane` instead (waiting for one, never refused: the request was admitted)."""
        if self.lane != lane:
            await self._admission._move(self, lane)

    def release(self) -> None:
        if self.lane is not None:
            self._admission.lane_running[self.lane] -= 1
            self._admission._slots[self.lane].release()
            self.lane = None

"""The HTTP face's listener: uvicorn's server as a task in the service's own event loop (no second
process or loop), on a socket bound here so that a taken port fails the start with an OSError."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Generator

import uvicorn

from appliance.common.config import hostport
from appliance.edge.http.app import build_app
from appliance.service.app import Service

log = logging.getLogger("appliance.http")


class _InLoopServer(uvicorn.Server):
    """uvicorn without its signal handlers: `appliance.edge.run` owns SIGTERM/SIGINT and stops it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class HttpServer:
    def __init__(self, service: Service) -> None:
        self.service = service
        self.host, self.port = hostport(service.cfg.http.listen)
        self._server: _InLoopServer | None = None
        self._task: asyncio.Task[None] | None = None
        self._sock: socket.socket | None = None

    async def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.create_server((self.host, self.port), family=family, backlog=512)
        sock.setblocking(False)
        self._sock = sock
        self.port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            build_app(self.service),
            loop="none",
            http="h11",
            ws="none",
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            timeout_keep_alive=30,
            timeout_graceful_shutdown=max(1, int(self.service.cfg.server.drain_timeout_s)),
        )
        self._server = _InLoopServer(config)
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():  # uvicorn gave up (it logs why)
                self._task.result()
                raise OSError(f"the HTTP edge could not start on {self.host}:{self.port}")
            await asyncio.sleep(0.01)
        log.info("HTTP edge (OpenAI /v1, Ollama /api) on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._sock is not None:
            self._sock.close()

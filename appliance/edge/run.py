"""`appliance serve`'s event loop: the `Service` with its faces (gRPC; the HTTP edge when
`[http] listen` is set), until SIGTERM/SIGINT, then a drain.

Under systemd (Type=notify) it tells the manager: READY=1 once serving, WATCHDOG=1 pings while the
loop runs, STOPPING=1 when draining."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass

from appliance.common.config import Config
from appliance.edge.grpc.server import GrpcServer
from appliance.edge.http.server import HttpServer
from appliance.engine.local_backend import LocalBackend
from appliance.service.app import Service
from appliance.service.sdnotify import Notifier, watchdog_interval

log = logging.getLogger("appliance.server")


@dataclass
class Faces:
    grpc: GrpcServer
    http: HttpServer | None = None


async def serve(cfg: Config, load_backend: Callable[[], LocalBackend], ready: Callable[[Faces], None]) -> None:
    """Run until SIGTERM/SIGINT; `ready(faces)` once their sockets listen (the model still loads)."""
    notifier = Notifier.from_env()
    pings: asyncio.Task[None] | None = None
    interval = watchdog_interval()
    if notifier.enabled and interval is not None:
        pings = asyncio.get_running_loop().create_task(notifier.watchdog_loop(interval))
    service = Service(cfg, load_backend)
    grpc_face = GrpcServer(service)
    await grpc_face.start()
    faces = Faces(grpc_face)
    if cfg.http.listen:
        faces.http = HttpServer(service)
        try:
            await faces.http.start()
        except BaseException:
            await grpc_face.stop()
            raise
    await service.start()
    ready(faces)
    notifier.status(f"loading the model; listening on unix:{grpc_face.socket_path}")

    async def announce() -> None:
        await service.loaded.wait()
        if service.load_error is not None:
            # no READY=1: systemd fails the start after TimeoutStartSec and Restart= applies
            notifier.status(f"loading failed: {service.load_error}".replace("\n", " "))
        elif not service.admission.closed:
            notifier.ready(f"serving on unix:{grpc_face.socket_path}")

    announcing = asyncio.get_running_loop().create_task(announce())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining (up to %.0f s)", cfg.server.drain_timeout_s)
    announcing.cancel()
    notifier.stopping(f"draining (up to {cfg.server.drain_timeout_s:.0f} s)")
    try:
        await service.drain()
        await grpc_face.stop()
        if faces.http is not None:
            await faces.http.stop()
        await service.close()
    finally:
        if pings is not None:
            pings.cancel()
        notifier.close()

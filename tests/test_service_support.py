"""Helpers for the service tests: a real `appliance serve` process and its config (no tests here)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc

from appliance.edge.grpc.client import Client
from appliance.service.auth import hash_token

TOKENS = {"acme": "acme-token-0123456789abcdef", "globex": "globex-token-0123456789abcdef"}


def write_config(
    path: Path,
    model: Path,
    *,
    tcp: bool = True,
    server: Mapping[str, Any] | None = None,
    cache: bool | Mapping[str, Any] = False,
    **model_cfg: Any,
) -> Path:
    lines = ["[server]", f'unix_socket = "{path.parent / "s.sock"}"', "drain_timeout_s = 10"]
    if tcp:
        lines.append('tcp = "127.0.0.1:0"')
    lines += [f"{k} = {v!r}" for k, v in (server or {}).items()]
    # cut_loops off unless a test asks: tiny random models loop at once, and the deadline, cancel and
    # drain tests need generations that run until stopped
    model_items = {"path": str(model), "n_ctx": 8192, "context_budget": 1024, "threads": 1, "cut_loops": False}
    model_items.update(model_cfg)
    lines += ["[model]"] + [
        f"{k} = {str(v).lower() if isinstance(v, bool) else repr(v)}".replace("'", '"') for k, v in model_items.items()
    ]
    lines += ["[storage]", f'dir = "{path.parent / "state"}"']
    lines += ["[cache]", f"enabled = {str(bool(cache)).lower()}", f'dir = "{path.parent / "semantic-cache"}"']
    if isinstance(cache, Mapping):  # settings beyond enabled = true
        lines += [f"{k} = {v!r}".replace("'", '"') for k, v in cache.items()]
    for name, token in TOKENS.items():
        lines += ["[[tenants]]", f'name = "{name}"', f'token_sha256 = "{hash_token(token)}"']
    path.write_text("\n".join(lines) + "\n")
    return path


class ServerProcess:
    """`python -m appliance.cli.serve serve -c CONFIG` in a child process."""

    def __init__(self, config: Path, argv_prefix: Sequence[str] = (sys.executable,)) -> None:
        self.config = config
        self.socket = config.parent / "s.sock"
        self.log = config.parent / "server.log"
        self.tcp_port: int | None = None
        self.http_port: int | None = None  # the HTTP edge's, when the config enables it
        self.metrics = ""  # host:port of the metrics endpoint, when the test configured one
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [*argv_prefix, "-m", "appliance.cli.serve", "serve", "-c", str(config)],
            stdout=subprocess.PIPE,
            stderr=self.log.open("wb"),
            env=env,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # "listening on unix:... and TCP port N; loading ..."
        if "listening" not in line:
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r} {self.log.read_text()}")
        if "TCP port" in line:
            self.tcp_port = int(line.split("TCP port ")[1].split(";")[0].split()[0])
        if "HTTP port" in line:
            self.http_port = int(line.split("HTTP port ")[1].split(";")[0])
        self.wait_serving()

    @property
    def unix_target(self) -> str:
        return f"unix:{self.socket}"

    @property
    def tcp_target(self) -> str:
        return f"127.0.0.1:{self.tcp_port}"

    def client(self, tenant: str | None = None) -> Client:
        """Unix-socket client, or a TCP client with `tenant`'s token."""
        if tenant is None:
            return Client.connect(self.unix_target)
        return Client.connect(self.tcp_target, TOKENS.get(tenant, tenant))

    def wait_serving(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        with Client.connect(self.unix_target) as c:
            while time.monotonic() < deadline:
                try:
                    if c.health() == "SERVING":
                        return
                except grpc.RpcError:
                    pass
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited: {self.log.read_text()}")
                time.sleep(0.05)
        raise TimeoutError("server not SERVING in time")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait()


def ledger_row(srv: ServerProcess, request_id: str) -> sqlite3.Row:
    """The server's ledger row for a request id (read from its SQLite file)."""
    conn = sqlite3.connect(srv.config.parent / "state" / "ledger.sqlite")
    conn.row_factory = sqlite3.Row
    try:
        row: sqlite3.Row = conn.execute("SELECT * FROM requests WHERE request_id=?", (request_id,)).fetchone()
    finally:
        conn.close()
    return row

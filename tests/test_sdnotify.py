"""sd_notify: the Notifier against real AF_UNIX datagram sockets, and the real `appliance serve`
process telling a socket this test binds (as systemd would) READY, WATCHDOG and STOPPING."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_service_support import write_config

from appliance.edge.grpc.client import Client
from appliance.service.sdnotify import Notifier, watchdog_interval


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    s.bind(str(path))
    s.settimeout(5.0)
    yield s, str(path)
    s.close()


def _fields(datagram: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.decode().split("\n"))


def test_notifier_sends_one_datagram_per_message_to_a_path(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready("serving on unix:/run/appliance/appliance.sock")
    assert _fields(sock.recv(4096)) == {"READY": "1", "STATUS": "serving on unix:/run/appliance/appliance.sock"}
    assert n.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert n.stopping("draining")
    assert _fields(sock.recv(4096)) == {"STOPPING": "1", "STATUS": "draining"}
    n.close()


def test_notifier_reaches_an_abstract_socket() -> None:
    name = f"appliance-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(b"\0" + name.encode())
        s.settimeout(5.0)
        n = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        assert n.status("loading")
        assert s.recv(4096) == b"STATUS=loading"
        n.close()


def test_without_notify_socket_nothing_is_sent() -> None:
    n = Notifier.from_env({})
    assert not n.enabled
    assert not n.ready("x")
    assert not n.watchdog()


def test_a_gone_socket_is_logged_not_raised(tmp_path: Path) -> None:
    n = Notifier(str(tmp_path / "nobody-listens.sock"))
    assert not n.status("x")
    n.close()


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="NOTIFY_SOCKET"):
        Notifier("relative/path")
    n = Notifier("@x")
    with pytest.raises(ValueError, match="one line"):
        n.status("two\nlines")
    n.close()


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None  # another process's
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_interval({}) is None


def _recv_until(sock: socket.socket, key: str, proc: subprocess.Popen[bytes], log: Path) -> list[dict[str, str]]:
    """Datagrams up to and including the first one carrying `key`."""
    got: list[dict[str, str]] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            got.append(_fields(sock.recv(4096)))
        except TimeoutError:
            if proc.poll() is not None:
                raise AssertionError(f"server exited with {proc.returncode}: {log.read_text()}") from None
            continue
        if key in got[-1]:
            return got
    raise AssertionError(f"no {key} within the time limit; got {got}; log: {log.read_text()}")


def test_serve_tells_systemd_ready_watchdog_and_stopping(
    tiny_model: Any, tmp_path: Path, listener: tuple[socket.socket, str]
) -> None:
    sock, path = listener
    cfg = write_config(tmp_path / "appliance.toml", tiny_model("gemma3"), tcp=False)
    log = tmp_path / "server.log"
    env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"}  # a ping every 0.1 s
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance.cli.serve", "serve", "-c", str(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
        env=env,
    )
    try:
        before_ready = _recv_until(sock, "READY", proc, log)
        ready = before_ready[-1]
        assert ready["READY"] == "1"
        assert ready["STATUS"] == f"serving on unix:{tmp_path / 's.sock'}"
        assert any(m.get("STATUS", "").startswith("loading the model") for m in before_ready)
        # READY means served: the health check and a real request answer right away
        with Client.connect(f"unix:{tmp_path / 's.sock'}") as c:
            assert c.health() == "SERVING"
            assert c.generate(prompt="Hello", max_tokens=2).usage.completion_tokens >= 1
        pings = _recv_until(sock, "WATCHDOG", proc, log)
        pings += _recv_until(sock, "WATCHDOG", proc, log)
        assert sum("WATCHDOG" in m for m in pings) >= 2
        proc.send_signal(signal.SIGTERM)
        stopping = _recv_until(sock, "STOPPING", proc, log)[-1]
        assert stopping["STOPPING"] == "1"
        assert stopping["STATUS"].startswith("draining")
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

"""systemd's notify protocol, spoken directly: one datagram per message to $NOTIFY_SOCKET.

No dependency: a message is newline-separated ``KEY=VALUE`` lines sent on an AF_UNIX datagram
socket. ``NOTIFY_SOCKET`` is a file path, or an abstract socket name when it starts with '@'.
Outside systemd (no NOTIFY_SOCKET) every call is a no-op, so the service runs the same by hand.

Used by `appliance serve`: ``READY=1`` once the model is loaded and requests are served,
``WATCHDOG=1`` from the event loop every half of ``WatchdogSec`` (so a wedged loop gets the
service restarted), ``STOPPING=1`` when draining, and ``STATUS=`` lines that `systemctl status`
shows.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger("appliance.sdnotify")


def _address(value: str) -> str | bytes:
    """The sendto() address for a NOTIFY_SOCKET value: '@name' is the abstract socket '\\0name'."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if not value.startswith("/"):
        raise ValueError(f"NOTIFY_SOCKET must be an absolute path or start with '@', got {value!r}")
    return value


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when no watchdog is asked
    for this process (unset, zero, malformed, or WATCHDOG_PID naming another process)."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None


class Notifier:
    """Sends notify messages to one socket; disabled (every send returns False) without one."""

    def __init__(self, notify_socket: str | None) -> None:
        self._address = _address(notify_socket) if notify_socket else None
        self._sock: socket.socket | None = None
        if self._address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        return cls(env.get("NOTIFY_SOCKET") or None)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, **fields: str) -> bool:
        """Send KEY=VALUE lines as one datagram; False when disabled or the send failed (logged:
        a notify failure must not take the service down)."""
        if self._sock is None or self._address is None:
            return False
        for key, value in fields.items():
            if "\n" in value:
                raise ValueError(f"notify field {key} must be one line, got {value!r}")
        message = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        try:
            self._sock.sendto(message, self._address)
        except OSError as e:
            log.warning("cannot notify systemd at %r: %s", self._address, e)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send(READY="1", STATUS=status)

    def stopping(self, status: str) -> bool:
        return self.send(STOPPING="1", STATUS=status)

    def status(self, status: str) -> bool:
        return self.send(STATUS=status)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG="1")

    async def watchdog_loop(self, interval: float) -> None:
        """Ping every `interval` seconds for as long as the event loop runs this task: a loop that
        stops turning stops the pings, and systemd restarts the service after WatchdogSec."""
        while True:
            self.watchdog()
            await asyncio.sleep(interval)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

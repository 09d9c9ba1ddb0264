"""The service under test of `bench soak` and `bench chaos`: a real `appliance serve` in a child process
on a Unix socket in its own home folder, with the metrics port on loopback, the semantic cache, a
cloud (the loopback flaky cloud) and a tenant that captures teacher examples."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from appliance.bench.common import free_port, start_service
from appliance.service.auth import hash_token

CAPTURE_TENANT = "acme"  # its cloud answers are kept as teacher examples (over the Unix socket, named per request)


@dataclass(frozen=True)
class Limits:
    """Admission and timeouts of the service under test."""

    max_concurrent: int = 4
    max_queue: int = 8
    max_cloud_concurrent: int = 4
    retry_after_ms: int = 200
    drain_timeout_s: float = 3.0
    cloud_timeout_s: float = 2.0  # the flaky cloud's stalls outlast it

    @property
    def capacity(self) -> int:
        """Requests the service holds at once (running in both lanes plus queued); more are refused."""
        return self.max_concurrent + self.max_cloud_concurrent + self.max_queue


MARK = ".appliance-bench-home"  # a home this module made: safe to clear before the next run


def fresh_home(out: Path) -> Path:
    """`out`/service, emptied: a run starts from no state (a ledger or cache left by an earlier run would
    replay its request ids and serve its answers). Refuses to clear a folder it did not make."""
    home = out / "service"
    if home.exists():
        if not (home / MARK).exists():
            raise FileExistsError(f"{home} exists and was not made by a bench run: choose another --out")
        shutil.rmtree(home)
    home.mkdir(parents=True)
    (home / MARK).touch()
    return home


def write_config(home: Path, model: str, threads: int, cloud_url: str, limits: Limits) -> tuple[Path, str]:
    """The config in `home` (socket, state, cache under it); returns (path, metrics host:port)."""
    metrics = f"127.0.0.1:{free_port()}"
    lines = [
        "[server]",
        f'unix_socket = "{home / "s.sock"}"',
        f"max_concurrent = {limits.max_concurrent}",
        f"max_queue = {limits.max_queue}",
        f"max_cloud_concurrent = {limits.max_cloud_concurrent}",
        f"retry_after_ms = {limits.retry_after_ms}",
        f"drain_timeout_s = {limits.drain_timeout_s}",
        f'metrics = "{metrics}"',
        "[model]",
        f'path = "{model}"',
        f"threads = {threads}",
        "[storage]",
        f'dir = "{home / "state"}"',
        "[cache]",
        "enabled = true",
        f'dir = "{home / "semantic-cache"}"',
        "embed_threads = 1",
        "[cloud]",
        'provider = "openai"',
        f'base_url = "{cloud_url}"',
        'model = "flaky-cloud"',
        f"timeout_s = {limits.cloud_timeout_s}",
        "connect_timeout_s = 1.0",
        "max_retries = 1",
        "backoff_s = 0.05",
        "backoff_max_s = 0.5",
        "breaker_failures = 8",
        "breaker_cooldown_s = 2.0",
        "[[tenants]]",
        f'name = "{CAPTURE_TENANT}"',
        f'token_sha256 = "{hash_token(CAPTURE_TENANT + "-soak-token-unused-over-the-socket")}"',
        "capture = true",
    ]
    cfg = home / "appliance.toml"
    home.mkdir(parents=True, exist_ok=True)
    cfg.write_text("\n".join(lines) + "\n")
    return cfg, metrics


class Served:
    """One run of the service: started (SERVING measured from the spawn), killed or stopped."""

    def __init__(self, cfg: Path, timeout_s: float = 180.0) -> None:
        self.home = cfg.parent
        self.socket = self.home / "s.sock"
        t0 = time.monotonic()
        self.proc: subprocess.Popen[str] = start_service(cfg, self.socket, self.home / "server.log", timeout_s)
        self.serving_s = time.monotonic() - t0  # spawn to health SERVING

    @property
    def target(self) -> str:
        return f"unix:{self.socket}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM (drain, save, close); the exit code, or None when it had to be killed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill9()
            return None

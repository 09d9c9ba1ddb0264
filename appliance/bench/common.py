"""Helpers the benchmarks share: random prompts, child processes, medians."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np


def random_tokens(n_vocab: int, n: int, seed: int) -> list[int]:
    """Token ids as llama-bench uses them: random, away from the special ids at the start."""
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(4, min(n_vocab, 32000), size=n)]


ENV_GPU_LAYERS = "APPLIANCE_GPU_LAYERS"


def gpu_layers(default: int = -1) -> int:
    """Layers both engines put on a GPU, as llama.cpp's -ngl (-1: all; no effect without a GPU), from
    APPLIANCE_GPU_LAYERS: `appliance bench decode/batch --gpu-layers N` sets it for the child processes,
    tools/gpu_check.sh for the parity tests' llama.cpp reference."""
    import os

    return int(os.environ.get(ENV_GPU_LAYERS, str(default)))


def run_child(module: str, args: list[str]) -> Any:
    """Run `python -m module args` and return the JSON it prints last (its own process: own peak RSS)."""
    out = subprocess.run([sys.executable, "-m", module, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_service_config(
    d: Path,
    model: str,
    threads: int,
    *,
    max_concurrent: int,
    cache: bool,
    extra: list[str],
    model_extra: tuple[str, ...] = (),
) -> Path:
    """A config for a benchmark's `appliance serve` in folder `d` (socket, state, cache), plus `extra` lines
    (after the [cache] table) and `model_extra` lines in [model]."""
    lines = [
        "[server]",
        f'unix_socket = "{d / "s.sock"}"',
        f"max_concurrent = {max_concurrent}",
        "max_queue = 256",
        "[model]",
        f'path = "{model}"',
        f"threads = {threads}",
        *model_extra,
        "[storage]",
        f'dir = "{d / "state"}"',
        "[cache]",
        f"enabled = {str(cache).lower()}",
        f'dir = "{d / "semantic-cache"}"',
        *extra,
    ]
    cfg = d / "appliance.toml"
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


def start_service(cfg: Path, sock: Path, log: Path, timeout: float = 120.0) -> subprocess.Popen[str]:
    """`appliance serve --config cfg` in a child process, returned once health says SERVING on `sock`."""
    from appliance.edge.grpc.client import Client

    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance", "serve", "--config", str(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
        text=True,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()}")
        if sock.exists():
            try:
                with Client.connect(f"unix:{sock}") as c:
                    if c.health() == "SERVING":
                        return proc
            except Exception:
                pass
        time.sleep(0.1)
    proc.kill()
    raise TimeoutError("server did not become SERVING")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_llama_server(
    model: str, log: Path, *, alias: str, threads: int = 1, timeout: float = 120.0
) -> tuple[subprocess.Popen[bytes], str]:
    """llama-cpp-python's OpenAI-compatible server on `model` (loopback, a free port): (process, base URL
    ending in /v1). A stand-in "cloud" for tests and benchmarks; gemma's chat format, as our engine uses."""
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", model, "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--n_ctx", "2048", "--n_threads", str(threads), "--model_alias", alias, "--chat_format", "gemma"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url + "/models", timeout=1).read()
            return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"llama_cpp.server did not start: {log.read_text()[-2000:]}") from None
            time.sleep(0.2)

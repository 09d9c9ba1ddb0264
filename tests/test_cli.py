"""The command line as a user runs it: a real subprocess."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path


def appliance(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args], input=stdin, capture_output=True, text=True, timeout=120
    )


def test_help_lists_commands() -> None:
    out = appliance("--help")
    assert out.returncode == 0
    for cmd in ("models", "generate", "bench"):
        assert cmd in out.stdout
    gen = appliance("generate", "--help")
    assert "--max-tokens" in gen.stdout and "--interactive" in gen.stdout


def test_generate_streams_from_a_model_file(tiny_model: Callable[..., Path]) -> None:
    path = tiny_model("qwen3", "Q8_0")
    out = appliance("generate", "--model", str(path), "-n", "8", "--threads", "1", "--stats", "the quick brown")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
    assert "tokens/s" in out.stderr


def test_interactive_reads_until_exit(tiny_model: Callable[..., Path]) -> None:
    path = tiny_model("llama", "F16")
    out = appliance("generate", "--interactive", "--model", str(path), "-n", "4", stdin="hello there\nexit\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(">") >= 2


def test_generate_errors_are_clear() -> None:
    out = appliance("generate", "--model", "/no/such/model.gguf", "hi")
    assert out.returncode == 2 and "does not exist" in out.stderr
    out = appliance("generate", "--model", "no-such-model", "hi")
    assert out.returncode == 2 and "unknown model" in out.stderr
    out = appliance("generate", "--threads", "0", "hi")
    assert out.returncode == 2 and "n_threads must be positive" in out.stderr

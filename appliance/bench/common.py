"""Helpers the benchmarks share: random prompts, child processes, medians."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import numpy as np


def random_tokens(n_vocab: int, n: int, seed: int) -> list[int]:
    """Token ids as llama-bench uses them: random, away from the special ids at the start."""
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(4, min(n_vocab, 32000), size=n)]


def run_child(module: str, args: list[str]) -> Any:
    """Run `python -m module args` and return the JSON it prints last (its own process: own peak RSS)."""
    out = subprocess.run([sys.executable, "-m", module, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])

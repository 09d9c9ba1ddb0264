"""An answer that loops is cut: the rule on token sequences, and the default (base) model asked a
question in a chat, as a new user would, through a real server: it starts repeating itself, and the
service stops it long before max_tokens (finish_reason "loop"), with the answer so far."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path
from typing import Any

from test_service_support import ServerProcess, write_config

from appliance.service.loops import MIN_SPAN, LoopCheck


def first_loop(tokens: list[int]) -> int | None:
    c = LoopCheck()
    return next((i for i, t in enumerate(tokens) if c.add(t)), None)


def test_a_repeated_block_is_a_loop_and_ordinary_text_is_not() -> None:
    block = list(range(100, 112))
    assert first_loop([1, 2, 3] + block * 6) == 3 + 3 * len(block) - 1  # the third copy completes it
    assert first_loop([7] * 40) == MIN_SPAN - 1
    rng = random.Random(0)
    assert first_loop([rng.randrange(5000) for _ in range(2000)]) is None
    assert first_loop([5, 6] * 8 + [1, 2, 3]) is None  # a short run is left alone
    assert first_loop(list(range(70)) * 2) is None  # a period past MAX_PERIOD


def ask_capital(srv: ServerProcess, max_tokens: int) -> tuple[str, Any]:
    """The issue's first chat turn, greedy: (the answer's text, the final message)."""
    with srv.client() as c:
        chunks = list(
            c.chat(
                session_id="s1",
                messages=[("user", "What is the capital of France?")],
                max_tokens=max_tokens,
                temperature=0.0,
            )
        )
    return "".join(ch.delta for ch in chunks[:-1]), chunks[-1].final


def test_the_base_model_looping_in_a_chat_is_cut(default_model: Path, tmp_path: Path) -> None:
    srv = ServerProcess(write_config(tmp_path / "appliance.toml", default_model, n_ctx=2048, cut_loops=True))
    try:
        text, final = ask_capital(srv, 256)
        assert final.finish_reason == "loop", (final.finish_reason, text)
        assert final.usage.completion_tokens < 128 and text
        # as a user meets it: `appliance chat` says the model is a base model, and that the answer was cut
        chat = subprocess.run(
            [sys.executable, "-m", "appliance", "chat", "--target", srv.unix_target, "-n", "256"],
            input="What is the capital of France?\n",
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert chat.returncode == 0, chat.stderr
        assert "is a base model" in chat.stderr and "appliance serve --model" in chat.stderr
        assert "the service cut it" in chat.stderr and chat.stdout.strip()
    finally:
        assert srv.stop() == 0


def test_cut_loops_false_runs_the_answer_to_max_tokens(default_model: Path, tmp_path: Path) -> None:
    """`[model] cut_loops = false` (what the peer benchmarks set, to generate what llama-server does)."""
    srv = ServerProcess(write_config(tmp_path / "appliance.toml", default_model, n_ctx=2048, cut_loops=False))
    try:
        _, final = ask_capital(srv, 96)
        assert final.finish_reason == "length" and final.usage.completion_tokens == 96
    finally:
        assert srv.stop() == 0

"""Conversation history management on the real default model: older turns are folded into a summary
written by the model, prompts stay within the budget, and the stable prefix keeps the KV cache hitting."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from test_service_support import ServerProcess, write_config

FACTS = [
    "My name is Ada and I live in Lisbon.",
    "I have two cats called Pixel and Byte.",
    "I work as a baker and start at five in the morning.",
    "My favourite colour is green.",
    "I want to plan a trip to Norway in June.",
    "What do you remember about me?",
]


def test_chat_summarizes_older_turns_within_the_budget(default_model: Path, tmp_path: Path) -> None:
    budget = 140
    cfg = write_config(
        tmp_path / "appliance.toml",
        default_model,
        tcp=False,
        n_ctx=2048,
        threads=2,
        context_budget=budget,
        keep_turns=2,
        summary_max_tokens=32,
    )
    srv = ServerProcess(cfg)
    usages = []
    try:
        with srv.client() as c:
            for i, fact in enumerate(FACTS):
                msgs = [("system", "You are a helpful assistant.")] if i == 0 else []
                chunks = list(
                    c.chat(
                        session_id="ada", messages=[*msgs, ("user", fact)], max_tokens=12, temperature=0, timeout=120
                    )
                )
                assert chunks[-1].done
                usages.append(chunks[-1].final.usage)
    finally:
        assert srv.stop() == 0
    db = sqlite3.connect(tmp_path / "state" / "history.sqlite")
    summary, folded = db.execute("SELECT summary, folded FROM sessions WHERE session_id='ada'").fetchone()
    assert folded > 0 and summary.startswith("The user "), "no turn was folded into a summary"
    # written by the model from the folded turns (a 270M base model: some facts survive, not all)
    assert any(word in summary for word in ("Ada", "Lisbon", "cat", "Pixel", "Byte", "baker", "green")), summary
    assert all(u.prompt_tokens <= budget + 40 for u in usages), [u.prompt_tokens for u in usages]
    assert usages[-1].summary_saved_tokens > 0
    # between folds the system prompt + summary prefix is unchanged, so most of the prompt is reused
    assert max(u.cached_tokens / u.prompt_tokens for u in usages[1:]) > 0.5, [
        (u.prompt_tokens, u.cached_tokens) for u in usages
    ]


def test_chat_prompts_start_with_bos(default_model: Path) -> None:
    """The built-in gemma template leaves BOS out; the service adds it (without it the model babbles)."""
    from appliance.engine.local_backend import LocalBackend

    backend = LocalBackend.load(default_model, 512, 2, max_seqs=1, kv_cache_mb=16)
    try:
        rendered = backend.render_chat([{"role": "user", "content": "hello"}])
        tokens = backend.tokenize_chat(rendered)
        bos = backend.engine.vocab.bos
        assert tokens[0] == bos and tokens.count(bos) == 1
        assert backend.tokenize_chat("<bos>" + rendered).count(bos) == 1  # never twice
    finally:
        backend.close()

"""Cross-check against llama.cpp's own server: the same greedy requests through llama-server's OpenAI
endpoint (built from the pinned llama-cpp-python sdist, `make llama-server`; `make test` builds it)
and through our HTTP edge, on the default model, give the same text. A divergence is accepted only at
a near-tie: llama-server's own top-2 probabilities at the first differing token within NEAR_TIE."""

from __future__ import annotations

import json
import math
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from test_http_edge import with_http
from test_service_support import TOKENS, ServerProcess, write_config

from appliance.bench import peer

EARLY_EXIT = os.environ.get("APPLIANCE_PEER_EARLY_EXIT", "off")
NEAR_TIE = 0.02  # top-1 minus top-2 probability at the first differing token
MAX_TOKENS = 32
FRESH = {"cache_prompt": False}  # llama-server: no reuse of the slot's last prompt (usage counts every token)
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Ticket 7: I have a problem with my card. What should I do?",
]
CHAT = "What is the capital of France? Answer in one sentence."

pytestmark = pytest.mark.skipif(
    peer.locate() is None, reason="llama-server is not built: run `make llama-server` (make test builds it first)"
)


class _Server(ServerProcess):
    """The default model loads (and its early-exit calibration with it) slower than a tiny one."""

    def wait_serving(self, timeout: float = 300.0) -> None:
        super().wait_serving(timeout)


@pytest.fixture(scope="module")
def ours(default_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    """Our service on the default model, as configured by default (early exit included)."""
    d = tmp_path_factory.mktemp("peer-ours")
    cfg = write_config(d / "appliance.toml", default_model, tcp=False, n_ctx=4096, early_exit=EARLY_EXIT)
    srv = _Server(with_http(cfg))
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{srv.http_port}/v1", api_key=TOKENS["acme"], max_retries=0)
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def theirs(default_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """llama-server on the same model; gemma's built-in chat template, the one our engine falls back
    to for a GGUF without one (llama-server's own fallback is ChatML)."""
    log = tmp_path_factory.mktemp("peer-theirs") / "llama-server.log"
    proc, url = peer.start(str(default_model), log, threads=1, slots=1, chat_template="gemma")  # as ours: 1 thread
    yield url
    proc.terminate()
    proc.wait(60)


def _post(url: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def _same_or_near_tie(url: str, prompt: str, ours: str, theirs: str, finish: str | None) -> None:
    """Equal texts; or ours cut short by the service (a loop) as a prefix of theirs; or a near-tie
    at the first token where they part, by llama-server's own top-2 probabilities."""
    if ours == theirs or (finish == "length" and theirs.startswith(ours) and len(ours) < len(theirs)):
        return
    common = 0
    while common < min(len(ours), len(theirs)) and ours[common] == theirs[common]:
        common += 1
    common = max(0, theirs.rfind(" ", 0, common + 1))  # back to a word's start: the differing token's
    probe = _post(
        url.removesuffix("/v1") + "/completion",
        {"prompt": prompt + theirs[:common], "n_predict": 1, "n_probs": 2, "temperature": 0, "cache_prompt": False},
    )
    top = probe["completion_probabilities"][0]["top_logprobs"]
    margin = math.exp(top[0]["logprob"]) - math.exp(top[1]["logprob"])
    print(f"near-tie check at char {common}: {top[0]['token']!r} vs {top[1]['token']!r}, margin {margin:.4f}")
    assert margin < NEAR_TIE, (
        f"greedy texts differ past a near-tie (margin {margin:.4f}):\nours   {ours!r}\ntheirs {theirs!r}"
    )


@pytest.mark.parametrize("prompt", PROMPTS)
def test_completions_match_llama_server(ours: openai.OpenAI, theirs: str, prompt: str) -> None:
    mine = ours.completions.create(model="appliance", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    ref = _post(theirs + "/completions", {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, **FRESH})
    assert mine.usage is not None and mine.usage.prompt_tokens == ref["usage"]["prompt_tokens"]
    _same_or_near_tie(theirs, prompt, mine.choices[0].text, ref["choices"][0]["text"], mine.choices[0].finish_reason)


def test_chat_matches_llama_server(ours: openai.OpenAI, theirs: str) -> None:
    messages: list[Any] = [{"role": "user", "content": CHAT}]
    mine = ours.chat.completions.create(model="appliance", messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    ref = _post(
        theirs + "/chat/completions", {"messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0, **FRESH}
    )
    assert mine.usage is not None and mine.usage.prompt_tokens == ref["usage"]["prompt_tokens"]  # the same template
    text = mine.choices[0].message.content or ""
    rendered = f"<start_of_turn>user\n{CHAT}<end_of_turn>\n<start_of_turn>model\n"
    _same_or_near_tie(theirs, rendered, text, ref["choices"][0]["message"]["content"], mine.choices[0].finish_reason)

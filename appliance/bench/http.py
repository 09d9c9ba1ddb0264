"""`appliance bench http`: our HTTP edge against llama-server, the same OpenAI API on both.

A real `appliance serve` process (default config, but the semantic cache off, so every request runs
the model, and `max_concurrent` at least the clients) answers streamed greedy `/v1/completions`
requests on its `[http] listen` port; llama-server (`bench/peer.py`: the same model, the same ggml
build, `-np` = clients, flash attention) answers the same prompts through the same client code.
Rounds alternate between the two (`bench/rounds.py`); medians of `repeats` rounds."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from appliance.bench.common import free_port
from appliance.bench.rounds import against_llama_server, openai_side

CONCURRENCY = (1, 8)
MAX_TOKENS = 128


def bench_http(
    model: str, threads: int, concurrency: Sequence[int] = CONCURRENCY, repeats: int = 3, max_tokens: int = MAX_TOKENS
) -> dict[str, Any]:
    url = f"http://127.0.0.1:{free_port()}"
    res = against_llama_server(
        model,
        threads,
        lambda d: lambda c: openai_side(url + "/v1", "appliance", max_tokens),
        concurrency=concurrency,
        repeats=repeats,
        max_tokens=max_tokens,
        extra=["[http]", f'listen = "{url.removeprefix("http://")}"'],
        label="http ",
    )
    return {**res, "ours": "the HTTP edge, /v1/completions streamed; default early exit; semantic cache off"}

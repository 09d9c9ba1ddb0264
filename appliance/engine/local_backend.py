"""The local model as an asyncio backend, on the continuous-batching AsyncEngine.

The pipeline sees `LocalBackend.generate(tokens, options, tenant=...) -> AsyncIterator[Chunk]`,
`tokenize`, `count_tokens` and `render_chat`. Requests run concurrently in one batched forward pass
per step; a consumer that stops iterating (client cancel, deadline) cancels its request in the
engine, which frees its KV blocks at once. The prompt-cache hit of each request comes back on its
last chunk (`cached_tokens`), from the tenant-salted prefix cache.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncGenerator, Mapping, Sequence
from pathlib import Path

from appliance.engine.async_engine import AsyncEngine
from appliance.engine.chunk import Chunk
from appliance.engine.placement import placement
from appliance.engine.sampling import ExitMode, SamplingOptions

log = logging.getLogger("appliance.engine")


class LocalBackend:
    def __init__(self, engine: AsyncEngine, name: str, n_ctx: int) -> None:
        self.engine = engine
        self.name = name
        self.n_ctx = min(n_ctx, engine.max_seq_len)

    @classmethod
    def load(
        cls,
        model_path: Path,
        n_ctx: int,
        threads: int,
        max_seqs: int = 16,
        kv_cache_mb: int = 256,
        max_batched_tokens: int = 512,
        gpu_layers: int = -1,
    ) -> LocalBackend:
        engine = AsyncEngine(
            model_path,
            n_threads=threads or None,
            max_seqs=max_seqs,
            kv_cache_mb=kv_cache_mb,
            max_batched_tokens=max_batched_tokens,
            gpu_layers=gpu_layers,
        )
        log.info("%s on %s", model_path.name, placement(engine.model))
        return cls(engine, model_path.stem, n_ctx)

    @property
    def n_layer(self) -> int:
        return int(self.engine.model.n_layer)

    def default_exit(self, configured: ExitMode) -> ExitMode | None:
        """The early-exit mode for requests that do not choose; None when the model has no calibration
        (then only "off" can be served)."""
        return None if self.engine.exit_calibration is None else configured

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        return self.engine.tokenize(text, add_special=add_special, parse_special=True)

    def tokenize_chat(self, rendered: str) -> list[int]:
        """Tokens of a rendered chat prompt, starting with BOS when the model wants one: templates that
        leave it out (llama.cpp's built-in gemma template does) would otherwise send none."""
        tokens = self.tokenize(rendered, add_special=False)
        bos = self.engine.vocab.bos
        if self.engine.vocab.add_bos and bos >= 0 and (not tokens or tokens[0] != bos):
            tokens.insert(0, bos)
        return tokens

    def piece(self, token: int) -> bytes:
        """A token's text as the model's vocabulary spells it (bytes: a piece may split a character)."""
        return self.engine.vocab.token_to_piece(token)

    def count_tokens(self, text: str) -> int:
        return len(self.engine.tokenize(text, add_special=False))

    def render_chat(self, messages: Sequence[Mapping[str, str]]) -> str:
        return self.engine.apply_chat_template(messages)

    async def generate(
        self, tokens: Sequence[int], options: SamplingOptions, *, tenant: str | None = None, adapter: int = 0
    ) -> AsyncGenerator[Chunk, None]:
        """Stream the continuation of `tokens`. Raises ValueError (overflow, bad options) up front.

        `tenant` namespaces the prefix cache; a call without one (the summarizer's) gets a namespace of
        its own, so nothing it leaves in the cache can serve, or be timed by, another tenant. `adapter`:
        a LoRA adapter loaded into the engine (a task model), 0 for the base model."""
        namespace = tenant if tenant is not None else f"private:{uuid.uuid4().hex}"
        async for chunk in self.engine.generate(list(tokens), options, tenant=namespace, adapter=adapter):
            yield chunk

    def close(self) -> None:
        self.engine.close()

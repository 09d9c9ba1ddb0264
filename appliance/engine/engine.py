"""The local generation engine for one caller at a time: the batching engine, stepped in the caller's
thread. It generates exactly as the service does (same native path, sampling, early exit, stop strings).

    engine = Engine("model.gguf", n_threads=2)
    for chunk in engine.generate("Hello", options=SamplingOptions(temperature=0)):
        print(chunk.text, end="")

Prompts reuse the KV blocks of earlier ones through the prefix cache. A lock serialises calls.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping, Sequence

from appliance.engine.chunk import Chunk, Decoder, Event
from appliance.engine.core import ContextOverflowError, EngineCore, ModelFormatError
from appliance.engine.sampling import SamplingOptions

__all__ = ["ContextOverflowError", "Engine", "ModelFormatError"]


class Engine:
    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        n_ubatch: int = 512,
        use_gpu: bool = True,
        gpu_layers: int = -1,
        early_exit: bool = True,
    ) -> None:
        """n_ctx: the longest sequence (prompt and output); n_ubatch: most prompt tokens a pass runs;
        early_exit: load the model's early-exit calibration when it has one."""
        if n_ctx <= 0:
            raise ValueError(f"n_ctx must be positive, got {n_ctx}")
        if n_ubatch <= 0:
            raise ValueError(f"n_ubatch must be positive, got {n_ubatch}")
        block_size = 16
        self.core = EngineCore(
            model_path,
            n_blocks=max(2, -(-n_ctx // block_size)),
            block_size=block_size,
            max_batched_tokens=n_ubatch,
            max_seqs=1,
            n_threads=n_threads,
            use_gpu=use_gpu,
            gpu_layers=gpu_layers,
            early_exit=early_exit,
        )
        self.model = self.core.model
        self.vocab = self.core.vocab
        self._lock = threading.Lock()

    @property
    def n_ctx(self) -> int:
        return self.core.max_seq_len

    def tokenize(self, text: str | bytes, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return self.core.tokenize(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, tokens: Sequence[int], *, remove_special: bool = False, special: bool = False) -> str:
        return self.core.detokenize(tokens, remove_special=remove_special, special=special)

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], *, add_assistant: bool = True) -> str:
        return self.core.apply_chat_template(messages, add_assistant=add_assistant)

    def load_adapter(self, path: str | os.PathLike[str], scale: float = 1.0) -> int:
        """A LoRA adapter (llama.cpp GGUF) over the model; its id goes to `generate(adapter=)`."""
        with self._lock:
            return self.core.load_adapter(path, scale)

    def unload_adapter(self, adapter: int) -> bool:
        with self._lock:
            return self.core.unload_adapter(adapter)

    def generate(
        self, prompt: str | bytes | Sequence[int], options: SamplingOptions | None = None, *, adapter: int = 0
    ) -> Iterator[Chunk]:
        """Stream the continuation of `prompt` (text, or token ids), under a loaded adapter or none;
        leaving the loop early cancels it."""
        tokens, opts = self.core.prepare(prompt, options)
        return self._run(tokens, opts, adapter)

    def _run(self, tokens: list[int], opts: SamplingOptions, adapter: int) -> Iterator[Chunk]:
        native = self.core.native
        with self._lock:
            rid = self.core.submit(tokens, opts, adapter=adapter)
            decoder = Decoder(self.vocab, opts.stop)
            ended = False  # the native request finished (else it is cancelled on the way out)
            try:
                while not decoder.done:
                    if native.idle:
                        raise RuntimeError("the engine went idle before the request finished")
                    for ev in native.step():
                        if ev.id != rid:
                            continue
                        ended = ended or bool(ev.finish_reason)
                        yield from decoder.chunks(Event.of(ev))
            finally:
                if not ended:
                    native.cancel(rid)

    def generate_text(
        self, prompt: str | bytes | Sequence[int], options: SamplingOptions | None = None, *, adapter: int = 0
    ) -> str:
        return "".join(c.text for c in self.generate(prompt, options, adapter=adapter))

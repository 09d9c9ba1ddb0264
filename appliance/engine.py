"""The local generation engine: a GGUF model run by the native core, one sequence at a time.

    engine = Engine("model.gguf", n_threads=2)
    for chunk in engine.generate("Hello", options=SamplingOptions(temperature=0)):
        print(chunk.text, end="")

An Engine keeps the KV cache of its last sequence and reuses the longest common token prefix of the
next prompt (prompt caching within one sequence). It is not thread-safe: a lock serialises calls.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from appliance import _native
from appliance.sampling import SamplingOptions
from appliance.textstream import TextStream

ModelFormatError = _native.ModelFormatError
ContextOverflowError = _native.ContextOverflowError

# chat templates libllama knows by name, for models whose GGUF carries none (base models)
_FALLBACK_TEMPLATES = {"gemma3": "gemma", "llama": "llama3", "qwen2": "chatml", "qwen3": "chatml"}


@dataclass(frozen=True)
class DecodeStats:
    """How a request's tokens were decoded (AsyncEngine; on the last chunk)."""

    tokens: int = 0  # tokens decided (the last one may be an end-of-generation token)
    layers_run: int = 0  # layer evaluations spent, drafts included
    drafted: int = 0  # lossless: positions drafted
    accepted: int = 0  # lossless: drafted tokens the full model agreed with
    exits: tuple[tuple[int, int], ...] = ()  # (layers run, tokens decided there), ascending

    @property
    def mean_layers(self) -> float:
        return self.layers_run / self.tokens if self.tokens else 0.0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def early_tokens(self, n_layer: int) -> int:
        """Tokens decided before the last layer (adaptive) plus drafted tokens kept (lossless)."""
        return self.accepted + sum(n for at, n in self.exits if at < n_layer)


@dataclass(frozen=True)
class Chunk:
    """One step of a streamed generation. text may be empty while a UTF-8 character or a possible
    stop string is held back; finish_reason is set on the last chunk ("stop", "length", or "oom"
    when the KV cache cannot hold the sequence). The last chunk also carries the prompt's token
    count and how many of those the prefix cache served."""

    token: int | None
    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    decode: DecodeStats | None = None
    logprob: float | None = None  # SamplingOptions.logprobs: the token's log-probability at temperature 1
    entropy: float | None = None  # ... and the entropy (nats) of the distribution it came from


def eog_tokens(vocab: _native.Vocab) -> list[int]:
    """Every end-of-generation token of the vocabulary: EOS and EOT first, then the rest it marks."""
    eog = [t for t in (vocab.eos, vocab.eot) if t >= 0]
    return eog + [t for t in range(vocab.n_tokens) if t not in eog and vocab.is_eog(t)]


def default_threads() -> int:
    """Physical-core-ish default: every CPU this process may run on."""
    return max(1, len(os.sched_getaffinity(0)))


def to_utf8(text: str | bytes, what: str = "prompt") -> str:
    """Validate text at the boundary; bytes must be UTF-8, str must encode to it."""
    if isinstance(text, bytes):
        try:
            return text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{what} is not valid UTF-8: byte {e.start} ({text[e.start : e.start + 1]!r})") from None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid UTF-8: character {e.start} is a lone surrogate") from None
    return text


def render_chat(
    vocab: _native.Vocab, arch: str, messages: Sequence[Mapping[str, str]], *, add_assistant: bool = True
) -> str:
    """Chat messages ({"role", "content"}) through the model's template, or its family's when the
    GGUF carries none (base models)."""
    pairs = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise ValueError(f"messages[{i}] needs string 'role' and 'content'")
        pairs.append((role, to_utf8(content, f"messages[{i}].content")))
    template = vocab.chat_template or _FALLBACK_TEMPLATES.get(arch, "chatml")
    return str(vocab.apply_chat_template(template, pairs, add_assistant=add_assistant))


class Engine:
    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        n_ubatch: int = 512,
        use_gpu: bool = True,
    ) -> None:
        n_threads = default_threads() if n_threads is None else n_threads
        if n_threads <= 0:
            raise ValueError(f"n_threads must be positive, got {n_threads}")
        if n_ctx <= 0:
            raise ValueError(f"n_ctx must be positive, got {n_ctx}")
        path = os.fspath(model_path)
        self.model = _native.Model(path, use_gpu=use_gpu)
        self.vocab = _native.Vocab(path)
        if self.vocab.n_tokens != self.model.n_vocab:
            raise ModelFormatError(
                f"model file '{path}': tokenizer has {self.vocab.n_tokens} tokens"
                f" but the embedding has {self.model.n_vocab}"
            )
        self.context = _native.Context(self.model, n_ctx=n_ctx, n_ubatch=n_ubatch, n_threads=n_threads)
        self._in_cache: list[int] = []  # tokens whose KV the context holds
        self._lock = threading.Lock()

    @property
    def n_ctx(self) -> int:
        return int(self.context.n_ctx)

    def tokenize(self, text: str | bytes, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return list(self.vocab.tokenize(to_utf8(text), add_special=add_special, parse_special=parse_special))

    def detokenize(self, tokens: Sequence[int], *, remove_special: bool = False, special: bool = False) -> str:
        """Text of `tokens`; special=True renders control tokens such as <start_of_turn> as text."""
        raw: bytes = self.vocab.detokenize(list(tokens), remove_special=remove_special, unparse_special=special)
        return raw.decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], *, add_assistant: bool = True) -> str:
        """Render chat messages ({"role", "content"}) with the model's template (or its family's)."""
        return render_chat(self.vocab, self.model.arch, messages, add_assistant=add_assistant)

    def generate(self, prompt: str | bytes | Sequence[int], options: SamplingOptions | None = None) -> Iterator[Chunk]:
        """Stream the continuation of `prompt` (text, or token ids) one token at a time."""
        opts = options or SamplingOptions()
        opts.validate()
        tokens = self.tokenize(prompt) if isinstance(prompt, str | bytes) else [int(t) for t in prompt]
        if not tokens:
            raise ValueError("prompt is empty")
        if len(tokens) > self.n_ctx:
            raise ContextOverflowError(
                f"prompt of {len(tokens)} tokens is longer than the context of {self.n_ctx} tokens"
            )
        return self._run(tokens, opts)

    def _run(self, tokens: list[int], opts: SamplingOptions) -> Iterator[Chunk]:
        if opts.early_exit != "off":
            raise ValueError("early exit runs in the batching engine (AsyncEngine), not in Engine")
        with self._lock:
            self._prefill(tokens)
            sampler = _native.Sampler(
                self.model.n_vocab,
                temperature=opts.temperature,
                top_k=opts.top_k,
                top_p=opts.top_p,
                min_p=opts.min_p,
                repeat_penalty=opts.repeat_penalty,
                repeat_last_n=opts.repeat_last_n,
                seed=opts.seed,
            )
            stream = TextStream(opts.stop)
            history = list(tokens)
            budget = min(opts.max_tokens, self.n_ctx - len(tokens) + 1)
            for n in range(1, budget + 1):
                tok = int(sampler.sample(self.context, history))
                lp, ent = self.context.score(tok) if opts.logprobs else (None, None)
                if self.vocab.is_eog(tok):
                    yield Chunk(None, stream.finish(), "stop")
                    return
                text = stream.push(self.vocab.token_to_piece(tok))
                if stream.stopped:
                    yield Chunk(tok, text, "stop", logprob=lp, entropy=ent)
                    return
                history.append(tok)
                if n == budget:
                    yield Chunk(tok, text + stream.finish(), "length", logprob=lp, entropy=ent)
                    return
                yield Chunk(tok, text, logprob=lp, entropy=ent)
                self.context.decode([tok])
                self._in_cache.append(tok)

    def _prefill(self, tokens: list[int]) -> None:
        """Bring the KV cache to `tokens`, reusing the longest prefix it already holds."""
        keep = 0
        limit = min(len(self._in_cache), len(tokens) - 1)  # at least one token must run for logits
        while keep < limit and self._in_cache[keep] == tokens[keep]:
            keep += 1
        self.context.truncate(keep)
        self._in_cache = self._in_cache[:keep]
        self.context.decode(tokens[keep:])
        self._in_cache = list(tokens)

    def generate_text(self, prompt: str | bytes | Sequence[int], options: SamplingOptions | None = None) -> str:
        return "".join(c.text for c in self.generate(prompt, options))

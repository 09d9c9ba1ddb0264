"""What both engines share: the model and its vocabulary loaded once, the native continuous-batching
`BatchEngine` built over them (with the model's early-exit calibration when it has one), and the
checks every request passes before it is submitted. `Engine` steps it in the caller's thread,
`AsyncEngine` on a thread of its own; generation itself exists once, in the native core."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from appliance import _native
from appliance.engine.early_exit import ExitCalibration, load_calibration
from appliance.engine.sampling import SamplingOptions

ModelFormatError = _native.ModelFormatError
ContextOverflowError = _native.ContextOverflowError

# chat templates libllama knows by name, for models whose GGUF carries none (base models)
_FALLBACK_TEMPLATES = {"gemma3": "gemma", "llama": "llama3", "qwen2": "chatml", "qwen3": "chatml"}


def default_threads() -> int:
    """Physical-core-ish default: every CPU this process may run on."""
    return max(1, len(os.sched_getaffinity(0)))


def eog_tokens(vocab: _native.Vocab) -> list[int]:
    """Every end-of-generation token of the vocabulary: EOS and EOT first, then the rest it marks."""
    eog = [t for t in (vocab.eos, vocab.eot) if t >= 0]
    return eog + [t for t in range(vocab.n_tokens) if t not in eog and vocab.is_eog(t)]


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


class EngineCore:
    """The loaded model, its vocabulary and the native batching engine. Not thread-safe: one thread
    calls `submit`, `cancel` and `step` (the engines see to it)."""

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        kv_cache_mb: int = 256,
        n_blocks: int = 0,
        block_size: int = 16,
        max_batched_tokens: int = 512,
        max_seqs: int = 16,
        n_threads: int | None = None,
        use_gpu: bool = True,
        gpu_layers: int = -1,
        early_exit: bool = True,
        draft_max: int = 8,
    ) -> None:
        """gpu_layers: with a GPU, how many of the last layers live there (llama.cpp's -ngl; -1: all)."""
        n_threads = default_threads() if n_threads is None else n_threads
        if n_threads <= 0:
            raise ValueError(f"n_threads must be positive, got {n_threads}")
        if gpu_layers < -1:
            raise ValueError(f"gpu_layers must be >= -1 (-1: all), got {gpu_layers}")
        path = os.fspath(model_path)
        self.model = _native.Model(path, use_gpu=use_gpu, gpu_layers=gpu_layers)
        self.vocab = _native.Vocab(path)
        if self.vocab.n_tokens != self.model.n_vocab:
            raise ModelFormatError(
                f"model file '{path}': tokenizer has {self.vocab.n_tokens} tokens"
                f" but the embedding has {self.model.n_vocab}"
            )
        self.exit_calibration: ExitCalibration | None = load_calibration(path) if early_exit else None
        cal = self.exit_calibration
        self.native = _native.BatchEngine(
            self.model,
            kv_cache_mb=kv_cache_mb,
            n_blocks=n_blocks,
            block_size=block_size,
            max_batched_tokens=max_batched_tokens,
            max_seqs=max_seqs,
            n_threads=n_threads,
            eog_tokens=eog_tokens(self.vocab),
            model_key=path,
            exit_layers=cal.exit_layers if cal else [],
            exit_thresholds=cal.thresholds if cal else [],
            draft_exit_layer=cal.draft_exit_layer if cal else 0,
            draft_max=draft_max,
            vocab=self.vocab,
        )
        if cal is not None:
            self.native.set_shortlist(cal.shortlist)

    @property
    def max_seq_len(self) -> int:
        """The longest sequence, prompt and output together."""
        return int(self.native.max_seq_len)

    def tokenize(self, text: str | bytes, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """parse_special=True reads control tokens written as text (<start_of_turn>, ...) as such."""
        return list(self.vocab.tokenize(to_utf8(text), add_special=add_special, parse_special=parse_special))

    def detokenize(self, tokens: Sequence[int], *, remove_special: bool = False, special: bool = False) -> str:
        """Text of `tokens`; special=True renders control tokens such as <start_of_turn> as text."""
        raw: bytes = self.vocab.detokenize(list(tokens), remove_special=remove_special, unparse_special=special)
        return raw.decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], *, add_assistant: bool = True) -> str:
        """Render chat messages ({"role", "content"}) with the model's template (or its family's)."""
        return render_chat(self.vocab, self.model.arch, messages, add_assistant=add_assistant)

    def prepare(
        self, prompt: str | bytes | Sequence[int], options: SamplingOptions | None
    ) -> tuple[list[int], SamplingOptions]:
        """A request's checks before it is queued: valid options, a calibration for early exit, a
        non-empty prompt that leaves room for at least one token."""
        opts = options or SamplingOptions()
        opts.validate()
        if opts.early_exit != "off" and self.exit_calibration is None:
            raise ValueError(
                f"early_exit={opts.early_exit!r} needs the model's early-exit calibration: "
                "run `appliance models calibrate-exit` for it"
            )
        tokens = self.tokenize(prompt) if isinstance(prompt, str | bytes) else [int(t) for t in prompt]
        if not tokens:
            raise ValueError("prompt is empty")
        if len(tokens) >= self.max_seq_len:
            raise ContextOverflowError(
                f"prompt of {len(tokens)} tokens is too long: the longest sequence is {self.max_seq_len} tokens"
            )
        return tokens, opts

    def submit(self, tokens: list[int], o: SamplingOptions, tenant: str = "", adapter: int = 0) -> int:
        """Queue a prepared request; its id names its events. adapter: a `load_adapter` id (0: none)."""
        return int(
            self.native.submit(
                tokens,
                max_tokens=o.max_tokens,
                temperature=o.temperature,
                top_k=o.top_k,
                top_p=o.top_p,
                min_p=o.min_p,
                repeat_penalty=o.repeat_penalty,
                repeat_last_n=o.repeat_last_n,
                seed=o.seed,
                tenant=tenant,
                exit_mode=o.early_exit,
                exit_threshold=o.exit_threshold,
                logprobs=o.logprobs,
                adapter=adapter,
                grammar=o.grammar,
                choices=o.choices,
            )
        )

    def load_adapter(self, path: str | os.PathLike[str], scale: float = 1.0) -> int:
        """Load a llama.cpp LoRA GGUF over this model (checked against it; a mismatch raises
        ModelFormatError naming the tensor); returns its id for `adapter=`."""
        return int(self.native.load_adapter(os.fspath(path), scale=scale))

    def unload_adapter(self, adapter: int) -> bool:
        """Free an adapter now (True), or once the requests using it finish (False); new requests
        naming it are refused from now on."""
        return bool(self.native.unload_adapter(adapter))

"""Sampling options for one generation request."""

from __future__ import annotations

from typing import Literal

import msgspec

ExitMode = Literal["off", "lossless", "adaptive"]
MAX_GRAMMAR = 1 << 20  # characters of GBNF a request may carry
MAX_CHOICE_TOKENS = 1 << 20  # tokens of all choices together (the native engine's limit)


class SamplingOptions(msgspec.Struct, frozen=True, kw_only=True):
    """How to pick tokens. temperature 0 means greedy (deterministic)."""

    max_tokens: int = 256
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int = 0
    stop: tuple[str, ...] = ()
    # early exit (AsyncEngine): "lossless" drafts with part of the network and keeps only what the full
    # model agrees with; "adaptive" lets confident tokens leave early (may differ from full depth)
    early_exit: ExitMode = "off"
    exit_threshold: float = -1.0  # adaptive: exit when confidence > this; < 0 uses the calibrated ones
    # score each token (Chunk.logprob, Chunk.entropy); costs a pass over the vocabulary per
    # token (about 1 ms for 262k tokens), so only the cascade's confidence check asks for it
    logprobs: bool = False
    # GBNF (root rule "root") every generated token must follow, e.g. engine.grammar.json_grammar();
    # "" for none. The engine refuses one libllama cannot parse (ValueError naming the problem).
    # Lossless early exit gives the full-depth output under it; adaptive exits weigh only the tokens
    # it allows.
    grammar: str = ""
    # or: the output is exactly one of these token sequences (a task's known answers, each tokenized
    # as the model writes it after the prompt: engine.grammar.answer_choices), then ends. Only each
    # answer's own tokenization is allowed, so a token's margin compares answers; () for none.
    choices: tuple[tuple[int, ...], ...] = ()

    def validate(self) -> None:
        """Raise ValueError naming the first field that is out of range."""
        checks = [
            ("max_tokens", self.max_tokens >= 1, "must be >= 1"),
            ("temperature", 0.0 <= self.temperature <= 100.0, "must be in [0, 100]"),
            ("top_k", self.top_k >= 0, "must be >= 0"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("min_p", 0.0 <= self.min_p < 1.0, "must be in [0, 1)"),
            ("repeat_penalty", 0.0 < self.repeat_penalty <= 10.0, "must be in (0, 10]"),
            ("repeat_last_n", self.repeat_last_n >= 0, "must be >= 0"),
            ("seed", 0 <= self.seed < 2**64, "must be in [0, 2**64)"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "entries must be non-empty strings"),
            ("early_exit", self.early_exit in ("off", "lossless", "adaptive"), "must be off, lossless or adaptive"),
            ("exit_threshold", self.exit_threshold <= 1.0, "must be <= 1 (or < 0 for the calibrated thresholds)"),
            ("grammar", isinstance(self.grammar, str) and "\0" not in self.grammar, "must be GBNF text without NUL"),
            ("grammar", len(self.grammar) <= MAX_GRAMMAR, f"must be at most {MAX_GRAMMAR} characters"),
            ("choices", all(c and all(t >= 0 for t in c) for c in self.choices), "entries must be non-empty token ids"),
            ("choices", sum(map(len, self.choices)) <= MAX_CHOICE_TOKENS, f"must total <= {MAX_CHOICE_TOKENS} tokens"),
            ("choices", not (self.choices and self.grammar), "cannot be combined with a grammar"),
        ]
        for name, ok, why in checks:
            if not ok:
                value = getattr(self, name)
                shown = f"{value[:40]!r}..." if isinstance(value, str) and len(value) > 40 else repr(value)
                raise ValueError(f"sampling option {name}={shown} {why}")

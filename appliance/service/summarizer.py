"""Incremental summarization: folds older conversation messages into a running summary, written by the
local model. Only the newly folded messages are read, together with the previous summary."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence

from appliance.common.history import StoredMessage
from appliance.engine.chunk import Chunk
from appliance.engine.core import ContextOverflowError
from appliance.engine.sampling import SamplingOptions

Generate = Callable[[Sequence[int], SamplingOptions], AsyncIterator[Chunk]]

LEAD = "The user"  # the summary is written as a continuation of this, which base models follow best


def summary_prompt(summary: str, messages: Sequence[StoredMessage]) -> str:
    """A completion prompt (works with base models): previous notes, the new lines, then the lead-in."""
    lines = "\n".join(f"{'User' if m.role == 'user' else 'Assistant'}: {m.content.strip()}" for m in messages)
    return (
        f"Notes so far: {summary or 'none.'}\n\nConversation:\n{lines}\n\n"
        f"Updated notes about the user (short, factual, keep names and numbers): {LEAD}"
    )


def fallback_summary(summary: str, messages: Sequence[StoredMessage], max_chars: int) -> str:
    """Used when the model writes nothing: the previous summary plus the start of each folded message."""
    parts = [summary] if summary else []
    parts += [f"{m.role}: {m.content.strip()[:80]}" for m in messages]
    return " | ".join(parts)[-max_chars:]


class Summarizer:
    def __init__(self, generate: Generate, tokenize: Callable[[str], list[int]], max_tokens: int) -> None:
        self._generate = generate
        self._tokenize = tokenize
        self.max_tokens = max_tokens

    async def fold(self, summary: str, messages: Sequence[StoredMessage]) -> str:
        """The summary of everything in `summary` plus `messages`."""
        if not messages:
            return summary
        opts = SamplingOptions(max_tokens=self.max_tokens, temperature=0.0, stop=("\n\n",), repeat_penalty=1.1)
        parts = []
        try:
            async for chunk in self._generate(self._tokenize(summary_prompt(summary, messages)), opts):
                parts.append(chunk.text)
        except ContextOverflowError:
            parts = []  # too much to fold at once for this model: keep the extractive fallback
        text = " ".join("".join(parts).split())
        return f"{LEAD} {text}" if text else fallback_summary(summary, messages, self.max_tokens * 4)

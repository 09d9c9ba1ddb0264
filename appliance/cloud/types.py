"""What a cloud backend streams back, whatever the provider: text pieces, then one Reply."""

from __future__ import annotations

from typing import Literal

import msgspec

ErrorKind = Literal["timeout", "connect", "http", "malformed", "circuit_open", "config"]


class CloudUsage(msgspec.Struct, kw_only=True):
    """Token counts as the provider billed them. input_tokens excludes cache reads and writes."""

    input_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0

    @property
    def prompt_tokens(self) -> int:
        return self.input_tokens + self.cache_read_tokens + self.cache_write_tokens


class Reply(msgspec.Struct, kw_only=True):
    text: str
    finish_reason: str  # "stop", "length" or the provider's own word ("tool_calls")
    usage: CloudUsage
    model: str
    tool_calls: str = ""  # the functions the model calls, as OpenAI's JSON list (a request that passed tools)


class CloudError(Exception):
    """The cloud could not answer. `kind` says how; `retryable` whether another try may help."""

    def __init__(self, kind: ErrorKind, message: str, *, retryable: bool = False, retry_after: float | None = None):
        super().__init__(message)
        self.kind = kind
        self.retryable = retryable
        self.retry_after = retry_after


def finish_word(provider_reason: str | None) -> str:
    """The pipeline's finish_reason for a provider's stop reason."""
    if provider_reason in (None, "", "stop", "end_turn", "stop_sequence"):
        return "stop"
    if provider_reason in ("length", "max_tokens"):
        return "length"
    return str(provider_reason)

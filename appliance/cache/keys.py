"""Cache keys: who may see an entry (namespace), what produced it (fingerprint) and which
conversation state it answers (context).

- The namespace is the tenant, optionally ``tenant/user``: lookups only ever search the entries of
  the same namespace, so a hit never crosses tenants.
- :func:`fingerprint` hashes the model, the system prompt and the parameters that change an answer
  (temperature, max_tokens, tools, ...). The cache adds the embedder version itself.
- :class:`Context` is the conversation state of a multi-turn chat (a running summary and the
  previous turn). Its normalised hash is part of the key: a follow-up such as "and the second
  one?" only matches an entry stored under the same conversation state.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass

import msgspec

from appliance.cache.errors import KeyError_
from appliance.cache.text import clean_text

_NAMESPACE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,255}$")
_FINGERPRINT = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
MAX_CONTEXT_CHARS = 65536


def check_namespace(namespace: object) -> str:
    if not isinstance(namespace, str) or not _NAMESPACE.match(namespace):
        raise KeyError_(
            f"invalid cache namespace {namespace!r}: use 1-256 characters from letters, digits and ._:@/- "
            "(the tenant, optionally tenant/user), starting with a letter or digit"
        )
    return namespace


def check_fingerprint(fp: object) -> str:
    if not isinstance(fp, str) or not _FINGERPRINT.match(fp):
        raise KeyError_(f"invalid cache fingerprint {fp!r}: use appliance.cache.fingerprint(...) to make one")
    return fp


def fingerprint(model: str, system_prompt: str = "", params: Mapping[str, object] | None = None) -> str:
    """Hex key of everything besides the query that decides the answer.

    ``params`` are the answer-changing request parameters (any JSON-encodable values); pass them
    all, order does not matter.
    """
    if not model:
        raise KeyError_("fingerprint needs the model name")
    try:
        blob = msgspec.json.encode(
            {"model": model, "system": system_prompt, "params": dict(params or {})}, order="sorted"
        )
    except (TypeError, msgspec.EncodeError) as e:
        raise KeyError_(f"fingerprint params are not JSON-encodable: {e}") from None
    return hashlib.sha256(blob).hexdigest()[:32]


@dataclass(frozen=True)
class Context:
    """Conversation state a multi-turn lookup depends on; empty for a single-turn request."""

    summary: str = ""
    previous_turn: str = ""

    def key(self) -> str:
        """ "" for an empty context, else a hash of the normalised, case-folded state."""
        summary = clean_text(self.summary, "context summary", max_chars=MAX_CONTEXT_CHARS, allow_empty=True)
        previous = clean_text(
            self.previous_turn, "context previous_turn", max_chars=MAX_CONTEXT_CHARS, allow_empty=True
        )
        if not summary and not previous:
            return ""
        blob = msgspec.json.encode([summary.casefold(), previous.casefold()])
        return hashlib.sha256(blob).hexdigest()[:32]


def partition_key(namespace: str, fp: str, context_key: str, embedder_version: str) -> str:
    """The set of entries one lookup may search: same tenant, fingerprint, context and embedder."""
    blob = msgspec.json.encode([namespace, fp, context_key, embedder_version])
    return hashlib.sha256(blob).hexdigest()[:32]

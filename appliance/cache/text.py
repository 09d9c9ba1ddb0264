"""Query text checks and normalisation: the cache refuses empty, huge and non-UTF-8 input by name."""

from __future__ import annotations

import re
import unicodedata

from appliance.cache.errors import QueryError

DEFAULT_MAX_CHARS = 8192
_SPACE = re.compile(r"\s+")


def clean_text(
    value: object, what: str = "query", *, max_chars: int = DEFAULT_MAX_CHARS, allow_empty: bool = False
) -> str:
    """``value`` (str, or bytes holding UTF-8) as NFC text with runs of whitespace collapsed.

    Raises QueryError naming ``what`` when it is not text, not valid UTF-8, contains NUL, is empty
    (unless ``allow_empty``) or has more than ``max_chars`` characters.
    """
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise QueryError(
                f"{what} is not valid UTF-8: byte 0x{raw[e.start]:02x} at offset {e.start} ({e.reason})"
            ) from None
    if not isinstance(value, str):
        raise QueryError(f"{what} must be text (str or UTF-8 bytes), not {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise QueryError(
            f"{what} is not valid UTF-8: lone surrogate U+{ord(value[e.start]):04X} at character {e.start}"
        ) from None
    if "\x00" in value:
        raise QueryError(f"{what} contains a NUL character at position {value.index(chr(0))}")
    if len(value) > max_chars:
        raise QueryError(f"{what} has {len(value)} characters; the cache takes at most {max_chars}")
    text = _SPACE.sub(" ", unicodedata.normalize("NFC", value)).strip()
    if not text and not allow_empty:
        raise QueryError(f"{what} is empty" + (" (only whitespace)" if value else ""))
    return text

"""The interactive prompt loop the CLI's `generate --interactive` and `chat` share."""

from __future__ import annotations

import sys
from collections.abc import Iterator


def prompt_lines(prompt: str = "> ") -> Iterator[str]:
    """Non-empty lines typed at `prompt`, until end of input or 'exit'/'quit'."""
    while True:
        try:
            line = input(prompt)
        except EOFError:
            print(file=sys.stderr)
            return
        if line.strip() in ("exit", "quit"):
            return
        if line.strip():
            yield line

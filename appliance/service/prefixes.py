"""Hot prompt prefixes (system prompts, long shared instructions) kept across restarts.

The pipeline notes the tokens of every local prompt. `HotPrefixes` counts, per tenant, how many
prompts began with each run of whole KV blocks (a bounded trie over block-sized chunks), so a
prefix shared by several requests stands out from the unique rest of each prompt. At shutdown the
service saves the K/V of the hottest shared prefixes (`AsyncEngine.save_prefix`, tenant-salted, one
file each) and at start it loads them back into the prefix cache, so the first request after a
restart does not recompute them. Another tenant never hits them: the salt is part of every block's
hash.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from appliance.engine.async_engine import AsyncEngine

log = logging.getLogger("appliance.prefixes")


@dataclass
class _Node:
    count: int = 0
    children: dict[tuple[int, ...], _Node] = field(default_factory=dict)


@dataclass(frozen=True)
class Hot:
    tenant: str
    tokens: tuple[int, ...]
    count: int  # prompts that began with it


class HotPrefixes:
    """Counts block-aligned prompt prefixes per tenant. `max_tokens` bounds the depth looked at and
    `max_nodes` the memory (once full, prompts only add counts to prefixes already known)."""

    def __init__(self, block_size: int, max_tokens: int = 2048, max_nodes: int = 20000) -> None:
        assert block_size > 0 and max_tokens >= block_size
        self.block_size = block_size
        self.max_blocks = max_tokens // block_size
        self.max_nodes = max_nodes
        self._roots: dict[str, _Node] = {}
        self._nodes = 0

    def note(self, tenant: str, tokens: Sequence[int]) -> None:
        """One prompt's tokens; only its whole blocks count (the engine caches nothing smaller)."""
        node = self._roots.setdefault(tenant, _Node())
        bs = self.block_size
        for b in range(min(len(tokens) // bs, self.max_blocks)):
            chunk = tuple(tokens[b * bs : (b + 1) * bs])
            child = node.children.get(chunk)
            if child is None:
                if self._nodes >= self.max_nodes:
                    return
                child = node.children[chunk] = _Node()
                self._nodes += 1
            child.count += 1
            node = child

    def hottest(self, n: int, min_count: int = 2) -> list[Hot]:
        """Up to `n` prefixes that at least `min_count` prompts shared, each the longest one with its
        count (a shorter prefix with the same count is inside it), by tokens saved: count x length."""
        found: list[Hot] = []
        for tenant, root in self._roots.items():
            stack: list[tuple[_Node, tuple[int, ...]]] = [(root, ())]
            while stack:
                node, path = stack.pop()
                for chunk, child in node.children.items():
                    if child.count < min_count:
                        continue
                    longer = any(c.count == child.count for c in child.children.values())
                    if not longer:
                        found.append(Hot(tenant, path + chunk, child.count))
                    stack.append((child, path + chunk))
        found.sort(key=lambda h: (h.count * len(h.tokens), len(h.tokens)), reverse=True)
        return found[:n]


def save_hot(engine: AsyncEngine, hot: list[Hot], directory: Path) -> int:
    """Replace the saved prefixes in `directory` with `hot` (none hot this run: the saved ones stay);
    returns the tokens written. Each new file is written aside and renamed into place, and the old
    ones are removed only after, so a save cut short (kill -9, power loss) leaves the old set, the new
    one or a mix of whole files, never a missing or half-written prefix."""
    if not hot:
        return 0
    directory.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(directory)
    old = set(directory.glob("*.kv"))
    total = 0
    for h in hot:
        name = hashlib.sha256(f"{h.tenant}\0{h.tokens}".encode()).hexdigest()[:16]
        tmp = directory / f"{name}.tmp"
        try:
            n = engine.save_prefix(h.tokens, tmp, tenant=h.tenant)
        except (OSError, RuntimeError, ValueError) as e:
            log.warning("could not save a hot prefix of %d tokens: %s", len(h.tokens), e)
            tmp.unlink(missing_ok=True)
            continue
        if n == 0:  # evicted from the cache since: nothing to keep
            tmp.unlink(missing_ok=True)
            continue
        kept = directory / f"{name}.kv"
        tmp.replace(kept)
        old.discard(kept)
        total += n
    if total:
        for path in old:
            path.unlink(missing_ok=True)
    return total


def _remove_leftovers(directory: Path) -> None:
    """The temporary files of a save that was cut short."""
    for path in directory.glob("*.tmp*"):
        path.unlink(missing_ok=True)


def load_hot(engine: AsyncEngine, directory: Path) -> int:
    """Load every saved prefix in `directory` into the prefix cache; a file the engine refuses (another
    model, truncated) is logged and removed, as are the leftovers of a save cut short. Returns the
    tokens loaded."""
    total = 0
    if directory.is_dir():
        _remove_leftovers(directory)
    for path in sorted(directory.glob("*.kv")):
        try:
            total += engine.load_prefix(path)
        except (OSError, RuntimeError, ValueError) as e:
            log.warning("dropping saved prefix %s: %s", path.name, e)
            path.unlink(missing_ok=True)
    return total

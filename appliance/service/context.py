"""Builds what the model reads within a token budget.

Chat: [system prompt + running summary] is a stable prefix (it changes only when more turns are
folded, so the KV prefix cache keeps hitting between folds), then the unfolded turns verbatim, then
this turn. When the total passes the budget, the oldest unfolded messages (all but the last
`keep_turns`) are folded into the summary, down to `refold_target` of the budget so that folding
happens in batches rather than every turn. Context items (retrieved passages) are kept by relevance
score, best first, within what the budget leaves, and go into this turn's user message.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import msgspec

from appliance.common.errors import InvalidArgument
from appliance.common.history import Session, StoredMessage
from appliance.common.types import ChatMessage, Passage

MESSAGE_OVERHEAD = 4  # template tokens around each message (turn markers, role, newline)
Fold = Callable[[str, Sequence[StoredMessage]], Awaitable[str]]


class Built(msgspec.Struct, kw_only=True):
    messages: list[dict[str, str]]  # empty for a raw prompt
    passages: list[Passage]  # kept, best first (already inside `messages` when there are messages)
    budget_tokens: int  # the estimate the budget was checked against
    unmanaged_tokens: int  # what the prompt would be with the whole history verbatim (no summary)


def select_passages(passages: Sequence[Passage], budget: int, count: Callable[[str], int]) -> list[Passage]:
    """The highest-scoring passages whose tokens fit in `budget`, in score order."""
    kept, used = [], 0
    for p in sorted(passages, key=lambda p: p.score, reverse=True):
        n = count(p.text) + 2
        if used + n <= budget:
            kept.append(p)
            used += n
    return kept


def with_passages(text: str, passages: Sequence[Passage]) -> str:
    if not passages:
        return text
    block = "\n".join(f"- {p.text.strip()}" for p in passages)
    return f"Context:\n{block}\n\n{text}"


def system_block(system: str, summary: str) -> str:
    if not summary:
        return system
    head = f"{system}\n\n" if system else ""
    return f"{head}Summary of the earlier conversation: {summary}"


class ContextBuilder:
    def __init__(
        self, count: Callable[[str], int], fold: Fold, budget: int, keep_turns: int, refold_target: float = 0.6
    ) -> None:
        self.count = count
        self.fold = fold
        self.budget = budget
        self.keep_turns = keep_turns
        self.refold_target = refold_target

    def _tokens(self, m: StoredMessage | ChatMessage) -> int:
        n = m.tokens if isinstance(m, StoredMessage) else self.count(m.content)
        return n + MESSAGE_OVERHEAD

    def _fixed(self, session: Session, new: Sequence[ChatMessage]) -> int:
        head = system_block(session.system, session.summary)
        return (self.count(head) + MESSAGE_OVERHEAD if head else 0) + sum(self._tokens(m) for m in new)

    async def chat(self, session: Session, new: Sequence[ChatMessage], passages: Sequence[Passage]) -> Built:
        """Fold older turns into `session.summary` as needed (updating session.folded) and build the messages."""
        unmanaged = (
            self.count(session.system)
            + sum(self._tokens(m) for m in session.messages)
            + self._fixed(Session(tenant="", session_id=""), new)
        )
        total = self._fixed(session, new) + sum(self._tokens(m) for m in session.messages[session.folded :])
        if total > self.budget:
            live = session.messages[session.folded :]
            target = int(self.budget * self.refold_target)
            n = 0
            while n < len(live) - self.keep_turns and total > target:
                total -= self._tokens(live[n])
                n += 1
            if total > self.budget:  # the last keep_turns alone do not fit: fold them too
                while n < len(live) and total > self.budget:
                    total -= self._tokens(live[n])
                    n += 1
            while 0 < n < len(live) and live[n].role == "assistant":  # fold whole exchanges: what stays
                total -= self._tokens(live[n])  # starts with a user turn, after system prompt and summary
                n += 1
            if n:
                session.summary = await self.fold(session.summary, live[:n])
                session.folded += n
            total = self._fixed(session, new) + sum(self._tokens(m) for m in session.messages[session.folded :])
        if total > self.budget:
            raise InvalidArgument(
                "messages", f"this turn needs about {total} tokens, more than the context budget of {self.budget}"
            )
        kept = select_passages(passages, self.budget - total, self.count)
        out: list[dict[str, str]] = []
        head = system_block(session.system, session.summary)
        if head:
            out.append({"role": "system", "content": head})
        out += [{"role": m.role, "content": m.content} for m in session.messages[session.folded :]]
        turn = [{"role": m.role, "content": m.content} for m in new]
        if kept and turn:
            turn[-1]["content"] = with_passages(turn[-1]["content"], kept)
        out += turn
        return Built(messages=out, passages=kept, budget_tokens=total, unmanaged_tokens=unmanaged)

    def single(self, messages: Sequence[ChatMessage], prompt: str, passages: Sequence[Passage], limit: int) -> Built:
        """A stateless request: the messages (or prompt) as given, plus the best passages that fit in `limit`."""
        total = sum(self._tokens(m) for m in messages) + (self.count(prompt) if prompt else 0)
        kept = select_passages(passages, max(0, limit - total), self.count)
        out = [{"role": m.role, "content": m.content} for m in messages]
        if kept and out:
            out[-1]["content"] = with_passages(out[-1]["content"], kept)
        return Built(messages=out, passages=kept, budget_tokens=total, unmanaged_tokens=total)

"""Prompt tokens sent per turn over a scripted support conversation, with context management on and off.

ON is what a `Chat` turn of the service sends: the session comes from the `HistoryStore`, the
`ContextBuilder` folds older turns into a running summary written by the local model (`Summarizer`)
once the turn passes the budget, the messages are rendered with the model's chat template and
tokenized as `Pipeline._tokenize` does, the reply is generated on the `LocalBackend` (batching
AsyncEngine) and the turn is committed. The summarizer's own prompts and outputs are cost too: they
are counted separately (`summarizer_tokens`) and in the net figure (`saved_ratio`).

OFF sends the whole history verbatim every turn (system prompt, every earlier message, this turn).
Both conversations get the same user turns and their own greedy replies, each under its own tenant
(the prefix cache is salted per tenant). When an OFF prompt no longer fits the model's context
(`n_ctx`) with room for the reply, the service would reject it: from then on no OFF reply is
generated, its tokens are still counted (what a model with a larger window would be sent), and the
ON reply of that turn stands in for the missing one in the OFF history. `off_over_context_turns`
lists those turns; `off_total_within_context` sums only the turns that fit.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import msgspec

from appliance.common.config import ModelConfig
from appliance.common.history import HistoryStore, Session, StoredMessage
from appliance.common.types import ChatMessage
from appliance.engine.chunk import Chunk
from appliance.engine.local_backend import LocalBackend
from appliance.engine.sampling import SamplingOptions
from appliance.service.context import ContextBuilder, Fold
from appliance.service.summarizer import Summarizer

SYSTEM = (
    "You are the virtual assistant of Northwind Bank. Be brief, polite and precise. Never ask for full card "
    "numbers, PINs or passwords. Offer to connect the customer to a human agent for anything you cannot do."
)

SCRIPT: tuple[str, ...] = (
    "Hi, my name is Maria Alvarez and I have a checking account with you.",
    "I noticed a charge of 84.99 euros from a company called StreamPlus that I don't recognise.",
    "It was posted on March 3rd. My account ends in 4471.",
    "I never signed up for StreamPlus. Could this be fraud?",
    "What should I do first to protect my account?",
    "Can you freeze my debit card right now? It's the one ending in 9023.",
    "Thanks. How long does a dispute for a card charge usually take?",
    "Will I get the 84.99 back while the dispute is open?",
    "I also want to set up a new standing order for my rent.",
    "The rent is 950 euros a month, paid to Casa Verde Properties on the 1st.",
    "Their IBAN starts with ES91. Do you need the whole number?",
    "Can the standing order start next month, in April?",
    "By the way, what is the daily limit for transfers from the mobile app?",
    "Can I raise that limit to 3,000 euros for one day next week? I'm buying a used car.",
    "The seller is a private person, not a dealer. Is there anything I should watch out for?",
    "Okay. Another question: my savings account pays 1.2 percent. Do you have anything better?",
    "What is the minimum deposit for the 12-month fixed term account?",
    "If I put 5,000 euros in it, how much interest would I get after a year?",
    "Can I take the money out early if I need it?",
    "Let's leave the savings for now. When will my replacement debit card arrive?",
    "Can it be sent to my work address instead? It's Calle Mayor 12 in Madrid.",
    "I'm travelling to Portugal in May. Do I need to tell you about that?",
    "Are there fees for paying by card in Portugal?",
    "And for withdrawing cash from ATMs there?",
    "My husband Javier wants to be added to my checking account. How does that work?",
    "Does he need to come to a branch, or can it be done online?",
    "Which documents should he bring?",
    "Going back to the StreamPlus charge: is there a reference number for my dispute?",
    "Can you summarise everything we agreed today, including amounts and dates?",
    "Thank you, that's all for now. Goodbye!",
)

KEEP_TURNS = ModelConfig().keep_turns  # the service's defaults for the last-N-verbatim window and summary length
SUMMARY_MAX_TOKENS = ModelConfig().summary_max_tokens
N_CTX = ModelConfig().n_ctx


class _Counted(msgspec.Struct, kw_only=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    text: str = ""
    finish_reason: str = ""


class _SummarizerLedger:
    """Wraps the backend's generate for the Summarizer and books every call it makes."""

    def __init__(self, backend: LocalBackend) -> None:
        self.backend = backend
        self.calls: list[_Counted] = []
        self.folds: list[dict[str, Any]] = []

    def wrap(self, fold: Fold) -> Fold:
        """`fold`, recording what each fold read and whether the model wrote the summary (or the fallback did)."""

        async def booked(summary: str, messages: Sequence[StoredMessage]) -> str:
            before = len(self.calls)
            out = await fold(summary, messages)
            calls = self.calls[before:]
            self.folds.append(
                {
                    "messages": len(messages),
                    "prompt_tokens": sum(c.prompt_tokens for c in calls),
                    "completion_tokens": sum(c.completion_tokens for c in calls),
                    "fallback": not any(c.text.strip() for c in calls),
                    "summary_tokens": self.backend.count_tokens(out),
                }
            )
            return out

        return booked

    async def generate(self, tokens: Sequence[int], options: SamplingOptions) -> AsyncIterator[Chunk]:
        call = _Counted()
        started = False
        async for chunk in self.backend.generate(tokens, options):  # as the pipeline wires it: no tenant
            if not started:
                started = True
                call.prompt_tokens = len(tokens)
                self.calls.append(call)
            if chunk.token is not None:
                call.completion_tokens += 1
            call.text += chunk.text
            if chunk.finish_reason:
                call.finish_reason = chunk.finish_reason
                call.cached_tokens = chunk.cached_tokens
            yield chunk


def _prompt(backend: LocalBackend, messages: list[dict[str, str]]) -> list[int]:
    """What `Pipeline._tokenize` sends for chat messages: the chat template, tokenized with its control tokens."""
    return backend.tokenize_chat(backend.render_chat(messages))


async def _reply(backend: LocalBackend, tokens: list[int], opts: SamplingOptions, tenant: str) -> _Counted:
    out = _Counted(prompt_tokens=len(tokens))
    async for chunk in backend.generate(tokens, opts, tenant=tenant):
        if chunk.token is not None:
            out.completion_tokens += 1
        out.text += chunk.text
        if chunk.finish_reason:
            out.finish_reason = chunk.finish_reason
            out.cached_tokens = chunk.cached_tokens  # the prefix-cache hit, on the last chunk
    return out


async def _managed(
    backend: LocalBackend,
    history: HistoryStore,
    script: Sequence[str],
    opts: SamplingOptions,
    budget: int,
    keep_turns: int,
    summary_max_tokens: int,
) -> tuple[list[dict[str, Any]], _SummarizerLedger, Session]:
    """The conversation as the service runs it: load session, build context, generate, commit."""
    ledger = _SummarizerLedger(backend)
    summarizer = Summarizer(ledger.generate, backend.tokenize, summary_max_tokens)
    builder = ContextBuilder(backend.count_tokens, ledger.wrap(summarizer.fold), budget, keep_turns)
    tenant, sid = "bench-on", "conversation"
    rows: list[dict[str, Any]] = []
    session = Session(tenant=tenant, session_id=sid)
    bos = backend.engine.vocab.bos
    for i, text in enumerate(script):
        session = await asyncio.to_thread(history.load, tenant, sid)
        if i == 0:  # the request carries the system prompt on its first turn (Pipeline._build_context)
            session.system = SYSTEM
        calls_before, folds_before, folded_before = len(ledger.calls), len(ledger.folds), session.folded
        built = await builder.chat(session, [ChatMessage("user", text)], [])
        tokens = _prompt(backend, built.messages)
        if len(tokens) >= backend.n_ctx:
            raise RuntimeError(f"managed turn {i + 1}: {len(tokens)} tokens exceed n_ctx {backend.n_ctx}")
        r = await _reply(backend, tokens, opts, tenant)
        new = [
            StoredMessage("user", text, backend.count_tokens(text)),
            StoredMessage("assistant", r.text, backend.count_tokens(r.text)),
        ]
        await history.commit_turn_async(session, new)
        fold_calls = ledger.calls[calls_before:]
        for f in ledger.folds[folds_before:]:
            f["turn"] = i + 1
        rows.append(
            {
                "prompt_tokens": len(tokens),
                "prompt_has_bos": bos >= 0 and tokens[0] == bos,
                "cached_tokens": r.cached_tokens,
                "completion_tokens": r.completion_tokens,
                "finish_reason": r.finish_reason,
                "reply": r.text,
                "budget_estimate": built.budget_tokens,
                "messages_sent": len(built.messages),
                # the role the verbatim history starts with after folding ("assistant": an odd number was folded)
                "first_verbatim_role": session.messages[session.folded].role
                if session.folded < len(session.messages)
                else "user",
                "folded_now": session.folded - folded_before,
                "summarizer_prompt_tokens": sum(c.prompt_tokens for c in fold_calls),
                "summarizer_completion_tokens": sum(c.completion_tokens for c in fold_calls),
            }
        )
    return rows, ledger, session


async def _unmanaged(
    backend: LocalBackend, script: Sequence[str], opts: SamplingOptions, stand_ins: Sequence[str]
) -> list[dict[str, Any]]:
    """The same user turns with the whole history sent verbatim every turn."""
    messages: list[dict[str, str]] = [{"role": "system", "content": SYSTEM}]
    rows: list[dict[str, Any]] = []
    for i, text in enumerate(script):
        messages.append({"role": "user", "content": text})
        tokens = _prompt(backend, messages)
        fits = len(tokens) + opts.max_tokens <= backend.n_ctx
        if fits:
            r = await _reply(backend, tokens, opts, "bench-off")
        else:  # the service would refuse this prompt: count it, generate nothing, keep the history going
            r = _Counted(prompt_tokens=len(tokens), text=stand_ins[i], finish_reason="over_context")
        messages.append({"role": "assistant", "content": r.text})
        rows.append(
            {
                "prompt_tokens": len(tokens),
                "cached_tokens": r.cached_tokens,
                "completion_tokens": r.completion_tokens,
                "finish_reason": r.finish_reason,
                "reply": r.text if fits else None,
                "fits_context": fits,
            }
        )
    return rows


async def _run(
    model_path: str,
    threads: int,
    turns: int,
    max_tokens: int,
    budget: int,
    keep_turns: int,
    summary_max_tokens: int,
    n_ctx: int,
) -> dict[str, Any]:
    if not 1 <= turns <= len(SCRIPT):
        raise ValueError(f"turns must be in [1, {len(SCRIPT)}], got {turns}")
    script = SCRIPT[:turns]
    opts = SamplingOptions(max_tokens=max_tokens, temperature=0.0)
    t0 = time.perf_counter()
    backend = LocalBackend.load(Path(model_path), n_ctx, threads)
    t_loaded = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="appliance-bench-context-") as tmp:
            history = HistoryStore(Path(tmp) / "history.sqlite")
            try:
                on, ledger, session = await _managed(
                    backend, history, script, opts, budget, keep_turns, summary_max_tokens
                )
            finally:
                history.close()
        t_on = time.perf_counter()
        off = await _unmanaged(backend, script, opts, [r["reply"] for r in on])
        t_off = time.perf_counter()
        stats = backend.engine.stats()
        n_ctx_used = backend.n_ctx
    finally:
        backend.close()

    on_prompt = [int(r["prompt_tokens"]) for r in on]
    off_prompt = [int(r["prompt_tokens"]) for r in off]
    on_total, off_total = sum(on_prompt), sum(off_prompt)
    s_prompt = sum(c.prompt_tokens for c in ledger.calls)
    s_completion = sum(c.completion_tokens for c in ledger.calls)
    summarizer_tokens = s_prompt + s_completion
    over = [i + 1 for i, r in enumerate(off) if not r["fits_context"]]
    per_turn = [
        {
            "turn": i + 1,
            "user": text,
            "on": on[i],
            "off": off[i],
        }
        for i, text in enumerate(script)
    ]
    return {
        "model": model_path,
        "threads": threads,
        "turns": turns,
        "budget": budget,
        "keep_turns": keep_turns,
        "summary_max_tokens": summary_max_tokens,
        "max_tokens": max_tokens,
        "n_ctx": n_ctx_used,
        "on_prompt_tokens": on_prompt,
        "off_prompt_tokens": off_prompt,
        "on_total": on_total,
        "off_total": off_total,
        "summarizer_calls": len(ledger.calls),
        "summarizer_fallbacks": sum(1 for f in ledger.folds if f["fallback"]),
        "summarizer_prompt_tokens": s_prompt,
        "summarizer_completion_tokens": s_completion,
        "summarizer_tokens": summarizer_tokens,
        "on_net_total": on_total + summarizer_tokens,
        "saved_tokens": off_total - on_total - summarizer_tokens,
        "saved_ratio": round(1 - (on_total + summarizer_tokens) / off_total, 4) if off_total else 0.0,
        "saved_ratio_gross": round(1 - on_total / off_total, 4) if off_total else 0.0,
        "cached_tokens_on": [int(r["cached_tokens"]) for r in on],
        "cached_tokens_off": [int(r["cached_tokens"]) for r in off],
        "summarizer_cached_tokens": sum(c.cached_tokens for c in ledger.calls),
        "max_on_prompt_tokens": max(on_prompt),
        "on_over_budget_turns": [i + 1 for i, p in enumerate(on_prompt) if p > budget],
        "prompt_has_bos": all(bool(r["prompt_has_bos"]) for r in on),
        "max_off_prompt_tokens": max(off_prompt),
        "fold_turns": [i + 1 for i, r in enumerate(on) if r["folded_now"]],
        "folds": ledger.folds,
        "folded_messages": session.folded,
        "final_summary": session.summary,
        "on_completion_tokens": sum(int(r["completion_tokens"]) for r in on),
        "off_completion_tokens": sum(int(r["completion_tokens"]) for r in off),
        "off_over_context_turns": over,
        "off_total_within_context": sum(p for p, r in zip(off_prompt, off, strict=True) if r["fits_context"]),
        "off_note": (
            "OFF prompts past the model context are counted but not generated; the ON reply stands in for them"
            if over
            else "every OFF prompt fit the model context"
        ),
        "prefix_hits": stats["prefix_hits"],
        "prefix_lookups": stats["prefix_lookups"],
        "load_s": round(t_loaded - t0, 3),
        "wall_s_on": round(t_on - t_loaded, 3),
        "wall_s_off": round(t_off - t_on, 3),
        "wall_s": round(t_off - t0, 3),
        "per_turn": per_turn,
    }


def bench_context(
    model_path: str,
    threads: int,
    turns: int = 30,
    max_tokens: int = 48,
    budget: int = 1024,
    *,
    keep_turns: int = KEEP_TURNS,
    summary_max_tokens: int = SUMMARY_MAX_TOKENS,
    n_ctx: int = N_CTX,
) -> dict[str, Any]:
    """Run the scripted conversation with context management on and off; JSON-ready results.

    threads 0 means every CPU this process may use (as in the service config). Raises ValueError when
    `turns` is outside [1, len(SCRIPT)].
    """
    return asyncio.run(_run(model_path, threads, turns, max_tokens, budget, keep_turns, summary_max_tokens, n_ctx))

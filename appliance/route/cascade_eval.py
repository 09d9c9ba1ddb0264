"""What the cascade would do with the local model's answers to a set of questions: each question is
answered locally as the service does (chat template, greedy, scored tokens), the held-back answer is
checked every `check_every` tokens and once whole, and the report says how many answers each check
would have escalated (`appliance route cascade-eval`). For tuning `[route]` thresholds and
`cascade_window` on your own traffic."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from appliance.common.config import RouteConfig
from appliance.engine.local_backend import LocalBackend
from appliance.engine.sampling import SamplingOptions
from appliance.route.cascade import CHECK_EVERY, TokenScores, assess


async def _answer(
    backend: LocalBackend, text: str, cfg: RouteConfig, max_tokens: int, check_every: int
) -> dict[str, Any]:
    tokens = backend.tokenize_chat(backend.render_chat([{"role": "user", "content": text}]))
    opts = SamplingOptions(max_tokens=max_tokens, temperature=0.0, logprobs=True)
    scores, parts, n, finish = TokenScores(), [], 0, ""
    first_cut: int | None = None
    first_why = ""
    next_check = check_every
    async for chunk in backend.generate(tokens, opts, tenant="cascade-eval"):
        if chunk.token is not None:
            n += 1
            scores.add(chunk.logprob, chunk.entropy)
        parts.append(chunk.text)
        finish = chunk.finish_reason or finish
        if first_cut is None and not finish and n >= next_check:  # as the service checks a held answer
            next_check = n + check_every
            conf = assess("".join(parts), "", cfg, scores, partial=True)
            if conf.escalate:
                first_cut, first_why = n, conf.why
    whole = assess("".join(parts), finish, cfg, scores)
    lp, ent = scores.means()
    return {
        "tokens": n,
        "finish_reason": finish,
        "cut_at": first_cut,  # the first check (in tokens) that would escalate a held answer
        "cut_why": first_why,
        "whole_escalates": whole.escalate,
        "whole_why": whole.why,
        "mean_logprob": None if lp is None else round(lp, 3),
        "mean_entropy": None if ent is None else round(ent, 3),
        "repetition": round(whole.repetition, 3),
    }


def summarize(rows: Sequence[dict[str, Any]], check_every: int, max_tokens: int) -> dict[str, Any]:
    """Share of answers escalated by each check, and by the whole-answer check."""
    n = len(rows)
    by_check = {}
    for k in range(check_every, max_tokens + 1, check_every):
        by_check[str(k)] = round(sum(1 for r in rows if r["cut_at"] is not None and r["cut_at"] <= k) / n, 4)
    reasons: Counter[str] = Counter()
    for r in rows:
        for why in filter(None, r["whole_why"].split("; ")):
            reasons[" ".join(w for w in why.split() if w[0].isalpha())] += 1  # the signal, without figures
    return {
        "answers": n,
        "escalated_by_tokens": by_check,
        "escalated_whole": round(sum(1 for r in rows if r["whole_escalates"]) / n, 4),
        "whole_reasons": dict(reasons.most_common()),
    }


def evaluate(
    backend: LocalBackend,
    texts: Sequence[str],
    labels: Sequence[str | None],
    cfg: RouteConfig,
    *,
    max_tokens: int = 256,
    check_every: int = CHECK_EVERY,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Answer each text locally (one at a time) and report what the cascade would do, overall and per
    label where rows are labelled."""
    rows = []
    for i, text in enumerate(texts):
        rows.append(asyncio.run(_answer(backend, text, cfg, max_tokens, check_every)))
        if progress is not None:
            progress(i + 1, len(texts))
    for r, text, label in zip(rows, texts, labels, strict=True):
        r["text"], r["label"] = text, label
    report: dict[str, Any] = {
        "max_tokens": max_tokens,
        "check_every": check_every,
        **summarize(rows, check_every, max_tokens),
    }
    named = sorted({lab for lab in labels if lab})
    if named:
        report["by_label"] = {
            lab: summarize([r for r in rows if r["label"] == lab], check_every, max_tokens) for lab in named
        }
    report["rows"] = rows
    return report

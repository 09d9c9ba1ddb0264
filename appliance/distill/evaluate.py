"""Held-out evaluation of a task model, and the confidence rule the service applies to it.

    engine = AsyncEngine(base, max_seqs=8)
    result = evaluate(engine, cases, adapter=engine.load_adapter("triage.lora.gguf"), answers=labels)

Each example (the training JSONL shapes, read by `appliance.distill.data`) is answered greedily by our
engine under the adapter, as the service would answer it: when the task has known answers (a
classification: the adapter records them at training time), decoding is constrained to them (each
answer's own tokens, `SamplingOptions.choices`). The answer is right when it equals the example's
answer after trimming whitespace. The confidence rule (`appliance.distill.rule`): an answer is kept
local when it ended by itself (not cut by max_tokens), is not empty, and its signal (the smallest
logit margin over its tokens, or the least likely token's log-probability; "auto": whichever keeps
more of the calibration set local) is at or above a threshold. The threshold is calibrated on a
calibration set (the lowest that keeps the kept answers at `target` precision or better): a given
one, or a split of the cases; the figures are measured on the rest: `exact_match` (all), `coverage`
(the share kept local), `covered_exact_match` (exact match on that share), `p50_ms` (per answer,
answered concurrently).
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance import _native
from appliance.distill.data import Record, answer_text, gguf_arch, read_jsonl, to_record, tokenize
from appliance.distill.rule import AUTO, DEFAULT_SIGNAL, SIGNALS, Sureness
from appliance.engine.async_engine import AsyncEngine
from appliance.engine.grammar import answer_choices
from appliance.engine.sampling import SamplingOptions

NEVER = 1e9  # a threshold no answer reaches (signals are <= MARGIN_CAP): nothing is kept local
EXTRA_TOKENS = 8  # an answer may run this many tokens past the expected one's length


@dataclass(frozen=True)
class Case:
    prompt: tuple[int, ...]
    expected: str
    max_tokens: int
    line: int


@dataclass(frozen=True)
class Answer:
    text: str
    low: float  # the least likely token's log-probability (0.0 for no tokens)
    finished: bool  # ended by itself (end of sequence or a stop), not by max_tokens
    ms: float
    right: bool
    margin: float = 0.0  # the smallest logit margin over its tokens (rule.MARGIN_CAP for none)

    @property
    def keepable(self) -> bool:
        return self.finished and bool(self.text.strip())

    def signal(self, name: str) -> float:
        return Sureness(self.low, self.margin).value(name)


def gguf_type(path: str | Path) -> str:
    """general.type of a GGUF file ("adapter" for a LoRA; "" when unset)."""
    import gguf

    field = gguf.GGUFReader(str(path)).fields.get("general.type")
    return str(field.contents()) if field is not None else ""


def load_cases(path: str | Path, model: str | Path, *, max_len: int = 512) -> list[Case]:
    """The examples of a JSONL file, tokenized as the service tokenizes a request for `model`;
    raises data.DataError naming bad lines."""
    vocab = _native.Vocab(str(model))
    arch = gguf_arch(model)
    cases = []
    for line, parsed in read_jsonl(path):
        record: Record = to_record(vocab, arch, line, parsed)
        example = tokenize(vocab, record, max_tokens=max_len)
        cases.append(Case(example.prompt, answer_text(parsed).strip(), len(example.answer) + EXTRA_TOKENS, line))
    return cases


async def _answer(
    engine: AsyncEngine, case: Case, adapter: int, choices: tuple[tuple[int, ...], ...], gate: asyncio.Semaphore
) -> Answer:
    opts = SamplingOptions(temperature=0.0, max_tokens=case.max_tokens, logprobs=True, choices=choices)
    async with gate:
        t0 = time.perf_counter()
        parts, sure, finish = [], Sureness(), ""
        async for chunk in engine.generate(list(case.prompt), opts, adapter=adapter):
            parts.append(chunk.text)
            if chunk.token is not None:
                sure.add(chunk.logprob, chunk.margin)
            finish = chunk.finish_reason or finish
        ms = (time.perf_counter() - t0) * 1e3
    text = "".join(parts)
    return Answer(text, sure.low, finish == "stop", ms, text.strip() == case.expected, sure.margin)


def answer_all(
    engine: AsyncEngine,
    cases: Sequence[Case],
    *,
    adapter: int = 0,
    answers: Sequence[str] | None = None,
    concurrency: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> list[Answer]:
    """Answer every case greedily, `concurrency` at a time (the engine batches them), constrained to
    `answers` when given; `progress(done, total)` after each."""
    choices: tuple[tuple[int, ...], ...] = ()
    if answers:
        choices = answer_choices(engine, answers)

    async def run() -> list[Answer]:
        gate = asyncio.Semaphore(max(1, concurrency))
        done = 0

        async def one(case: Case) -> Answer:
            nonlocal done
            a = await _answer(engine, case, adapter, choices, gate)
            done += 1
            if progress is not None:
                progress(done, len(cases))
            return a

        return list(await asyncio.gather(*(one(c) for c in cases)))

    return asyncio.run(run())


def calibrate(answers: Sequence[Answer], target: float, signal: str = DEFAULT_SIGNAL) -> float:
    """The lowest threshold whose kept answers are right at least `target` of the time (NEVER when
    none is)."""
    candidates = sorted({a.signal(signal) for a in answers if a.keepable}, reverse=True)
    best = NEVER
    for t in candidates:
        kept = [a for a in answers if a.keepable and a.signal(signal) >= t]
        if kept and sum(a.right for a in kept) / len(kept) >= target:
            best = t
    return best


def figures(answers: Sequence[Answer], threshold: float, signal: str = DEFAULT_SIGNAL) -> dict[str, Any]:
    n = len(answers)
    kept = [a for a in answers if a.keepable and a.signal(signal) >= threshold]
    return {
        "exact_match": sum(a.right for a in answers) / n if n else 0.0,
        "n": n,
        "coverage": len(kept) / n if n else 0.0,
        "covered_exact_match": sum(a.right for a in kept) / len(kept) if kept else 0.0,
        "p50_ms": statistics.median(a.ms for a in answers) if answers else 0.0,
    }


def judge(
    answers: Sequence[Answer],
    calibration: Sequence[Answer],
    *,
    target: float = 0.97,
    signal: str = DEFAULT_SIGNAL,
) -> dict[str, Any]:
    """Figures of `answers` under the threshold calibrated on `calibration` for `target` precision.
    signal AUTO: each signal is calibrated, and the one keeping the larger share of `calibration`
    local is used (DEFAULT_SIGNAL on a tie); nothing of `answers` takes part in the choice."""
    if signal == AUTO:
        kept = {s: figures(calibration, calibrate(calibration, target, s), s)["coverage"] for s in SIGNALS}
        signal = max(SIGNALS, key=lambda s: (kept[s], s == DEFAULT_SIGNAL))
    if signal not in SIGNALS:
        raise ValueError(f"unknown confidence signal {signal!r} (one of {', '.join((AUTO, *SIGNALS))})")
    threshold = calibrate(calibration, target, signal)
    out = figures(answers, threshold, signal)
    out.update(
        {
            "threshold": threshold,
            "signal": signal,
            "target_precision": target,
            "val_n": len(calibration),
            "val": {k: v for k, v in figures(calibration, threshold, signal).items() if k != "p50_ms"},
        }
    )
    return out


def evaluate(
    engine: AsyncEngine,
    cases: Sequence[Case],
    *,
    adapter: int = 0,
    answers: Sequence[str] | None = None,
    target: float = 0.97,
    val_fraction: float = 0.3,
    seed: int = 0,
    signal: str = DEFAULT_SIGNAL,
    concurrency: int = 8,
) -> dict[str, Any]:
    """Answer every case; calibrate the threshold on a validation split (`val_fraction`, chosen by
    `seed`) and measure on the rest. With fewer than 2 cases both are the same set."""
    if not cases:
        raise ValueError("no examples to evaluate")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    got = answer_all(engine, cases, adapter=adapter, answers=answers, concurrency=concurrency)
    order = list(range(len(cases)))
    random.Random(seed).shuffle(order)
    n_val = min(len(cases) - 1, max(1, round(len(cases) * val_fraction))) if len(cases) >= 2 else 0
    val = [got[i] for i in sorted(order[:n_val])] or got
    test = [got[i] for i in sorted(order[n_val:])]
    out = judge(test, val, target=target, signal=signal)
    out["p50_ms"] = statistics.median(a.ms for a in got)
    out["constrained"] = bool(answers)
    return out

"""Held-out evaluation of a task model, and the confidence rule the service applies to it.

    figures = evaluate(engine, cases, adapter=engine.load_adapter("triage.lora.gguf"))

Each example (the training JSONL shapes, read by `appliance.distill.data`) is answered greedily by our
engine under the adapter, as the service would answer it. The answer is right when it equals the
example's answer after trimming whitespace. The confidence rule: an answer is kept local when it
ended by itself (not cut by max_tokens), is not empty, and its least likely token has a
log-probability at or above a threshold. The threshold is calibrated on a validation split (the
lowest that keeps the kept answers at `target` precision or better) and the figures are measured
on the rest: `exact_match` (all), `coverage` (the share kept local), `covered_exact_match`
(exact match on that share), `p50_ms` (per answer).
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance import _native
from appliance.distill.data import Record, gguf_arch, read_jsonl, to_record, tokenize
from appliance.engine.engine import Engine
from appliance.engine.sampling import SamplingOptions

NEVER = 1.0  # a threshold no answer reaches (log-probabilities are <= 0): nothing is kept local
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

    @property
    def keepable(self) -> bool:
        return self.finished and bool(self.text.strip())


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
        kind, value = parsed
        if kind == "pc":
            expected = str(value[1])
        else:
            expected = str([m for m in value if m["role"] == "assistant"][-1]["content"])
        cases.append(Case(example.prompt, expected.strip(), len(example.answer) + EXTRA_TOKENS, line))
    return cases


def answer(engine: Engine, case: Case, adapter: int = 0) -> Answer:
    opts = SamplingOptions(temperature=0.0, max_tokens=case.max_tokens, logprobs=True)
    t0 = time.perf_counter()
    parts, low, finish = [], 0.0, ""
    for chunk in engine.generate(list(case.prompt), opts, adapter=adapter):
        parts.append(chunk.text)
        if chunk.logprob is not None:
            low = min(low, chunk.logprob)
        finish = chunk.finish_reason or finish
    text = "".join(parts)
    ms = (time.perf_counter() - t0) * 1e3
    return Answer(text, low, finish == "stop", ms, text.strip() == case.expected)


def calibrate(answers: Sequence[Answer], target: float) -> float:
    """The lowest threshold whose kept answers are right at least `target` of the time (NEVER when
    none is)."""
    candidates = sorted({a.low for a in answers if a.keepable}, reverse=True)
    best = NEVER
    for t in candidates:
        kept = [a for a in answers if a.keepable and a.low >= t]
        if kept and sum(a.right for a in kept) / len(kept) >= target:
            best = t
    return best


def figures(answers: Sequence[Answer], threshold: float) -> dict[str, Any]:
    n = len(answers)
    kept = [a for a in answers if a.keepable and a.low >= threshold]
    return {
        "exact_match": sum(a.right for a in answers) / n if n else 0.0,
        "n": n,
        "coverage": len(kept) / n if n else 0.0,
        "covered_exact_match": sum(a.right for a in kept) / len(kept) if kept else 0.0,
        "p50_ms": statistics.median(a.ms for a in answers) if answers else 0.0,
    }


def evaluate(
    engine: Engine,
    cases: Sequence[Case],
    *,
    adapter: int = 0,
    target: float = 0.97,
    val_fraction: float = 0.3,
    seed: int = 0,
) -> dict[str, Any]:
    """Answer every case; calibrate the threshold on a validation split (`val_fraction`, chosen by
    `seed`) and measure on the rest. With fewer than 2 cases both are the same set."""
    if not cases:
        raise ValueError("no examples to evaluate")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    answers = [answer(engine, c, adapter) for c in cases]
    order = list(range(len(cases)))
    random.Random(seed).shuffle(order)
    n_val = min(len(cases) - 1, max(1, round(len(cases) * val_fraction))) if len(cases) >= 2 else 0
    val = [answers[i] for i in sorted(order[:n_val])] or answers
    test = [answers[i] for i in sorted(order[n_val:])]
    threshold = calibrate(val, target)
    out = figures(test, threshold)
    out.update(
        {
            "threshold": threshold,
            "target_precision": target,
            "val_n": len(val),
            "val": {k: v for k, v in figures(val, threshold).items() if k != "p50_ms"},
            "p50_ms": statistics.median(a.ms for a in answers),
        }
    )
    return out

"""Training data for distillation: the OpenAI fine-tuning JSONL shapes, tokenized as the appliance serves.

Two line shapes are read (one JSON object per line; blank lines are skipped):

- ``{"prompt": "...", "completion": "..."}``: the prompt is sent as it is (no chat template), as a
  `generate` request sends it; the completion is the answer, followed by the end-of-sequence token so
  the model learns to stop.
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: the LAST assistant message is the answer;
  the messages before it are rendered through the model's chat template (its family's when the GGUF
  carries none), as a chat request is. The answer is what the template writes for that message,
  end-of-turn marker included. Messages after the last assistant message are ignored.

Tokens come from the served GGUF's own tokenizer (libllama, through ``appliance._native.Vocab``),
called as the service calls it, so training sees exactly the ids the engine will see. A bad line
raises `DataError` naming the file, line number and field of every bad line found (up to 20);
nothing is trained on a bad file.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance import _native

# chat templates libllama knows by name, for models whose GGUF carries none (base models)
_FALLBACK_TEMPLATES = {"gemma3": "gemma", "llama": "llama3", "qwen2": "chatml", "qwen3": "chatml"}
_MAX_REPORTED = 20
_ROLES = ("system", "user", "assistant", "developer", "tool")


MAX_ANSWERS = 1000  # a task with more distinct answers is free text, not a choice among labels
MIN_REPEATS = 3


class DataError(ValueError):
    """One or more bad lines; `problems` holds one "FILE:LINE: field: what" string per bad line."""

    def __init__(self, problems: Sequence[str], n_bad: int | None = None) -> None:
        self.problems = list(problems)
        n = len(self.problems) if n_bad is None else n_bad
        more = f"\n  ... and {n - len(self.problems)} more" if n > len(self.problems) else ""
        head = f"{n} bad line{'s' if n != 1 else ''} in the training data; nothing was trained:"
        super().__init__(head + "\n  " + "\n  ".join(self.problems) + more)


@dataclass(frozen=True)
class Record:
    """One training example as text: what the model sees, and the answer it should give."""

    prompt: str  # rendered (chat template applied for messages)
    completion: str
    chat: bool  # True: rendered through the chat template
    line: int  # 1-based line in the file (0 when not from a file)


@dataclass(frozen=True)
class Example:
    """A tokenized example: loss is taken on `answer` only."""

    prompt: tuple[int, ...]
    answer: tuple[int, ...]
    line: int = 0

    @property
    def tokens(self) -> tuple[int, ...]:
        return self.prompt + self.answer


def _check_messages(value: Any) -> str | None:
    """None when `value` is a usable messages list, else what is wrong (with the field path)."""
    if not isinstance(value, list) or not value:
        return "messages: expected a non-empty list"
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            return f"messages[{i}]: expected an object with 'role' and 'content'"
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or role not in _ROLES:
            return f"messages[{i}].role: expected one of {', '.join(_ROLES)}, got {role!r}"
        if not isinstance(content, str):
            return f"messages[{i}].content: expected a string, got {type(content).__name__}"
    if not any(m["role"] == "assistant" for m in value):
        return "messages: no assistant message (the last one is the training target)"
    last = max(i for i, m in enumerate(value) if m["role"] == "assistant")
    if not value[last]["content"].strip():
        return f"messages[{last}].content: the assistant answer is empty"
    if last == 0:
        return "messages: the assistant answer has no message before it"
    return None


def parse_line(obj: Any) -> tuple[str, Any] | str:
    """("pc", (prompt, completion)) or ("messages", list); a string says what is wrong."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    if "messages" in obj:
        if "prompt" in obj or "completion" in obj:
            return "messages: a line has either 'messages' or 'prompt'/'completion', not both"
        problem = _check_messages(obj["messages"])
        return problem if problem else ("messages", obj["messages"])
    if "prompt" not in obj and "completion" not in obj:
        return "expected 'prompt' and 'completion', or 'messages'"
    for key in ("prompt", "completion"):
        if key not in obj:
            return f"{key}: missing"
        if not isinstance(obj[key], str):
            return f"{key}: expected a string, got {type(obj[key]).__name__}"
    if not obj["prompt"]:
        return "prompt: empty"
    if not obj["completion"].strip():
        return "completion: empty"
    return ("pc", (obj["prompt"], obj["completion"]))


def read_jsonl(path: str | os.PathLike[str]) -> list[tuple[int, tuple[str, Any]]]:
    """The parsed lines of `path` as (line number, parse_line result); raises DataError on bad lines."""
    name = os.fspath(path)
    out: list[tuple[int, tuple[str, Any]]] = []
    problems: list[str] = []
    n_bad = 0

    def bad(lineno: int, what: str) -> None:
        nonlocal n_bad
        n_bad += 1
        if len(problems) < _MAX_REPORTED:
            problems.append(f"{name}:{lineno}: {what}")

    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise DataError([f"{name}: cannot read: {e.strerror or e}"]) from None
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            bad(lineno, f"not valid UTF-8 (byte {e.start})")
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            bad(lineno, f"not valid JSON: {e.msg} (column {e.colno})")
            continue
        parsed = parse_line(obj)
        if isinstance(parsed, str):
            bad(lineno, parsed)
        else:
            out.append((lineno, parsed))
    if n_bad:
        raise DataError(problems, n_bad)
    if not out:
        raise DataError([f"{name}: no training examples"])
    return out


def render_messages(
    vocab: _native.Vocab, arch: str, messages: Sequence[Mapping[str, str]], *, add_assistant: bool
) -> str:
    """Messages through the model's chat template (its family's when the GGUF carries none)."""
    template = vocab.chat_template or _FALLBACK_TEMPLATES.get(arch, "chatml")
    pairs = [(str(m["role"]), str(m["content"])) for m in messages]
    return str(vocab.apply_chat_template(template, pairs, add_assistant=add_assistant))


def answer_text(parsed: tuple[str, Any]) -> str:
    """The answer of a parsed line as the model writes it: the completion, or the last assistant
    message's content."""
    kind, value = parsed
    if kind == "pc":
        return str(value[1])
    return str([m for m in value if m["role"] == "assistant"][-1]["content"])


def known_answers(texts: Sequence[str]) -> list[str] | None:
    """The task's answers when it is a classification: at most MAX_ANSWERS distinct non-empty
    answers, each seen MIN_REPEATS times on average (labels, not free text). None otherwise."""
    distinct = sorted({t for t in texts if t.strip()})
    if not distinct or len(distinct) > MAX_ANSWERS or len(texts) < MIN_REPEATS * len(distinct):
        return None
    return distinct


def to_record(vocab: _native.Vocab, arch: str, line: int, parsed: tuple[str, Any]) -> Record:
    kind, value = parsed
    if kind == "pc":
        prompt, completion = value
        return Record(prompt, completion, chat=False, line=line)
    messages: list[Mapping[str, str]] = value
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt = render_messages(vocab, arch, messages[:last], add_assistant=True)
    full = render_messages(vocab, arch, messages[: last + 1], add_assistant=False)
    if not full.startswith(prompt) or len(full) == len(prompt):
        raise DataError([f"line {line}: messages: the chat template does not render the answer after the prompt"])
    return Record(prompt, full[len(prompt) :], chat=True, line=line)


def tokenize(vocab: _native.Vocab, record: Record, *, max_tokens: int) -> Example:
    """Prompt and answer token ids, as the service tokenizes a request (control tokens written as text
    are read as such). A plain prompt gets BOS as the model asks; a rendered chat prompt is tokenized
    without adding specials and gets BOS in front when the model wants one and the template left it
    out. The answer is tokenized after it without specials; plain completions get the end-of-sequence
    token appended. Over-long examples lose the start of their prompt (BOS and the answer are kept
    whole); an answer of `max_tokens` or more is an error.
    """
    prompt = list(vocab.tokenize(record.prompt, add_special=not record.chat, parse_special=True))
    if record.chat and vocab.add_bos and vocab.bos >= 0 and (not prompt or prompt[0] != vocab.bos):
        prompt.insert(0, vocab.bos)
    answer = list(vocab.tokenize(record.completion, add_special=False, parse_special=True))
    if not record.chat and vocab.eos >= 0:
        answer.append(vocab.eos)
    if len(answer) >= max_tokens:
        raise DataError([f"line {record.line}: completion: {len(answer)} tokens, more than --max-len {max_tokens}"])
    if len(prompt) + len(answer) > max_tokens:
        keep = max_tokens - len(answer)
        head = prompt[:1] if vocab.add_bos and prompt and prompt[0] == vocab.bos else []
        prompt = head + prompt[len(prompt) - (keep - len(head)) :]
    return Example(tuple(prompt), tuple(answer), record.line)


def load_examples(
    path: str | os.PathLike[str], model_path: str | os.PathLike[str], *, max_tokens: int = 512
) -> list[Example]:
    """Read, validate and tokenize a JSONL file for the GGUF at `model_path`."""
    parsed = read_jsonl(path)
    vocab = _native.Vocab(os.fspath(model_path))
    arch = gguf_arch(model_path)
    return [tokenize(vocab, to_record(vocab, arch, line, p), max_tokens=max_tokens) for line, p in parsed]


def gguf_arch(model_path: str | os.PathLike[str]) -> str:
    """general.architecture of a GGUF file (read from its header only)."""
    import gguf

    reader = gguf.GGUFReader(os.fspath(model_path))
    field = reader.fields.get("general.architecture")
    if field is None:
        raise ValueError(f"{os.fspath(model_path)}: no general.architecture")
    return str(field.contents())


def split(examples: Sequence[Example], *, seed: int, val_fraction: float = 0.1) -> tuple[list[Example], list[Example]]:
    """Deterministic train/validation split: shuffled by `seed`, `val_fraction` (at least one example
    when there are two or more) held out."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = 0
    if len(examples) >= 2 and val_fraction > 0:
        n_val = min(len(examples) - 1, max(1, math.floor(len(examples) * val_fraction + 0.5)))
    val = [examples[i] for i in sorted(order[:n_val])]
    train = [examples[i] for i in order[n_val:]]
    return train, val


def n_tokens(examples: Iterable[Example]) -> int:
    return sum(len(e.prompt) + len(e.answer) for e in examples)

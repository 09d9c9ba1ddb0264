"""Distillation training data: the OpenAI JSONL shapes, bad lines reported by number, chat rendering,
tokenization as the engine does it, and the deterministic split. No torch needed."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance import _native
from appliance.distill.data import DataError, Example, load_examples, read_jsonl, split


def _write(path: Path, lines: list[object]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_bad_lines_are_reported_by_number_and_field(tmp_path: Path) -> None:
    good = {"prompt": "a", "completion": " b"}
    data = _write(
        tmp_path / "bad.jsonl",
        [
            good,
            "{not json",
            {"prompt": "a"},
            {"prompt": 3, "completion": "x"},
            "",  # blank lines are skipped, not errors
            {"messages": [{"role": "user", "content": "hi"}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 5}]},
            {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
            [1, 2],
            good,
            {"prompt": "a", "completion": "  "},
        ],
    )
    with pytest.raises(DataError) as info:
        read_jsonl(data)
    problems = info.value.problems
    assert len(problems) == 8
    expected = [
        (2, "not valid JSON"),
        (3, "completion: missing"),
        (4, "prompt: expected a string"),
        (6, "no assistant message"),
        (7, "messages[1].content"),
        (8, "messages[0].role"),
        (9, "expected a JSON object"),
        (11, "completion: empty"),
    ]
    for problem, (line, what) in zip(problems, expected, strict=True):
        assert problem.startswith(f"{data}:{line}: "), problem
        assert what in problem, problem
    assert "8 bad lines" in str(info.value) and "nothing was trained" in str(info.value)


def test_invalid_utf8_and_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "x.jsonl"
    p.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff", "completion": "b"}\n')
    with pytest.raises(DataError, match=r"x\.jsonl:2: not valid UTF-8"):
        read_jsonl(p)
    p.write_text("\n\n")
    with pytest.raises(DataError, match="no training examples"):
        read_jsonl(p)


def test_prompt_completion_tokens(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    base = tiny_model("gemma3", "F32")
    vocab = _native.Vocab(str(base))
    data = _write(tmp_path / "d.jsonl", [{"prompt": "hello world", "completion": " the"}])
    (ex,) = load_examples(data, base)
    # the prompt alone, as the service tokenizes a served prompt; the answer then EOS
    assert list(ex.prompt) == list(vocab.tokenize("hello world", add_special=True, parse_special=True))
    assert ex.prompt[0] == vocab.bos and ex.prompt[1] != vocab.bos
    assert list(ex.answer) == [*vocab.tokenize(" the", add_special=False, parse_special=True), vocab.eos]
    assert ex.line == 1


def test_messages_use_the_chat_template(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    base = tiny_model("gemma3", "F32")
    vocab = _native.Vocab(str(base))
    msgs = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "world"},
        {"role": "user", "content": "the"},
        {"role": "assistant", "content": "you"},  # the target: the LAST assistant message
    ]
    data = _write(tmp_path / "m.jsonl", [{"messages": msgs}])
    (ex,) = load_examples(data, base)
    assert ex.prompt[0] == vocab.bos and ex.prompt[1] != vocab.bos  # the template's BOS, once
    prompt = vocab.detokenize(list(ex.prompt), unparse_special=True).decode()
    answer = vocab.detokenize(list(ex.answer), unparse_special=True).decode()
    assert prompt.endswith("<start_of_turn>user\nthe<end_of_turn>\n<start_of_turn>model\n")
    assert "<start_of_turn>model\nworld<end_of_turn>" in prompt
    assert answer == "you<end_of_turn>\n"
    end_of_turn = vocab.tokenize("<end_of_turn>", add_special=False, parse_special=True)
    assert len(end_of_turn) == 1 and end_of_turn[0] in ex.answer  # a control token, not its letters


def test_long_prompts_keep_bos_and_the_whole_answer(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    base = tiny_model("gemma3", "F32")
    data = _write(tmp_path / "l.jsonl", [{"prompt": "hello " * 100, "completion": " world"}])
    (ex,) = load_examples(data, base, max_tokens=32)
    assert len(ex.tokens) == 32 and ex.prompt[0] == _native.Vocab(str(base)).bos
    with pytest.raises(DataError, match="completion"):
        load_examples(
            _write(tmp_path / "l2.jsonl", [{"prompt": "a", "completion": " world" * 40}]), base, max_tokens=32
        )


def test_split_is_deterministic_and_ninety_ten() -> None:
    examples = [Example((1, i), (2,), i) for i in range(100)]
    train, val = split(examples, seed=7)
    assert len(train) == 90 and len(val) == 10
    assert {e.line for e in train} | {e.line for e in val} == set(range(100))
    assert split(examples, seed=7) == (train, val)
    assert split(examples, seed=8)[1] != val
    assert split(examples[:1], seed=0) == (examples[:1], [])
    assert len(split(examples[:5], seed=0)[1]) == 1

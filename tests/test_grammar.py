"""Grammar-constrained decoding: every token of a request with a grammar follows it (libllama's grammar
sampler over our logits), in greedy and sampled decoding, batched with plain requests (whose output
it leaves alone) and under both early-exit modes; an invalid grammar is refused naming the problem."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from reference import ref_load, ref_logits

from appliance import _native
from appliance.common.errors import InvalidArgument
from appliance.common.types import GenerateInput, SamplingInput
from appliance.engine.core import eog_tokens
from appliance.engine.engine import Engine
from appliance.engine.grammar import answer_choices, json_grammar
from appliance.engine.sampling import SamplingOptions
from appliance.service.normalize import normalize

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer"},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "age", "ok"],
    "additionalProperties": False,
}
PROMPTS = ["the quick brown fox", "hello world and", "one two three four", "zebra"]


def check_schema(value: Any) -> None:
    """SCHEMA, checked by hand. A random model may spell a character with byte tokens that are not
    UTF-8 (the grammar counts such a sequence as one character, the decoder as several U+FFFD)."""
    assert isinstance(value, dict)
    assert {"name", "age", "ok"} <= value.keys() <= {"name", "age", "ok", "tags"}
    name = value["name"]
    assert isinstance(name, str) and len(name.replace("\ufffd" * 4, "?").replace("\ufffd" * 3, "?")) <= 8
    assert isinstance(value["age"], int) and not isinstance(value["age"], bool)
    assert isinstance(value["ok"], bool)
    tags = value.get("tags", [])
    assert isinstance(tags, list) and len(tags) <= 3 and all(t in ("a", "b") for t in tags)


class Tiny:
    def __init__(self, path: Path, **kw: Any) -> None:
        self.vocab = _native.Vocab(str(path))
        self.engine = _native.BatchEngine(
            _native.Model(str(path)),
            n_blocks=96,
            block_size=16,
            eog_tokens=eog_tokens(self.vocab),
            vocab=self.vocab,
            **kw,
        )

    def run(self, requests: list[dict[str, Any]]) -> list[tuple[list[int], str]]:
        """Submits every request (prompt text and submit's keywords) at once; (tokens, finish) each."""
        ids = []
        for r in requests:
            kw = dict(r)
            ids.append(self.engine.submit(list(self.vocab.tokenize(kw.pop("prompt"))), **kw))
        out: dict[int, list[int]] = {i: [] for i in ids}
        finish: dict[int, str] = {}
        while not self.engine.idle:
            for ev in self.engine.step():
                out[ev.id] += ev.tokens
                if ev.finish_reason:
                    finish[ev.id] = ev.finish_reason
            assert self.engine.check_invariants() == ""
        return [(out[i], finish[i]) for i in ids]

    def scored(self, prompt: str, **kw: Any) -> tuple[list[int], list[float]]:
        """One request with logprobs on: its tokens and their margins."""
        rid = self.engine.submit(list(self.vocab.tokenize(prompt)), logprobs=True, **kw)
        tokens: list[int] = []
        margins: list[float] = []
        while not self.engine.idle:
            for ev in self.engine.step():
                assert ev.id == rid
                tokens += ev.tokens
                margins += ev.margins
        return tokens, margins

    def text(self, tokens: list[int]) -> str:
        return bytes(self.vocab.detokenize(tokens)).decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def tiny(tiny_model: Callable[..., Path]) -> Tiny:
    return Tiny(tiny_model("qwen3", "F32"))


def test_greedy_and_sampled_output_follows_a_schema(tiny: Tiny) -> None:
    grammar = json_grammar(SCHEMA)
    greedy = [{"prompt": p, "temperature": 0.0} for p in PROMPTS]
    sampled = [
        {"prompt": p, "temperature": t, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": s}
        for s, p in enumerate(PROMPTS)
        for t in (0.7, 1.5)
    ]
    results = tiny.run([{**r, "grammar": grammar, "max_tokens": 400} for r in greedy + sampled])
    for tokens, finish in results:
        assert finish == "stop", tiny.text(tokens)  # the grammar completed, then only end-of-generation was allowed
        check_schema(json.loads(tiny.text(tokens)))
    assert len({tiny.text(t) for t, _ in results}) > 1


def test_any_json_object(tiny: Tiny) -> None:
    """json_object mode: every answer that ends is a JSON object. A random model may run out of tokens
    inside a string (nothing bounds its length), so those are only checked to be cut there."""
    grammar = json_grammar(None)
    requests = [{"prompt": p, "temperature": 0.0} for p in PROMPTS]
    requests += [{"prompt": p, "seed": s, "temperature": t} for s, p in enumerate(PROMPTS) for t in (0.3, 0.8)]
    results = tiny.run([{**r, "grammar": grammar, "max_tokens": 200} for r in requests])
    for tokens, finish in results:
        text = tiny.text(tokens)
        if finish == "stop":
            assert isinstance(json.loads(text), dict)
        else:
            assert finish == "length" and text.startswith("{")
            with pytest.raises(json.JSONDecodeError, match="Unterminated string"):
                json.loads(text)
    assert sum(finish == "stop" for _, finish in results) >= len(results) // 2


def test_grammar_changes_nothing_for_plain_requests_batched_with_it(tiny_model: Callable[..., Path]) -> None:
    # fresh engines: where a pool has placed a sequence's cells changes the attention's rounding, which
    # can flip a sampled draw
    path = tiny_model("qwen3", "F32")
    plain = [{"prompt": p, "temperature": 0.0, "max_tokens": 24, "stop_at_eog": False} for p in PROMPTS]
    sampled = {"prompt": "hello", "temperature": 0.9, "seed": 7, "max_tokens": 24, "stop_at_eog": False}
    alone = Tiny(path).run([*plain, sampled])
    constrained = [
        {"prompt": p, "temperature": 0.0, "max_tokens": 400, "grammar": json_grammar(SCHEMA)} for p in PROMPTS
    ]
    t = Tiny(path)
    mixed = t.run([constrained[0], plain[0], constrained[1], plain[1], plain[2], sampled, plain[3], *constrained[2:]])
    assert [mixed[i] for i in (1, 3, 4, 6, 5)] == alone
    for i in (0, 2, 7, 8):
        check_schema(json.loads(t.text(mixed[i][0])))


def test_a_tiny_grammar_is_followed_exactly(tiny: Tiny) -> None:
    grammar = 'root ::= ("yes" | "no") " " [0-9] [0-9]?'
    for tokens, finish in tiny.run([{"prompt": p, "temperature": 1.5, "seed": 3, "grammar": grammar} for p in PROMPTS]):
        text = tiny.text(tokens)
        assert finish == "stop"
        head, digits = text.split(" ")
        assert head in ("yes", "no") and digits.isdigit() and 1 <= len(digits) <= 2


ANSWERS = [" yes", " no", ' say "hi"\n', " maybe so", " back\\slash", " yes indeed"]


def _choices(t: Tiny, answers: list[str]) -> tuple[tuple[int, ...], ...]:
    return answer_choices(t.vocab, answers)


def test_choices_give_one_answer_exactly_as_greedy_over_the_allowed_tokens(tiny_model: Callable[..., Path]) -> None:
    """A task's known answers as choices, against llama.cpp's logits: each step takes the best token
    that continues some answer (or ends one, where a longer answer goes on), its margin is its lead over
    the best other such token (inf where it was the only one), and the output is one answer's own
    tokens, ended without another step."""
    path = tiny_model("qwen3", "F32")
    t = Tiny(path)
    llm = ref_load(path)
    choices = _choices(t, ANSWERS)
    eog = set(eog_tokens(t.vocab))
    for p in PROMPTS:
        prompt = list(t.vocab.tokenize(p))
        tokens, margins = t.scored(p, temperature=0.0, choices=choices, max_tokens=40)
        assert tuple(tokens) in choices or (tokens[-1] in eog and tuple(tokens[:-1]) in choices)
        assert len(margins) == len(tokens)
        for k, tok in enumerate(tokens):  # the same walk over the trie, on the reference's logits
            row = ref_logits(llm, prompt + tokens[:k])[-1]
            allowed = {c[k] for c in choices if len(c) > k and c[:k] == tuple(tokens[:k])}
            if tuple(tokens[:k]) in choices:
                allowed |= eog
            assert tok in allowed and max(allowed, key=lambda a: row[a]) == tok
            rivals = [float(row[a]) for a in allowed if a != tok]
            want = float(row[tok]) - max(rivals) if rivals else float("inf")
            assert margins[k] == pytest.approx(want, abs=2e-3)


def test_sampled_and_batched_choices_keep_to_the_answers(tiny: Tiny) -> None:
    choices = _choices(tiny, ANSWERS)
    eog = set(eog_tokens(tiny.vocab))
    requests = [
        {"prompt": p, "temperature": 1.5, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": s}
        for s, p in enumerate(PROMPTS)
    ]
    requests += [
        {"prompt": p, "temperature": 0.0, "max_tokens": 16, "stop_at_eog": False} for p in PROMPTS[:2]
    ]  # plain
    out = tiny.run([{**r, "choices": choices} if "seed" in r else r for r in requests])
    for tokens, finish in out[: len(PROMPTS)]:
        assert finish == "stop"
        assert tuple(tokens) in choices or (tokens[-1] in eog and tuple(tokens[:-1]) in choices)
    assert [len(tokens) for tokens, _ in out[len(PROMPTS) :]] == [16, 16]
    one = _choices(tiny, [" maybe so"])
    tokens, margins = tiny.scored(PROMPTS[0], temperature=0.0, choices=one)
    assert tuple(tokens) == one[0] and all(m == float("inf") for m in margins)


def test_bad_choices_are_refused_naming_the_problem(tiny: Tiny) -> None:
    n = tiny.vocab.n_tokens
    for choices, problem in [
        ([[1, 2], []], "answer 1 has no tokens"),
        ([[1, n + 5]], f"token {n + 5}, outside the vocabulary"),
        ([[1, -1]], "outside the vocabulary"),
    ]:
        with pytest.raises(ValueError, match=problem):
            tiny.engine.submit([1, 2, 3], choices=choices)
    with pytest.raises(ValueError, match="grammar or choices, not both"):
        tiny.engine.submit([1, 2, 3], choices=[[1]], grammar=json_grammar(None))
    assert tiny.engine.idle and tiny.engine.stats()["n_waiting"] == 0
    with pytest.raises(ValueError, match="no answers"):
        _choices(tiny, ["", ""])
    for bad in [SamplingOptions(choices=((),)), SamplingOptions(choices=((1,),), grammar="root ::= x")]:
        with pytest.raises(ValueError, match="choices"):
            bad.validate()


def test_margin_without_a_grammar_is_the_lead_over_the_runner_up(tiny_model: Callable[..., Path]) -> None:
    """Against llama.cpp's logits: the first token's margin is the gap between the two best logits."""
    path = tiny_model("qwen3", "F32")
    t = Tiny(path)
    llm = ref_load(path)
    for p in PROMPTS:
        _, margins = t.scored(p, temperature=0.0, max_tokens=1, stop_at_eog=False)
        row = np.sort(ref_logits(llm, list(t.vocab.tokenize(p)))[-1])
        assert margins[0] == pytest.approx(float(row[-1] - row[-2]), abs=2e-3)


@pytest.mark.parametrize(
    ("grammar", "problem"),
    [
        ("root ::= foo", "Undefined rule identifier 'foo'"),
        ('root ::= "a', "unexpected end of input"),
        ('answer ::= "a"', "grammar does not contain a 'root' symbol"),
        ('root ::= root "a"', "left recursion"),
    ],
)
def test_invalid_grammar_is_refused_naming_the_problem(tiny: Tiny, grammar: str, problem: str) -> None:
    with pytest.raises(ValueError, match="invalid grammar") as err:
        tiny.engine.submit([1, 2, 3], grammar=grammar)
    assert problem in str(err.value)
    assert tiny.engine.idle and tiny.engine.stats()["n_waiting"] == 0


def test_a_grammar_needs_the_engine_vocabulary(tiny_model: Callable[..., Path]) -> None:
    engine = _native.BatchEngine(_native.Model(str(tiny_model("qwen3", "F32"))), n_blocks=16)
    with pytest.raises(ValueError, match="vocabulary"):
        engine.submit([1, 2, 3], grammar=json_grammar(None))


@pytest.mark.parametrize("mode", ["lossless", "adaptive"])
def test_early_exit_under_a_grammar(tiny_model: Callable[..., Path], mode: str) -> None:
    """Lossless: the same tokens as full depth under the grammar (drafts it rules out are not accepted).
    Adaptive: exits weigh only the allowed shortlisted tokens; the output keeps to the grammar."""
    path = tiny_model("llama", "F32", n_layer=4)
    grammar = json_grammar(SCHEMA)
    requests = [{"prompt": p, "temperature": 0.0, "max_tokens": 120, "grammar": grammar} for p in PROMPTS]
    full = Tiny(path).run(requests)
    t = Tiny(path, exit_layers=[1, 2], exit_thresholds=[0.05, 0.05], always_draft=True)
    t.engine.set_shortlist(list(range(0, t.vocab.n_tokens, 2)))  # half the vocabulary: some allowed, some not
    out = t.run([{**r, "exit_mode": mode} for r in requests])
    for tokens, finish in out:
        assert finish == "stop"
        check_schema(json.loads(t.text(tokens)))
    stats = t.engine.stats()
    if mode == "lossless":
        assert out == full and stats["drafted"] > 0
    else:
        assert sum(stats["exits_per_layer"][:4]) > 0  # some tokens did exit early


def test_engine_generates_json_and_validates_the_option(tiny_model: Callable[..., Path]) -> None:
    engine = Engine(tiny_model("gemma3", "Q8_0"), n_ctx=256, n_threads=2)
    opts = SamplingOptions(temperature=0.0, max_tokens=200, grammar=json_grammar(SCHEMA))
    check_schema(json.loads(engine.generate_text("the quick brown", opts)))
    with pytest.raises(ValueError, match="grammar"):
        SamplingOptions(grammar="root ::= \0").validate()


def test_json_grammar_refuses_what_it_cannot_convert() -> None:
    with pytest.raises(ValueError, match="JSON Schema"):
        json_grammar({"type": "no-such-type"})
    assert "\\x00-\\x1F" in json_grammar(None)  # JSON strings take no raw control characters


def test_normalize_keeps_grammar_requests_local() -> None:
    grammar = json_grammar(None)
    inp = GenerateInput(prompt="hi", sampling=SamplingInput(grammar=grammar))
    req = normalize(inp, "t", chat=False, default_max_tokens=16)
    assert req.sampling.grammar == grammar and req.route_policy == "local_only"
    assert normalize(GenerateInput(prompt="hi"), "t", chat=False, default_max_tokens=16).route_policy == "auto"
    with pytest.raises(InvalidArgument) as err:
        normalize(
            GenerateInput(prompt="hi", sampling=SamplingInput(grammar=grammar), route_policy="cloud_only"),
            "t",
            chat=False,
            default_max_tokens=16,
        )
    assert err.value.field == "sampling.grammar"


def test_grpc_sampling_takes_a_grammar_or_a_json_schema() -> None:
    from appliance.edge.grpc.proto import pb2
    from appliance.edge.grpc.server import input_from_proto

    def sampling(**kw: str) -> SamplingInput:
        pb = pb2()
        return input_from_proto(pb.GenerateRequest(prompt="x", sampling=pb.Sampling(**kw))).sampling

    assert sampling(json_schema=json.dumps(SCHEMA)).grammar == json_grammar(SCHEMA)
    assert sampling(json_schema="{}").grammar == json_grammar(None)
    assert sampling(grammar='root ::= "a"').grammar == 'root ::= "a"'
    assert sampling().grammar == ""
    for kw in (
        {"json_schema": "{not json"},
        {"json_schema": '{"type": "nope"}'},
        {"json_schema": "{}", "grammar": "x"},
    ):
        with pytest.raises(InvalidArgument) as err:
            sampling(**kw)
        assert err.value.field == "sampling.json_schema"

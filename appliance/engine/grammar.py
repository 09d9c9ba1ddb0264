"""Grammars for structured output: JSON (any object, or the values a JSON Schema accepts) as GBNF,
the grammar language of libllama's grammar sampler, which the native engine applies to every token
of a request that carries one (`SamplingOptions.grammar`).

The JSON Schema converter is llama-cpp-python's (`llama_cpp.llama_grammar`, a pinned dependency). Its
strings admit any character but `"` and `\\`; JSON forbids raw control characters in strings, so
the grammar made here leaves them out (as llama.cpp's own converter does), and what a grammar allows
always parses with `json.loads`.

A task's known answers are no grammar: `answer_choices` gives them as token sequences
(`SamplingOptions.choices`), which the engine follows as a trie of exactly those tokenizations.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from appliance.engine.sampling import MAX_GRAMMAR

# any JSON object (the converter's, with one optional space between tokens: a model cannot loop on
# whitespace, as it can under a grammar that allows any amount of it)
ANY_OBJECT: Mapping[str, Any] = {"type": "object"}

_CHAR = 'char ::= [^"\\\\] '
_JSON_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] '


def json_grammar(schema: Mapping[str, Any] | None = None) -> str:
    """GBNF whose sentences are JSON: any object when `schema` is None, else a value the JSON Schema
    accepts (as far as the converter understands it: types, properties, required, enum, const, items,
    lengths, local $refs, ...). Raises ValueError naming what it cannot convert."""
    if schema is None:
        schema = ANY_OBJECT
    if not isinstance(schema, Mapping):
        raise ValueError(f"a JSON Schema must be an object, got {type(schema).__name__}")
    try:
        text = json.dumps(schema)
    except (TypeError, ValueError) as e:
        raise ValueError(f"the JSON Schema is not JSON: {e}") from None
    properties = schema.get("properties")
    order = tuple(properties) if isinstance(properties, Mapping) else ()
    return _convert(text, order)


@functools.lru_cache(maxsize=64)  # apps send the same few schemas again and again
def _convert(schema: str, order: tuple[str, ...]) -> str:
    """`order`: the properties in the order the schema declares them, which the answer keeps (the
    converter would otherwise sort them by name)."""
    # llama_cpp's package loads libllama through ctypes (the copy our extension uses) and routes its
    # log through Python; like Llama(verbose=False), keep that to errors
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    log = logging.getLogger("llama-cpp-python")
    if log.level == logging.NOTSET:
        log.setLevel(logging.ERROR)
    try:
        gbnf = str(json_schema_to_gbnf(schema, list(order)))
    except RecursionError:
        raise ValueError("the JSON Schema nests too deeply") from None
    except Exception as e:  # the converter raises whatever its code meets (KeyError, TypeError, ...)
        raise ValueError(f"cannot convert the JSON Schema to a grammar: {type(e).__name__}: {e}") from None
    gbnf = gbnf.replace(_CHAR, _JSON_CHAR)
    if len(gbnf) > MAX_GRAMMAR:
        raise ValueError(f"the JSON Schema's grammar is {len(gbnf)} characters, more than {MAX_GRAMMAR}")
    return gbnf


class Tokenizer(Protocol):
    """What tokenizes an answer: the native Vocab, or the engine (`AsyncEngine.tokenize`)."""

    def tokenize(self, text: str, *, add_special: bool = ..., parse_special: bool = ...) -> Sequence[int]: ...


def answer_choices(tokenizer: Tokenizer, answers: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """A task's known answers (its labels, each as the model writes it, leading space included) as
    SamplingOptions.choices: each tokenized as `distill train` tokenized answers after their prompt
    (no specials added, control tokens written as text read as such). Raises ValueError when there
    is no non-empty answer."""
    texts = sorted({a for a in answers if a})
    if not texts:
        raise ValueError("no answers to choose from")
    choices = tuple(tuple(int(t) for t in tokenizer.tokenize(a, add_special=False, parse_special=True)) for a in texts)
    return tuple(c for c in choices if c)

"""Cheap features of a request's text: length, task kind and language, from patterns alone."""

from __future__ import annotations

import math
import re

import msgspec
import numpy as np
import numpy.typing as npt

KINDS = ("code", "math", "multi_step", "extraction", "chit_chat", "question")

_PATTERNS: dict[str, re.Pattern[str]] = {
    "code": re.compile(
        r"```|\b(def|class|function|struct|impl|fn|lambda|async|await|SELECT|JOIN|regex|regular expression|python|"
        r"javascript|typescript|java|rust|golang|c\+\+|sql|bash|script|compile|debug|refactor|algorithm|unit tests?|"
        r"dockerfile|kubernetes|api|implement)\b",
        re.I,
    ),
    "math": re.compile(
        r"\b(prove|proof|integral|derivative|dériv\w*|equation|solve|probability|eigen\w*|matrix|theorem|"
        r"calculate|compute|derive|formula|induction|converge\w*)\b|\d\s*[-+*/^=]\s*\d|\bx\^",
        re.I,
    ),
    "multi_step": re.compile(
        r"\b(step by step|paso a paso|schritt für schritt|plan|compare|analy[sz]e|design|trade-?offs?|evaluate|"
        r"explain (why|how)|walk me through|reason|justify|recommend|pros and cons|strategy|strategies|"
        r"root cause|assumptions)\b",
        re.I,
    ),
    "extraction": re.compile(r"\b(extract|list (all|every)|summari[sz]e|as json|from the following|from this)\b", re.I),
    "chit_chat": re.compile(r"^\s*(hi|hello|hey|thanks|thank you|good (morning|evening|night)|bye)\b", re.I),
}
_ENGLISH = frozenset(
    "the a an is are was be to of and in on for with how what why can do does i my you it this that".split()
)
_WORD = re.compile(r"[^\W\d_]+", re.U)


class Features(msgspec.Struct, frozen=True):
    kinds: tuple[str, ...]  # every kind whose pattern matched (empty: "question")
    words: int
    chars: int
    language: str  # "en" or "other"

    @property
    def kind(self) -> str:
        """The dominant kind: the first that matched, in KINDS order."""
        return self.kinds[0] if self.kinds else "question"


def language(words: list[str]) -> str:
    if not words:
        return "en"
    english = sum(w.lower() in _ENGLISH for w in words) / len(words)
    non_ascii = sum(not w.isascii() for w in words) / len(words)
    return "en" if english >= 0.12 and non_ascii < 0.2 else "other"


def extract(text: str) -> Features:
    words = _WORD.findall(text)
    kinds = tuple(k for k in KINDS if k in _PATTERNS and _PATTERNS[k].search(text))
    return Features(kinds=kinds, words=len(words), chars=len(text), language=language(words))


N_FEATURES = len(KINDS) + 3


def vector(f: Features) -> npt.NDArray[np.float32]:
    """Numbers for the classifier: one flag per kind, log length, long-text flag, non-English flag."""
    v = np.zeros(N_FEATURES, dtype=np.float32)
    for k in f.kinds or ("question",):
        v[KINDS.index(k)] = 1.0
    v[len(KINDS)] = math.log1p(f.words) / 5.0
    v[len(KINDS) + 1] = 1.0 if f.words > 40 else 0.0
    v[len(KINDS) + 2] = 1.0 if f.language != "en" else 0.0
    return v

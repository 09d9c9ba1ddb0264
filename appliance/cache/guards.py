"""Guards against the known false hits of embedding similarity.

Two queries can embed close together yet ask for opposite or different things: "enable 2FA" /
"disable 2FA" (cosine 0.89 with MiniLM), "transfer 50 EUR" / "transfer 500 EUR", "card for
Spain" / "card for France", "I can" / "I can't". :func:`conflict` compares the two texts'
:class:`Signature` and names the first difference found, or returns None when none of these apply:

- negation: one text negates and the other does not;
- opposite actions: one uses a word of an antonym pair (enable/disable, lock/unlock, add/remove,
  ...) that the other lacks while the other uses its opposite; also a word against its
  un-/dis-/de-/non- prefixed form;
- numbers and amounts: the sets of numbers (digits or number words, with currency marks) differ;
- dates and times: month, weekday and relative-day words (today, tomorrow, ...) differ;
- named entities: a capitalised word, acronym or code ("Spain", "USD", "2FA") in one text that the
  other does not contain.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9'’&.-]*[A-Za-z0-9]|[A-Za-z0-9]")
_NUMBER = re.compile(r"(?<![A-Za-z])[$€£¥]?\s?\d[\d,]*(?:\.\d+)?(?:\s?(?:k|m|bn|%))?(?![A-Za-z])", re.IGNORECASE)

NEGATIONS = frozenset(
    "not no never none nobody nothing nowhere neither nor without cannot cant can't won't wont don't dont "
    "doesn't doesnt didn't didnt isn't isnt aren't arent wasn't wasnt weren't werent haven't havent hasn't "
    "hasnt hadn't hadnt shouldn't shouldnt wouldn't wouldnt couldn't couldnt mustn't unable".split()
)

_ANTONYM_PAIRS = (
    ("enable", "disable"),
    ("enabled", "disabled"),
    ("activate", "deactivate"),
    ("activated", "deactivated"),
    ("on", "off"),
    ("lock", "unlock"),
    ("locked", "unlocked"),
    ("freeze", "unfreeze"),
    ("frozen", "unfrozen"),
    ("block", "unblock"),
    ("blocked", "unblocked"),
    ("add", "remove"),
    ("add", "delete"),
    ("create", "delete"),
    ("increase", "decrease"),
    ("raise", "lower"),
    ("higher", "lower"),
    ("more", "less"),
    ("more", "fewer"),
    ("maximum", "minimum"),
    ("max", "min"),
    ("open", "close"),
    ("opened", "closed"),
    ("start", "stop"),
    ("allow", "deny"),
    ("allow", "block"),
    ("accept", "reject"),
    ("accept", "decline"),
    ("approve", "reject"),
    ("approved", "declined"),
    ("approved", "rejected"),
    ("buy", "sell"),
    ("deposit", "withdraw"),
    ("deposit", "withdrawal"),
    ("send", "receive"),
    ("sent", "received"),
    ("incoming", "outgoing"),
    ("import", "export"),
    ("upload", "download"),
    ("login", "logout"),
    ("subscribe", "unsubscribe"),
    ("install", "uninstall"),
    ("connect", "disconnect"),
    ("show", "hide"),
    ("encrypt", "decrypt"),
    ("include", "exclude"),
    ("before", "after"),
    ("above", "below"),
    ("over", "under"),
    ("true", "false"),
    ("yes", "no"),
    ("win", "lose"),
    ("same", "different"),
    ("push", "pull"),
    ("upgrade", "downgrade"),
    ("success", "failure"),
    ("successful", "failed"),
    ("first", "last"),
    ("earliest", "latest"),
    ("credit", "debit"),
    ("in", "out"),
    ("up", "down"),
    ("join", "leave"),
    ("link", "unlink"),
    ("pause", "resume"),
    ("hire", "fire"),
    ("encode", "decode"),
    ("mount", "unmount"),
    ("attach", "detach"),
    ("ascending", "descending"),
    ("inbound", "outbound"),
    ("import", "export"),
    ("grant", "revoke"),
)
_PREFIXES = ("un", "dis", "de", "non", "in", "im", "ir", "il")

_MONTHS = (
    "january february march april may june july august september october november december "
    "jan feb mar apr jun jul aug sep sept oct nov dec"
).split()
_DAYS = "monday tuesday wednesday thursday friday saturday sunday mon tue tues wed thu thur thurs fri sat sun".split()
DATE_WORDS = frozenset(
    _MONTHS
    + _DAYS
    + "today tomorrow yesterday tonight weekend weekday morning afternoon evening night noon midnight "
    "daily weekly monthly yearly annually hourly".split()
)
_MONTH_CANON = {m[:3]: m[:3] for m in _MONTHS}
_NUMBER_WORDS: dict[str, float] = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen twenty".split()
    )
}
_NUMBER_WORDS.update({"thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90})
_NUMBER_WORDS.update({"hundred": 100, "thousand": 1000, "million": 10**6, "billion": 10**9, "half": 0.5, "twice": 2})
_ORDINALS = {
    w: i + 1
    for i, w in enumerate("first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth".split())
}
_CURRENCY = {
    "$": "usd",
    "dollar": "usd",
    "dollars": "usd",
    "usd": "usd",
    "€": "eur",
    "euro": "eur",
    "euros": "eur",
    "eur": "eur",
    "£": "gbp",
    "pound": "gbp",
    "pounds": "gbp",
    "gbp": "gbp",
    "¥": "jpy",
    "yen": "jpy",
    "jpy": "jpy",
}
# Words that start a sentence or are capitalised by habit, not names.
_COMMON_CAPS = frozenset(
    "i i'm i've i'd i'll a an the what why how when where who which whom whose can could would should will shall "
    "is are am was were do does did have has had my me we our you your it its this that these those there here "
    "please hi hello hey thanks thank ok okay yes no not if and or but so also is it help why".split()
)
_SENTENCE_END = re.compile(r"[.!?]\s*$")


@dataclass(frozen=True)
class Signature:
    """The features of one text that must agree for two texts to share an answer."""

    words: frozenset[str]
    negated: bool
    numbers: frozenset[str]
    dates: frozenset[str]
    entities: frozenset[str]


def _canon_number(raw: str) -> str:
    s = raw.lower().replace(",", "").replace(" ", "")
    unit = ""
    for sym, code in (("$", "usd"), ("€", "eur"), ("£", "gbp"), ("¥", "jpy")):
        if sym in s:
            s, unit = s.replace(sym, ""), code
    mult = 1.0
    if s.endswith("%"):
        s, unit = s[:-1], unit + "%"
    elif s.endswith("bn"):
        s, mult = s[:-2], 1e9
    elif s.endswith("k"):
        s, mult = s[:-1], 1e3
    elif s.endswith("m"):
        s, mult = s[:-1], 1e6
    try:
        value = float(s) * mult
    except ValueError:
        return raw.lower()
    return f"{value:g}{unit}"


def signature(text: str) -> Signature:
    """Extract the guard features of ``text`` (already cleaned: NFC, single spaces)."""
    tokens = _WORD.findall(text.replace("’", "'"))
    lower = [t.lower().strip(".") for t in tokens]
    words = frozenset(lower)
    negated = any(w in NEGATIONS or w.endswith("n't") for w in lower)
    numbers = {_canon_number(m.group(0)) for m in _NUMBER.finditer(text)}
    numbers.update(f"{_NUMBER_WORDS[w]:g}" for w in lower if w in _NUMBER_WORDS)
    numbers.update(f"#{_ORDINALS[w]}" for w in lower if w in _ORDINALS and w not in ("first", "second"))
    dates = {(_MONTH_CANON.get(w[:3], w) if w in _MONTHS else w) for w in lower if w in DATE_WORDS}
    if "may" in dates and not any(t == "May" for t in tokens):
        dates.discard("may")  # the verb
    entities: set[str] = {_CURRENCY[w] for w in lower if w in _CURRENCY}
    entities.update(_CURRENCY[c] for c in "$€£¥" if c in text)
    prev_end = True
    for tok, low in zip(tokens, lower, strict=True):
        starts_sentence = prev_end
        prev_end = False
        if low in _COMMON_CAPS or low in DATE_WORDS or low in _NUMBER_WORDS or low in _CURRENCY:
            continue
        has_digit = any(c.isdigit() for c in tok)
        is_acronym = len(tok) >= 2 and sum(c.isupper() for c in tok) >= 2
        is_name = tok[:1].isupper() and not starts_sentence
        if (has_digit and any(c.isalpha() for c in tok)) or is_acronym or is_name:
            entities.add(low)
    # A capitalised first word of a sentence is not taken as a name (too often just capitalisation).
    return Signature(words, negated, frozenset(numbers), frozenset(dates), frozenset(entities))


def _antonym_conflict(a: frozenset[str], b: frozenset[str]) -> str | None:
    for x, y in _ANTONYM_PAIRS:
        for p, q in ((a, b), (b, a)):
            if x in p and y not in p and y in q and x not in q:
                return f"opposite actions: {x!r} vs {y!r}"
    only_a, only_b = a - b, b - a
    for p, q in ((only_a, only_b), (only_b, only_a)):
        for w in p:
            for pre in _PREFIXES:
                if len(w) > 3 and pre + w in q:
                    return f"opposite actions: {w!r} vs {pre + w!r}"
    return None


def conflict(a: Signature, b: Signature) -> str | None:
    """Why two texts must not share an answer, or None when no guard fires."""
    if a.negated != b.negated:
        return "negation differs"
    why = _antonym_conflict(a.words, b.words)
    if why:
        return why
    if a.numbers != b.numbers:
        return f"numbers differ: {sorted(a.numbers)} vs {sorted(b.numbers)}"
    if a.dates != b.dates:
        return f"dates differ: {sorted(a.dates)} vs {sorted(b.dates)}"
    # An entity of one text must occur (in any case) among the words of the other.
    missing = sorted((a.entities - b.words - b.entities) | (b.entities - a.words - a.entities))
    if missing:
        return f"named entities differ: {missing}"
    return None


def texts_conflict(a: str, b: str) -> str | None:
    return conflict(signature(a), signature(b))

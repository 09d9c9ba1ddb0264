"""Opposite-meaning pairs never hit the cache (with the shipped threshold and guards), though many of
them embed closer than true paraphrases; paraphrases that keep the meaning still hit."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.cache import CacheConfig, GgufEmbedder, SemanticCache, fingerprint
from appliance.cache.guards import texts_conflict

FP = fingerprint("m")

OPPOSITES = [
    ("How do I enable 2FA?", "How do I disable 2FA?"),
    ("enable 2FA", "disable 2FA"),
    ("Activate my card", "Deactivate my card"),
    ("How do I lock my card?", "How do I unlock my card?"),
    ("I want to freeze my account", "I want to unfreeze my account"),
    ("Turn on notifications for payments", "Turn off notifications for payments"),
    ("How can I add a beneficiary?", "How can I remove a beneficiary?"),
    ("Increase my credit limit", "Decrease my credit limit"),
    ("My payment was approved", "My payment was declined"),
    ("I can log in to the app", "I can't log in to the app"),
    ("The transfer went through", "The transfer did not go through"),
    ("Is there a fee for top ups?", "Is there no fee for top ups?"),
    ("Send 50 EUR to my savings account", "Send 500 EUR to my savings account"),
    ("Transfer $20 to John", "Transfer $200 to John"),
    ("I was charged twice for one purchase", "I was charged three times for one purchase"),
    ("Can I withdraw 300 pounds a day?", "Can I withdraw 3000 pounds a day?"),
    ("Is my card arriving on Monday?", "Is my card arriving on Friday?"),
    ("What was my balance in January?", "What was my balance in March?"),
    ("Did my salary come in today?", "Did my salary come in yesterday?"),
    ("Can I use my card in Spain?", "Can I use my card in France?"),
    ("What is the exchange rate for USD?", "What is the exchange rate for GBP?"),
    ("How do I top up with Apple Pay?", "How do I top up with Google Pay?"),
    ("Can I pay with Visa?", "Can I pay with Mastercard?"),
    ("Where is the Berlin office?", "Where is the Munich office?"),
    ("How do I deposit cash?", "How do I withdraw cash?"),
    ("Show my incoming transfers", "Show my outgoing transfers"),
]

PARAPHRASES = [
    ("How do I reset my online banking password?", "how can I reset my password for online banking"),
    ("What is the exchange rate for USD?", "what's the USD exchange rate"),
    ("How do I enable 2FA?", "how can I enable 2FA"),
    ("Send 50 EUR to my savings account", "please send 50 EUR to my savings account"),
]


@pytest.fixture(scope="module")
def embedder() -> Iterator[GgufEmbedder]:
    with GgufEmbedder(n_threads=1) as emb:
        yield emb


@pytest.mark.parametrize("guards", [True, False])
def test_opposite_pairs(tmp_path: Path, embedder: GgufEmbedder, guards: bool) -> None:
    with SemanticCache.open(tmp_path, embedder, CacheConfig(guards=guards)) as cache:
        hits = []
        for i, (a, b) in enumerate(OPPOSITES):
            ns = f"t{i}"
            cache.store(ns, FP, a, a, model="m")
            if cache.lookup(ns, FP, b) is not None:
                hits.append((a, b))
            cache.store(f"u{i}", FP, b, b, model="m")
            if cache.lookup(f"u{i}", FP, a) is not None:
                hits.append((b, a))
    if guards:
        assert hits == []
    else:
        # Without the guards, similarity alone serves some of these wrong answers:
        # the guards are what stops them, not a threshold high enough to hide them.
        print(f"{len(hits)} wrong hits without guards: {hits}")
        assert len(hits) >= 3


@pytest.mark.parametrize(("a", "b"), OPPOSITES)
def test_guard_names_the_difference(a: str, b: str) -> None:
    why, back = texts_conflict(a, b), texts_conflict(b, a)
    assert why is not None and back is not None
    assert why.split(":")[0] == back.split(":")[0]  # the same guard fires both ways


@pytest.mark.parametrize(("a", "b"), PARAPHRASES)
def test_paraphrases_pass_the_guards_and_hit(tmp_path: Path, embedder: GgufEmbedder, a: str, b: str) -> None:
    assert texts_conflict(a, b) is None
    with SemanticCache.open(tmp_path, embedder, CacheConfig()) as cache:
        cache.store("acme", FP, a, "answer", model="m")
        hit = cache.lookup("acme", FP, b)
        assert hit is not None, f"{a!r} / {b!r}: cosine {float(embedder.embed(a) @ embedder.embed(b)):.3f}"

"""Semantic cache input checks: empty, huge and non-UTF-8 queries, bad keys and policies get errors
that name the problem; keys and fingerprints behave as documented."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.cache import (
    CacheConfig,
    ConfigError,
    Context,
    EmbedderError,
    GgufEmbedder,
    KeyError_,
    Policy,
    QueryError,
    SemanticCache,
    fingerprint,
)
from appliance.cache.text import clean_text

FP = fingerprint("m")


@pytest.fixture(scope="module")
def embedder() -> Iterator[GgufEmbedder]:
    with GgufEmbedder(n_threads=1) as emb:
        yield emb


@pytest.fixture
def cache(tmp_path: Path, embedder: GgufEmbedder) -> Iterator[SemanticCache]:
    with SemanticCache.open(tmp_path, embedder, CacheConfig(max_query_chars=2000)) as c:
        yield c


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("", "query is empty"),
        ("   \n\t ", "query is empty (only whitespace)"),
        (b"", "query is empty"),
        (b"caf\xe9 au lait", "query is not valid UTF-8: byte 0xe9 at offset 3"),
        (b"\xff\xfe", "query is not valid UTF-8: byte 0xff at offset 0"),
        ("half a pair \ud800 here", "query is not valid UTF-8: lone surrogate U+D800 at character 12"),
        ("nul\x00inside", "query contains a NUL character at position 3"),
        ("x" * 2001, "query has 2001 characters; the cache takes at most 2000"),
        (12345, "query must be text (str or UTF-8 bytes), not int"),
    ],
)
def test_bad_queries_are_refused_by_name(cache: SemanticCache, query: object, message: str) -> None:
    for call in (
        lambda: cache.lookup("acme", FP, query),  # type: ignore[arg-type]
        lambda: cache.store("acme", FP, query, "answer", model="m"),  # type: ignore[arg-type]
    ):
        with pytest.raises(QueryError) as err:
            call()
        assert str(err.value).startswith(message), str(err.value)
    assert cache.entries() == 0


def test_query_with_too_many_tokens_is_refused(cache: SemanticCache) -> None:
    query = " ".join(f"q{i}z" for i in range(300))  # under 2,000 characters, over 512 tokens
    assert len(query) < 2000
    with pytest.raises(QueryError, match=r"query has \d+ tokens; the embedding model takes at most 512"):
        cache.lookup("acme", FP, query)


def test_utf8_bytes_and_whitespace_variants_are_the_same_query(cache: SemanticCache) -> None:
    cache.store("acme", FP, "Où est ma carte ?".encode(), "answer", model="m")
    hit = cache.lookup("acme", FP, "  Où   est ma carte ?\n")
    assert hit is not None and hit.similarity > 0.999 and hit.matched_query == "Où est ma carte ?"


@pytest.mark.parametrize("namespace", ["", "has space", "/leading", "x" * 300, "semi;colon"])
def test_bad_namespaces(cache: SemanticCache, namespace: str) -> None:
    with pytest.raises(KeyError_, match="invalid cache namespace"):
        cache.lookup(namespace, FP, "hello")


def test_bad_fingerprint_and_policy(cache: SemanticCache) -> None:
    with pytest.raises(KeyError_, match="invalid cache fingerprint"):
        cache.lookup("acme", "not a fingerprint!", "hello")
    with pytest.raises(ConfigError, match="unknown cache policy 'sometimes'; use one of: auto, read-only, skip"):
        cache.lookup("acme", FP, "hello", policy="sometimes")


def test_bad_config_values() -> None:
    with pytest.raises(ConfigError, match="threshold must be in"):
        CacheConfig(threshold=1.5)
    with pytest.raises(ConfigError, match="ttl_s must be"):
        CacheConfig(ttl_s=-1)


def test_text_normalisation() -> None:
    assert clean_text("  a\u0301  b\n") == "á b"  # NFC and collapsed whitespace
    assert clean_text("", allow_empty=True) == ""


def test_fingerprint_covers_model_prompt_and_params() -> None:
    base = fingerprint("gemma", "You are helpful.", {"temperature": 0.0, "max_tokens": 100})
    assert base == fingerprint("gemma", "You are helpful.", {"max_tokens": 100, "temperature": 0.0})
    assert base != fingerprint("qwen", "You are helpful.", {"temperature": 0.0, "max_tokens": 100})
    assert base != fingerprint("gemma", "You are terse.", {"temperature": 0.0, "max_tokens": 100})
    assert base != fingerprint("gemma", "You are helpful.", {"temperature": 0.7, "max_tokens": 100})
    with pytest.raises(KeyError_, match="not JSON-encodable"):
        fingerprint("gemma", "", {"x": object()})


def test_context_key() -> None:
    assert Context().key() == ""
    a = Context("User asks about cards.", "Assistant: Which card, debit or credit?")
    assert a.key() == Context(" user asks about  cards.", "assistant: which card, DEBIT or credit?").key()
    assert a.key() != Context("User asks about cards.", "Assistant: Which account?").key()


def test_policy_parse() -> None:
    assert Policy.parse("READ_ONLY") is Policy.READ_ONLY
    assert (Policy.AUTO.reads, Policy.AUTO.writes) == (True, True)
    assert (Policy.READ_ONLY.reads, Policy.READ_ONLY.writes) == (True, False)
    assert (Policy.SKIP.reads, Policy.SKIP.writes) == (False, False)


def test_memo_embedder_runs_the_model_once_per_recent_text(embedder: GgufEmbedder) -> None:
    import numpy as np

    from appliance.cache.embedder import MemoEmbedder

    memo = MemoEmbedder(embedder, size=2)
    assert (memo.dim, memo.version, memo.max_tokens) == (embedder.dim, embedder.version, embedder.max_tokens)
    a = memo.embed("my card has not arrived")
    assert memo.embed("my card has not arrived") is a and (memo.requests, memo.computed) == (2, 1)
    np.testing.assert_array_equal(a, embedder.embed("my card has not arrived"))
    with pytest.raises(ValueError, match="read-only"):
        a[0] = 1.0  # shared between the stages of a request: nobody may change it
    memo.embed("b")
    memo.embed("c")  # evicts the least recently used, "my card has not arrived"
    memo.embed("my card has not arrived")
    assert (memo.requests, memo.computed) == (5, 4)
    with pytest.raises(ValueError, match="at least 1"):
        MemoEmbedder(embedder, size=0)


def test_the_cache_shares_its_embeddings(cache: SemanticCache) -> None:
    """A missed lookup and the store after it embed the query once; so does the router (it reads
    ``cache.embedder``)."""
    from appliance.cache.embedder import MemoEmbedder

    assert isinstance(cache.embedder, MemoEmbedder)
    before = cache.embedder.computed
    assert cache.lookup("t", FP, "How do I top up by bank transfer?") is None
    cache.store("t", FP, "How do I top up by bank transfer?", "like this", model="m")
    cache.embedder.embed("How do I top up by bank transfer?")
    assert cache.embedder.computed == before + 1


def test_embedder_takes_more_threads_while_the_engine_is_idle() -> None:
    import numpy as np

    busy = [False]
    with GgufEmbedder(n_threads=1, n_threads_idle=2, busy=lambda: busy[0]) as emb:
        idle_vec = emb.embed("Where is my new card?")
        assert emb.threads == 2
        busy[0] = True
        busy_vec = emb.embed("Where is my new card?")
        assert emb.threads == 1
        np.testing.assert_allclose(idle_vec, busy_vec, atol=1e-5)
    with pytest.raises(EmbedderError, match="at least 1"):
        GgufEmbedder(n_threads=0)

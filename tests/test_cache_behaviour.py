"""Semantic cache behaviour on real parts (SQLite files, the MiniLM GGUF, hnswlib indexes on disk):
tenant isolation, policies, TTL, invalidation, eviction, multi-turn keys, cost saved, and indexes
deleted or corrupted while the cache runs."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.cache import CacheConfig, Context, GgufEmbedder, SemanticCache, fingerprint

FP = fingerprint("gemma3-270m", "You are a bank assistant.", {"temperature": 0})
Q = "How do I reset my online banking password?"
PARAPHRASE = "how can I reset my password for online banking"


@pytest.fixture(scope="module")
def embedder() -> Iterator[GgufEmbedder]:
    with GgufEmbedder(n_threads=1) as emb:
        yield emb


def open_cache(path: Path, embedder: GgufEmbedder, **kw: object) -> SemanticCache:
    return SemanticCache.open(path, embedder, CacheConfig(**kw))  # type: ignore[arg-type]


def test_hit_on_paraphrase_with_cost_saved(tmp_path: Path, embedder: GgufEmbedder) -> None:
    with open_cache(tmp_path, embedder) as cache:
        assert cache.lookup("acme", FP, Q) is None
        eid = cache.store(
            "acme", FP, Q, "Use 'Forgot password' on the login page.", model="gemma", cost=0.0021, tokens=180
        )
        hit = cache.lookup("acme", FP, PARAPHRASE)
        assert hit is not None
        assert (hit.entry_id, hit.response, hit.matched_query) == (eid, "Use 'Forgot password' on the login page.", Q)
        assert (hit.cost_saved, hit.tokens_saved, hit.model, hit.hits) == (0.0021, 180, "gemma", 1)
        assert cache.threshold <= hit.similarity <= 1.0 and hit.lookup_ms > 0
        assert cache.lookup("acme", FP, PARAPHRASE).hits == 2  # type: ignore[union-attr]
        assert cache.lookup("acme", FP, "What are your branch opening hours?") is None


def test_tenants_and_fingerprints_never_share(tmp_path: Path, embedder: GgufEmbedder) -> None:
    with open_cache(tmp_path, embedder) as cache:
        cache.store("acme", FP, Q, "acme answer", model="gemma")
        cache.store("acme/alice", FP, Q, "alice answer", model="gemma")
        assert cache.lookup("acme", FP, Q).response == "acme answer"  # type: ignore[union-attr]
        assert cache.lookup("acme/alice", FP, Q).response == "alice answer"  # type: ignore[union-attr]
        for ns in ("globex", "acme/bob", "acme2", "ACME"):
            assert cache.lookup(ns, FP, Q) is None, ns
        assert cache.lookup("acme", fingerprint("gemma3-270m", "You are a pirate."), Q) is None
        assert (
            cache.lookup("acme", fingerprint("gemma3-270m", "You are a bank assistant.", {"temperature": 1}), Q) is None
        )


def test_multi_turn_lookup_covers_conversation_state(tmp_path: Path, embedder: GgufEmbedder) -> None:
    cards = Context("Customer asks about card fees.", "Assistant: Do you mean the debit card or the credit card?")
    loans = Context("Customer asks about loan rates.", "Assistant: Do you mean the car loan or the mortgage?")
    with open_cache(tmp_path, embedder) as cache:
        cache.store("acme", FP, "The second one", "Credit card fees: ...", model="gemma", context=cards)
        assert cache.lookup("acme", FP, "the second one", context=cards).response == "Credit card fees: ..."  # type: ignore[union-attr]
        assert cache.lookup("acme", FP, "The second one", context=loans) is None
        assert cache.lookup("acme", FP, "The second one") is None  # no context: a different conversation state


def test_policies(tmp_path: Path, embedder: GgufEmbedder) -> None:
    with open_cache(tmp_path, embedder) as cache:
        assert cache.store("acme", FP, Q, "a", model="gemma", policy="read-only") is None
        assert cache.store("acme", FP, Q, "a", model="gemma", policy="skip") is None
        assert cache.entries() == 0
        cache.store("acme", FP, Q, "a", model="gemma", policy="auto")
        assert cache.lookup("acme", FP, Q, policy="skip") is None
        assert cache.lookup("acme", FP, Q, policy="read-only") is not None
        assert cache.stats["lookups"] == 1  # skip does not even embed


def test_ttl(tmp_path: Path, embedder: GgufEmbedder) -> None:
    with open_cache(tmp_path, embedder, ttl_s=3600.0) as cache:
        cache.store("acme", FP, Q, "short", model="gemma", ttl_s=0.3)
        cache.store("acme", FP, "What is the daily ATM withdrawal limit?", "long", model="gemma")
        assert cache.lookup("acme", FP, Q) is not None
        time.sleep(0.4)
        assert cache.lookup("acme", FP, Q) is None
        assert cache.stats["expired"] >= 1
        assert cache.purge_expired() == 1 and cache.entries() == 1
        assert cache.lookup("acme", FP, "What is the daily ATM withdrawal limit?") is not None


def test_invalidation(tmp_path: Path, embedder: GgufEmbedder) -> None:
    other_fp = fingerprint("qwen")
    with open_cache(tmp_path, embedder) as cache:
        a = cache.store("acme", FP, Q, "a", model="gemma")
        cache.store("acme/alice", FP, Q, "alice", model="gemma")
        cache.store("acme", other_fp, Q, "qwen", model="qwen")
        cache.store("acmecorp", FP, Q, "other tenant", model="gemma")
        assert a is not None
        assert cache.invalidate(entry_id=a) == 1
        assert cache.lookup("acme", FP, Q) is None
        assert cache.invalidate("acme", fingerprint=other_fp) == 1
        assert cache.lookup("acme", other_fp, Q) is None
        assert cache.lookup("acme/alice", FP, Q) is not None
        assert cache.invalidate("acme") == 1  # covers acme/alice, not acmecorp
        assert cache.lookup("acme/alice", FP, Q) is None
        assert cache.lookup("acmecorp", FP, Q).response == "other tenant"  # type: ignore[union-attr]
        time.sleep(0.05)
        cache.store("acme", FP, Q, "fresh", model="gemma")
        assert cache.invalidate(older_than_s=0.04) == 1  # only the acmecorp entry is that old
        assert cache.lookup("acme", FP, Q).response == "fresh"  # type: ignore[union-attr]
        with pytest.raises(ValueError, match="invalidate needs"):
            cache.invalidate()


def test_size_budget_evicts_least_recently_used(tmp_path: Path, embedder: GgufEmbedder) -> None:
    questions = [f"What is the fee for a transfer to account number {n}?" for n in range(100, 106)]
    with open_cache(tmp_path, embedder, max_entries=4) as cache:
        for q in questions[:4]:
            cache.store("acme", FP, q, q.upper(), model="gemma")
        assert cache.lookup("acme", FP, questions[0]) is not None  # entry 0 is now recently used
        cache.store("acme", FP, questions[4], "4", model="gemma")
        cache.store("acme", FP, questions[5], "5", model="gemma")
        assert cache.entries() == 4 and cache.stats["evicted"] == 2
        assert cache.lookup("acme", FP, questions[0]) is not None
        assert cache.lookup("acme", FP, questions[1]) is None
        assert cache.lookup("acme", FP, questions[2]) is None
    small = 3 * (384 * 4 + 400)
    with open_cache(tmp_path / "bytes", embedder, max_bytes=small) as cache:
        for q in questions:
            cache.store("acme", FP, q, "x" * 100, model="gemma")
        n, size = cache.store_db.totals()
        assert size <= small and 1 <= n < len(questions)


TOPICS = [
    ("How do I reset my online banking password?", "reset"),
    ("My card has not arrived yet, what should I do?", "card-arrival"),
    ("Why was I charged a fee for a transfer?", "transfer-fee"),
    ("Can I get a refund for a duplicate payment?", "refund"),
    ("How long does a bank transfer take to arrive?", "transfer-time"),
    ("What is the exchange rate for paying abroad with my card?", "fx"),
]


def fill(cache: SemanticCache) -> None:
    for q, a in TOPICS:
        cache.store("acme", FP, q, a, model="gemma")
    cache.flush()


def check_answers(cache: SemanticCache) -> None:
    for q, a in TOPICS:
        hit = cache.lookup("acme", FP, q)
        assert hit is not None and hit.response == a, (q, hit)


def index_files(root: Path) -> list[Path]:
    return sorted((root / "index").glob("*/*.hnsw"))


@pytest.mark.parametrize("damage", ["delete", "truncate", "garbage", "swap"])
def test_damaged_index_at_open_is_rebuilt(tmp_path: Path, embedder: GgufEmbedder, damage: str) -> None:
    with open_cache(tmp_path, embedder, persist_min_entries=1) as cache:
        fill(cache)
        cache.store("globex", FP, "Totally different tenant question about mortgages", "g", model="gemma")
    files = index_files(tmp_path)
    assert len(files) == 2
    target = next(f for f in files if f.stat().st_size > 0)
    ours = [f for f in files]
    if damage == "delete":
        for f in ours:
            f.unlink()
    elif damage == "truncate":
        for f in ours:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "garbage":
        for f in ours:
            data = bytearray(f.read_bytes())
            data[100:400] = b"\xff" * 300
            f.write_bytes(bytes(data))
    else:  # the other tenant's index file in place of ours (a valid hnswlib file, wrong content)
        ours[0].write_bytes(ours[1].read_bytes())
        target = ours[0]
    assert target.exists() or damage == "delete"
    with open_cache(tmp_path, embedder, persist_min_entries=1) as cache:
        check_answers(cache)
        assert cache.lookup("acme", FP, "Totally different tenant question about mortgages") is None
        assert sum(cache.indexes.rebuilds.values()) >= 1, cache.indexes.rebuilds
    # the rebuilt index was written back intact: a third open loads it without rebuilding
    with open_cache(tmp_path, embedder, persist_min_entries=1) as cache:
        check_answers(cache)
        assert sum(cache.indexes.rebuilds.values()) == 0, cache.indexes.rebuilds


def test_index_deleted_or_corrupted_while_running(tmp_path: Path, embedder: GgufEmbedder) -> None:
    with open_cache(tmp_path, embedder, persist_min_entries=1) as cache:
        fill(cache)
        check_answers(cache)
        (f,) = index_files(tmp_path)
        f.write_bytes(b"\x00" * 64)
        time.sleep(1.05)  # the file is checked at most once a second per partition
        check_answers(cache)  # served from the in-memory index, verified against SQLite
        assert cache.indexes.rebuilds["index file changed under a running cache"] == 1
        cache.flush()  # the damaged file is replaced from memory
        f.unlink()
        time.sleep(1.05)
        check_answers(cache)
    with open_cache(tmp_path, embedder, persist_min_entries=1) as cache:
        check_answers(cache)
        assert sum(cache.indexes.rebuilds.values()) == 0


def test_two_caches_on_one_directory_stay_consistent(tmp_path: Path, embedder: GgufEmbedder) -> None:
    """Two workers (two open caches) share the directory: each sees the other's stores and
    deletions through SQLite, never an entry the other deleted."""
    with open_cache(tmp_path, embedder) as a, open_cache(tmp_path, embedder) as b:
        assert b.lookup("acme", FP, Q) is None  # b loads the (empty) partition first
        eid = a.store("acme", FP, Q, "from a", model="gemma")
        hit = b.lookup("acme", FP, PARAPHRASE)
        assert hit is not None and hit.response == "from a"
        assert a.invalidate(entry_id=eid) == 1
        assert b.lookup("acme", FP, PARAPHRASE) is None
        b.store("acme", FP, Q, "from b", model="gemma")
        assert a.lookup("acme", FP, Q).response == "from b"  # type: ignore[union-attr]


def test_a_wrong_label_in_an_index_is_never_served(tmp_path: Path, embedder: GgufEmbedder) -> None:
    """Damage the in-memory index itself: plant another tenant's entry id in acme's index. The row
    is checked against SQLite (partition, namespace, fingerprint, similarity), so it is not served."""
    with open_cache(tmp_path, embedder) as cache:
        cache.store("acme", FP, "What are your opening hours?", "acme hours", model="gemma")
        foreign = cache.store("globex", FP, Q, "globex secret", model="gemma")
        assert foreign is not None
        acme_partition = cache._key("acme", FP, None).partition
        cache.indexes.get(acme_partition).add([foreign], [embedder.embed(Q)])
        assert cache.lookup("acme", FP, Q) is None
        assert cache.stats["index_mismatch"] == 1
        assert cache.lookup("globex", FP, Q).response == "globex secret"  # type: ignore[union-attr]

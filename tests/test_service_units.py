"""In-process tests of the service's small stages: config, auth, admission, context budget, ledger."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest

from appliance.common.config import Config, ConfigError, TenantConfig, load_config, parse_config
from appliance.common.errors import InvalidArgument, Overloaded, PermissionDenied, Unauthenticated, Unavailable
from appliance.common.history import HistoryStore, Session, StoredMessage
from appliance.common.ledger import Ledger, sum_totals
from appliance.common.types import ChatMessage, Passage, Result, RouteTaken, Usage
from appliance.service.admission import Admission, Lane
from appliance.service.auth import Authenticator, hash_token
from appliance.service.context import ContextBuilder, select_passages
from appliance.service.prefixes import Hot, HotPrefixes, load_hot, save_hot


def test_defaults_serve_air_gapped() -> None:
    cfg = load_config(None)
    assert cfg == parse_config("")
    assert cfg.server.tcp == "" and cfg.tenants == [] and cfg.model.path == ""
    assert cfg.server.socket_path().name == "appliance.sock"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[server]\nmax_queue = -1", "$.server.max_queue: must be >= 0"),
        ('[server]\ntcp = "nope"', "$.server.tcp: 'nope' is not host:port"),
        ('[model]\nn_ctx = "big"', "$.model.n_ctx: Expected `int`, got `str`"),
        ("[model]\nn_ctx = 512\ncontext_budget = 1024", "$.model.context_budget: must be in [64, n_ctx]"),
        ('[[tenants]]\nname = "a b"\ntoken_sha256 = "00"', "$.tenants[0].name: must be 1-64"),
        ("[pricing]\ninput_per_mtok = -1.0", "$.pricing.input_per_mtok: must be >= 0"),
        ("[pricing]\ncolour = 1", "$.pricing: Object contains unknown field `colour`"),
        ("[cache]\nthreshold = 1.5", "$.cache.threshold: must be in [0, 1] (0: the calibrated one)"),
        ("[cache]\nembed_threads = -2", "$.cache.embed_threads: must be >= 0"),
        ("[server\n", "not valid TOML"),
    ],
)
def test_config_errors_name_the_field_path(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(text)
    assert message in str(e.value)


def test_duplicate_tenants_and_missing_file(tmp_path: Path) -> None:
    t = f'[[tenants]]\nname = "a"\ntoken_sha256 = "{"0" * 64}"\n'
    with pytest.raises(ConfigError, match=r"\$\.tenants: duplicate"):
        parse_config(t + t)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.toml")


def test_auth_by_transport() -> None:
    auth = Authenticator([TenantConfig(name="acme", token_sha256=hash_token("s3cret"))], "local")
    assert auth.tenant_for("unix:/x.sock", [], "") == "local"
    assert auth.tenant_for("unix:", [], "team") == "team"
    assert auth.tenant_for("ipv4:127.0.0.1:5", [("authorization", "Bearer s3cret")], "") == "acme"
    with pytest.raises(Unauthenticated):
        auth.tenant_for("ipv4:127.0.0.1:5", [], "")
    with pytest.raises(Unauthenticated):
        auth.tenant_for("ipv6:[::1]:5", [("authorization", "Bearer s3cret2")], "")
    with pytest.raises(PermissionDenied):
        auth.tenant_for("ipv4:127.0.0.1:5", [("authorization", "Bearer s3cret")], "other")


def test_cloud_requests_do_not_take_local_slots() -> None:
    """The local lane full (and the queue too) still admits a cloud request at once, and the other way."""

    async def scenario() -> None:
        adm = Admission(max_concurrent=1, max_queue=0, retry_after_ms=10, max_cloud=1)
        gate = asyncio.Event()

        async def hold(lane: Lane) -> None:
            async with adm.slot(lane):
                await gate.wait()

        local = asyncio.create_task(hold("local"))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="local"):
            async with adm.slot("local"):
                pass
        cloud = asyncio.create_task(hold("cloud"))
        await asyncio.sleep(0)
        assert adm.lane_running == {"local": 1, "cloud": 1} and adm.running == 2
        with pytest.raises(Overloaded, match="cloud"):
            async with adm.slot("cloud"):
                pass
        gate.set()
        await asyncio.gather(local, cloud)
        await asyncio.wait_for(adm.wait_idle(), 1)

    asyncio.run(scenario())


def test_a_request_moves_lanes_when_its_route_changes() -> None:
    """An escalation frees its local slot for the next local request while it waits on the cloud; a move
    into a full lane waits (holding nothing) instead of being refused, and a cancelled move leaks nothing."""

    async def scenario() -> None:
        adm = Admission(max_concurrent=1, max_queue=4, retry_after_ms=10, max_cloud=1)
        escalated, cloud_gate, next_gate = asyncio.Event(), asyncio.Event(), asyncio.Event()

        async def escalating() -> None:
            async with adm.slot("local") as held:
                await held.move("cloud")  # the cascade cut the local answer
                assert held.lane == "cloud"
                escalated.set()
                await cloud_gate.wait()

        async def local_next() -> None:
            async with adm.slot("local") as held:
                assert held.lane == "local"
                await next_gate.wait()

        first = asyncio.create_task(escalating())
        await asyncio.wait_for(escalated.wait(), 1)
        assert adm.lane_running == {"local": 0, "cloud": 1}
        second = asyncio.create_task(local_next())  # gets the slot the escalation gave back
        await asyncio.sleep(0)
        assert adm.lane_running == {"local": 1, "cloud": 1}

        async def blocked_move() -> None:
            async with adm.slot("cloud") as held:  # queued: the cloud lane is full
                await held.move("local")

        third = asyncio.create_task(blocked_move())
        await asyncio.sleep(0)
        assert adm.waiting == 1
        cloud_gate.set()
        await first  # its cloud slot goes to the third, which then waits for the local lane
        for _ in range(10):
            await asyncio.sleep(0)
        assert adm.lane_running == {"local": 1, "cloud": 0} and adm.waiting == 1
        third.cancel()
        with pytest.raises(asyncio.CancelledError):
            await third
        assert adm.lane_running == {"local": 1, "cloud": 0} and adm.waiting == 0
        next_gate.set()
        await second
        await asyncio.wait_for(adm.wait_idle(), 1)
        assert adm.lane_running == {"local": 0, "cloud": 0}

    asyncio.run(scenario())


def test_admission_bounds_the_queue_and_drains() -> None:
    async def scenario() -> None:
        adm = Admission(max_concurrent=1, max_queue=1, retry_after_ms=250)
        gate = asyncio.Event()

        async def hold() -> None:
            async with adm.slot():
                await gate.wait()

        first = asyncio.create_task(hold())
        await asyncio.sleep(0)
        second = asyncio.create_task(hold())  # queued
        await asyncio.sleep(0)
        assert (adm.running, adm.waiting) == (1, 1)
        with pytest.raises(Overloaded) as e:
            async with adm.slot():
                pass
        assert e.value.retry_after_ms == 250
        second.cancel()  # a cancelled waiter leaves the queue
        await asyncio.sleep(0)
        assert adm.waiting == 0
        adm.close()
        with pytest.raises(Unavailable):
            async with adm.slot():
                pass
        gate.set()
        await asyncio.wait_for(adm.wait_idle(), 1)
        await first

    asyncio.run(scenario())


def _count(text: str) -> int:
    return len(text.split())


def test_passages_kept_by_relevance_within_budget() -> None:
    ps = [Passage("a " * 10, 0.1), Passage("b " * 10, 0.9), Passage("c " * 30, 0.8), Passage("d " * 5, 0.5)]
    kept = select_passages(ps, 30, _count)
    assert [p.text[0] for p in kept] == ["b", "d"]  # c is relevant but too long; a is least relevant


def test_context_folds_older_turns_in_batches_keeping_a_stable_prefix() -> None:
    folds: list[tuple[str, int]] = []

    async def fold(summary: str, msgs: Sequence[StoredMessage]) -> str:
        folds.append((summary, len(msgs)))
        return f"summary #{len(folds)}"

    builder = ContextBuilder(_count, fold, budget=100, keep_turns=2)
    session = Session(tenant="t", session_id="s", system="be brief")
    prefixes = []

    async def turns() -> None:
        for _ in range(12):
            new = [ChatMessage("user", "word " * 8)]
            built = await builder.chat(session, new, [])
            assert built.budget_tokens <= 100
            prefixes.append(built.messages[0]["content"])
            session.messages += [StoredMessage("user", "word " * 8, 8), StoredMessage("assistant", "ok " * 8, 8)]

    asyncio.run(turns())
    assert folds and folds[0][0] == ""  # the first fold starts from no summary
    assert all(prev for prev, _ in folds[1:])  # later folds are incremental: previous summary + new turns only
    assert session.folded == sum(n for _, n in folds)
    assert len(folds) < 6  # folded in batches, not every turn
    assert len(set(prefixes)) == len(folds) + 1  # the prefix changes only when a fold happens
    assert prefixes[-1].startswith("be brief\n\nSummary of the earlier conversation:")


def test_folds_take_whole_exchanges_so_kept_history_starts_with_a_user_turn() -> None:
    async def fold(summary: str, msgs: Sequence[StoredMessage]) -> str:
        return "summary"

    builder = ContextBuilder(_count, fold, budget=100, keep_turns=3)  # an odd number kept
    session = Session(tenant="t", session_id="s", system="be brief")

    async def turns() -> None:
        for _ in range(12):
            built = await builder.chat(session, [ChatMessage("user", "word " * 8)], [])
            kept = session.messages[session.folded :]
            assert not kept or kept[0].role == "user", "a fold must not split an exchange"
            assert built.messages[0]["role"] == "system"
            session.messages += [StoredMessage("user", "word " * 8, 8), StoredMessage("assistant", "ok " * 7, 7)]

    asyncio.run(turns())
    assert session.folded > 0


def test_context_refuses_a_turn_larger_than_the_budget() -> None:
    async def fold(summary: str, msgs: Sequence[StoredMessage]) -> str:
        return summary

    builder = ContextBuilder(_count, fold, budget=64, keep_turns=2)
    with pytest.raises(InvalidArgument, match=r"^messages:"):
        asyncio.run(builder.chat(Session(tenant="t", session_id="s"), [ChatMessage("user", "w " * 100)], []))


def test_ledger_and_history_roundtrip(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite", "cloud-x")
    cfg = Config()
    routes: list[RouteTaken] = ["local", "local", "cache"]
    for i, route in enumerate(routes):
        u = Usage(prompt_tokens=10, completion_tokens=5, counterfactual_cost=cfg.pricing.cloud_cost(10, 0, 5))
        res = Result(request_id=f"r{i}", text="x", route=route, model="m", finish_reason="stop", usage=u)
        asyncio.run(ledger.record("acme" if i < 2 else "globex", res))
    assert "r0" in [r["request_id"] for r in ledger.rows("acme")]
    assert "r0" not in [r["request_id"] for r in ledger.rows("globex")]
    acme = ledger.totals("acme")
    assert [(t.route, t.requests) for t in acme] == [("local", 2)]
    total = sum_totals(ledger.totals(None))
    assert total.requests == 3 and total.counterfactual_cost == pytest.approx(3 * (10 * 0.5 + 5 * 1.5) / 1e6)
    ledger.close()

    store = HistoryStore(tmp_path / "history.sqlite")
    s = store.load("acme", "s1")
    s.system, s.summary, s.folded = "sys", "sum", 0
    store.commit_turn(s, [StoredMessage("user", "hi", 1), StoredMessage("assistant", "yo", 1)])
    store.close()
    again = HistoryStore(tmp_path / "history.sqlite").load("acme", "s1")
    assert (again.system, again.summary, [m.content for m in again.messages]) == ("sys", "sum", ["hi", "yo"])
    assert HistoryStore(tmp_path / "history.sqlite").load("globex", "s1").messages == []


def test_hot_prefixes_pick_the_longest_shared_block_runs() -> None:
    hot = HotPrefixes(block_size=4, max_tokens=16, max_nodes=100)
    system = list(range(100, 110))  # 10 tokens: 2 whole blocks
    for q in ([1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12], [13, 14]):
        hot.note("acme", system + q)
    hot.note("globex", [*system, 1, 2, 3, 4, 5, 6])
    hot.note("acme", [9] * 40)  # deeper than max_tokens: only 4 blocks counted
    got = hot.hottest(4)
    assert got[0].tenant == "acme" and got[0].count == 3 and list(got[0].tokens) == system[:8]
    assert all(h.tenant == "acme" for h in got)  # globex's prompt was seen once: not hot
    assert [h.count for h in hot.hottest(10, min_count=1) if h.tenant == "globex"] == [1]
    full = HotPrefixes(block_size=4, max_nodes=2)
    full.note("acme", list(range(40)))
    full.note("acme", list(range(40)))
    assert [len(h.tokens) for h in full.hottest(2)] == [8]  # the memory bound stops new nodes


class _Killed(BaseException):
    """Stands for kill -9 in the middle of a save: nothing after it runs."""


class _PrefixEngine:
    """save_prefix / load_prefix as AsyncEngine's: the file holds the tokens; `die_at` kills the save."""

    def __init__(self, die_at: int = -1) -> None:
        self.saves = 0
        self.die_at = die_at
        self.loaded: list[str] = []

    def save_prefix(self, tokens: Sequence[int], path: Path, *, tenant: str = "") -> int:
        if self.saves == self.die_at:
            Path(str(path) + ".tmp").write_text("half")  # the native writer's own temporary
            raise _Killed
        self.saves += 1
        Path(path).write_text(f"{tenant}:{list(tokens)}")
        return len(tokens)

    def load_prefix(self, path: Path) -> int:
        self.loaded.append(Path(path).read_text())
        return 1


def test_hot_prefix_saves_replace_the_old_set_only_once_the_new_one_is_written(tmp_path: Path) -> None:
    first = [Hot("acme", (1, 2, 3, 4), 3), Hot("acme", (5, 6, 7, 8), 2)]
    second = [Hot("acme", (9, 9, 9, 9), 5), Hot("globex", (1, 2, 3, 4), 4)]
    assert save_hot(_PrefixEngine(), first, tmp_path) == 8  # type: ignore[arg-type]
    with pytest.raises(_Killed):  # killed after the first new prefix: the old ones are all still there
        save_hot(_PrefixEngine(die_at=1), second, tmp_path)  # type: ignore[arg-type]
    engine = _PrefixEngine()
    load_hot(engine, tmp_path)  # type: ignore[arg-type]
    assert sorted(engine.loaded) == sorted(["acme:[1, 2, 3, 4]", "acme:[5, 6, 7, 8]", "acme:[9, 9, 9, 9]"])
    assert not list(tmp_path.glob("*.tmp*"))  # the cut save's leftovers are gone
    assert save_hot(_PrefixEngine(), second, tmp_path) == 8  # type: ignore[arg-type]
    engine = _PrefixEngine()
    load_hot(engine, tmp_path)  # type: ignore[arg-type]
    assert sorted(engine.loaded) == ["acme:[9, 9, 9, 9]", "globex:[1, 2, 3, 4]"]  # a whole save replaces the set


def test_the_packaged_config_parses_and_keeps_the_defaults() -> None:
    """packaging/appliance.toml (what the installer puts in /etc) is a valid config, and its cache and
    model settings are the embedded defaults spelled out."""
    path = Path(__file__).resolve().parents[1] / "packaging" / "appliance.toml"
    cfg = parse_config(path.read_bytes(), str(path))
    default = parse_config("")
    assert cfg.model.kv_cache_mb == default.model.kv_cache_mb and cfg.model.threads == default.model.threads
    assert (cfg.cache.embed_threads, cfg.cache.embedding_model, cfg.cache.threshold) == (0, "", 0.0)
    assert cfg.cache.enabled and cfg.cache.ttl_s == default.cache.ttl_s


def test_a_tenant_names_the_model_its_requests_get_by_default() -> None:
    token = "0" * 64
    cfg = parse_config(
        f'[[tenants]]\nname = "acme"\ntoken_sha256 = "{token}"\nmodel = "triage"\n'
        f'[[tenants]]\nname = "globex"\ntoken_sha256 = "{"1" * 64}"\n'
    )
    assert cfg.model_for("acme") == "triage" and cfg.model_for("globex") == "" and cfg.model_for("nobody") == ""

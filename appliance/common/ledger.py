"""The usage ledger: one row per request (tenant, route, model, tokens, latency, cost, and the cost the
configured cloud model would have charged). A response is acknowledged only after its row commits.

The row is also the request_id's idempotency record: it holds a hash of the normalized request and,
for an answer that ended normally ("stop" or "length"), the whole response (`replay`, JSON) in the
same insert. A retry with the same (tenant, request_id) and the same request gets that response back
(`Ledger.replay`) instead of a second generation, charge or row. Response texts older than the replay
window are purged (on open and then at most every few minutes); the accounting columns stay.

`task` is the task a request named ("" when none). `confident` applies to a task model's local answer:
1 if it passed the model's confidence rule, 0 if it was sent without passing (no cloud could take it),
NULL when no rule was applied. `appliance report` counts a local answer as a saving only when it is
not 0."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import msgspec

from appliance.common.errors import AlreadyExists, InvalidArgument
from appliance.common.sqlite import open_db
from appliance.common.types import Result

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    tenant TEXT NOT NULL,
    request_id TEXT NOT NULL,
    ts REAL NOT NULL,
    session_id TEXT NOT NULL,
    route TEXT NOT NULL,
    model TEXT NOT NULL,
    cloud_model TEXT NOT NULL,
    finish_reason TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    summary_saved_tokens INTEGER NOT NULL,
    early_exit_tokens INTEGER NOT NULL,
    latency_ms REAL NOT NULL,
    cost REAL NOT NULL,
    counterfactual_cost REAL NOT NULL,
    cache_write_tokens INTEGER NOT NULL DEFAULT 0,
    degraded INTEGER NOT NULL DEFAULT 0,
    route_reason TEXT NOT NULL DEFAULT '',
    request_hash TEXT NOT NULL DEFAULT '',
    replay TEXT,
    attempts INTEGER NOT NULL DEFAULT 1,
    user TEXT NOT NULL DEFAULT '',
    task TEXT NOT NULL DEFAULT '',
    confident INTEGER,
    PRIMARY KEY (tenant, request_id)
);
CREATE INDEX IF NOT EXISTS requests_by_time ON requests (tenant, ts);
"""
# columns added after the first release: a ledger written by an older version gains them on open
ADDED_COLUMNS = {
    "cache_write_tokens": "INTEGER NOT NULL DEFAULT 0",
    "degraded": "INTEGER NOT NULL DEFAULT 0",
    "route_reason": "TEXT NOT NULL DEFAULT ''",
    "request_hash": "TEXT NOT NULL DEFAULT ''",
    "replay": "TEXT",
    "attempts": "INTEGER NOT NULL DEFAULT 1",
    "user": "TEXT NOT NULL DEFAULT ''",
    "task": "TEXT NOT NULL DEFAULT ''",
    "confident": "INTEGER",
}
COLUMNS = (
    "tenant request_id ts session_id route model cloud_model finish_reason prompt_tokens cached_tokens"
    " completion_tokens summary_saved_tokens early_exit_tokens latency_ms cost counterfactual_cost"
    " cache_write_tokens degraded route_reason request_hash replay user task confident"
).split()
# a retry after an attempt that ended cancelled or failed runs again, into the same row: the work of
# every attempt is summed (it was all spent), the rest describes the last attempt
SUMMED = (
    "prompt_tokens cached_tokens completion_tokens summary_saved_tokens early_exit_tokens cost cache_write_tokens"
).split()
_UPSERT = (
    f"INSERT INTO requests ({','.join(COLUMNS)}) VALUES ({','.join('?' * len(COLUMNS))})"
    " ON CONFLICT(tenant, request_id) DO UPDATE SET attempts = attempts + 1, "
    + ", ".join(
        f"{c} = {c} + excluded.{c}" if c in SUMMED else f"{c} = excluded.{c}"
        for c in COLUMNS
        if c not in ("tenant", "request_id")
    )
    + " WHERE requests.finish_reason NOT IN ('stop', 'length')"
)
REPLAYABLE = ("stop", "length")  # a cancelled or failed request's partial answer is not kept for retries
_PURGE_EVERY_S = 300.0


class Totals(msgspec.Struct, kw_only=True):
    route: str = ""
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    summary_saved_tokens: int = 0
    early_exit_tokens: int = 0
    cost: float = 0.0
    counterfactual_cost: float = 0.0


class Ledger:
    def __init__(
        self, path: Path, cloud_model: str, replay_window_s: float = 86400.0, purge_every_s: float = _PURGE_EVERY_S
    ) -> None:
        self.path = path
        self.cloud_model = cloud_model
        self.replay_window_s = replay_window_s
        self.purge_every_s = purge_every_s  # an insert purges expired texts when this long has passed
        self._conn = open_db(path, SCHEMA)
        self._lock = threading.Lock()
        have = {r[1] for r in self._conn.execute("PRAGMA table_info(requests)")}
        for name, decl in ADDED_COLUMNS.items():
            if name not in have:
                self._conn.execute(f"ALTER TABLE requests ADD COLUMN {name} {decl}")
        # after the migration (an older ledger has no replay column): the purge's index
        self._conn.execute("CREATE INDEX IF NOT EXISTS requests_replay ON requests (ts) WHERE replay IS NOT NULL")
        self._last_purge = 0.0
        self.purge_replays()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _insert(self, tenant: str, result: Result, ts: float, request_hash: str, user: str = "") -> None:
        u = result.usage
        keep = self.replay_window_s > 0 and result.finish_reason in REPLAYABLE
        replay = msgspec.json.encode(result).decode() if keep else None
        if time.monotonic() - self._last_purge >= self.purge_every_s:
            self.purge_replays()
        with self._lock:
            cur = self._conn.execute(
                _UPSERT,
                (
                    tenant,
                    result.request_id,
                    ts,
                    result.session_id,
                    result.route,
                    result.model,
                    self.cloud_model,
                    result.finish_reason,
                    u.prompt_tokens,
                    u.cached_tokens,
                    u.completion_tokens,
                    u.summary_saved_tokens,
                    u.early_exit_tokens,
                    u.latency_ms,
                    u.cost,
                    u.counterfactual_cost,
                    u.cache_write_tokens,
                    int(result.degraded),
                    result.route_reason,
                    request_hash,
                    replay,
                    user,
                    result.task,
                    None if result.confident is None else int(result.confident),
                ),
            )  # autocommit: durable (synchronous=FULL) when this returns
            if cur.rowcount != 1:  # a finished row is never overwritten (the replay check runs first)
                raise AlreadyExists(f"request_id: '{result.request_id}' was already served for this tenant")

    async def record(self, tenant: str, result: Result, request_hash: str = "", *, user: str = "") -> None:
        """Commit the row (with what a retry needs to replay it); returns once it is durable. Shielded:
        a cancelled caller still gets its row. `user`: the end user the calling app named."""
        await asyncio.shield(asyncio.to_thread(self._insert, tenant, result, time.time(), request_hash, user))

    def replay(self, tenant: str, request_id: str, request_hash: str, now: float | None = None) -> Result | None:
        """The stored response of `tenant`'s request `request_id` (marked replayed), or None when the
        request_id is new or its last attempt ended cancelled or failed (then it runs again). Raises
        InvalidArgument when the stored request differs from this one, and AlreadyExists when it was
        served but its answer cannot be replayed (expired, or served before answers were stored)."""
        with self._lock:
            row = self._conn.execute(
                "SELECT ts, request_hash, replay, finish_reason FROM requests WHERE tenant=? AND request_id=?",
                (tenant, request_id),
            ).fetchone()
        if row is None:
            return None
        ts, stored_hash, replay, finish = float(row[0]), str(row[1]), row[2], str(row[3])
        if stored_hash and stored_hash != request_hash:
            raise InvalidArgument(
                "request_id",
                f"'{request_id}' was already used for a different request (prompt, messages or parameters);"
                " use a new request_id for a new request",
            )
        served = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
        if finish not in REPLAYABLE:
            return None  # the last attempt was cancelled or failed: this retry runs it again
        age = (time.time() if now is None else now) - ts
        if replay is None or not stored_hash or age > self.replay_window_s:
            raise AlreadyExists(
                f"request_id: '{request_id}' was already served at {served}; its stored answer expired"
                f" (kept for {self.replay_window_s:.0f} s): use a new request_id"
            )
        result = msgspec.json.decode(str(replay), type=Result)
        result.replayed = True
        return result

    def purge_replays(self, now: float | None = None) -> int:
        """Drop the response texts older than the replay window (their rows stay); returns how many."""
        cutoff = (time.time() if now is None else now) - self.replay_window_s
        with self._lock:
            self._last_purge = time.monotonic()
            cur = self._conn.execute("UPDATE requests SET replay=NULL WHERE ts < ? AND replay IS NOT NULL", (cutoff,))
        return int(cur.rowcount)

    def cloud_spend(self, tenant: str, since: float) -> float:
        """What `tenant` spent on requests answered by the cloud since `since` (the budget's measure)."""
        with self._lock:
            row = self._conn.execute(
                "SELECT COALESCE(SUM(cost), 0) FROM requests WHERE tenant=? AND route='cloud' AND ts >= ?",
                (tenant, since),
            ).fetchone()
        return float(row[0])

    def totals(self, tenant: str | None, since: float = 0.0, until: float = 0.0) -> list[Totals]:
        """Per-route totals for `tenant` (None: all tenants) in [since, until) (0 = unbounded)."""
        where, args = ["ts >= ?"], [since]
        if until:
            where.append("ts < ?")
            args.append(until)
        sql = (
            "SELECT route, COUNT(*), SUM(prompt_tokens), SUM(cached_tokens), SUM(completion_tokens),"
            " SUM(summary_saved_tokens), SUM(early_exit_tokens), SUM(cost), SUM(counterfactual_cost)"
            " FROM requests WHERE " + " AND ".join(where)
        )
        params: list[object] = list(args)
        if tenant is not None:
            sql += " AND tenant = ?"
            params.append(tenant)
        sql += " GROUP BY route ORDER BY route"
        with self._lock:
            rows = self._conn.execute(sql, params).fetchall()
        return [_totals(r) for r in rows]

    def rows(self, tenant: str | None = None) -> list[sqlite3.Row]:
        with self._lock:
            cur = self._conn.cursor()
            cur.row_factory = sqlite3.Row
            if tenant is None:
                return list(cur.execute("SELECT * FROM requests ORDER BY ts"))
            return list(cur.execute("SELECT * FROM requests WHERE tenant=? ORDER BY ts", (tenant,)))


def _totals(r: Any) -> Totals:
    return Totals(
        route=str(r[0]),
        requests=int(r[1]),
        prompt_tokens=int(r[2]),
        cached_tokens=int(r[3]),
        completion_tokens=int(r[4]),
        summary_saved_tokens=int(r[5]),
        early_exit_tokens=int(r[6]),
        cost=float(r[7]),
        counterfactual_cost=float(r[8]),
    )


def sum_totals(parts: list[Totals]) -> Totals:
    t = Totals(route="all")
    for p in parts:
        t.requests += p.requests
        t.prompt_tokens += p.prompt_tokens
        t.cached_tokens += p.cached_tokens
        t.completion_tokens += p.completion_tokens
        t.summary_saved_tokens += p.summary_saved_tokens
        t.early_exit_tokens += p.early_exit_tokens
        t.cost += p.cost
        t.counterfactual_cost += p.counterfactual_cost
    return t

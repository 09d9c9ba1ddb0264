"""The usage ledger: one row per request (tenant, route, model, tokens, latency, cost, and the cost the
configured cloud model would have charged). A response is acknowledged only after its row commits."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import msgspec

from appliance.service.sqlite import open_db
from appliance.service.types import Result

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
    PRIMARY KEY (tenant, request_id)
);
CREATE INDEX IF NOT EXISTS requests_by_time ON requests (tenant, ts);
"""
# columns added after the first release: a ledger written by an older version gains them on open
ADDED_COLUMNS = {
    "cache_write_tokens": "INTEGER NOT NULL DEFAULT 0",
    "degraded": "INTEGER NOT NULL DEFAULT 0",
    "route_reason": "TEXT NOT NULL DEFAULT ''",
}
COLUMNS = (
    "tenant request_id ts session_id route model cloud_model finish_reason prompt_tokens cached_tokens"
    " completion_tokens summary_saved_tokens early_exit_tokens latency_ms cost counterfactual_cost"
    " cache_write_tokens degraded route_reason"
).split()


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
    def __init__(self, path: Path, cloud_model: str) -> None:
        self.path = path
        self.cloud_model = cloud_model
        self._conn = open_db(path, SCHEMA)
        self._lock = threading.Lock()
        have = {r[1] for r in self._conn.execute("PRAGMA table_info(requests)")}
        for name, decl in ADDED_COLUMNS.items():
            if name not in have:
                self._conn.execute(f"ALTER TABLE requests ADD COLUMN {name} {decl}")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _insert(self, tenant: str, result: Result, ts: float) -> None:
        u = result.usage
        with self._lock:
            self._conn.execute(
                f"INSERT INTO requests ({','.join(COLUMNS)}) VALUES ({','.join('?' * len(COLUMNS))})",
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
                ),
            )  # autocommit: durable (synchronous=FULL) when this returns

    async def record(self, tenant: str, result: Result) -> None:
        """Commit the row; returns once it is durable. Shielded: a cancelled caller still gets its row."""
        await asyncio.shield(asyncio.to_thread(self._insert, tenant, result, time.time()))

    def exists(self, tenant: str, request_id: str) -> bool:
        with self._lock:
            row = self._conn.execute(
                "SELECT 1 FROM requests WHERE tenant=? AND request_id=?", (tenant, request_id)
            ).fetchone()
        return row is not None

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

"""Conversation history in SQLite (WAL, synchronous=FULL): per tenant and session, the system prompt,
every message with its token count, and the running summary of the first `folded` messages.
A Chat turn (its messages and any new summary) commits in one transaction before it is acknowledged."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import msgspec

from appliance.common.sqlite import open_db

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    tenant TEXT NOT NULL,
    session_id TEXT NOT NULL,
    system TEXT NOT NULL,
    summary TEXT NOT NULL,
    folded INTEGER NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (tenant, session_id)
);
CREATE TABLE IF NOT EXISTS messages (
    tenant TEXT NOT NULL,
    session_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    tokens INTEGER NOT NULL,
    PRIMARY KEY (tenant, session_id, idx),
    FOREIGN KEY (tenant, session_id) REFERENCES sessions (tenant, session_id)
);
"""


class StoredMessage(msgspec.Struct, frozen=True):
    role: str
    content: str
    tokens: int


class Session(msgspec.Struct, kw_only=True):
    tenant: str
    session_id: str
    system: str = ""
    summary: str = ""
    folded: int = 0  # messages[:folded] are folded into the summary
    messages: list[StoredMessage] = msgspec.field(default_factory=list)


class HistoryStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn = open_db(path, SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def load(self, tenant: str, session_id: str) -> Session:
        with self._lock:
            row = self._conn.execute(
                "SELECT system, summary, folded FROM sessions WHERE tenant=? AND session_id=?", (tenant, session_id)
            ).fetchone()
            msgs = self._conn.execute(
                "SELECT role, content, tokens FROM messages WHERE tenant=? AND session_id=? ORDER BY idx",
                (tenant, session_id),
            ).fetchall()
        session = Session(tenant=tenant, session_id=session_id)
        if row is not None:
            session.system, session.summary, session.folded = str(row[0]), str(row[1]), int(row[2])
        session.messages = [StoredMessage(str(r[0]), str(r[1]), int(r[2])) for r in msgs]
        return session

    def commit_turn(self, session: Session, new: Sequence[StoredMessage]) -> None:
        """Store the session's system prompt and summary and append `new` messages, in one transaction."""
        with self._lock:
            c = self._conn
            c.execute("BEGIN IMMEDIATE")
            try:
                c.execute(
                    "INSERT INTO sessions VALUES (?,?,?,?,?,?) ON CONFLICT (tenant, session_id) DO UPDATE SET"
                    " system=excluded.system, summary=excluded.summary, folded=excluded.folded,"
                    " updated=excluded.updated",
                    (session.tenant, session.session_id, session.system, session.summary, session.folded, time.time()),
                )
                (start,) = c.execute(
                    "SELECT COUNT(*) FROM messages WHERE tenant=? AND session_id=?",
                    (session.tenant, session.session_id),
                ).fetchone()
                c.executemany(
                    "INSERT INTO messages VALUES (?,?,?,?,?,?)",
                    [
                        (session.tenant, session.session_id, int(start) + i, m.role, m.content, m.tokens)
                        for i, m in enumerate(new)
                    ],
                )
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise

    async def commit_turn_async(self, session: Session, new: Sequence[StoredMessage]) -> None:
        await asyncio.shield(asyncio.to_thread(self.commit_turn, session, list(new)))

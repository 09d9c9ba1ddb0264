"""Teacher capture: the cloud's answers kept as training examples, per tenant, in SQLite.

The service stores every answer that came from the cloud for a tenant that opted in (`[distill]
capture`, or a tenant's own `capture`): what the local model would have seen (the prompt as sent, or
the chat messages after the context stage: system prompt, summary, earlier turns, passages), the
cloud's answer, the task name the request gave ("" when none), the time. Examples are bounded per
tenant by age (`retention_days`), count (`max_examples`) and size (`max_mb` of text); past a bound
the oldest go first. Every query is by tenant: one tenant's examples are never read, exported,
purged or counted with another's.

`export` writes the OpenAI fine-tuning JSONL shapes the training reader takes
(`appliance.distill.data.read_jsonl`): ``{"prompt", "completion"}`` for prompts and ``{"messages":
[..., {"role": "assistant", ...}]}`` for chat requests.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from appliance.common.config import Config
from appliance.common.sqlite import open_db
from appliance.distill.export import atomic_path

SCHEMA = """
CREATE TABLE IF NOT EXISTS examples (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant TEXT NOT NULL,
    task TEXT NOT NULL,
    ts REAL NOT NULL,
    prompt TEXT,
    messages TEXT,
    answer TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    request_id TEXT NOT NULL DEFAULT '',
    model TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS examples_by_tenant ON examples (tenant, id);
CREATE INDEX IF NOT EXISTS examples_by_task ON examples (tenant, task, id);
"""
FILE = "teacher.sqlite"
_DAY = 86400.0


@dataclass(frozen=True)
class Limits:
    retention_days: float = 90.0  # 0: no age limit
    max_examples: int = 100_000  # per tenant
    max_bytes: int = 256 << 20  # per tenant: prompt (or messages) and answer text, UTF-8


@dataclass(frozen=True)
class Teacher:
    """One captured example."""

    tenant: str
    task: str
    ts: float
    answer: str
    prompt: str | None = None  # a prompt request: the text the model continues
    messages: tuple[Mapping[str, str], ...] = ()  # a chat request: the messages before the answer
    request_id: str = ""
    model: str = ""  # the cloud model that answered

    def line(self) -> dict[str, object]:
        """The OpenAI fine-tuning JSONL object for this example."""
        if self.prompt is not None:
            return {"prompt": self.prompt, "completion": self.answer}
        msgs = [{"role": str(m["role"]), "content": str(m["content"])} for m in self.messages]
        return {"messages": [*msgs, {"role": "assistant", "content": self.answer}]}


class TeacherStore:
    """The examples database (`teacher.sqlite` in the distill dir); safe to call from several threads."""

    def __init__(self, path: str | os.PathLike[str], limits: Limits | None = None) -> None:
        self.path = Path(path)
        self.limits = limits or Limits()
        self._conn = open_db(self.path, SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> TeacherStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ writing

    def add(
        self,
        tenant: str,
        answer: str,
        *,
        task: str = "",
        prompt: str | None = None,
        messages: Sequence[Mapping[str, str]] = (),
        request_id: str = "",
        model: str = "",
        now: float | None = None,
    ) -> bool:
        """Store one example (a prompt or chat messages, and the answer); False when there is nothing
        to learn from (an empty answer or prompt). Then the tenant's bounds are enforced."""
        if not answer.strip() or (prompt is None and not messages) or (prompt is not None and not prompt):
            return False
        ts = time.time() if now is None else now
        msgs = None
        if prompt is None:
            msgs = json.dumps([{"role": m["role"], "content": m["content"]} for m in messages], ensure_ascii=False)
        size = len((prompt if prompt is not None else msgs or "").encode()) + len(answer.encode())
        if size > self.limits.max_bytes:
            return False  # one example bigger than the whole budget: nothing else would be kept
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.execute(
                    "INSERT INTO examples (tenant, task, ts, prompt, messages, answer, bytes, request_id, model)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (tenant, task, ts, prompt, msgs, answer, size, request_id, model),
                )
                self._enforce(tenant, ts)
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return True

    def _enforce(self, tenant: str, now: float) -> int:
        """Drop `tenant`'s examples past the bounds, oldest first; returns how many (lock held)."""
        lim = self.limits
        dropped = 0
        if lim.retention_days > 0:
            cur = self._conn.execute(
                "DELETE FROM examples WHERE tenant=? AND ts < ?", (tenant, now - lim.retention_days * _DAY)
            )
            dropped += cur.rowcount
        n, size = self._conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM examples WHERE tenant=?", (tenant,)
        ).fetchone()
        if n > lim.max_examples:
            cur = self._conn.execute(
                "DELETE FROM examples WHERE id IN (SELECT id FROM examples WHERE tenant=? ORDER BY id LIMIT ?)",
                (tenant, n - lim.max_examples),
            )
            dropped += cur.rowcount
            n, size = self._conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM examples WHERE tenant=?", (tenant,)
            ).fetchone()
        if size > lim.max_bytes:
            # the newest rows that fit the budget stay; everything older goes
            rows = self._conn.execute(
                "SELECT id, bytes FROM examples WHERE tenant=? ORDER BY id DESC", (tenant,)
            ).fetchall()
            kept, cut = 0, None
            for rid, b in rows:
                if kept + b > lim.max_bytes:
                    cut = rid
                    break
                kept += b
            if cut is not None:
                cur = self._conn.execute("DELETE FROM examples WHERE tenant=? AND id <= ?", (tenant, cut))
                dropped += cur.rowcount
        return dropped

    def expire(self, now: float | None = None) -> int:
        """Enforce every tenant's bounds now (the service does at start); returns examples dropped."""
        ts = time.time() if now is None else now
        with self._lock:
            tenants = [r[0] for r in self._conn.execute("SELECT DISTINCT tenant FROM examples")]
            return sum(self._enforce(t, ts) for t in tenants)

    def purge(self, tenant: str, task: str | None = None) -> int:
        """Delete `tenant`'s examples (of one task when given); returns how many."""
        with self._lock:
            if task is None:
                cur = self._conn.execute("DELETE FROM examples WHERE tenant=?", (tenant,))
            else:
                cur = self._conn.execute("DELETE FROM examples WHERE tenant=? AND task=?", (tenant, task))
        return int(cur.rowcount)

    # ------------------------------------------------------------------ reading

    def examples(self, tenant: str, task: str | None = None) -> Iterator[Teacher]:
        """`tenant`'s examples, oldest first (of one task when given)."""
        sql = "SELECT tenant, task, ts, prompt, messages, answer, request_id, model FROM examples WHERE tenant=?"
        args: list[object] = [tenant]
        if task is not None:
            sql += " AND task=?"
            args.append(task)
        with self._lock:
            rows = self._conn.execute(sql + " ORDER BY id", args).fetchall()
        for t, k, ts, prompt, msgs, answer, rid, model in rows:
            messages = tuple(json.loads(msgs)) if msgs is not None else ()
            yield Teacher(str(t), str(k), float(ts), str(answer), prompt, messages, str(rid), str(model))

    def counts(self, tenant: str) -> dict[str, int]:
        """Examples per task name ("" for requests that named none) of `tenant`."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT task, COUNT(*) FROM examples WHERE tenant=? GROUP BY task ORDER BY task", (tenant,)
            ).fetchall()
        return {str(k): int(n) for k, n in rows}

    def size(self, tenant: str) -> tuple[int, int]:
        """(examples, bytes of text) held for `tenant`."""
        with self._lock:
            n, b = self._conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM examples WHERE tenant=?", (tenant,)
            ).fetchone()
        return int(n), int(b)

    def export(self, tenant: str, out: str | os.PathLike[str], task: str | None = None) -> int:
        """Write `tenant`'s examples (of one task when given) as JSONL to `out` (atomically); returns
        how many lines were written."""
        n = 0
        with atomic_path(out) as tmp, tmp.open("w", encoding="utf-8") as f:
            for ex in self.examples(tenant, task):
                f.write(json.dumps(ex.line(), ensure_ascii=False) + "\n")
                n += 1
        return n


def open_store(directory: str | os.PathLike[str], limits: Limits | None = None) -> TeacherStore:
    return TeacherStore(Path(directory) / FILE, limits)


def store_for(cfg: Config) -> TeacherStore:
    """The service's teacher store, as `cfg`'s [distill] section places and bounds it."""
    d = cfg.distill
    return open_store(d.path(cfg.storage), Limits(d.retention_days, d.max_examples, int(d.max_mb * (1 << 20))))

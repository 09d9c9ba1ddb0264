"""The task models: which distilled adapter serves which tenant's task, with its held-out figures.

One SQLite file (`tasks.sqlite` in the distill dir). A row is a model registered for (tenant, task):
its name, the LoRA adapter GGUF, the base model it was trained on, the figures `appliance distill
eval` measured on held-out data (exact_match, coverage, covered_exact_match, n) and the confidence
threshold calibrated with them, and whether it is promoted. At most one model is promoted per
(tenant, task); `promote` refuses a model whose figures are worse than the promoted one's (see
`worse_than`). The service loads the promoted adapters and serves the task under them.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from appliance.common.sqlite import open_db
from appliance.distill.rule import SIGNALS

SCHEMA = """
CREATE TABLE IF NOT EXISTS task_models (
    tenant TEXT NOT NULL,
    task TEXT NOT NULL,
    name TEXT NOT NULL,
    adapter TEXT NOT NULL,
    base TEXT NOT NULL DEFAULT '',
    exact_match REAL NOT NULL,
    coverage REAL NOT NULL,
    covered_exact_match REAL NOT NULL,
    threshold REAL NOT NULL,
    n INTEGER NOT NULL DEFAULT 0,
    signal TEXT NOT NULL DEFAULT 'logprob',
    promoted INTEGER NOT NULL DEFAULT 0,
    updated REAL NOT NULL,
    PRIMARY KEY (tenant, task, name)
);
CREATE UNIQUE INDEX IF NOT EXISTS one_promoted ON task_models (tenant, task) WHERE promoted = 1;
"""
FILE = "tasks.sqlite"
# a new model may trail the promoted one by this much on a figure (measurement noise on small sets)
TOLERANCE = 0.0


@dataclass(frozen=True)
class Figures:
    """Held-out figures of a task model (`appliance distill eval`)."""

    exact_match: float
    coverage: float  # share the confidence rule keeps local
    covered_exact_match: float  # exact match on that share
    threshold: float  # the rule: local when the answer's `signal` (see distill.rule) is >= this
    n: int = 0
    signal: str = "logprob"  # what the threshold applies to (registrations before margins: logprob)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Figures:
        try:
            f = cls(
                exact_match=float(d["exact_match"]),
                coverage=float(d["coverage"]),
                covered_exact_match=float(d["covered_exact_match"]),
                threshold=float(d["threshold"]),
                n=int(d.get("n", 0)),
                signal=str(d.get("signal", "logprob")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"held-out figures are incomplete: {e}") from None
        if f.signal not in SIGNALS:
            raise ValueError(f"held-out figures: unknown confidence signal {f.signal!r} (one of {', '.join(SIGNALS)})")
        return f

    def local_precise(self) -> float:
        """Share of all requests answered locally and right."""
        return self.coverage * self.covered_exact_match


@dataclass(frozen=True)
class TaskModel:
    tenant: str
    task: str
    name: str
    adapter: str  # the LoRA GGUF's path
    base: str  # the base model it was trained on ("" when unknown)
    figures: Figures
    promoted: bool
    updated: float

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(d.pop("figures"))
        return d


def worse_than(new: Figures, current: Figures, tolerance: float = TOLERANCE) -> list[str]:
    """Why `new` is worse than `current` (empty: it is not). Worse: a lower exact match, a lower exact
    match on the share it keeps local (those answers are sent unchecked), or fewer requests answered
    locally and right."""
    why = []
    if new.exact_match < current.exact_match - tolerance:
        why.append(f"exact_match {new.exact_match:.4f} < {current.exact_match:.4f}")
    if new.covered_exact_match < current.covered_exact_match - tolerance:
        why.append(f"covered_exact_match {new.covered_exact_match:.4f} < {current.covered_exact_match:.4f}")
    if new.local_precise() < current.local_precise() - tolerance:
        why.append(f"coverage x covered_exact_match {new.local_precise():.4f} < {current.local_precise():.4f}")
    return why


class PromoteRefused(ValueError):
    """The model is worse than the one serving the task now."""


class Registry:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._conn = open_db(self.path, SCHEMA)
        columns = {r[1] for r in self._conn.execute("PRAGMA table_info(task_models)")}
        if "signal" not in columns:  # a registry written before the margin rule
            self._conn.execute("ALTER TABLE task_models ADD COLUMN signal TEXT NOT NULL DEFAULT 'logprob'")
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _rows(self, where: str, args: tuple[object, ...]) -> list[TaskModel]:
        sql = (
            "SELECT tenant, task, name, adapter, base, exact_match, coverage, covered_exact_match, threshold, n,"
            f" promoted, updated, signal FROM task_models WHERE {where} ORDER BY tenant, task, name"
        )
        with self._lock:
            rows = self._conn.execute(sql, args).fetchall()
        return [
            TaskModel(
                str(r[0]),
                str(r[1]),
                str(r[2]),
                str(r[3]),
                str(r[4]),
                Figures(float(r[5]), float(r[6]), float(r[7]), float(r[8]), int(r[9]), str(r[12])),
                bool(r[10]),
                float(r[11]),
            )
            for r in rows
        ]

    def models(self, tenant: str | None = None) -> list[TaskModel]:
        return self._rows("tenant=?", (tenant,)) if tenant is not None else self._rows("1", ())

    def promoted(self, tenant: str | None = None) -> list[TaskModel]:
        if tenant is None:
            return self._rows("promoted=1", ())
        return self._rows("promoted=1 AND tenant=?", (tenant,))

    def serving(self, tenant: str, task: str) -> TaskModel | None:
        rows = self._rows("promoted=1 AND tenant=? AND task=?", (tenant, task))
        return rows[0] if rows else None

    def version(self) -> tuple[int, float]:
        """Changes when a model is registered, promoted or removed (the service polls it)."""
        with self._lock:
            n, t = self._conn.execute("SELECT COUNT(*), COALESCE(MAX(updated), 0) FROM task_models").fetchone()
        return int(n), float(t)

    def register(
        self, tenant: str, task: str, name: str, adapter: str | os.PathLike[str], figures: Figures, *, base: str = ""
    ) -> TaskModel:
        """Add or update a (not yet promoted) model for the task; a promoted one keeps being promoted."""
        now = time.time()
        with self._lock:
            self._conn.execute(
                "INSERT INTO task_models (tenant, task, name, adapter, base, exact_match, coverage,"
                " covered_exact_match, threshold, n, signal, promoted, updated) VALUES (?,?,?,?,?,?,?,?,?,?,?,0,?)"
                " ON CONFLICT(tenant, task, name) DO UPDATE SET adapter=excluded.adapter, base=excluded.base,"
                " exact_match=excluded.exact_match, coverage=excluded.coverage,"
                " covered_exact_match=excluded.covered_exact_match, threshold=excluded.threshold,"
                " n=excluded.n, signal=excluded.signal, updated=excluded.updated",
                (
                    tenant,
                    task,
                    name,
                    os.fspath(adapter),
                    base,
                    figures.exact_match,
                    figures.coverage,
                    figures.covered_exact_match,
                    figures.threshold,
                    figures.n,
                    figures.signal,
                    now,
                ),
            )
        rows = self._rows("tenant=? AND task=? AND name=?", (tenant, task, name))
        return rows[0]

    def promote(
        self,
        tenant: str,
        task: str,
        name: str,
        adapter: str | os.PathLike[str],
        figures: Figures,
        *,
        base: str = "",
        force: bool = False,
    ) -> tuple[TaskModel, TaskModel | None]:
        """Make `name` serve (tenant, task); returns (it, the model it replaced or None). Raises
        PromoteRefused when it is worse than the promoted model (unless `force`)."""
        current = self.serving(tenant, task)
        if current is not None and current.name != name and not force:
            why = worse_than(figures, current.figures)
            if why:
                raise PromoteRefused(
                    f"'{name}' is worse than '{current.name}', which serves {tenant}/{task} now: " + "; ".join(why)
                )
        self.register(tenant, task, name, adapter, figures, base=base)
        now = time.time()
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.execute(
                    "UPDATE task_models SET promoted=0, updated=? WHERE tenant=? AND task=? AND promoted=1",
                    (now, tenant, task),
                )
                self._conn.execute(
                    "UPDATE task_models SET promoted=1, updated=? WHERE tenant=? AND task=? AND name=?",
                    (now, tenant, task, name),
                )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        serving = self.serving(tenant, task)
        assert serving is not None
        replaced = current if current is not None and current.name != name else None
        return serving, replaced

    def demote(self, tenant: str, task: str) -> bool:
        """Stop serving the task with a model (it goes to the cloud again); True if one was promoted."""
        with self._lock:
            cur = self._conn.execute(
                "UPDATE task_models SET promoted=0, updated=? WHERE tenant=? AND task=? AND promoted=1",
                (time.time(), tenant, task),
            )
        return cur.rowcount > 0


def open_registry(directory: str | os.PathLike[str]) -> Registry:
    return Registry(Path(directory) / FILE)


def read_figures(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON `appliance distill eval` wrote beside an adapter (NAME.eval.json)."""
    data: dict[str, Any] = json.loads(Path(path).read_text("utf-8"))
    return data

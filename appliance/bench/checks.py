"""What `bench soak` and `bench chaos` read back from the service under test: its metrics gauges, its
RSS, and its files (the ledger, the teacher examples, the semantic cache's SQLite rows and hnswlib
index files, every SQLite database's integrity). Read-only: nothing here writes to the service's home.

Each check is a `Check`: a name, whether it held, and a short detail that says what was seen."""

from __future__ import annotations

import sqlite3
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import msgspec


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def gauges(metrics: str, timeout_s: float = 5.0) -> dict[str, float]:
    """The unlabelled gauges and counters of the service's Prometheus endpoint at host:port."""
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=timeout_s) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or "{" in line or " " not in line:
            continue
        name, value = line.rsplit(" ", 1)
        try:
            out[name] = float(value)
        except ValueError:
            continue
    return out


def rss_mb(pid: int) -> float | None:
    """Resident set size of process `pid` in MiB (Linux /proc), None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def quiesce(metrics: str, timeout_s: float = 60.0) -> tuple[dict[str, float], float]:
    """Wait until the service holds no request (running, queued, engine sequences all 0): the last
    gauges read and the seconds it took (timeout_s when it never got there)."""
    t0 = time.monotonic()
    busy = ("appliance_requests_running", "appliance_requests_queued")
    engine = ("appliance_engine_sequences_running", "appliance_engine_sequences_waiting")
    while True:
        g = gauges(metrics)
        if all(g.get(k, 0.0) == 0.0 for k in (*busy, *engine)):
            return g, time.monotonic() - t0
        if time.monotonic() - t0 >= timeout_s:
            return g, timeout_s
        time.sleep(0.5)


def _ro(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30.0)


def integrity(home: Path) -> Check:
    """PRAGMA integrity_check on every SQLite database under `home` (read-only connections)."""
    dbs = sorted(p for p in home.rglob("*") if p.suffix in (".sqlite", ".sqlite3", ".db") and p.is_file())
    bad: list[str] = []
    for db in dbs:
        try:
            conn = _ro(db)
            try:
                row = conn.execute("PRAGMA integrity_check").fetchone()
            finally:
                conn.close()
            if not row or row[0] != "ok":
                bad.append(f"{db.relative_to(home)}: {row[0] if row else 'no answer'}")
        except sqlite3.Error as e:
            bad.append(f"{db.relative_to(home)}: {e}")
    names = ", ".join(str(d.relative_to(home)) for d in dbs)
    return Check("sqlite_integrity", not bad and bool(dbs), "; ".join(bad) or f"ok: {len(dbs)} databases ({names})")


def _keys(path: Path, sql: str) -> set[tuple[str, str]]:
    if not path.exists():
        return set()
    conn = _ro(path)
    try:
        return {(str(a), str(b)) for a, b in conn.execute(sql)}
    finally:
        conn.close()


def missing_rows(home: Path, acked: Iterable[tuple[str, str]], default_tenant: str = "local") -> Check:
    """Every acknowledged (tenant, request_id) has its ledger row."""
    want = {(t or default_tenant, rid) for t, rid in acked}
    have = _keys(home / "state" / "ledger.sqlite", "SELECT tenant, request_id FROM requests")
    missing = sorted(want - have)
    detail = f"{len(want)} acknowledged, {len(missing)} without a ledger row"
    return Check("ledger_rows", not missing, detail + (f": {missing[:5]}" if missing else ""))


def missing_examples(home: Path, acked: Iterable[tuple[str, str]]) -> Check:
    """Every acknowledged captured answer (tenant, request_id) is a teacher example."""
    want = set(acked)
    have = _keys(home / "state" / "teacher.sqlite", "SELECT tenant, request_id FROM examples")
    missing = sorted(want - have)
    detail = f"{len(want)} acknowledged cloud answers to capture, {len(missing)} not in teacher.sqlite"
    return Check("teacher_examples", not missing, detail + (f": {missing[:5]}" if missing else ""))


def missing_cache_entries(home: Path, acked: Iterable[tuple[str, str, str]]) -> Check:
    """Every acknowledged cacheable answer (namespace, question, answer) is a cache entry."""
    want = set(acked)
    path = home / "semantic-cache" / "cache.sqlite3"
    have: set[tuple[str, str, str]] = set()
    if path.exists():
        conn = _ro(path)
        try:
            have = {
                (str(a), str(b), str(c)) for a, b, c in conn.execute("SELECT namespace, query, response FROM entries")
            }
        finally:
            conn.close()
    missing = sorted(want - have)
    detail = f"{len(want)} acknowledged cacheable answers, {len(missing)} not in cache.sqlite3"
    return Check("cache_entries", not missing, detail + (f": {[m[:2] for m in missing[:3]]}" if missing else ""))


def index_files(home: Path) -> Check:
    """Each saved hnswlib partition index against SQLite, as the cache's own loader judges it at start
    (appliance.cache.index.load: sidecar, digest, element count) plus the counts: the index's live
    entries must equal the partition's rows up to the id it reflects. An index the loader refuses is
    rebuilt from SQLite by the service (reported, not a failure); one it accepts with other counts is."""
    from appliance.cache.index import HnswParams, IndexMeta, load

    root = home / "semantic-cache"
    sides = sorted((root / "index").glob("*/*.json"))
    if not sides:
        return Check("hnsw_index", True, "no index file saved (partitions below the persist size are rebuilt)")
    conn = _ro(root / "cache.sqlite3")
    try:
        store_id = conn.execute("SELECT value FROM meta WHERE key='store_id'").fetchone()[0]
        notes, bad = [], []
        for side_path in sides:
            try:
                side = msgspec.json.decode(side_path.read_bytes(), type=IndexMeta)
            except (OSError, msgspec.DecodeError, msgspec.ValidationError) as e:
                notes.append(f"{side_path.name}: sidecar unreadable ({e}): rebuilt at start")
                continue
            expect = {"store_id": store_id, "partition": side.partition, "embedder": side.embedder, "dim": side.dim}
            index, _meta, why = load(side_path.with_suffix(""), side.dim, HnswParams(), expect)
            row = conn.execute(
                "SELECT max_id, tomb_seq FROM partitions WHERE partition=?", (side.partition,)
            ).fetchone()
            db_max, db_tomb = (int(row[0]), int(row[1])) if row else (0, 0)
            if index is None:
                notes.append(f"{side.partition[:8]}: refused ({why}): rebuilt from SQLite at start")
                continue
            if side.max_id > db_max or side.tomb_seq > db_tomb:
                notes.append(f"{side.partition[:8]}: ahead of SQLite: rebuilt at start")
                continue
            (rows,) = conn.execute(
                "SELECT COUNT(*) FROM entries WHERE partition=? AND id<=?", (side.partition, side.max_id)
            ).fetchone()
            if side.tomb_seq == db_tomb and index.live != rows:
                bad.append(
                    f"{side.partition[:8]}: index has {index.live} live, SQLite {rows} rows up to id {side.max_id}"
                )
            else:
                (newer,) = conn.execute(
                    "SELECT COUNT(*) FROM entries WHERE partition=? AND id>?", (side.partition, side.max_id)
                ).fetchone()
                notes.append(
                    f"{side.partition[:8]}: intact, {index.live} live = SQLite's; {newer} newer row(s) added on load"
                )
    finally:
        conn.close()
    return Check("hnsw_index", not bad, "; ".join(bad + notes))

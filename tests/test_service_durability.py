"""kill -9 under load, then restart: every acknowledged request is in the ledger, the databases open cleanly."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import grpc
from test_service_support import ServerProcess, write_config

from appliance.common.sqlite import integrity_ok


def test_kill9_under_load_keeps_every_acknowledged_request(tiny_model: Any, tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path / "appliance.toml", tiny_model("gemma3", n_ctx_train=8192), tcp=False, server={"max_queue": 64}
    )
    srv = ServerProcess(cfg)
    acked: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def load(worker: int) -> None:
        with srv.client() as c:
            i = 0
            while not stop.is_set():
                rid = f"w{worker}-{i}"
                i += 1
                try:
                    if worker % 2:
                        r = c.generate(prompt="hello world", max_tokens=4, request_id=rid, timeout=5)
                        done = r.request_id == rid
                    else:
                        chunks = list(
                            c.chat(
                                session_id=f"s{worker}",
                                messages=[("user", "hi")],
                                max_tokens=4,
                                request_id=rid,
                                timeout=5,
                            )
                        )
                        done = chunks[-1].done
                except grpc.RpcError:
                    continue
                if done:
                    with lock:
                        acked.append(rid)

    threads = [threading.Thread(target=load, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    srv.kill9()
    stop.set()
    for t in threads:
        t.join()
    assert len(acked) > 20, "the load did not get going"

    state = tmp_path / "state"
    srv = ServerProcess(cfg)  # reopens (and recovers the WAL of) both databases
    try:
        with srv.client() as c:
            assert c.generate(prompt="hello", max_tokens=1).finish_reason
    finally:
        srv.stop()
    for db in ("ledger.sqlite", "history.sqlite"):
        assert integrity_ok(state / db)
    ledger = sqlite3.connect(state / "ledger.sqlite")
    stored = {rid for (rid,) in ledger.execute("SELECT request_id FROM requests")}
    missing = sorted(set(acked) - stored)
    assert not missing, f"{len(missing)} acknowledged requests missing from the ledger: {missing[:5]}"
    # every acknowledged Chat turn is in the history too
    history = sqlite3.connect(state / "history.sqlite")
    for worker in (0, 2):
        turns = sum(1 for rid in acked if rid.startswith(f"w{worker}-"))
        (n,) = history.execute("SELECT COUNT(*) FROM messages WHERE session_id=?", (f"s{worker}",)).fetchone()
        assert n >= 2 * turns


def test_hot_prefixes_survive_a_restart(tiny_model: Any, tmp_path: Path) -> None:
    """A system prompt several requests shared is saved at shutdown and loaded at start: after a
    restart the first request with it is served from the prefix cache (cached_tokens), for its own
    tenant only, and the log says what was saved and loaded."""
    cfg = write_config(tmp_path / "appliance.toml", tiny_model("gemma3", n_ctx_train=8192), tcp=True)
    system = "You are the help desk of a bank. Answer briefly and politely. " * 6
    ask = {"max_tokens": 2, "temperature": 0, "cache_policy": 1}

    def turn(c: Any, question: str) -> Any:
        return c.generate(messages=[("system", system), ("user", question)], **ask)

    srv = ServerProcess(cfg)
    try:
        with srv.client("acme") as c:
            first = [turn(c, q) for q in ("Where is my card?", "How do I reset my PIN?", "Can I close my account?")]
    finally:
        assert srv.stop() == 0
    assert first[0].usage.cached_tokens == 0 and first[1].usage.cached_tokens >= 64  # shared within the run
    saved = list((tmp_path / "state" / "prefixes").glob("*.kv"))
    assert len(saved) == 1 and "saved 1 hot prefix(es)" in (tmp_path / "server.log").read_text()

    srv = ServerProcess(cfg)
    try:
        with srv.client("acme") as c:
            after = turn(c, "What are your opening hours?")
        with srv.client("globex") as c:
            other = turn(c, "What are your opening hours?")
    finally:
        assert srv.stop() == 0
    assert after.usage.cached_tokens >= first[1].usage.cached_tokens - 16
    assert other.usage.cached_tokens == 0  # another tenant never reads acme's prefix
    log = (tmp_path / "server.log").read_text()
    assert "hot prefixes into the prefix cache" in log and "the hot prefixes saved before stay" in log
    assert list((tmp_path / "state" / "prefixes").glob("*.kv")) == saved

"""bench savings' workload and its accounting (the replay itself is `make bench-savings`)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from appliance.bench.savings import Workload, build_workload, summarize

BANKING77 = Path(__file__).resolve().parents[2] / "shared" / "data" / "banking77" / "train.csv"


def test_workload_repeats_rewords_and_mixes_in_hard_questions() -> None:
    w = Workload(requests=300, distinct_support=40, hard_share=0.2, seed=3)
    first, again = build_workload(BANKING77, w), build_workload(BANKING77, w)
    assert first == again and len(first) == 300  # seeded
    hard = [t for t, kind in first if kind == "hard"]
    support = [t for t, kind in first if kind == "support"]
    assert 0.12 < len(hard) / 300 < 0.28
    assert len(set(support)) < len(support) / 2  # popular questions come back
    assert len(set(hard)) < len(hard)


def test_summary_splits_the_saving_by_technique() -> None:
    conn = sqlite3.connect(":memory:")
    conn.row_factory = sqlite3.Row
    conn.execute(
        "CREATE TABLE requests (request_id TEXT, route TEXT, route_reason TEXT, degraded INT, cost REAL,"
        " counterfactual_cost REAL, prompt_tokens INT, completion_tokens INT)"
    )
    rows = [
        ("00000-support", "local", "router", 0, 0.0, 0.010, 20, 40),
        ("00001-support", "cache", "", 0, 0.0, 0.010, 0, 0),
        ("00002-hard", "cloud", "router", 0, 0.030, 0.030, 30, 60),
        ("00003-support", "cloud", "cascade", 0, 0.012, 0.011, 20, 50),
        ("00004-hard", "local", "cloud_error", 1, 0.0, 0.020, 30, 40),
    ]
    conn.executemany("INSERT INTO requests VALUES (?,?,?,?,?,?,?,?)", rows)
    s = summarize(list(conn.execute("SELECT * FROM requests")))
    assert s["cost_all_cloud"] == pytest.approx(0.081) and s["cost_appliance"] == pytest.approx(0.042)
    by = s["saving_by_technique"]
    assert by == {"semantic_cache": 0.01, "local_model": 0.03, "cloud_prompt_cache_and_cascade": -0.001}
    assert sum(by.values()) == pytest.approx(s["cost_all_cloud"] - s["cost_appliance"])
    assert s["degraded"] == 1 and s["hard_requests"] == 2 and s["hard_answered_by_cloud_or_cache"] == 1
    assert s["support_requests_to_cloud"] == 1 and s["by_reason"]["cloud:cascade"] == 1

"""Short smokes of `bench soak` and `bench chaos` (the full runs: `make soak`, `make chaos`) on a tiny
generated model: the real server, the flaky loopback cloud, the traffic and every end check."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from appliance.bench.chaos import MOMENTS, bench_chaos
from appliance.bench.flaky_cloud import FlakyCloud
from appliance.bench.soak import bench_soak
from appliance.cloud.pool import make_backend
from appliance.cloud.types import CloudError
from appliance.common.config import CloudConfig
from appliance.engine.sampling import SamplingOptions


def _failed(checks: list[dict[str, Any]]) -> list[str]:
    return [f"{c['name']}: {c['detail']}" for c in checks if not c["ok"]]


def test_soak_smoke(tiny_model: Any, tmp_path: Path) -> None:
    res = bench_soak(str(tiny_model("gemma3", n_ctx_train=8192)), 1, 20 / 60, tmp_path, rss_growth_max=1.0)
    assert not _failed(res["checks"]), _failed(res["checks"])
    names = {c["name"] for c in res["checks"]}
    assert {"ledger_rows", "kv_pool_free", "no_stuck", "rss_growth", "sqlite_integrity", "queue_bounded"} <= names
    codes = {code for by in res["by_kind_and_status"].values() for code in by}
    assert "RESOURCE_EXHAUSTED" in codes, "4x the admission capacity must overload the service"
    assert res["answered_by_route"].get("cache", {}).get("cache", 0) > 0, "repeated questions must hit the cache"
    assert res["acknowledged"] > 20 and res["cloud_served"].get("ok", 0) > 0
    assert (tmp_path / "rss.csv").read_text().count("\n") > 10


def test_chaos_smoke(tiny_model: Any, tmp_path: Path) -> None:
    res = bench_chaos(str(tiny_model("gemma3", n_ctx_train=8192)), 1, 2, tmp_path, load_s=2.0)
    assert res["ok"], res["failed"]
    assert res["cycles_run"] == 2 and [r.get("moment") for r in res["per_cycle"][:2]] == list(MOMENTS[:2])
    assert res["acknowledged_total"] > 0
    last = {c["name"] for c in res["per_cycle"][-1]["checks"]}
    assert {"ledger_rows", "teacher_examples", "cache_entries", "hnsw_index", "sqlite_integrity"} <= last


def test_a_cloud_event_of_the_wrong_shape_is_a_cloud_error() -> None:
    cloud = FlakyCloud({"wrong_shape": 1.0})

    async def ask() -> None:
        async with httpx.AsyncClient() as http:
            backend = make_backend(CloudConfig(base_url=cloud.url, model="m", max_retries=0), http)
            async for _ in backend.stream([{"role": "user", "content": "hi"}], SamplingOptions()):
                pass

    try:
        with pytest.raises(CloudError):
            asyncio.run(ask())
    finally:
        cloud.close()


def test_fallbacks_to_the_local_lane_keep_the_queue_bound() -> None:
    from appliance.common.errors import Overloaded
    from appliance.service.admission import Admission

    async def run() -> int:
        adm = Admission(max_concurrent=1, max_queue=2, retry_after_ms=0, max_cloud=2)
        release = asyncio.Event()

        async def local() -> None:
            async with adm.slot("local"):
                await release.wait()

        async def cloud_falling_back() -> None:
            async with adm.slot("cloud") as held:
                await held.move("local")  # the cloud failed: answered locally

        tasks = [asyncio.create_task(local())]
        await asyncio.sleep(0)
        for _ in range(10):  # more than max_queue: the rest must be refused
            tasks.append(asyncio.create_task(cloud_falling_back()))
            await asyncio.sleep(0.001)
        most = adm.waiting
        release.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
        assert all(r is None or isinstance(r, Overloaded) for r in results), results
        return most

    assert asyncio.run(run()) <= 2


def test_a_request_cancelled_before_the_engine_takes_it_leaves_the_engine_running(tiny_model: Any) -> None:
    import threading
    from concurrent.futures import Future

    from appliance.engine.async_engine import AsyncEngine, _Call

    engine = AsyncEngine(tiny_model("gemma3"), n_threads=1)
    gate = threading.Event()
    try:
        engine._commands.put(_Call(gate.wait, Future()))  # the engine thread is busy until the gate opens

        async def consume() -> None:
            async for _ in engine.generate("hello there", SamplingOptions(max_tokens=4)):
                pass

        async def main() -> None:
            task = asyncio.create_task(consume())
            await asyncio.sleep(0.05)  # its submit now waits behind the gate
            task.cancel()
            await asyncio.sleep(0.01)
            gate.set()
            await asyncio.sleep(0.2)
            assert engine._thread.is_alive(), "the engine thread died"
            await asyncio.wait_for(consume(), 30)  # and the next request is served

        asyncio.run(main())
    finally:
        gate.set()
        if engine._thread.is_alive():
            engine.close()

"""`appliance report`: totals and savings by technique per tenant and period, and the PNG chart."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from appliance.cli.serve import main
from appliance.common.config import PricingConfig
from appliance.common.ledger import Ledger
from appliance.common.types import Result, RouteTaken, Usage


def test_report_totals_savings_and_chart(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    (tmp_path / "c.toml").write_text(f'[storage]\ndir = "{state}"\n[pricing]\ninput_per_mtok = 1.0\n')
    prices = PricingConfig(input_per_mtok=1.0)
    ledger = Ledger(state / "ledger.sqlite", prices.cloud_model)
    rows: list[tuple[str, RouteTaken, int, int, int]] = [
        ("acme", "local", 1000, 100, 500),
        ("acme", "cache", 1000, 100, 0),
        ("globex", "local", 2000, 0, 0),
    ]
    for i, (tenant, route, prompt, out, saved) in enumerate(rows):
        u = Usage(prompt_tokens=prompt, completion_tokens=out, summary_saved_tokens=saved)
        u.counterfactual_cost = prices.cloud_cost(prompt + saved, 0, out)
        r = Result(request_id=f"r{i}", text="", route=route, model="m", finish_reason="stop", usage=u)
        asyncio.run(ledger.record(tenant, r))
    ledger.close()

    png = tmp_path / "chart.png"
    assert main(["report", "-c", str(tmp_path / "c.toml"), "--period", "all", "--json", "--png", str(png)]) == 0
    rep = json.loads(capsys.readouterr().out)
    acme, globex = rep["lines"]
    assert (acme["tenant"], acme["requests"], globex["requests"]) == ("acme", 2, 1)
    local_cf = (1500 * 1.0 + 100 * 1.5) / 1e6
    assert acme["saved_summarization"] == pytest.approx(500 / 1e6)
    assert acme["saved_local_model"] == pytest.approx(local_cf - 500 / 1e6)
    assert acme["saved_semantic_cache"] == pytest.approx((1000 + 150) / 1e6)
    assert globex["counterfactual_cost"] == pytest.approx(2000 / 1e6)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert main(["report", "-c", str(tmp_path / "c.toml"), "--tenant", "globex"]) == 0
    text = capsys.readouterr().out
    assert "globex" in text and "acme" not in text.split("\n", 2)[2]


def test_report_without_a_ledger_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "c.toml").write_text(f'[storage]\ndir = "{tmp_path / "none"}"\n')
    assert main(["report", "-c", str(tmp_path / "c.toml")]) == 2
    assert "no ledger" in capsys.readouterr().err

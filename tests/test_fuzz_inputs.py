"""Property-based fuzzing (hypothesis) of every input a user or client controls: the targets of
`tests/fuzz_targets.py` (config, manifest, JSONL, CSV, gRPC wire bytes, HTTP bodies), each fed
near-valid documents with adversarial values and raw bytes; a target's only allowed outcomes are a
result or its module's own error with a message. Then every regression input of a past finding
(`tests/data/fuzz/TARGET/`) replayed.

`make test` runs APPLIANCE_FUZZ_EXAMPLES (default 100) examples per target; `make fuzz` runs the
coverage-guided campaign (libFuzzer through atheris, `tests/fuzz_run.py`) on the same targets.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fuzz_targets import TARGETS
from hypothesis import HealthCheck, given, settings

EXAMPLES = int(os.environ.get("APPLIANCE_FUZZ_EXAMPLES", "100"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
REGRESSIONS = Path(__file__).parent / "data" / "fuzz"


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_generated(name: str) -> None:
    target = TARGETS[name]
    FUZZ(given(target.strategy)(target.run))()


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_regressions(name: str) -> None:
    for path in sorted((REGRESSIONS / name).glob("*")):
        TARGETS[name].run(path.read_bytes())


def test_regressions_name_targets() -> None:
    """A regression folder whose name is no target would never be replayed."""
    assert REGRESSIONS.is_dir()
    assert {p.name for p in REGRESSIONS.iterdir()} <= set(TARGETS)


def test_libfuzzer_smoke(tmp_path: Path) -> None:
    """`make fuzz`'s Python half, briefly: every target runs under libFuzzer with coverage feedback
    (instrumentation reaching the appliance's code) and finds nothing."""
    out = tmp_path / "fuzz"
    p = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).parent / "fuzz_run.py"),
            "--runs",
            "300",
            "--seeds",
            "10",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    rows = {r["target"]: r for r in json.loads((out / "py-summary.json").read_text())["targets"]}
    assert set(rows) == set(TARGETS)
    for name, r in rows.items():
        assert r["executions"] == 300, (name, r)
        assert r["coverage_edges"] and r["coverage_edges"] > 10, (name, r)
        assert not r["findings"], (name, r)

"""systemd/appliance.service: systemd-analyze verify and security on the real unit file, the
directives the issue requires, and the service running under MemoryDenyWriteExecute's kernel
equivalent (PR_SET_MDWE), which the unit turns on."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_service_support import ServerProcess, write_config

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "appliance.service"
needs_systemd_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")


def _directives() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


def _unit_with_existing_exec(tmp_path: Path) -> Path:
    """The unit with ExecStart's program replaced by one that exists here (verify checks that)."""
    exe = tmp_path / "appliance"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    unit = tmp_path / "appliance.service"
    unit.write_text(UNIT.read_text().replace("/opt/appliance/current/venv/bin/appliance", str(exe)))
    return unit


def test_the_unit_has_what_the_issue_asks_for() -> None:
    d = _directives()
    assert d["Type"] == ["notify"]
    assert d["WatchdogSec"] and d["Restart"] == ["on-failure"]
    assert d["StartLimitBurst"] and d["StartLimitIntervalSec"]
    assert d["User"] == ["appliance"]
    for key in ("StateDirectory", "ConfigurationDirectory", "RuntimeDirectory"):
        assert d[key] == ["appliance"]
    assert d["ProtectSystem"] == ["strict"] and d["ProtectHome"] == ["yes"] and d["PrivateTmp"] == ["yes"]
    assert d["NoNewPrivileges"] == ["yes"]
    assert d["CapabilityBoundingSet"] == [""]
    assert d["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    assert "@system-service" in d["SystemCallFilter"]
    assert d["UMask"] == ["0077"]
    assert d["DevicePolicy"] == ["closed"] and d["PrivateDevices"] == ["yes"]  # GPU only via the drop-in
    assert "--config /etc/appliance/appliance.toml" in d["ExecStart"][0]
    assert "APPLIANCE_HOME=/var/lib/appliance" in d["Environment"][0]


@needs_systemd_analyze
def test_systemd_analyze_verify_passes(tmp_path: Path) -> None:
    run = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(_unit_with_existing_exec(tmp_path))],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout + run.stderr


@needs_systemd_analyze
def test_security_exposure_is_low(tmp_path: Path) -> None:
    run = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(_unit_with_existing_exec(tmp_path))],
        capture_output=True,
        text=True,
    )
    if "--offline" in run.stderr and "unrecognized" in run.stderr:
        pytest.skip("this systemd-analyze has no --offline")
    m = re.search(r"Overall exposure level for appliance.service: ([0-9.]+)", run.stdout)
    assert m is not None, run.stdout + run.stderr
    assert float(m.group(1)) <= 2.0, run.stdout


def _mdwe_supported() -> bool:
    probe = subprocess.run(
        [sys.executable, "-c", "import ctypes,sys; sys.exit(ctypes.CDLL(None).prctl(65, 1, 0, 0, 0) != 0)"]
    )
    return probe.returncode == 0


MDWE_WRAPPER = """
import ctypes, os, sys
if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, REFUSE_EXEC_GAIN
    sys.exit("PR_SET_MDWE failed")
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


def test_the_service_runs_with_memory_deny_write_execute(tiny_model: Any, tmp_path: Path) -> None:
    """MemoryDenyWriteExecute=yes is in the unit: the generation model, llama.cpp's log callback (a
    libffi closure) and the embedding model must all work without writable+executable memory."""
    if not _mdwe_supported():
        pytest.skip("the kernel has no PR_SET_MDWE (Linux 6.3+)")
    wrapper = tmp_path / "mdwe.py"
    wrapper.write_text(MDWE_WRAPPER)
    cfg = write_config(tmp_path / "appliance.toml", tiny_model("gemma3"), tcp=False, cache=True)
    server = ServerProcess(cfg, argv_prefix=[sys.executable, str(wrapper)])
    try:
        with server.client() as c:
            first = c.generate(prompt="Hello there", max_tokens=3)
            again = c.generate(prompt="Hello there", max_tokens=3)
        assert first.route == 2 and again.route == 1  # local model, then the semantic cache's embedder
        # the control: the same wrapper really forbids a writable+executable mapping
        probe = subprocess.run(
            [
                sys.executable,
                str(wrapper),
                "-c",
                "import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)",
            ],
            capture_output=True,
            text=True,
        )
        assert probe.returncode != 0 and "PermissionError" in probe.stderr
    finally:
        assert server.stop() == 0

"""`appliance doctor`: each check on real files, sockets and ports, and the command's exit code."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.cli.doctor_checks import (
    Level,
    check_cache,
    check_config,
    check_cpu,
    check_disk,
    check_permissions,
    check_ports,
    format_text,
)
from appliance.common.config import load_config
from appliance.models import ggml_cpu


def _config(tmp_path: Path, extra: str = "") -> Path:
    p = tmp_path / "appliance.toml"
    p.write_text(
        f'[server]\nunix_socket = "{tmp_path / "run" / "a.sock"}"\n{extra}\n[storage]\ndir = "{tmp_path / "state"}"\n'
    )
    p.chmod(0o640)
    return p


def test_a_broken_config_fails_and_names_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nmax_concurrent = -1\n")
    check, cfg = check_config(bad)
    assert cfg is None
    assert check.level is Level.FAIL
    assert "max_concurrent" in check.detail
    assert "--check-config" in check.fix


def test_permissions_missing_world_writable_and_good(tmp_path: Path) -> None:
    path = _config(tmp_path)
    cfg = load_config(path)
    by_name = {c.name: c for c in check_permissions(cfg, path, None)}
    assert by_name["state dir"].level is Level.FAIL and "does not exist" in by_name["state dir"].detail
    (tmp_path / "state").mkdir(mode=0o750)
    (tmp_path / "run").mkdir()
    (tmp_path / "run").chmod(0o777)
    by_name = {c.name: c for c in check_permissions(cfg, path, None)}
    assert by_name["state dir"].level is Level.OK
    assert by_name["socket dir"].level is Level.FAIL and "world-writable" in by_name["socket dir"].detail
    assert by_name["socket dir"].fix == f"chmod o-w {tmp_path / 'run'}"
    assert by_name["config file"].level is Level.OK


def test_ownership_is_checked_against_the_service_user(tmp_path: Path) -> None:
    path = _config(tmp_path)
    (tmp_path / "state").mkdir(mode=0o750)
    (tmp_path / "run").mkdir(mode=0o750)
    import pwd

    other = next(p.pw_name for p in pwd.getpwall() if p.pw_uid != os.getuid())
    checks = check_permissions(load_config(path), path, other)
    assert any(c.level is Level.FAIL and f"not {other}" in c.detail for c in checks)


def test_a_taken_port_fails_and_a_free_one_passes(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = load_config(_config(tmp_path, f'tcp = "127.0.0.1:{port}"'))
        [check] = check_ports(cfg)
        assert check.level is Level.FAIL and "not free" in check.detail
    [check] = check_ports(cfg)  # closed now
    assert check.level is Level.OK


def test_cpu_without_avx2_warns() -> None:
    [features, _variant] = check_cpu(frozenset({"sse4_2", "avx"}))
    assert features.level is Level.WARN
    assert "avx2" in features.detail


def test_low_disk_warns(tmp_path: Path) -> None:
    [check] = check_disk([tmp_path], min_free=1 << 62)
    assert check.level is Level.WARN
    [check] = check_disk([tmp_path], min_free=0)
    assert check.level is Level.OK


def test_variant_refusals() -> None:
    haswell = frozenset(ggml_cpu.VARIANT_FLAGS["haswell"])
    assert ggml_cpu.refusal("haswell", haswell, amx_ok=False) == ""
    assert "avx512f" in ggml_cpu.refusal("skylakex", haswell, amx_ok=False)
    amx = frozenset(ggml_cpu.VARIANT_FLAGS["sapphirerapids"])
    assert ggml_cpu.refusal("sapphirerapids", amx, amx_ok=True) == ""
    assert "AMX" in ggml_cpu.refusal("sapphirerapids", amx, amx_ok=False)  # CPUID says yes, the kernel says no
    assert "unknown" in ggml_cpu.refusal("future-lake", amx, amx_ok=True)


def test_choose_takes_the_best_allowed_and_checks_a_forced_one() -> None:
    C = ggml_cpu.Candidate
    cands = [
        C("haswell", Path("h.so"), 63, ""),
        C("skylakex", Path("s.so"), 191, ""),
        C("sapphirerapids", Path("a.so"), -1, "the kernel refuses AMX tile state"),
    ]
    assert ggml_cpu.choose(cands).name == "skylakex"
    assert ggml_cpu.choose(cands, "haswell").name == "haswell"
    with pytest.raises(ggml_cpu.CpuBackendError, match="cannot run on this CPU: the kernel refuses AMX"):
        ggml_cpu.choose(cands, "sapphirerapids")
    with pytest.raises(ggml_cpu.CpuBackendError, match="no such variant"):
        ggml_cpu.choose(cands, "zen9")
    with pytest.raises(ggml_cpu.CpuBackendError, match="no ggml CPU backend variant can run"):
        ggml_cpu.choose([cands[2]])


def test_cpu_flags_parse_proc_cpuinfo(tmp_path: Path) -> None:
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nflags\t\t: fpu sse4_2 avx avx2\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert ggml_cpu.cpu_flags(f) == frozenset({"fpu", "sse4_2", "avx", "avx2"})
    assert ggml_cpu.cpu_flags(tmp_path / "missing") == frozenset()


def test_doctor_command_exit_code_and_json(tmp_path: Path) -> None:
    path = _config(tmp_path)
    env = {**os.environ, "APPLIANCE_HOME": str(tmp_path / "home")}  # no models there
    run = subprocess.run(
        [sys.executable, "-m", "appliance.cli.main", "doctor", "--json", "-c", str(path), "--service-user", ""],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert run.returncode == 1, run.stderr
    report = json.loads(run.stdout)
    assert report["ok"] is False
    by_name = {c["name"]: c for c in report["checks"]}
    assert by_name["config"]["level"] == "ok"
    assert by_name["model gemma3-270m-q4km"]["level"] == "fail"
    assert "appliance models pull gemma3-270m-q4km" in by_name["model gemma3-270m-q4km"]["fix"]
    assert by_name["ggml cpu variant"]["level"] == "ok"
    text = subprocess.run(
        [sys.executable, "-m", "appliance.cli.main", "doctor", "-c", str(path), "--service-user", ""],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    ).stdout
    assert "[fail] model gemma3-270m-q4km: missing" in text
    assert text.strip().endswith("ok")


def test_format_text_shows_fixes_and_counts() -> None:
    from appliance.cli.doctor_checks import Check

    text = format_text([Check("gpu", Level.OK, "none"), Check("disk", Level.WARN, "0.1 GiB free", "free space")])
    assert text.splitlines() == [
        "[  ok] gpu: none",
        "[warn] disk: 0.1 GiB free",
        "       fix: free space",
        "0 failed, 1 warning(s), 1 ok",
    ]


def test_cache_check_names_the_embedder_and_its_threshold(tmp_path: Path) -> None:
    ok = check_cache(load_config(_config(tmp_path)))
    assert [c.level for c in ok] == [Level.OK] and "calibrated threshold 0.92" in ok[0].detail
    missing = check_cache(load_config(_config(tmp_path, f'[cache]\nembedding_model = "{tmp_path / "x.gguf"}"')))
    assert missing[0].level is Level.WARN and "does not exist" in missing[0].detail
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF" + bytes(64))
    uncal = check_cache(load_config(_config(tmp_path, f'[cache]\nembedding_model = "{other}"')))
    assert uncal[0].level is Level.WARN and "no calibrated threshold for other.gguf:" in uncal[0].detail
    assert "[cache] threshold" in uncal[0].fix
    set_ = check_cache(load_config(_config(tmp_path, f'[cache]\nembedding_model = "{other}"\nthreshold = 0.9')))
    assert set_[0].level is Level.OK and "threshold 0.9" in set_[0].detail
    wrong = check_cache(load_config(_config(tmp_path, '[cache]\nembedding_model = "gemma3-270m-q4km"')))
    assert wrong[0].level is Level.WARN and "is a generation model; an embedding model is needed" in wrong[0].detail
    off = check_cache(load_config(_config(tmp_path, "[cache]\nenabled = false")))
    assert off[0].level is Level.OK and "disabled" in off[0].detail


def test_doctor_reports_the_training_stack() -> None:
    from appliance.cli.doctor_checks import check_training

    c = check_training()
    assert c.name == "training stack" and "torch 2.13.0" in c.detail and "peft" in c.detail
    assert c.detail.endswith((" on cpu", " on cuda"))

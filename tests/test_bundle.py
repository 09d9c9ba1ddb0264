"""The offline bundle end to end: install it into a fresh root with no network and no package index,
start the service with the unit's own ExecStart, answer a gRPC request over its Unix socket, upgrade
in place keeping config and data, uninstall (keeping data), purge.

Slow (builds the bundle unless $APPLIANCE_BUNDLE names one): `make test-bundle` runs it; `make test`
leaves it out (marker `bundle`).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.edge.grpc.client import Client

pytestmark = pytest.mark.bundle
REPO = Path(__file__).resolve().parent.parent
UNREACHABLE_INDEX = "http://127.0.0.1:9/simple"  # the discard port: nothing answers
USER = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture(scope="session")
def bundle_archive() -> Path:
    given = os.environ.get("APPLIANCE_BUNDLE")
    if given:
        return Path(given)
    subprocess.run(["make", "bundle"], cwd=REPO, check=True, timeout=3600)
    [archive] = sorted((REPO / "build" / "bundle").glob("appliance-*-linux-x86_64.tar.gz"))
    return archive


@pytest.fixture(scope="session")
def bundle(bundle_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle")
    with tarfile.open(bundle_archive) as tar:
        tar.extractall(out, filter="tar")
    [top] = out.iterdir()
    return top


def _no_network_prefix() -> list[str]:
    """`unshare --net` when this user may make a network namespace (nothing but a down loopback in
    it), else nothing: the unreachable index in the environment still forbids every download."""
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True)
    if probe.returncode == 0:
        return ["unshare", "--net"]
    probe = subprocess.run(["unshare", "-rn", "true"], capture_output=True)
    return ["unshare", "-rn"] if probe.returncode == 0 else []


def _offline_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV", "APPLIANCE_"))}
    env.update(PIP_INDEX_URL=UNREACHABLE_INDEX, PIP_EXTRA_INDEX_URL=UNREACHABLE_INDEX, PIP_FIND_LINKS="")
    env["PATH"] = ":".join(p for p in env.get("PATH", "").split(":") if ".venv" not in p)
    return env


def _install(bundle: Path, root: Path, *extra: str) -> str:
    cmd = [
        *_no_network_prefix(),
        "bash",
        str(bundle / "install.sh"),
        "--root",
        str(root),
        "--service-user",
        USER,
        "--python",
        sys._base_executable,  # the interpreter this venv was made from (the bundle's Python version)
        *extra,
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, env=_offline_env(), timeout=900)
    assert run.returncode == 0, f"install.sh failed:\n{run.stdout}\n{run.stderr}"
    return run.stdout


def _unit(root: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in (root / "etc/systemd/system/appliance.service").read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


class Service:
    """The service as systemd would start it: the unit's ExecStart, Environment and WorkingDirectory,
    NOTIFY_SOCKET and WATCHDOG_USEC set, in a namespace without network."""

    def __init__(self, root: Path, tmp: Path) -> None:
        unit = _unit(root)
        [exec_start] = unit["ExecStart"]
        env = {"PATH": "/usr/bin:/bin", "WATCHDOG_USEC": "30000000"}
        for assignment in shlex.split(" ".join(unit.get("Environment", []))):
            k, v = assignment.split("=", 1)
            env[k] = v
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify_path = tmp / f"notify-{time.monotonic_ns()}.sock"
        self.notify.bind(str(notify_path))
        self.notify.settimeout(1.0)
        env["NOTIFY_SOCKET"] = str(notify_path)
        self.log = tmp / "service.log"
        [workdir] = unit["WorkingDirectory"]
        self.proc = subprocess.Popen(
            [*_no_network_prefix(), *shlex.split(exec_start)],
            env=env,
            cwd=workdir,
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("ab"),
        )
        self.socket = root / "run/appliance/appliance.sock"

    def wait_for(self, key: str, timeout: float = 180.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = self.notify.recv(4096).decode()
            except TimeoutError:
                assert self.proc.poll() is None, f"service exited {self.proc.returncode}: {self.log.read_text()}"
                continue
            fields = dict(line.split("=", 1) for line in data.split("\n"))
            if key in fields:
                return fields
        raise AssertionError(f"no {key} from the service: {self.log.read_text()}")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        self.wait_for("STOPPING")
        rc = self.proc.wait(60)
        self.notify.close()
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.notify.close()


@pytest.fixture
def service_factory(tmp_path: Path) -> Iterator[list[Service]]:
    started: list[Service] = []
    yield started
    for s in started:
        s.kill()


def _doctor(root: Path) -> dict[str, dict[str, str]]:
    exe = root / "opt/appliance/current/venv/bin/appliance"
    env = {"PATH": "/usr/bin:/bin", "APPLIANCE_HOME": str(root / "var/lib/appliance")}
    run = subprocess.run(
        [str(exe), "doctor", "--json", "-c", str(root / "etc/appliance/appliance.toml"), "--service-user", USER],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        timeout=300,
    )
    report = json.loads(run.stdout)
    assert run.returncode == 0 and report["ok"], run.stdout + run.stderr
    return {c["name"]: c for c in report["checks"]}


PORTABILITY_PROBE = """
import sys
from appliance.models import ggml_cpu
from appliance.engine.engine import Engine
from appliance.engine.sampling import SamplingOptions
import hnswlib, numpy as np
print("variant", ggml_cpu.loaded().name if ggml_cpu.loaded() else ggml_cpu.error(), flush=True)
eng = Engine(sys.argv[1], n_ctx=128, n_threads=2)
print("text", repr("".join(c.text for c in eng.generate("The sky is", SamplingOptions(temperature=0, max_tokens=2)))))
idx = hnswlib.Index(space="cosine", dim=8)
idx.init_index(max_elements=4)
idx.add_items(np.eye(4, 8, dtype=np.float32))
print("hnswlib", int(idx.knn_query(np.eye(1, 8, dtype=np.float32), k=1)[0][0][0]))
"""


def _check_on_an_emulated_haswell(root: Path) -> None:
    """The installed venv (ggml, our extension, numpy, hnswlib) on an emulated AVX2-only CPU:
    `qemu-x86_64 -cpu Haswell` runs no AVX-512 or AMX, so any such instruction is SIGILL there."""
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        return  # said in docs/install.md: the check needs Debian's qemu-user
    python = root / "opt/appliance/current/venv/bin/python"
    model = next((root / "opt/appliance/current/models").glob("gemma-*.gguf"))
    env = {"PATH": "/usr/bin:/bin", "APPLIANCE_HOME": str(root / "var/lib/appliance")}
    run = subprocess.run(
        [qemu, "-cpu", "Haswell", str(python), "-c", PORTABILITY_PROBE, str(model)],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,  # not the source tree: `python -c` puts the working directory on sys.path
        timeout=900,
    )
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert "variant haswell" in run.stdout
    assert "text '" in run.stdout and "hnswlib 0" in run.stdout
    # a forced AVX-512 variant is refused with a message, not run into SIGILL
    forced = subprocess.run(
        [qemu, "-cpu", "Haswell", str(python), "-c", "from appliance.models import ggml_cpu; print(ggml_cpu.error())"],
        capture_output=True,
        text=True,
        env={**env, "APPLIANCE_GGML_CPU_VARIANT": "skylakex"},
        cwd=root,
        timeout=600,
    )
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert "skylakex cannot run on this CPU" in forced.stdout, forced.stdout


def _ask(sock: Path) -> tuple[str, int]:
    with Client.connect(f"unix:{sock}") as c:
        r = c.generate(prompt="Name one colour of the sky.", max_tokens=8, temperature=0.0)
        return r.text, r.route


def test_bundle_installs_offline_serves_upgrades_and_uninstalls(
    bundle: Path, tmp_path: Path, service_factory: list[Service]
) -> None:
    root = tmp_path / "root"
    # ------------------------------------------------------------------ install, offline
    out = _install(bundle, root)
    assert "not calling systemctl" in out
    prefix = root / "opt/appliance"
    first_release = (prefix / "current").resolve()
    assert (first_release / ".complete").is_file()
    assert (root / "var/lib/appliance/models").resolve() == (prefix / "current/models").resolve()
    unit_path = root / "etc/systemd/system/appliance.service"
    verify = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit_path)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--threshold=20", str(unit_path)],
        capture_output=True,
        text=True,
    )
    assert security.returncode == 0, security.stdout[-2000:]
    score = re.search(r"Overall exposure level for appliance.service: ([0-9.]+)", security.stdout)
    assert score is not None and float(score.group(1)) <= 2.0
    assert (root / "etc/systemd/system/appliance.service.d/10-memory.conf").read_text().endswith("MemoryMax=75%\n")

    doctor = _doctor(root)
    variant = doctor["ggml cpu variant"]["detail"]
    assert not variant.startswith("built-in"), "the bundle must carry ggml's CPU variants"
    assert not variant.startswith("sapphirerapids"), "the AMX variant is opt-in only"
    _check_on_an_emulated_haswell(root)

    # ------------------------------------------------------------------ start it as systemd would, ask it
    svc = Service(root, tmp_path)
    service_factory.append(svc)
    ready = svc.wait_for("READY")
    assert ready["STATUS"] == f"serving on unix:{svc.socket}"
    text, route = _ask(svc.socket)
    assert text.strip() and route == 2  # local model
    _, route = _ask(svc.socket)
    assert route == 1  # the semantic cache (the bundled embedding model) answered the repeat
    assert svc.stop() == 0
    ledger = root / "var/lib/appliance/state/ledger.sqlite"
    assert ledger.stat().st_size > 0

    # ------------------------------------------------------------------ idempotent, then a real upgrade
    config = root / "etc/appliance/appliance.toml"
    config.write_text(config.read_text() + "\n# site note kept across upgrades\n")
    assert "already installed" in _install(bundle, root)
    newer = tmp_path / "newer-bundle"
    shutil.copytree(bundle, newer)
    (newer / "docs" / "install.md").write_text((newer / "docs" / "install.md").read_text() + "\n<!-- next -->\n")
    sums = subprocess.run(["sha256sum", "docs/install.md"], cwd=newer, capture_output=True, text=True, check=True)
    lines = [ln for ln in (newer / "SHA256SUMS").read_text().splitlines() if not ln.endswith("  docs/install.md")]
    (newer / "SHA256SUMS").write_text("\n".join([*lines, sums.stdout.strip()]) + "\n")
    _install(newer, root, "--memory-max", "6G")
    second_release = (prefix / "current").resolve()
    assert second_release != first_release
    assert first_release.is_dir()  # the previous release stays for a rollback
    assert config.read_text().endswith("# site note kept across upgrades\n")
    assert (root / "etc/systemd/system/appliance.service.d/10-memory.conf").read_text().endswith("MemoryMax=6G\n")
    svc = Service(root, tmp_path)
    service_factory.append(svc)
    svc.wait_for("READY")
    _, route = _ask(svc.socket)
    assert route == 1  # the cache built before the upgrade still answers
    assert svc.stop() == 0

    # ------------------------------------------------------------------ a damaged bundle is refused
    damaged = tmp_path / "damaged-bundle"
    shutil.copytree(bundle, damaged)
    with (damaged / "requirements.txt").open("a") as f:
        f.write("# tampered\n")
    run = subprocess.run(
        ["bash", str(damaged / "install.sh"), "--root", str(root), "--service-user", USER],
        capture_output=True,
        text=True,
        env=_offline_env(),
    )
    assert run.returncode != 0 and "the bundle is damaged" in run.stderr
    assert (prefix / "current").resolve() == second_release

    # ------------------------------------------------------------------ uninstall keeps data, --purge does not
    run = subprocess.run(
        ["bash", str(bundle / "uninstall.sh"), "--root", str(root)], capture_output=True, text=True, check=True
    )
    assert not prefix.exists() and not unit_path.exists()
    assert ledger.is_file() and config.is_file()
    subprocess.run(["bash", str(bundle / "uninstall.sh"), "--root", str(root), "--purge"], check=True)
    assert not (root / "var/lib/appliance").exists() and not (root / "etc/appliance").exists()

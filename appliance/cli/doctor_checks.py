"""`appliance doctor`: checks an installation and says what to fix.

Each check gives ok, warn or fail with a one-line detail and, unless ok, what to do about it.
The checks: the config parses; the default models (and a configured model file) are present with
the manifest's sha256; the state, socket and config locations have safe permissions; the CPU has
what the bundled ggml needs, which ggml CPU variant was loaded and which kernels it runs; the GPU
(device, memory, driver, what [model] gpu_layers offloads) or "no GPU: CPU"; the configured TCP
ports are free or already ours; free disk space.
"""

from __future__ import annotations

import enum
import shutil
import socket
import stat
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import msgspec

from appliance.common.config import Config, ConfigError, hostport, load_config

DEFAULT_CONFIG = Path("/etc/appliance/appliance.toml")
SERVICE_USER = "appliance"
MIN_FREE_BYTES = 2 * 1024**3
NEEDED_CPU_FLAGS = ("avx2", "fma", "f16c")  # what the default build and the haswell variant use


class Level(enum.Enum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


class Check(msgspec.Struct, frozen=True):
    name: str
    level: Level
    detail: str
    fix: str = ""


def _ok(name: str, detail: str) -> Check:
    return Check(name, Level.OK, detail)


# ---------------------------------------------------------------- config


def check_config(path: Path | None) -> tuple[Check, Config | None]:
    if path is None:
        return Check(
            "config",
            Level.WARN,
            f"no config file ({DEFAULT_CONFIG} does not exist); using built-in defaults",
            f"write {DEFAULT_CONFIG} (install.sh puts a commented default there) or pass --config",
        ), load_config(None)
    try:
        cfg = load_config(path)
    except ConfigError as e:
        return Check("config", Level.FAIL, str(e), f"edit {path}; `appliance serve --check-config -c {path}`"), None
    except OSError as e:
        return Check("config", Level.FAIL, f"cannot read {path}: {e}", "check the path and its permissions"), None
    return _ok("config", f"{path} parses"), cfg


# ---------------------------------------------------------------- models


def check_models(cfg: Config) -> list[Check]:
    from appliance.models.manifest import ManifestError, load_manifest
    from appliance.models.provision import Status, quick_status, verify

    try:
        manifest = load_manifest()
    except ManifestError as e:
        return [Check("models", Level.FAIL, f"model manifest: {e}", "reinstall the appliance package")]
    out = []
    specs = list(manifest.defaults())
    if cfg.model.path and not (cfg.model.path.endswith(".gguf") or "/" in cfg.model.path):
        specs += [s for s in manifest.models if s.name == cfg.model.path and s not in specs]
    for spec in specs:
        name = f"model {spec.name}"
        status = quick_status(spec)
        if status is Status.UNVERIFIED:
            status = verify(spec).status
        if status is Status.OK:
            out.append(_ok(name, f"present, sha256 {spec.sha256[:12]}… matches"))
        else:
            fix = f"`appliance models pull {spec.name}` (as the owner of the models folder), or reinstall the bundle"
            level = Level.FAIL if spec.role == "generation" or cfg.cache.enabled else Level.WARN
            out.append(Check(name, level, status.value, fix))
    if cfg.model.path.endswith(".gguf") or "/" in cfg.model.path:
        p = Path(cfg.model.path).expanduser()
        if p.is_file():
            out.append(_ok("model file", f"{p} ({p.stat().st_size} bytes; not in the manifest, no sha256 to check)"))
        else:
            out.append(Check("model file", Level.FAIL, f"model.path {p} does not exist", "fix [model] path"))
    return out


def check_cache(cfg: Config) -> list[Check]:
    """The semantic cache's embedding model and its threshold: without either the service runs with the
    cache off (a WARN: requests are still served, only not from the cache)."""
    from appliance.cache.config import shipped_calibrations
    from appliance.cache.embedder import file_version
    from appliance.cache.names import resolve_embedder, stored_calibration
    from appliance.models.manifest import ManifestError, UnknownModelError

    c = cfg.cache
    if not c.enabled:
        return [_ok("semantic cache", "disabled ([cache] enabled = false)")]
    try:
        path = resolve_embedder(c.embedding_model or None)  # a tuned embedder's name too
    except (OSError, UnknownModelError, ManifestError) as e:
        fix = "fix [cache] embedding_model" if c.embedding_model else "`appliance models pull all-minilm-l6-v2`"
        return [Check("semantic cache", Level.WARN, f"off: {e}", fix)]
    if c.threshold:
        return [_ok("semantic cache", f"{path.name}, threshold {c.threshold} ([cache] threshold)")]
    if stored_calibration(path) is not None:
        return [_ok("semantic cache", f"{path.name}, a tuned embedder with its own calibrated decision")]
    version = file_version(path)
    cal = shipped_calibrations().get(version)
    if cal is None:
        fix = f"`appliance cache calibrate --embedding-model {path} --csv DATA`, then set [cache] threshold"
        return [Check("semantic cache", Level.WARN, f"off: no calibrated threshold for {version}", fix)]
    return [_ok("semantic cache", f"{path.name}, calibrated threshold {cal.threshold}")]


# ---------------------------------------------------------------- permissions


def _mode_check(name: str, path: Path, *, want_dir: bool, owner: str | None) -> Check:
    try:
        st = path.lstat()
    except FileNotFoundError:
        fix = "start the service once (systemd creates it) or rerun install.sh"
        return Check(name, Level.FAIL if want_dir else Level.WARN, f"{path} does not exist", fix)
    except OSError as e:
        return Check(name, Level.FAIL, f"cannot stat {path}: {e}", "run doctor as root or as the service user")
    if want_dir and not stat.S_ISDIR(st.st_mode):
        return Check(name, Level.FAIL, f"{path} is not a directory", f"remove it; the service needs a folder at {path}")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o002:
        return Check(name, Level.FAIL, f"{path} is world-writable ({mode:o})", f"chmod o-w {path}")
    if mode & 0o004:
        return Check(name, Level.WARN, f"{path} is world-readable ({mode:o})", f"chmod o-rwx {path}")
    if owner is not None:
        import pwd

        try:
            want = pwd.getpwnam(owner).pw_uid
        except KeyError:
            want = None
        if want is not None and st.st_uid != want:
            return Check(name, Level.FAIL, f"{path} is owned by uid {st.st_uid}, not {owner}", f"chown {owner}: {path}")
    return _ok(name, f"{path} ({mode:o})")


def check_permissions(cfg: Config, config_path: Path | None, service_user: str | None) -> list[Check]:
    out = [
        _mode_check("state dir", cfg.storage.path(), want_dir=True, owner=service_user),
        _mode_check("socket dir", cfg.server.socket_path().parent, want_dir=True, owner=service_user),
    ]
    sock = cfg.server.socket_path()
    if sock.exists():
        mode = stat.S_IMODE(sock.stat().st_mode)
        if mode & 0o007:
            out.append(Check("socket", Level.FAIL, f"{sock} is open to others ({mode:o})", "set server.socket_mode"))
        else:
            out.append(_ok("socket", f"{sock} ({mode:o})"))
    if config_path is not None:
        out.append(_mode_check("config file", config_path, want_dir=False, owner=None))
    return out


# ---------------------------------------------------------------- CPU and GPU


def check_cpu(flags: frozenset[str]) -> list[Check]:
    from appliance.models import ggml_cpu

    missing = [f for f in NEEDED_CPU_FLAGS if f not in flags]
    out = []
    if missing:
        out.append(
            Check(
                "cpu features",
                Level.WARN,
                f"the kernel does not report {', '.join(missing)}: ggml falls back to a slower variant",
                "run on an x86-64 CPU with AVX2/FMA/F16C (Haswell or newer)",
            )
        )
    else:
        extra = [f for f in ("avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
        out.append(_ok("cpu features", "avx2 fma f16c" + (" " + " ".join(extra) if extra else "")))
    err = ggml_cpu.error()
    loaded = ggml_cpu.loaded()
    if err is not None:
        out.append(Check("ggml cpu variant", Level.FAIL, err, f"unset {ggml_cpu.ENV_FORCE} or reinstall the bundle"))
    elif loaded is None or loaded.name == "built-in":
        out.append(_ok("ggml cpu variant", "built-in (a build linking one CPU backend; no runtime dispatch)"))
    else:
        refused = [f"{c.name} ({c.refused})" for c in loaded.candidates if c.refused]
        detail = f"{loaded.name} ({loaded.path})"
        out.append(_ok("ggml cpu variant", detail + (f"; refused: {'; '.join(refused)}" if refused else "")))
    return out


def ggml_kernels(info: Mapping[str, Any]) -> Check:
    """The instruction sets the loaded ggml CPU backend was built for: its kernels (what runs)."""
    feats = [str(f) for f in info.get("cpu_features", [])]
    on = [f.partition("=")[0] for f in feats if f.partition("=")[2] not in ("", "0")]
    simd = [f for f in on if f.startswith(("AVX", "AMX", "F16C", "FMA", "BMI", "SSE", "SSSE"))]
    if not simd:
        return Check("ggml kernels", Level.WARN, "the CPU backend reports no features", "reinstall the appliance")
    widest = next((w for w in ("AMX_INT8", "AVX512_BF16", "AVX512_VNNI", "AVX512", "AVX2") if w in simd), simd[-1])
    return _ok("ggml kernels", f"{widest} ({' '.join(simd)})")


def nvidia_smi() -> list[dict[str, str]]:
    """nvidia-smi's GPUs: name, memory.total, driver_version (empty without nvidia-smi or a driver)."""
    import subprocess

    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    fields = ("name", "memory.total", "driver_version")
    try:
        out = subprocess.run(
            [smi, f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    if out.returncode != 0:
        return []
    return [dict(zip(fields, (v.strip() for v in line.split(",")), strict=False)) for line in out.stdout.splitlines()]


def check_gpu(
    cfg: Config,
    info: Mapping[str, Any],
    smi: list[dict[str, str]],
    dev: Path = Path("/dev"),
) -> Check:
    """The GPU the appliance uses (from ggml: device, memory; the driver from nvidia-smi) and what
    [model] gpu_layers puts on it, or why it runs on the CPU."""
    from appliance.engine.placement import gpu_layers_plan

    nodes = sorted(p.name for p in dev.glob("nvidia*")) if dev.is_dir() else []
    gpu_backends = [str(b) for b in info.get("backends", []) if b != "CPU"]
    gpus = list(info.get("gpus", []))
    seen = ", ".join(f"{g.get('name', '?')} driver {g.get('driver_version', '?')}" for g in smi)
    if not gpu_backends:
        if smi or nodes:
            return Check(
                "gpu",
                Level.WARN,
                f"no GPU: CPU; this is a CPU build but the machine has {seen or '/dev/' + ', /dev/'.join(nodes)}",
                "build the CUDA flavour (`make serve GPU=cuda`, or the bundle's CUDA flavour) to use it",
            )
        return _ok("gpu", "no GPU: CPU")
    if not gpus:
        detail = f"no GPU: CPU (this build has ggml's {', '.join(gpu_backends)} backend, which finds no device)"
        if smi or nodes:
            return Check(
                "gpu",
                Level.WARN,
                f"{detail}; nvidia-smi: {seen or 'no answer'}",
                "check the driver (nvidia-smi) and that the service may open /dev/nvidia* (install.sh --gpu)",
            )
        return _ok("gpu", detail)
    g = gpus[0]
    gib = 1024**3
    driver = next((s.get("driver_version", "") for s in smi), "") or "unknown (no nvidia-smi)"
    what = gpu_layers_plan(cfg.model.gpu_layers)
    detail = (
        f"{g['name']} {g['description']}, {int(g['memory_total']) / gib:.1f} GiB"
        f" ({int(g['memory_free']) / gib:.1f} free), driver {driver}; offloaded: {what}"
    )
    if len(gpus) > 1:
        detail += f" (the first of {len(gpus)} GPUs)"
    return _ok("gpu", detail)


def native_info() -> dict[str, Any]:
    """_native.system_info(), or {} when the extension cannot load (the CPU check says why)."""
    try:
        from appliance import _native

        return dict(_native.system_info())
    except (ImportError, RuntimeError):
        return {}


# ---------------------------------------------------------------- ports and disk


def _port_check(name: str, value: str, ours: bool) -> Check:
    host, port = hostport(value)
    if port == 0:
        return _ok(name, f"{value}: any free port")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if ours:
                return _ok(name, f"{value} in use, by the running appliance (its socket answers)")
            return Check(
                name, Level.FAIL, f"{value} is not free: {e.strerror}", f"stop what listens on {port} or change it"
            )
    return _ok(name, f"{value} is free")


def check_ports(cfg: Config) -> list[Check]:
    from appliance.edge.grpc.server import unix_socket_in_use

    ours = unix_socket_in_use(cfg.server.socket_path())
    out = []
    for name, value in (("tcp port", cfg.server.tcp), ("metrics port", cfg.server.metrics)):
        if value:
            out.append(_port_check(name, value, ours))
    return out


def check_disk(paths: Iterable[Path], min_free: int = MIN_FREE_BYTES) -> list[Check]:
    out = []
    seen: set[int] = set()
    for p in paths:
        existing = next((q for q in (p, *p.parents) if q.exists()), Path("/"))
        dev = existing.stat().st_dev
        if dev in seen:
            continue
        seen.add(dev)
        free = shutil.disk_usage(existing).free
        gib = free / 1024**3
        if free < min_free:
            out.append(
                Check(
                    "disk",
                    Level.WARN,
                    f"{gib:.1f} GiB free under {existing}",
                    "free space: the ledger, history and cache grow",
                )
            )
        else:
            out.append(_ok("disk", f"{gib:.1f} GiB free under {existing}"))
    return out


# ---------------------------------------------------------------- all together


def default_config_path(explicit: str | None) -> Path | None:
    if explicit:
        return Path(explicit)
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


TRAINING_STACK = ("torch", "transformers", "peft")


def check_training() -> Check:
    """The training stack `appliance distill train` and `cache tune` need: installed, which versions,
    on which device. Without it the service runs; only training is unavailable."""
    from importlib import metadata

    versions, missing = [], []
    for dist in TRAINING_STACK:
        try:
            versions.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            missing.append(dist)
    if missing:
        fix = "make serve installs it; or pip install 'appliance[train]' (the offline bundle carries it)"
        return Check("training stack", Level.WARN, f"missing {', '.join(missing)}: distill train is unavailable", fix)
    try:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    except Exception as e:  # a broken install raises anything from its native libraries
        return Check("training stack", Level.WARN, f"torch does not load: {e}", "reinstall torch==2.13.0")
    return _ok("training stack", f"{', '.join(versions)} on {device}")


def run_checks(config: str | None, service_user: str | None = None) -> list[Check]:
    from appliance.models import ggml_cpu
    from appliance.models.provision import data_home

    path = default_config_path(config)
    first, cfg = check_config(path)
    checks = [first]
    if cfg is None:
        return checks
    info = native_info()
    steps: list[Callable[[], list[Check]]] = [
        lambda: check_models(cfg),
        lambda: check_cache(cfg),
        lambda: check_permissions(cfg, path, service_user),
        lambda: check_cpu(ggml_cpu.cpu_flags()),
        lambda: [ggml_kernels(info)],
        lambda: [check_gpu(cfg, info, nvidia_smi())],
        lambda: [check_training()],
        lambda: check_ports(cfg),
        lambda: check_disk([cfg.storage.path(), data_home() / "models"]),
    ]
    for step in steps:
        checks += step()
    return checks


def service_user_default() -> str | None:
    """Check ownership against the `appliance` user when it exists (an installed system)."""
    import pwd

    try:
        pwd.getpwnam(SERVICE_USER)
    except KeyError:
        return None
    return SERVICE_USER


def format_text(checks: list[Check]) -> str:
    lines = []
    for c in checks:
        lines.append(f"[{c.level.value:>4}] {c.name}: {c.detail}")
        if c.fix:
            lines.append(f"       fix: {c.fix}")
    fails = sum(c.level is Level.FAIL for c in checks)
    warns = sum(c.level is Level.WARN for c in checks)
    lines.append(f"{fails} failed, {warns} warning(s), {len(checks) - fails - warns} ok")
    return "\n".join(lines)


def exit_code(checks: list[Check]) -> int:
    return 1 if any(c.level is Level.FAIL for c in checks) else 0

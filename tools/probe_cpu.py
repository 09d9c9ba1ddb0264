"""The widest x86-64 instruction set this host really executes, as ggml build flags.

`make build` / `make serve` build llama-cpp-python's ggml with the flags this prints. /proc/cpuinfo and
CPUID say what the silicon has, not what the kernel or hypervisor lets a process run (a guest can list
AVX-512 or AMX and still fault on the first such instruction), so each level is decided by compiling a
tiny C program for it (tools/cpu_probe/NAME.c, with the same -m flags ggml's CMake passes) and running
it: it passes only when it exits 0 with the right arithmetic; SIGILL, a wrong sum, or a compiler that
cannot build it make it fail. The portable AVX2 build (what every build used before) is the fallback.

    python3 tools/probe_cpu.py                # what passed and the flags chosen (human-readable)
    python3 tools/probe_cpu.py --cmake-args   # the extra ggml CMake flags (empty: the AVX2 build)
    python3 tools/probe_cpu.py --name         # the level's name, e.g. avx2 or avx512-vnni-bf16
    python3 tools/probe_cpu.py --json

AMX is never chosen by the probe alone: on a VM here the kernel granted tile state and a small tile
probe ran, yet ggml's AMX kernels faulted (appliance/models/ggml_cpu.py tells the story). It needs the
amx probe to pass AND APPLIANCE_CPU_AMX=1 (`make serve CPU_AMX=1`).

Environment: APPLIANCE_CPU_PROBE_FAKE="avx2,avx512,..." replaces running the probes with that list of
passing ones (for tests, or to build for another machine); APPLIANCE_CPU_LEVEL="avx2" (or another
name this prints) skips the probes and asks for that level as it is. Results are cached in
build/cpu-probe.json, keyed by the CPU's model, flags and microcode, the kernel and the compiler.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBES = Path(__file__).resolve().parent / "cpu_probe"
CACHE = ROOT / "build" / "cpu-probe.json"
ENV_FAKE = "APPLIANCE_CPU_PROBE_FAKE"
ENV_LEVEL = "APPLIANCE_CPU_LEVEL"
ENV_AMX = "APPLIANCE_CPU_AMX"

_BASE = ("-mavx", "-mavx2", "-mfma", "-mf16c", "-mbmi2")
_AVX512 = (*_BASE, "-mavx512f", "-mavx512cd", "-mavx512vl", "-mavx512dq", "-mavx512bw")


@dataclass(frozen=True)
class Probe:
    name: str
    cflags: tuple[str, ...]  # the -m flags ggml's CMake passes for its option(s)
    cmake: tuple[str, ...]  # the ggml options it adds on top of the AVX2 build
    needs: tuple[str, ...]  # probes that must pass too


# in the order the name lists them; ggml/src/ggml-cpu/CMakeLists.txt maps each option to its -m flags
PROBE_LIST: tuple[Probe, ...] = (
    Probe("avx2", _BASE, (), ()),
    Probe("avx512", _AVX512, ("-DGGML_AVX512=ON",), ("avx2",)),
    Probe("avx512_vbmi", (*_AVX512, "-mavx512vbmi"), ("-DGGML_AVX512_VBMI=ON",), ("avx512",)),
    Probe("avx512_vnni", (*_AVX512, "-mavx512vnni"), ("-DGGML_AVX512_VNNI=ON",), ("avx512",)),
    Probe("avx512_bf16", (*_AVX512, "-mavx512bf16"), ("-DGGML_AVX512_BF16=ON",), ("avx512",)),
    Probe("avx_vnni", (*_BASE, "-mavxvnni"), ("-DGGML_AVX_VNNI=ON",), ("avx2",)),
    Probe(
        "amx",
        (*_AVX512, "-mavx512vnni", "-mamx-tile", "-mamx-int8", "-pthread"),
        ("-DGGML_AMX_TILE=ON", "-DGGML_AMX_INT8=ON"),
        ("avx512_vnni",),
    ),
)
PROBES_BY_NAME = {p.name: p for p in PROBE_LIST}


class ProbeError(ValueError):
    """A bad level name or fake list."""


@dataclass(frozen=True)
class Choice:
    features: tuple[str, ...]  # probes whose flags the build uses, avx2 first
    passed: tuple[str, ...]  # every probe that passed
    notes: tuple[str, ...]  # why something that passed is not used, or why the fallback

    @property
    def name(self) -> str:
        """avx2, avx512, avx512-vnni-bf16, avx2-avx_vnni: the wheel cache's key prefix."""
        if "avx512" in self.features:
            rest = [f.removeprefix("avx512_") for f in self.features if f not in ("avx2", "avx512")]
            return "-".join(["avx512", *rest])
        return "-".join(self.features)

    @property
    def cmake_args(self) -> list[str]:
        return [a for f in self.features for a in PROBES_BY_NAME[f].cmake]


def select(passed: set[str] | frozenset[str], *, amx_opt_in: bool = False) -> Choice:
    """The widest set of levels whose probes (and the probes they build on) passed."""
    unknown = sorted(set(passed) - PROBES_BY_NAME.keys())
    if unknown:
        raise ProbeError(f"unknown probe(s) {', '.join(unknown)}; known: {', '.join(PROBES_BY_NAME)}")
    notes: list[str] = []
    if "avx2" not in passed:
        notes.append("the avx2 probe failed: the portable AVX2 build anyway (it may not run on this CPU)")

    def usable(name: str) -> bool:
        p = PROBES_BY_NAME[name]
        return name in passed and all(usable(n) for n in p.needs)

    features = ["avx2"]
    for p in PROBE_LIST[1:]:
        if not usable(p.name):
            continue
        if p.name == "avx_vnni" and "avx512_vnni" in features:
            continue  # the AVX-512 VNNI kernels cover it
        if p.name == "amx" and not amx_opt_in:
            notes.append(f"the amx probe passed; AMX is used only with {ENV_AMX}=1 (see this file's docstring)")
            continue
        features.append(p.name)
    ordered = tuple(n for n in PROBES_BY_NAME if n in passed)
    return Choice(tuple(features), ordered, tuple(notes))


def _no_core_dump() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_probe(probe: Probe, workdir: Path, cc: str) -> tuple[bool, str]:
    """Compile and run one probe: (passed, why not)."""
    exe = workdir / probe.name
    src = PROBES / f"{probe.name}.c"
    try:
        comp = subprocess.run(
            [cc, "-O1", *probe.cflags, str(src), "-o", str(exe)], capture_output=True, text=True, timeout=300
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"cannot compile: {e}"
    if comp.returncode != 0:
        return False, "the compiler cannot build it: " + (comp.stderr.strip().splitlines() or ["?"])[-1]
    try:
        # in the scratch folder, with no core dump, since a refused instruction is the expected failure
        run = subprocess.run(
            [str(exe)], capture_output=True, text=True, timeout=30, cwd=workdir, preexec_fn=_no_core_dump
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"did not run: {e}"
    if run.returncode < 0:
        return False, f"killed by signal {-run.returncode}" + (" (illegal instruction)" if run.returncode == -4 else "")
    if run.returncode != 0:
        return False, run.stdout.strip() or f"exit status {run.returncode}"
    return True, ""


def fingerprint(cc: str) -> str:
    """What the probes' answer depends on: the CPU as the kernel shows it, the kernel, the compiler."""
    h = hashlib.sha256()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key = line.partition(":")[0].strip()
            if key in ("model name", "flags", "microcode", "vendor_id", "cpu family", "model", "stepping"):
                h.update(line.encode())
                if key == "flags":
                    break  # the first CPU is enough
    except OSError:
        pass
    h.update(platform.release().encode())
    h.update((shutil.which(cc) or cc).encode())
    for p in sorted(PROBES.glob("*.c")):
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def probe_all(cc: str = "cc", cache: Path | None = CACHE) -> tuple[set[str], dict[str, str]]:
    """Every probe's outcome on this host: (passed, why each other one failed); cached per fingerprint."""
    fp = fingerprint(cc)
    if cache is not None and cache.is_file():
        try:
            data = json.loads(cache.read_text())
            if data.get("fingerprint") == fp:
                return set(data["passed"]), dict(data["failed"])
        except (OSError, ValueError, KeyError):
            pass
    passed: set[str] = set()
    failed: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="cpu-probe-") as d:
        for p in PROBE_LIST:
            ok, why = run_probe(p, Path(d), cc)
            if ok:
                passed.add(p.name)
            else:
                failed[p.name] = why
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            tmp.write_text(json.dumps({"fingerprint": fp, "passed": sorted(passed), "failed": failed}, indent=1))
            tmp.replace(cache)
        except OSError:
            pass
    return passed, failed


def parse_list(text: str) -> set[str]:
    return {n.strip() for n in text.replace("+", ",").split(",") if n.strip()}


def level_features(name: str) -> set[str]:
    """The probes a level name stands for: "avx512-vnni-bf16" -> {avx2, avx512, avx512_vnni, avx512_bf16}."""
    parts = [p for p in name.strip().split("-") if p]
    if not parts or parts[0] not in ("avx2", "avx512"):
        raise ProbeError(f"{ENV_LEVEL}={name!r}: a level starts with avx2 or avx512 (e.g. avx2, avx512-vnni-bf16)")
    out = {"avx2"}
    for part in parts:
        if part in ("avx2", "avx512"):
            out.add(part)
        elif part in ("vbmi", "vnni", "bf16") and "avx512" in out:
            out.add(f"avx512_{part}")
        elif part in PROBES_BY_NAME:
            out.add(part)
        else:
            raise ProbeError(f"{ENV_LEVEL}={name!r}: unknown part {part!r}")
    return out


def choose(
    env: dict[str, str] | None = None, cc: str = "cc", cache: Path | None = CACHE
) -> tuple[Choice, dict[str, str]]:
    """The level to build: from APPLIANCE_CPU_LEVEL, else the fake list, else the probes."""
    env = dict(os.environ) if env is None else env
    amx = env.get(ENV_AMX, "") == "1"
    if env.get(ENV_LEVEL):
        return select(level_features(env[ENV_LEVEL]), amx_opt_in=True), {}
    if ENV_FAKE in env:
        return select(parse_list(env[ENV_FAKE]), amx_opt_in=amx), {}
    passed, failed = probe_all(cc, cache)
    return select(passed, amx_opt_in=amx), failed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    out = ap.add_mutually_exclusive_group()
    out.add_argument("--cmake-args", action="store_true", help="print the extra ggml CMake flags (empty for avx2)")
    out.add_argument("--name", action="store_true", help="print the level's name (the wheel cache's key prefix)")
    out.add_argument("--json", action="store_true", help="print everything as JSON")
    ap.add_argument("--cc", default=os.environ.get("CC", "cc"), help="the C compiler (default: $CC or cc)")
    ap.add_argument("--no-cache", action="store_true", help=f"run the probes even if {CACHE} has the answer")
    args = ap.parse_args(argv)
    try:
        choice, failed = choose(cc=args.cc, cache=None if args.no_cache else CACHE)
    except ProbeError as e:
        print(f"probe_cpu: {e}", file=sys.stderr)
        return 2
    if args.cmake_args:
        print(" ".join(choice.cmake_args))
    elif args.name:
        print(choice.name)
    elif args.json:
        doc = {
            "name": choice.name,
            "features": list(choice.features),
            "cmake_args": choice.cmake_args,
            "passed": list(choice.passed),
            "failed": failed,
            "notes": list(choice.notes),
        }
        print(json.dumps(doc, indent=1))
    else:
        for p in PROBE_LIST:
            state = "passed" if p.name in choice.passed else f"failed: {failed.get(p.name, 'not run')}"
            print(f"{p.name:12} {state}")
        for n in choice.notes:
            print(f"note: {n}")
        print(f"build: {choice.name}  {' '.join(choice.cmake_args) or '(the portable AVX2 flags only)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

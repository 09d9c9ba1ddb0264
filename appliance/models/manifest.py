"""The model manifest: which GGUF files the appliance serves and how to provision each one offline.

The manifest is a TOML file (``models/manifest.toml`` in the source tree, ``appliance/manifest.toml``
inside an installed wheel) decoded with msgspec into the frozen structs below. Unknown fields,
wrong types and malformed values are rejected; the error names the manifest file and the
offending field path (for example ``$.models[0].sha256``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import msgspec

import appliance

# A model name as typed on the command line: lower-case, digits, '.', '_' and '-'.
ModelName = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]
# A bare file name (no directories) inside <home>/models/.
FileName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
Sha256 = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
# A pinned pip requirement, exactly ``distribution==version``.
Requirement = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9][A-Za-z0-9.+!_-]*$")]
# A top-level importable module name (the directory a pip package installs into site-packages).
ModuleName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
# A relative path inside such a module: no leading '/', no '..' component.
RelPath = Annotated[str, msgspec.Meta(pattern=r"^(?!.*(^|/)\.\.(/|$))[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")]
# Builders are code shipped inside this package; a manifest can only name one of those.
BuilderModule = Annotated[str, msgspec.Meta(pattern=r"^appliance\.models\.builders\.[a-z_][a-z0-9_]*$")]
Role = Literal["generation", "embedding"]

MANIFEST_NAME = "manifest.toml"


class ManifestError(Exception):
    """The manifest is missing, is not valid TOML, or does not match the schema."""


class UnknownModelError(LookupError):
    """A model name that the manifest does not list."""


class _Strict(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    pass


class Chunk(_Strict, frozen=True):
    """One piece of a split file: ``<site-packages>/<module>/<path>``."""

    module: ModuleName
    path: RelPath


class PypiChunksSource(_Strict, frozen=True, tag_field="kind", tag="pypi-chunks"):
    """The GGUF is the concatenation, in order, of chunk files shipped in pip packages."""

    requirement: Requirement
    chunks: Annotated[tuple[Chunk, ...], msgspec.Meta(min_length=1)]


class BuilderSource(_Strict, frozen=True, tag_field="kind", tag="builder"):
    """The GGUF is produced by ``builder.build(input_dir, out_path)`` from files in a pip package."""

    builder: BuilderModule
    requirement: Requirement
    module: ModuleName
    path: RelPath | None = None


Source = PypiChunksSource | BuilderSource


class ModelSpec(_Strict, frozen=True):
    name: ModelName
    role: Role
    architecture: Annotated[str, msgspec.Meta(min_length=1)]
    file: FileName
    sha256: Sha256
    size: Annotated[int, msgspec.Meta(gt=0)]
    source: Source
    default: bool = False
    license: str = ""
    instruct: bool = True  # false: a base model, which continues text rather than following instructions


class Manifest(_Strict, frozen=True):
    schema_version: Literal[1]
    models: tuple[ModelSpec, ...]

    def get(self, name: str) -> ModelSpec:
        for model in self.models:
            if model.name == name:
                return model
        known = ", ".join(m.name for m in self.models)
        raise UnknownModelError(f"unknown model {name!r}; the manifest lists: {known}")

    def base_model_names(self) -> set[str]:
        """How the service names the base (not instruction-tuned) generation models: manifest name and
        file stem."""
        return {
            n for m in self.models if m.role == "generation" and not m.instruct for n in (m.name, Path(m.file).stem)
        }

    def defaults(self) -> tuple[ModelSpec, ...]:
        return tuple(m for m in self.models if m.default)


def requirement_parts(requirement: str) -> tuple[str, str]:
    """``"pkg-name==1.0"`` -> ``("pkg-name", "1.0")``."""
    dist, _, version = requirement.partition("==")
    return dist, version


def manifest_candidates() -> tuple[Path, ...]:
    """Where the manifest is looked for, in order: inside the installed package, then the source tree."""
    pkg_file = Path(appliance.__file__)
    return (pkg_file.with_name(MANIFEST_NAME), pkg_file.parents[1] / "models" / MANIFEST_NAME)


def find_manifest() -> Path:
    candidates = manifest_candidates()
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ManifestError("no model manifest found; looked at: " + ", ".join(str(c) for c in candidates))


def parse_manifest(text: str | bytes, origin: Path | str) -> Manifest:
    """Decode and validate manifest text; ``origin`` is only used in error messages."""
    try:
        manifest = msgspec.toml.decode(text, type=Manifest)
    except msgspec.ValidationError as exc:
        raise ManifestError(f"invalid model manifest {origin}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ManifestError(f"model manifest {origin} is not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ManifestError(f"model manifest {origin} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    _check_unique(manifest, origin)
    return manifest


def load_manifest(path: Path | None = None) -> Manifest:
    """Load the manifest at ``path``, or the one :func:`find_manifest` finds."""
    path = find_manifest() if path is None else path
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ManifestError(f"cannot read model manifest {path}: {exc.strerror or exc}") from None
    return parse_manifest(data, path)


def _check_unique(manifest: Manifest, origin: Path | str) -> None:
    for field in ("name", "file"):
        seen: set[str] = set()
        for index, model in enumerate(manifest.models):
            value = getattr(model, field)
            if value in seen:
                raise ManifestError(
                    f"invalid model manifest {origin}: duplicate {field} {value!r} - at `$.models[{index}].{field}`"
                )
            seen.add(value)

"""Turns what a user typed for --model (nothing, a manifest name, or a file path) into a GGUF path."""

from __future__ import annotations

from pathlib import Path

from appliance.models.manifest import UnknownModelError, load_manifest
from appliance.models.provision import model_path


def resolve_model(ref: str | None, role: str = "generation") -> Path:
    """The file to load. Raises FileNotFoundError saying how to provision it when it is missing, and
    UnknownModelError for a name the manifest lacks or gives another role."""
    if ref is not None and (ref.endswith(".gguf") or "/" in ref):
        path = Path(ref).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"model file {path} does not exist")
        return path
    manifest = load_manifest()
    if ref is None:
        candidates = [m for m in manifest.defaults() if m.role == role]
        if not candidates:
            raise FileNotFoundError(f"the manifest names no default {role} model; pass --model")
        spec = candidates[0]
    else:
        spec = manifest.get(ref)
        if spec.role != role:
            article = "an" if role[0] in "aeiou" else "a"
            raise UnknownModelError(
                f"model '{spec.name}' is a {spec.role} model; {article} {role} model is needed here"
            )
    path = model_path(spec)
    if not path.is_file():
        raise FileNotFoundError(
            f"model '{spec.name}' is not provisioned ({path} is missing); run `appliance models pull {spec.name}`"
        )
    return path

"""Where tuned embedders live and what ``--embedding-model`` / ``[cache] embedding_model`` name.

A name given to ``appliance cache tune --out NAME`` is the file ``$APPLIANCE_HOME/embedders/NAME.gguf``.
An embedding-model reference is, in order: a path (it ends in ``.gguf`` or holds a ``/``), a tuned
embedder's name, or a manifest model name (``all-minilm-l6-v2``); none means the default.
"""

from __future__ import annotations

import re
from pathlib import Path

from appliance.cache.errors import ConfigError

NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


def tuned_dir() -> Path:
    from appliance.models.provision import data_home

    return data_home() / "embedders"


def is_path(ref: str) -> bool:
    return ref.endswith(".gguf") or "/" in ref


def tuned_path(ref: str) -> Path:
    """Where ``cache tune --out REF`` writes: REF itself when it is a path, else the tuned embedders' folder."""
    if is_path(ref):
        return Path(ref).expanduser()
    if not NAME.fullmatch(ref):
        raise ConfigError(
            f"embedder name {ref!r}: use 1-64 of a-z 0-9 . _ - (starting with a letter or digit), "
            "or a path ending in .gguf"
        )
    return tuned_dir() / f"{ref}.gguf"


def resolve_embedder(ref: str | None) -> Path:
    """The GGUF file an embedding-model reference names. Raises FileNotFoundError (saying how to get it)
    or ``UnknownModelError`` for a name that is neither tuned nor in the manifest."""
    from appliance.models.modelref import resolve_model

    if ref and not is_path(ref) and NAME.fullmatch(ref) and tuned_path(ref).is_file():
        return tuned_path(ref)
    return resolve_model(ref or None, role="embedding")


def stored_calibration(path: Path) -> str | None:
    """The calibration a tuned embedder's GGUF carries (its JSON text), read without loading the model;
    None when it has none or gguf-py cannot read the file (llama.cpp will say what is wrong with it)."""
    import struct

    import gguf

    from appliance.cache.embedder import CALIBRATION_KEY

    try:
        field = gguf.GGUFReader(path).get_field(CALIBRATION_KEY)
    except (OSError, ValueError, IndexError, KeyError, struct.error):
        return None
    return None if field is None else str(field.contents())

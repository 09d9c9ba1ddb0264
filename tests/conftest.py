"""Shared fixtures: tiny generated models, the provisioned default model, and the reference."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

TINY_ARCHS = ("llama", "qwen2", "qwen3", "gemma3")
TINY_WTYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_K", "Q6_K")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_dir: Path) -> Iterator[object]:
    """tiny_model(arch, wtype="F32", **overrides) -> Path, generated once per session."""
    from tinymodels import make_tiny_model

    made: dict[tuple[str, str, tuple[tuple[str, object], ...]], Path] = {}

    def get(arch: str, wtype: str = "F32", **overrides: object) -> Path:
        key = (arch, wtype, tuple(sorted(overrides.items())))
        if key not in made:
            suffix = "-".join(f"{k}{v}" for k, v in key[2])
            made[key] = make_tiny_model(tiny_dir / f"{arch}-{wtype}{suffix}.gguf", arch, wtype, **overrides)
        return made[key]

    yield get


@pytest.fixture(scope="session")
def default_model() -> Path:
    """The default generation model, provisioned by `make models` (`appliance models pull`)."""
    from appliance.models.modelref import resolve_model

    try:
        return resolve_model(None)
    except FileNotFoundError as e:
        pytest.fail(f"{e} (make test provisions it; APPLIANCE_HOME={os.environ.get('APPLIANCE_HOME')})")

"""The package layout: imports only point down the layers, and README.md's picture is the code's."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

TOOL = Path(__file__).resolve().parents[1] / "tools" / "layout.py"


def _layout() -> ModuleType:
    spec = importlib.util.spec_from_file_location("layout_tool", TOOL)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_imports_point_down() -> None:
    layout = _layout()
    assert layout.check() == []
    # the check sees real edges: the service reaches the engine, the engine never the service
    graph = layout.imports()
    assert "engine" in graph["service"] and "service" not in graph["engine"]


def test_every_folder_has_a_layer() -> None:
    layout = _layout()
    for d in sorted(p for p in layout.PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()):
        layout.layer_of(d.name)  # KeyError names a folder without one


def test_readme_picture_is_the_code() -> None:
    layout = _layout()
    block = layout.readme_block(layout.README.read_text("utf-8"))
    assert block == layout.picture(), "README.md's layout picture is stale: run `make layout`"


def test_an_upward_import_is_named(tmp_path: Path) -> None:
    layout = _layout()
    pkg = tmp_path / "appliance"
    for unit, source in {
        "engine": "from appliance.service.app import Service\n",
        "service": "from appliance.engine.core import EngineCore\n",
        "cache": "import appliance.cloud.pool\n",
    }.items():
        (pkg / unit).mkdir(parents=True)
        (pkg / unit / "__init__.py").write_text("")
        (pkg / unit / "mod.py").write_text(source)
    layout.ROOT, layout.PACKAGE = tmp_path, pkg
    assert layout.check() == [
        "appliance.cache.mod imports appliance.cloud: stages -> stages",
        "appliance.engine.mod imports appliance.service: "
        "the local engine, model files -> the service and its request path",
    ]

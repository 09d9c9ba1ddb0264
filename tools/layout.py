"""The package layout, read from the code: which layer each folder of appliance/ is, and which layers
its imports reach. `check()` lists imports that point up (or sideways between peers); `picture()` is
the Mermaid diagram in README.md's layout section, made from the real import graph.

    python tools/layout.py            # print the picture
    python tools/layout.py --write    # rewrite README.md's picture (make layout)
    python tools/layout.py --check    # exit 1 if an import points up or the README's picture is stale
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "appliance"
README = ROOT / "README.md"
BEGIN, END = "<!-- layout: made by tools/layout.py; do not edit -->", "<!-- layout end -->"

# top to bottom; a unit may import units of lower layers only (never a peer in its own layer)
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("the command line", ("cli",)),
    ("benchmarks", ("bench",)),
    ("faces", ("edge",)),
    ("the service and its request path", ("service",)),
    ("routing and the cascade", ("route",)),
    ("stages", ("cache", "cloud", "distill")),
    ("the floor", ("common",)),
    ("the local engine, model files", ("engine", "models")),
    ("the native core (C++)", ("_native",)),
]
ENTRY = {"__init__", "__main__"}  # the package's own entry points, above every layer


def layer_of(unit: str) -> int:
    for i, (_, units) in enumerate(LAYERS):
        if unit in units:
            return i
    raise KeyError(f"appliance/{unit} is in no layer: add it to tools/layout.py's LAYERS")


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports() -> dict[str, dict[str, set[str]]]:
    """unit -> imported unit -> the modules of `unit` that import it."""
    graph: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        src = unit_of(module)
        for node in ast.walk(ast.parse(path.read_text("utf-8"), str(path))):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module == "appliance":
                    names = [f"appliance.{a.name}" for a in node.names if a.name != "__version__"]
                elif node.module.startswith("appliance."):
                    names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("appliance.")]
            for name in names:
                dst = unit_of(name)
                if dst != src:
                    graph[src][dst].add(module)
    return graph


def check() -> list[str]:
    """Every import that does not point down, as 'module imports unit (layer a -> layer b)'."""
    bad = []
    for src, targets in sorted(imports().items()):
        if src in ENTRY:
            continue
        for dst, modules in sorted(targets.items()):
            if layer_of(dst) <= layer_of(src):
                for m in sorted(modules):
                    bad.append(f"{m} imports appliance.{dst}: {LAYERS[layer_of(src)][0]} -> {LAYERS[layer_of(dst)][0]}")
    return bad


def picture() -> str:
    graph = imports()
    lines = ["```mermaid", "flowchart TD"]
    for i, (title, units) in enumerate(LAYERS):
        present = [u for u in units if u == "_native" or (PACKAGE / u).is_dir()]
        if not present:
            continue
        lines.append(f'    subgraph L{i}["{title}"]')
        lines.extend(
            f'        {u.strip("_")}["{u}/"]' if u != "_native" else '        native["native/ (_native)"]'
            for u in present
        )
        lines.append("    end")
    for src in sorted(graph, key=lambda u: (layer_of(u) if u not in ENTRY else -1, u)):
        if src in ENTRY:
            continue
        for dst in sorted(graph[src], key=lambda u: (layer_of(u), u)):
            lines.append(f"    {src.strip('_')} --> {dst.strip('_') if dst != '_native' else 'native'}")
    lines.append("```")
    return "\n".join(lines)


def readme_block(text: str) -> str | None:
    if BEGIN not in text or END not in text:
        return None
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n")


def main(argv: list[str]) -> int:
    pic = picture()
    if "--write" in argv:
        text = README.read_text("utf-8")
        if readme_block(text) is None:
            print(f"README.md has no {BEGIN!r} ... {END!r} section", file=sys.stderr)
            return 1
        head, rest = text.split(BEGIN, 1)
        README.write_text(head + BEGIN + "\n" + pic + "\n" + END + rest.split(END, 1)[1], "utf-8")
        return 0
    if "--check" in argv:
        problems = check()
        if readme_block(README.read_text("utf-8")) != pic:
            problems.append("README.md's layout picture is stale: run `make layout`")
        print("\n".join(problems) or "layout ok")
        return 1 if problems else 0
    print(pic)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""`appliance` command line: each sub-command lives in its own module and registers itself here."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from appliance import __version__


def build_parser() -> argparse.ArgumentParser:
    from appliance.cli import bench, cache, distill, doctor, generate, models, route, serve

    parser = argparse.ArgumentParser(
        prog="appliance",
        description="On-prem LLM runtime: local GGUF models on our own ggml core, with caching and cloud fallback.",
    )
    parser.add_argument("--version", action="version", version=f"appliance {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    models.register(sub)
    generate.register(sub)
    bench.register(sub)
    serve.register(sub)
    cache.register(sub)
    doctor.register(sub)
    route.register(sub)
    distill.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc: int = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return rc


if __name__ == "__main__":
    raise SystemExit(main())

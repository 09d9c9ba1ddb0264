"""`appliance serve`, `appliance chat` and `appliance report`: the gRPC service, its interactive
client, and the usage/savings report. `register(sub)` adds the three commands."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.cli.repl import prompt_lines
from appliance.models.manifest import ManifestError

if TYPE_CHECKING:
    from appliance.common.config import Config


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve",
        help="run the service (gRPC on a Unix socket, optional TCP; optional OpenAI/Ollama HTTP edge)",
        description="Serve the Appliance gRPC API on a Unix socket (and TCP when configured), and the "
        "OpenAI-compatible and Ollama HTTP API when [http] listen is set, until SIGTERM, then drain. "
        "Every setting has a default; --config names a TOML file (see appliance/common/config.py).",
    )
    p.add_argument("--config", "-c", default=None, help="TOML config file (default: built-in defaults)")
    p.add_argument("--model", "-m", default=None, help="override model.path (manifest name or .gguf path)")
    p.add_argument("--socket", default=None, help="override server.unix_socket")
    p.add_argument("--tcp", default=None, help="override server.tcp (host:port; needs [[tenants]] with tokens)")
    p.add_argument(
        "--http",
        default=None,
        help="override [http] listen: the OpenAI/Ollama HTTP edge on host:port ('' turns it off; an address "
        "other than loopback needs [[tenants]] with tokens)",
    )
    p.add_argument("--hash-token", action="store_true", help="print a new bearer token and its token_sha256, exit")
    p.add_argument("--check-config", action="store_true", help="validate the config, print it as JSON, exit")
    p.set_defaults(func=run_serve)

    c = sub.add_parser("chat", help="interactive chat with a running server", description="Chat over gRPC.")
    c.add_argument("--config", "-c", default=None, help="TOML config (to find the socket)")
    c.add_argument("--target", default=None, help="gRPC target, e.g. unix:/path.sock or 127.0.0.1:50051")
    c.add_argument("--token", default=os.environ.get("APPLIANCE_TOKEN"), help="bearer token (TCP); $APPLIANCE_TOKEN")
    c.add_argument("--session", default=None, help="session id to continue (default: a new one)")
    c.add_argument("--system", default="", help="system prompt for a new session")
    c.add_argument("--max-tokens", "-n", type=int, default=128)
    c.add_argument("--temperature", "-t", type=float, default=0.0)
    c.set_defaults(func=run_chat)

    r = sub.add_parser(
        "report", help="usage and savings per tenant and period", description="Totals and savings from the ledger."
    )
    r.add_argument("--config", "-c", default=None, help="TOML config (to find the ledger and prices)")
    r.add_argument("--tenant", default=None, help="only this tenant")
    r.add_argument("--period", choices=("day", "week", "month", "all"), default="day", help="group by (default day)")
    r.add_argument("--since", default=None, help="ISO date; default: the start of the ledger")
    r.add_argument("--png", default=None, help="write a chart of cost vs cloud counterfactual to this PNG file")
    r.add_argument("--json", action="store_true", help="print JSON")
    r.set_defaults(func=run_report)


def _config(args: argparse.Namespace) -> Config:
    from appliance.common.config import load_config

    return load_config(args.config)


def run_serve(args: argparse.Namespace) -> int:
    import msgspec
    import uvloop

    from appliance.common.config import ConfigError, hostport, is_loopback
    from appliance.edge.run import Faces, serve
    from appliance.engine.local_backend import LocalBackend
    from appliance.models.modelref import resolve_model
    from appliance.service.auth import hash_token, new_token

    if args.hash_token:
        token = new_token()
        print(f"token:        {token}\ntoken_sha256: {hash_token(token)}")
        return 0
    try:
        cfg = _config(args)
        server_cfg = cfg.server
        model_cfg = cfg.model
        if args.socket is not None:
            server_cfg = msgspec.structs.replace(server_cfg, unix_socket=args.socket)
        if args.tcp is not None:
            hostport(args.tcp)
            server_cfg = msgspec.structs.replace(server_cfg, tcp=args.tcp)
        http_cfg = cfg.http
        if args.http is not None:
            if args.http:
                hostport(args.http)
            http_cfg = msgspec.structs.replace(http_cfg, listen=args.http)
        if args.model is not None:
            model_cfg = msgspec.structs.replace(model_cfg, path=args.model)
        cfg = msgspec.structs.replace(cfg, server=server_cfg, http=http_cfg, model=model_cfg)
        if cfg.server.tcp and not cfg.tenants:
            raise ConfigError("$.server.tcp: TCP needs at least one [[tenants]] entry with a token_sha256")
        if cfg.http.listen and not cfg.tenants and not is_loopback(hostport(cfg.http.listen)[0]):
            raise ConfigError(
                "$.http.listen: a listener on a non-loopback address needs at least one [[tenants]] entry"
                " with a token_sha256"
            )
        model_path = resolve_model(cfg.model.path or None)
        for where, cloud in cfg.cloud_sections():
            cloud.api_key(where)  # a missing key stops the start here, naming the field (never the key)
    except (ConfigError, OSError, LookupError, ManifestError) as e:
        print(f"appliance serve: {e}", file=sys.stderr)
        return 2
    if args.check_config:
        print(msgspec.json.encode(cfg).decode())
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.umask(0o077)  # the socket is chmod-ed to server.socket_mode right after binding

    def load() -> LocalBackend:
        m = cfg.model
        return LocalBackend.load(
            model_path,
            m.n_ctx,
            m.threads,
            cfg.server.max_concurrent,
            m.kv_cache_mb,
            m.max_batched_tokens,
            gpu_layers=m.gpu_layers,
        )

    def ready(faces: Faces) -> None:
        server = faces.grpc
        tcp = f" and TCP port {server.tcp_port}" if server.tcp_port else ""
        http = f" and HTTP port {faces.http.port}" if faces.http is not None else ""
        print(f"appliance serve: listening on unix:{server.socket_path}{tcp}{http}; loading {model_path}", flush=True)

    try:
        uvloop.run(serve(cfg, load, ready))
    except OSError as e:
        print(f"appliance serve: {e}", file=sys.stderr)
        return 1
    return 0


BASE_MODEL_NOTE = (
    "note: {model} is a base model: it continues text, it does not follow instructions, so its chat"
    " answers ramble or loop. Serve an instruction-tuned GGUF (appliance serve --model PATH.gguf), or let"
    " the appliance learn your repeated tasks from the cloud's answers (appliance distill --help)."
)


def _base_models() -> set[str]:
    from appliance.models.manifest import ManifestError, load_manifest

    try:
        return load_manifest().base_model_names()
    except (ManifestError, OSError):
        return set()


def run_chat(args: argparse.Namespace) -> int:
    import grpc

    from appliance.common.config import ConfigError
    from appliance.edge.grpc.client import Client

    try:
        target = args.target or f"unix:{_config(args).server.socket_path()}"
    except ConfigError as e:
        print(f"appliance chat: {e}", file=sys.stderr)
        return 2
    session = args.session or uuid.uuid4().hex[:12]
    print(f"session {session} on {target}; 'exit' or Ctrl-D to quit", file=sys.stderr)
    first = not args.session
    warned = False
    base_models = _base_models()
    with Client.connect(target, args.token) as client:
        for line in prompt_lines():
            msgs = ([("system", args.system)] if first and args.system else []) + [("user", line)]
            first = False
            try:
                for chunk in client.chat(
                    session_id=session, messages=msgs, max_tokens=args.max_tokens, temperature=args.temperature
                ):
                    if chunk.done:
                        u = chunk.final.usage
                        if not warned and chunk.final.model in base_models:
                            warned = True
                            print(f"\n{BASE_MODEL_NOTE.format(model=chunk.final.model)}", file=sys.stderr)
                        if chunk.final.finish_reason == "loop":
                            print("\n[the answer started repeating itself; the service cut it]", file=sys.stderr)
                        print(
                            f"\n[{u.prompt_tokens} prompt ({u.cached_tokens} cached), {u.completion_tokens} out,"
                            f" {u.latency_ms:.0f} ms]",
                            file=sys.stderr,
                        )
                    else:
                        sys.stdout.write(chunk.delta)
                        sys.stdout.flush()
            except grpc.RpcError as e:
                print(f"\nappliance chat: {e.code().name}: {e.details()}", file=sys.stderr)
                if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED):
                    return 1
    return 0


def run_report(args: argparse.Namespace) -> int:
    from appliance.common.config import ConfigError
    from appliance.service.report import build_report, format_report, write_chart

    try:
        cfg = _config(args)
        since = time.mktime(time.strptime(args.since, "%Y-%m-%d")) if args.since else 0.0
    except (ConfigError, ValueError) as e:
        print(f"appliance report: {e}", file=sys.stderr)
        return 2
    ledger_path = cfg.storage.path() / "ledger.sqlite"
    if not ledger_path.is_file():
        print(f"appliance report: no ledger at {ledger_path} (has the server run?)", file=sys.stderr)
        return 2
    tasks_db = cfg.distill.path(cfg.storage) / "tasks.sqlite"
    rep = build_report(ledger_path, cfg.pricing, args.period, args.tenant, since, tasks_db)
    if args.png:
        try:
            write_chart(rep, Path(args.png))
        except (OSError, RuntimeError) as e:
            print(f"appliance report: cannot write chart: {e}", file=sys.stderr)
            return 1
    print(format_report(rep, as_json=args.json))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="appliance")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())

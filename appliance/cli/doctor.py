"""`appliance doctor`: check an installation (appliance.cli.doctor_checks) and say what to fix."""

from __future__ import annotations

import argparse

import msgspec


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "doctor",
        help="check models, config, permissions, CPU, GPU, ports and disk; say what to fix",
        description="Check this installation: the config parses; the default models are present with the "
        "manifest's sha256; the state and socket folders have safe owners and modes; the CPU has AVX2, "
        "which ggml CPU variant was loaded and which kernels it runs; the GPU (device, memory, driver, what "
        "[model] gpu_layers offloads) or 'no GPU: CPU'; the TCP ports are free or the appliance's own; "
        "free disk. Exits 1 when a check fails (warnings do not). Run it as root or as the service user, "
        "with the service's environment: APPLIANCE_HOME=/var/lib/appliance for an installed system.",
    )
    p.add_argument(
        "--config", "-c", default=None, help="TOML config (default: /etc/appliance/appliance.toml if present)"
    )
    p.add_argument(
        "--service-user",
        default=None,
        help="user that must own the state and socket folders (default: 'appliance' when that user exists)",
    )
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p.set_defaults(func=run_doctor)


def run_doctor(args: argparse.Namespace) -> int:
    from appliance.cli.doctor_checks import exit_code, format_text, run_checks, service_user_default

    user = args.service_user if args.service_user is not None else service_user_default()
    checks = run_checks(args.config, user or None)
    if args.json:
        print(msgspec.json.encode({"ok": exit_code(checks) == 0, "checks": checks}).decode())
    else:
        print(format_text(checks))
    return exit_code(checks)

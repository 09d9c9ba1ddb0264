"""``appliance distill train``: teach the local model a task from examples (LoRA), export it for llama.cpp and
as a merged Q4_K_M model. The training stack (torch, transformers, peft) is imported only when a
command runs."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2  # the exit statuses of every `appliance distill` action

_TRAIN_DESCRIPTION = """\
Train a LoRA adapter on the model the appliance serves (the same GGUF file, loaded by transformers
and dequantized, so the adapter learns the weights that will run), on CPU with PyTorch.

Data: JSONL in the OpenAI fine-tuning shapes, one example a line:
  {"prompt": "Customer message: my card is lost\\nIntent:", "completion": " lost_or_stolen_card"}
  {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
or, with --tenant T --task NAME, the cloud answers the service captured for that tenant's task (the
[distill] capture of its config; `appliance distill export` writes the same JSONL). A prompt is
used as it is (as `generate` sends it) and the completion is followed by end-of-sequence; messages
go through the model's chat template and the LAST assistant message is the answer. The loss
is on the answer tokens only. A bad line is reported with its line number and field, and nothing is
trained. 10% of the examples (chosen by --seed) are held out: their loss is reported before and
after training, and training stops early when it stops improving; the adapter kept is the one with
the best held-out loss.

Output (--out NAME: in the models directory, $APPLIANCE_HOME/models; --out DIR/NAME: there):
  NAME.lora.gguf      the adapter, llama.cpp's LoRA GGUF (llama-cli --lora, Llama(lora_path=...))
  NAME.gguf           with --merged: the base with the adapter merged in, through libllama's
                      Q4_K_M quantizer: the tensors the adapter does not touch keep the base's
                      bytes, the merged ones are Q8_0 (4-bit rounding would erase the update);
                      serve it with --model
  NAME.distill.json   options and figures of the run
Files are written only when training has finished, each to a temporary file renamed into place:
Ctrl-C or a crash leaves no partial file. The same data, options, --seed and --threads give the
same adapter bytes. Progress (loss, tokens/s, ETA) goes to stderr. Nothing is fetched from a hub."""

_TRAIN_EPILOG = """\
examples:
  appliance distill train --data tickets.jsonl --out ticket-triage --merged
  appliance distill train --tenant acme --task triage -c /etc/appliance/appliance.toml --out triage-v2
  appliance distill train --data intents.jsonl --out /tmp/intents --epochs 2 --rank 8 --json
  appliance distill train --data intents.jsonl --out intents --layers 9   # LoRA on the top 9 blocks: faster

exit status: 0 trained and written, 1 training or export failed, 2 bad usage or bad data."""


def register_train(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = actions.add_parser(
        "train",
        help="train a LoRA on JSONL examples and export it (adapter GGUF, merged model)",
        description=_TRAIN_DESCRIPTION,
        epilog=_TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, metavar="FILE.jsonl", help="training examples (JSONL)")
    src.add_argument(
        "--tenant", metavar="T", help="train on the cloud answers the service captured for this tenant (with --task)"
    )
    p.add_argument("--task", metavar="NAME", help="with --tenant: the task whose captured examples to train on")
    p.add_argument("--config", "-c", default=None, help="with --tenant: the service's TOML config (its state dir)")
    p.add_argument("--out", required=True, metavar="PATH_OR_NAME", help="output name, or DIR/NAME for another place")
    p.add_argument(
        "--base", default=None, metavar="MODEL", help="model to train: manifest name or .gguf path (default: served)"
    )
    p.add_argument("--epochs", type=int, default=3, metavar="N", help="passes over the data (default 3)")
    p.add_argument("--rank", type=int, default=16, metavar="R", help="LoRA rank (default 16)")
    p.add_argument("--alpha", type=float, default=None, metavar="A", help="LoRA alpha (default 2 x rank)")
    p.add_argument("--lr", type=float, default=2e-4, metavar="X", help="peak learning rate (default 2e-4)")
    p.add_argument(
        "--schedule",
        choices=("cosine", "linear", "constant"),
        default="cosine",
        help="learning-rate decay after a 5%% linear warmup (default cosine)",
    )
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="examples per step (default 8)")
    p.add_argument("--max-len", type=int, default=256, metavar="N", help="most tokens per example (default 256)")
    p.add_argument(
        "--layers",
        type=int,
        default=None,
        metavar="N",
        help="LoRA on the top N transformer blocks only; the blocks below are frozen and run once per example"
        " (faster steps; default: every block)",
    )
    p.add_argument(
        "--patience",
        type=int,
        default=1,
        metavar="N",
        help="stop after N evaluations without a better held-out loss; 0 never stops (default 1)",
    )
    p.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads (default: all available)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the split, init and shuffles (default 0)")
    p.add_argument(
        "--merged", action="store_true", help="also write the merged model NAME.gguf (Q4_K_M base, merged tensors Q8_0)"
    )
    p.add_argument("--json", action="store_true", help="print the figures as JSON on stdout")
    p.set_defaults(func=cmd_train)


def _models_dir() -> Path:
    try:
        from appliance.models.provision import models_dir
    except ImportError:  # pragma: no cover - the layout moved; fall back to the documented default
        home = os.environ.get("APPLIANCE_HOME") or "~/.local/share/appliance"
        return Path(home).expanduser() / "models"
    return models_dir()


def _resolve_base(ref: str | None) -> Path:
    if ref is not None and (ref.endswith(".gguf") or "/" in ref):
        path = Path(ref).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"model file {path} does not exist")
        return path
    from appliance.models.modelref import resolve_model

    return resolve_model(ref)


@contextlib.contextmanager
def _training_data(args: argparse.Namespace) -> Iterator[Path]:
    """--data, or the tenant's captured examples of --task exported to a private temporary JSONL
    (removed afterwards: `distill purge` stays the only copy to delete)."""
    if args.data is not None:
        yield args.data
        return
    from appliance.common.config import load_config
    from appliance.distill.capture import store_for

    with store_for(load_config(args.config)) as store, tempfile.TemporaryDirectory(prefix="appliance-distill-") as tmp:
        path = Path(tmp) / f"{args.tenant}-{args.task}.jsonl"
        if store.export(args.tenant, path, args.task) == 0:
            have = store.counts(args.tenant)
            listed = ", ".join(f"{t} ({n})" for t, n in sorted(have.items())) or "none"
            raise LookupError(
                f"no examples captured for tenant '{args.tenant}', task '{args.task}' (captured: {listed})"
            )
        yield path


def cmd_train(args: argparse.Namespace) -> int:
    from appliance.distill.data import DataError
    from appliance.distill.run import distill, output_paths
    from appliance.distill.train import TrainConfig

    try:
        cfg = TrainConfig(
            epochs=args.epochs,
            rank=args.rank,
            alpha=float(args.alpha) if args.alpha is not None else 2.0 * args.rank,
            lr=args.lr,
            schedule=args.schedule,
            batch_size=args.batch_size,
            max_len=args.max_len,
            patience=args.patience,
            threads=args.threads,
            seed=args.seed,
            layers=args.layers,
        )
        cfg.validate()
        if args.tenant is not None and not args.task:
            raise ValueError("--tenant needs --task NAME (the task whose captured examples to train on)")
        if args.tenant is None and (args.task or args.config):
            raise ValueError("--task and --config go with --tenant (use --data for a JSONL file)")
        base = _resolve_base(args.base)
        outputs = output_paths(args.out, _models_dir())
    except (ValueError, FileNotFoundError) as e:
        print(f"appliance distill train: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with _training_data(args) as data:
            report = distill(data, base, outputs, cfg, merged=args.merged)
    except LookupError as e:  # nothing captured for the tenant's task
        print(f"appliance distill train: {e}", file=sys.stderr)
        return EXIT_USAGE
    except DataError as e:
        print(f"appliance distill train: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, RuntimeError, ValueError) as e:
        print(f"appliance distill train: failed: {e}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        keys = (
            "train_examples",
            "val_examples",
            "seconds",
            "frozen_seconds",
            "tokens_per_s",
            "val_loss_before",
            "val_loss_after",
            "epochs_run",
            "steps",
            "stopped_early",
            "adapter",
            "merged",
            "report",
        )
        print(json.dumps({k: report[k] for k in keys}))
    else:
        before, after = report["val_loss_before"], report["val_loss_after"]
        val = f"; held-out loss {before:.4f} -> {after:.4f}" if before is not None and after is not None else ""
        print(
            f"trained on {report['train_examples']} examples in {report['seconds']:.1f} s"
            f" ({report['tokens_per_s']:.0f} tokens/s){val}"
        )
        print(f"adapter: {report['adapter']}")
        if report["merged"]:
            print(f"merged model: {report['merged']}")
    return EXIT_OK

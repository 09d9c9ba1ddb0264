"""One distillation run: read the data, train a LoRA on the served GGUF, export it (and the merged model).

    outputs = output_paths("ticket-triage", models_dir)
    report = distill("tickets.jsonl", base_gguf, outputs, TrainConfig(epochs=3), merged=True)

Files (all written atomically, after training has finished; an interrupted run leaves none):
``<name>.lora.gguf`` the llama.cpp LoRA adapter; ``<name>.gguf`` the merged model (with ``merged=True``:
the base's Q4_K_M tensors as they are, the merged ones Q8_0, see export.merge); ``<name>.distill.json``
the report (options, figures, base model, paths).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

from appliance.distill.data import answer_text, gguf_arch, known_answers, load_examples, read_jsonl
from appliance.distill.export import ANSWERS_KEY, atomic_path, from_hf, merge, write_adapter
from appliance.distill.train import TrainConfig, load_model, lora_weights, train


@dataclass(frozen=True)
class Outputs:
    name: str
    adapter: Path
    merged: Path
    report: Path


def output_paths(out: str, models_dir: Path) -> Outputs:
    """`out` is a NAME (files go in `models_dir`) or a path DIR/NAME[.gguf]."""
    if not out or out.strip() != out:
        raise ValueError(f"--out must be a name or a path, got {out!r}")
    p = Path(out).expanduser()
    is_path = "/" in out or out.endswith(".gguf")
    name = p.name.removesuffix(".gguf").removesuffix(".lora")
    if not name or name.startswith("."):
        raise ValueError(f"--out {out!r}: no usable file name")
    directory = p.parent if is_path else models_dir
    return Outputs(
        name=name,
        adapter=directory / f"{name}.lora.gguf",
        merged=directory / f"{name}.gguf",
        report=directory / f"{name}.distill.json",
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def distill(
    data: str | os.PathLike[str],
    base: str | os.PathLike[str],
    outputs: Outputs,
    cfg: TrainConfig,
    *,
    merged: bool = False,
    log: TextIO | None = None,
) -> dict[str, Any]:
    """Train and export; returns the report (also written to outputs.report)."""
    out = sys.stderr if log is None else log
    cfg.validate()
    base = Path(base)
    examples = load_examples(data, base, max_tokens=cfg.max_len)  # DataError before anything is loaded
    answers = known_answers([answer_text(p) for _, p in read_jsonl(data)])
    t0 = time.monotonic()
    print(f"distill: loading {base} with transformers", file=out, flush=True)
    model = load_model(base)
    load_s = time.monotonic() - t0
    peft_model, result = train(model, examples, cfg, log=out, load_seconds=load_s)

    tcfg = model.config
    meta = {
        "training.base_model": base.name,
        "training.base_sha256": _sha256(base),
        "training.seed": str(cfg.seed),
    }
    if answers:  # a classification: the service and eval decode under these (see export.read_answers)
        meta[ANSWERS_KEY] = json.dumps(answers, ensure_ascii=False)
    adapter = from_hf(
        gguf_arch(base),
        n_layer=int(tcfg.num_hidden_layers),
        n_head=int(tcfg.num_attention_heads),
        n_head_kv=int(tcfg.num_key_value_heads),
        alpha=cfg.alpha,
        rank=cfg.rank,
        hf_weights=lora_weights(peft_model),
        meta=meta,
    )
    write_adapter(adapter, outputs.adapter, name=outputs.name)
    print(f"distill: wrote the adapter {outputs.adapter}", file=out, flush=True)
    merged_path: Path | None = None
    if merged:
        t1 = time.monotonic()
        merged_path = merge(adapter, base, outputs.merged, quantize=True, threads=cfg.threads or 0)
        print(f"distill: wrote the merged model {merged_path} ({time.monotonic() - t1:.1f} s)", file=out, flush=True)

    report: dict[str, Any] = {
        **result.as_dict(),
        "name": outputs.name,
        "adapter": str(outputs.adapter),
        "merged": str(merged_path) if merged_path else None,
        "report": str(outputs.report),
        "base": str(base),
        "base_sha256": meta["training.base_sha256"],
        "data": os.fspath(data),
        "data_sha256": _sha256(Path(data)),
        "answers": len(answers) if answers else 0,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()},
    }
    with atomic_path(outputs.report) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    return report

"""A trained adapter, as `appliance distill train` writes it, in our batching engine: its greedy output
equals llama.cpp running the same base with the same adapter (llama-cpp-python `lora_path`), alone
and mixed in one batch with other adapters and base-only requests, up to near-ties (a divergence is
printed with the reference's top-2 margin and must be under test_adapters.NEAR_TIE; in the mixed
batch, under twice the logit spread llama.cpp itself shows between these prompts decoded alone and
as one batch, when that is larger: on the quantized default model its GEMM and GEMV sum differently).

Fast: the tiny Gemma 3 model (F32), trained for a few seconds on test_distill_train's tiny task.
Slow (`-m slow`, run by `make bench-adapters`): the default model, trained for a minute or two on
48 rows of BANKING77's training split (`Customer message: {text}\\nIntent:` -> ` {label}`), checked on
other rows of the training split, mixed with the rank-16 adapters of `appliance bench adapters`.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import random
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from reference import ref_batch_spread, ref_greedy, ref_load
from test_adapters import NEAR_TIE, PROMPTS, check_against_ref, run, write_adapter
from tinymodels import tiny_config

from appliance import _native

# training runs in a child process: torch is not imported here (its OpenMP threads next to llama.cpp's
# and ours would crowd 2 cores)
if importlib.util.find_spec("torch") is None or importlib.util.find_spec("peft") is None:
    pytest.skip("distill train needs torch and peft", allow_module_level=True)

# the Makefile passes its BANKING77 (../shared/data/banking77/train.csv beside the checkout)
BANKING77_TRAIN = Path(
    os.environ.get("BANKING77", Path(__file__).resolve().parents[2] / "shared/data/banking77/train.csv")
)


def tiny_rows(n: int, seed: int) -> list[dict[str, str]]:
    """'text: <four words>\nlabel:' -> ' yes' when the words include 'fox', else ' no' (tiny-vocabulary words)."""
    rng = random.Random(seed)
    words = PROMPTS[0].split()
    rows = []
    for _ in range(n):
        w = rng.sample(words, 4)
        rows.append({"prompt": "text: " + " ".join(w) + "\nlabel:", "completion": " yes" if "fox" in w else " no"})
    return rows


def distill_train(rows: list[dict[str, str]], base: Path, out: Path, *args: str) -> Path:
    """`appliance distill train` on `rows` (written as OUT.jsonl) in a child process; the adapter it wrote."""
    data = out.with_suffix(".jsonl")
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cmd = [sys.executable, "-m", "appliance", "distill", "train", "--data", str(data), "--base", str(base)]
    done = subprocess.run([*cmd, "--out", str(out), "--json", *args], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    print(
        f"trained: {report['train_examples']} examples, {report['seconds']:.0f} s, held-out loss "
        f"{report['val_loss_before']:.3f} -> {report['val_loss_after']:.3f}"
    )
    return Path(report["adapter"])


def check_trained(
    base: Path, trained: Path, others: Sequence[Path], prompts: list[list[int]], n: int, threads: int
) -> None:
    """Every prompt under the trained adapter alone (one request at a time), then every prompt under
    the trained adapter, under each of `others` and under none, all in one batch: each equals
    llama.cpp with that adapter up to near-ties."""
    engine = _native.BatchEngine(_native.Model(str(base)), n_blocks=256, block_size=16, max_seqs=32, n_threads=threads)
    t = engine.load_adapter(str(trained))
    ids = [0, t, *(engine.load_adapter(str(p)) for p in others)]
    refs: dict[int, Any] = {
        ad: ref_load(base, n_ctx=256, n_threads=threads, lora=lora)
        for ad, lora in zip(ids, [None, trained, *others], strict=True)
    }
    try:
        want = {(k, ad): ref_greedy(refs[ad], p, n) for k, p in enumerate(prompts) for ad in ids}
        # the adapter was trained: it changes what the model says
        assert any(want[(k, t)] != want[(k, 0)] for k in range(len(prompts)))
        same = 0
        for k, p in enumerate(prompts):
            got = run(engine, [(p, t)], n, tenant=f"alone{k}")[0]
            check_against_ref(refs[t], p, got, want[(k, t)], f"alone, prompt {k}")
            same += got == want[(k, t)]
        # In one batch, quantized kernels sum in another order than for a lone sequence, in llama.cpp
        # as in ours: a flip is a near-tie when its margin is under twice the largest logit change
        # llama.cpp itself shows between decoding these prompts alone and as one batch (0 for F32).
        spread = ref_batch_spread(refs[0], prompts, n_threads=threads)
        near_tie = max(NEAR_TIE, 2 * spread)
        print(f"llama.cpp's own batch-vs-alone logit spread {spread:.3e}: mixed near-tie bound {near_tie:.3e}")
        reqs = [(k, ad) for ad in ids for k in range(len(prompts))]
        mixed = run(engine, [(prompts[k], ad) for k, ad in reqs], n, tenant="mixed")
        for (k, ad), got in zip(reqs, mixed, strict=True):
            check_against_ref(refs[ad], prompts[k], got, want[(k, ad)], f"mixed, prompt {k} adapter {ad}", near_tie)
            same += got == want[(k, ad)]
        print(f"{same} of {len(prompts) + len(reqs)} greedy continuations identical to llama.cpp's")
        assert engine.stats()["n_free_blocks"] == engine.stats()["n_blocks"]
    finally:
        for llm in refs.values():
            llm.close()


def test_trained_tiny_adapter_matches_llamacpp(tiny_model: Any, tmp_path: Path) -> None:
    base = tiny_model("gemma3", "F32")  # F32: no quantized kernels whose sums differ from llama.cpp's
    args = ["--epochs", "2", "--rank", "8", "--lr", "0.01", "--threads", "1", "--batch-size", "8"]
    trained = distill_train(tiny_rows(40, seed=2), base, tmp_path / "task", *args)
    cfg = tiny_config("gemma3")
    others = [write_adapter(tmp_path / f"other{k}.gguf", cfg, seed=50 + k, rank=4 + 4 * k) for k in range(2)]
    vocab = _native.Vocab(str(base))
    prompts = [list(vocab.tokenize(r["prompt"])) for r in tiny_rows(6, seed=9)]
    check_trained(base, trained, others, prompts, 8, threads=1)  # tiny: one thread is plenty


def banking77_rows(n: int, skip: int, seed: int) -> list[dict[str, str]]:
    """n rows of BANKING77's training split (never its test split) as prompt/completion, after
    skipping the first `skip` of the seeded shuffle (so training and checking rows differ)."""
    if not BANKING77_TRAIN.is_file():
        pytest.skip(f"{BANKING77_TRAIN} is not there")
    with BANKING77_TRAIN.open(newline="") as f:
        rows = list(csv.DictReader(f))
    random.Random(seed).shuffle(rows)
    return [
        {"prompt": f"Customer message: {r['text']}\nIntent:", "completion": f" {r['category']}"}
        for r in rows[skip : skip + n]
    ]


@pytest.mark.slow
def test_trained_adapter_on_the_default_model_matches_llamacpp(default_model: Path, tmp_path: Path) -> None:
    from appliance.bench.adapters import bench_adapters_files

    args = ["--epochs", "2", "--lr", "1e-3", "--threads", "2", "--batch-size", "8", "--max-len", "64"]
    trained = distill_train(banking77_rows(48, skip=0, seed=0), default_model, tmp_path / "b77", *args)
    others = bench_adapters_files(str(default_model), n=2)
    vocab = _native.Vocab(str(default_model))
    prompts = [list(vocab.tokenize(r["prompt"])) for r in banking77_rows(6, skip=48, seed=0)]
    check_trained(default_model, trained, others, prompts, 16, threads=2)

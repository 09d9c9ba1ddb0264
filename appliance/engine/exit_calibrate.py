"""`appliance models calibrate-exit`: measure where a model may exit early.

1. The model continues every calibration prompt at full depth (greedy, batched): the text early
   exit will have to reproduce.
2. The shortlist is built from the calibration half of those sequences.
3. Each sequence is run again, teacher-forced, reading the shortlisted head after every candidate
   exit layer: its pick and confidence, next to the full model's pick.
4. Per exit layer, the lowest threshold whose exits agree with the full model at least `target` of
   the time is chosen on the calibration half; the held-out half reports what that gives.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TextIO

import numpy as np
import numpy.typing as npt

from appliance import _native
from appliance.engine.core import default_threads, eog_tokens
from appliance.engine.early_exit import (
    ExitCalibration,
    build_shortlist,
    choose_thresholds,
    exit_stats,
)

MAX_EXIT_LAYERS = 4  # each exit layer is one more pass per undecided token


def candidate_layers(n_layer: int) -> list[int]:
    step = max(1, n_layer // 6)
    return list(range(step, n_layer, step))


def generate_greedy(
    model: _native.Model,
    vocab: _native.Vocab,
    prompts: list[list[int]],
    max_tokens: int,
    threads: int,
    progress: TextIO | None,
) -> list[list[int]]:
    """Full-depth greedy continuations of every prompt, batched."""
    eog = eog_tokens(vocab)
    eng = _native.BatchEngine(model, n_threads=threads, eog_tokens=eog, max_seqs=16)
    ids = [eng.submit(p, max_tokens=max_tokens, temperature=0.0) for p in prompts]
    out: dict[int, list[int]] = {i: [] for i in ids}
    done, t0, last = 0, time.monotonic(), 0.0
    while not eng.idle:
        for ev in eng.step():
            out[ev.id].extend(ev.tokens)
            done += len(ev.tokens)
        if progress is not None and time.monotonic() - last > 5:
            last = time.monotonic()
            print(f"  generating: {done}/{len(prompts) * max_tokens} tokens, {last - t0:.0f} s", file=progress)
    return [out[i] for i in ids]


def probe(
    ctx: _native.Context, seq: list[int], n_prompt: int, layers: list[int]
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32], npt.NDArray[np.float32]]:
    """(full pick, exit picks, exit confidences) at the positions that predict the continuation."""
    full, top, conf = ctx.probe_exits(seq, layers)
    rows = slice(n_prompt - 1, len(seq) - 1)
    return full[rows], top[rows], conf[rows]


def calibrate(
    model_path: str | os.PathLike[str],
    prompts: list[str],
    *,
    target: float = 0.95,
    shortlist_size: int = 16384,
    max_tokens: int = 64,
    threads: int | None = None,
    draft_exit_layer: int = 0,
    progress: TextIO | None = sys.stderr,
) -> ExitCalibration:
    if len(prompts) < 4:
        raise ValueError(f"calibration needs at least 4 prompts, got {len(prompts)}")
    if not 0.5 <= target <= 1.0:
        raise ValueError(f"target agreement must be in [0.5, 1], got {target}")
    threads = threads or default_threads()
    path = Path(model_path)
    model = _native.Model(str(path))
    vocab = _native.Vocab(str(path))
    n_layer, n_vocab = int(model.n_layer), int(vocab.n_tokens)
    if not 0 <= draft_exit_layer <= n_layer:
        raise ValueError(f"draft exit layer must be in [0, {n_layer}]")
    shortlist_size = min(shortlist_size, n_vocab)

    def say(msg: str) -> None:
        if progress is not None:
            print(msg, file=progress)

    say(f"calibrating early exit for {path.name}: {len(prompts)} prompts x {max_tokens} tokens, target {target}")
    tokenized = [list(vocab.tokenize(p)) for p in prompts]
    conts = generate_greedy(model, vocab, tokenized, max_tokens, threads, progress)
    seqs = [(p, p + c) for p, c in zip(tokenized, conts, strict=True) if c]
    held = [s for i, s in enumerate(seqs) if i % 4 == 3]  # a quarter of the prompts are held out
    fit = [s for i, s in enumerate(seqs) if i % 4 != 3]
    if not held or not fit:
        raise ValueError("too few prompts produced a continuation to calibrate on")

    shortlist = build_shortlist((s for _, s in fit), n_vocab, shortlist_size)
    layers = candidate_layers(n_layer)
    n_ctx = max(len(s) for _, s in seqs) + 1
    ctx = _native.Context(model, n_ctx=max(64, n_ctx), n_threads=threads)
    ctx.set_shortlist(shortlist)

    def collect(
        group: list[tuple[list[int], list[int]]],
    ) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32], npt.NDArray[np.float32]]:
        parts = [probe(ctx, s, len(p), layers) for p, s in group]
        return (
            np.concatenate([f for f, _, _ in parts]),
            np.concatenate([t for _, t, _ in parts]),
            np.concatenate([c for _, _, c in parts]),
        )

    say(f"  probing exit layers {layers} with a shortlist of {len(shortlist)} tokens")
    f_full, f_top, f_conf = collect(fit)
    h_full, h_top, h_conf = collect(held)
    f_agree = f_top == f_full[:, None]
    h_agree = h_top == h_full[:, None]

    # keep the exit layers that take the most tokens, then fit their thresholds together
    thr_all = choose_thresholds(f_conf, f_agree, target)
    taken = [s.exit_rate for s in exit_stats(f_conf, f_agree, layers, thr_all)]
    keep = sorted(sorted(range(len(layers)), key=lambda x: -taken[x])[:MAX_EXIT_LAYERS])
    keep = [x for x in keep if thr_all[x] < 1.0] or keep[:1]
    chosen = [layers[x] for x in keep]
    thresholds = choose_thresholds(f_conf[:, keep], f_agree[:, keep], target)
    stats = exit_stats(h_conf[:, keep], h_agree[:, keep], chosen, thresholds)
    in_short = np.isin(h_full, np.asarray(shortlist))
    cal = ExitCalibration(
        model_file=path.name,
        model_bytes=path.stat().st_size,
        n_layer=n_layer,
        n_vocab=n_vocab,
        shortlist=shortlist,
        exit_layers=chosen,
        thresholds=thresholds,
        draft_exit_layer=draft_exit_layer,
        target_agreement=target,
        corpus_tokens=len(f_full),
        shortlist_coverage=float(in_short.mean()),
        held_out=stats,
    )
    for s in stats:
        say(
            f"  layer {s.layer:>3}: threshold {s.threshold:.4f}, held-out exit rate {s.exit_rate:.3f}, "
            f"agreement {s.agreement:.3f}"
        )
    say(f"  shortlist covers {cal.shortlist_coverage:.3f} of the held-out tokens")
    return cal

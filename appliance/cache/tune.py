"""Contrastive fine-tuning of the cache's MiniLM on its own evidence (``appliance cache tune``).

Input: (question, answer) pairs, from a ``text,category`` CSV (the category plays the answer) or
from one tenant's cache entries (answers equal after :func:`~appliance.cache.decision.answer_key`).
The rows are shuffled with the seed and split: ``1 - calibration_fraction`` tunes the embedder, the
rest (which the tuning never sees) fits the decision (:mod:`appliance.cache.calibrate`).

Training (PyTorch, CPU): the all-MiniLM-L6-v2 checkpoint the default embedder is built from, mean
pooling, unit vectors. Each anchor question comes with a positive (another question with the same
answer) and a hard negative (one of the nearest questions under the current embedder whose answer
differs, re-mined at each epoch). The loss is a cross-entropy over scaled cosine similarities
between every anchor and every positive and hard negative of the batch (in-batch negatives plus the
mined ones); candidates that share the anchor's answer are masked out rather than pushed away.
The written weights are the plain ones plus ``mix`` (0.5) times the change training made
(weight-space ensembling, as WiSE-FT): tuning on one domain alone moves other topics' questions too,
and half the step keeps most of the gain on the tuned domain while the plain geometry elsewhere
mostly stays. Only the top ``train_layers`` layers learn, so the embeddings and the layers below them run once
per question before training (:meth:`Encoder.frozen_states`) and each step runs only the top ones.

Output: a GGUF written by the same builder as the default embedder
(:mod:`appliance.models.builders.minilm_gguf`), with the decision and the cosine threshold calibrated
for it stored in its metadata (``appliance.cache.calibration``), so the file alone is a working
cache embedder. Deterministic for the same data, seed, options and thread count.
"""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np
import numpy.typing as npt

from appliance.cache.decision import answer_key
from appliance.cache.errors import CacheError
from appliance.cache.replay import Example

if TYPE_CHECKING:
    import torch

BASE_MODEL = "all-minilm-l6-v2"
_COPIED = ("config.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "modules.json")


@dataclass(frozen=True)
class TuneConfig:
    epochs: int = 1
    batch_size: int = 32
    lr: float = 2e-4
    warmup: float = 0.1
    scale: float = 20.0  # similarities are multiplied by this before the softmax
    hard_negatives: int = 8  # nearest other-answer questions an anchor's negative is drawn from
    max_anchors: int = 4000  # anchors per epoch (a sample when there are more)
    max_len: int = 32  # tokens per question (longer ones are cut)
    train_layers: int = 3  # the top layers that learn; the embeddings and the layers below stay as they are
    mix: float = 0.5  # the written weights: plain + mix * (tuned - plain); below 1 keeps other topics' geometry
    threads: int = 2
    seed: int = 0
    calibration_fraction: float = 0.2
    target: float = 0.97

    def validate(self) -> None:
        checks = [
            (self.epochs >= 1, "--epochs must be at least 1"),
            (self.batch_size >= 2, "--batch-size must be at least 2"),
            (self.lr > 0, "--lr must be positive"),
            (0 <= self.warmup < 1, "warmup must be in [0, 1)"),
            (self.hard_negatives >= 1, "hard_negatives must be at least 1"),
            (self.max_anchors >= 2, "--max-anchors must be at least 2"),
            (self.max_len >= 8, "max_len must be at least 8"),
            (self.train_layers >= 1, "train_layers must be at least 1"),
            (0 < self.mix <= 1, "--mix must be in (0, 1]"),
            (self.threads >= 1, "--threads must be at least 1"),
            (0 < self.calibration_fraction < 1, "--calibration-fraction must be between 0 and 1"),
            (0.5 <= self.target < 1, "--target must be in [0.5, 1)"),
        ]
        for ok, what in checks:
            if not ok:
                raise CacheError(what)


def base_checkpoint() -> Path:
    """The directory of the sentence-transformers checkpoint the default embedder is built from."""
    from appliance.models.manifest import BuilderSource, load_manifest

    src = load_manifest().get(BASE_MODEL).source
    if not isinstance(src, BuilderSource):
        raise CacheError(f"manifest model {BASE_MODEL} is not built from a checkpoint")
    spec = importlib.util.find_spec(src.module)
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    if not roots:
        raise CacheError(f"Python package {src.module!r} ({src.requirement}) is not installed; `make deps` installs it")
    path = Path(roots[0]) / (src.path or "")
    if not (path / "model.safetensors").is_file():
        raise CacheError(f"{path} has no model.safetensors (package {src.module!r} is incomplete)")
    return path


def check_examples(rows: Sequence[Example], what: str) -> None:
    """Tuning needs answers that repeat (positives) and more than one answer (negatives)."""
    groups: dict[str, int] = defaultdict(int)
    for r in rows:
        groups[answer_key(r.category)] += 1
    repeated = sum(1 for n in groups.values() if n >= 2)
    if len(rows) < 20 or len(groups) < 2 or repeated < 2:
        raise CacheError(
            f"{what}: {len(rows)} questions with {len(groups)} distinct answers ({repeated} given twice or more); "
            "tuning needs at least 20 questions and at least 2 answers that several questions share"
        )


class Encoder:
    """The MiniLM in PyTorch: mean-pooled, L2-normalised sentence vectors."""

    def __init__(self, checkpoint: Path, max_len: int) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.torch = torch
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        self.tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
        self.model = AutoModel.from_pretrained(str(checkpoint))
        self.max_len = max_len

    def trainable(self, top: int) -> list[torch.nn.Parameter]:
        """Freeze all but the top ``top`` encoder layers (cheaper steps: no gradient below them)."""
        layers = self.model.encoder.layer
        keep = {id(p) for layer in layers[max(0, len(layers) - top) :] for p in layer.parameters()}
        params = []
        for p in self.model.parameters():
            p.requires_grad_(id(p) in keep)
            if id(p) in keep:
                params.append(p)
        return params

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_len, return_tensors="pt")
        out = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
        pooled = (out * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.torch.nn.functional.normalize(pooled, dim=-1)

    def _by_length(
        self, lengths: Sequence[int], run: Callable[[list[int]], Iterable[Any]], batch_size: int
    ) -> list[Any]:
        """``run`` over batches of indices of similar ``lengths`` (little padding), without gradients:
        its results, one per index, in the original order."""
        self.model.eval()
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        out: list[Any] = [None] * len(lengths)
        with self.torch.no_grad():
            for a in range(0, len(order), batch_size):
                idx = order[a : a + batch_size]
                for i, result in zip(idx, run(idx), strict=True):
                    out[i] = result
        return out

    def _vectors(
        self, lengths: Sequence[int], run: Callable[[list[int]], torch.Tensor], batch_size: int
    ) -> npt.NDArray[np.float32]:
        """:meth:`_by_length` of a ``run`` giving one vector per index, as one float32 matrix."""
        rows = self._by_length(lengths, lambda idx: run(idx).numpy(), batch_size)
        return np.stack(rows) if rows else np.empty((0, self.model.config.hidden_size), dtype=np.float32)

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> npt.NDArray[np.float32]:
        """Vectors of ``texts``, batched by length (little padding)."""
        return self._vectors([len(t) for t in texts], lambda idx: self.forward([texts[i] for i in idx]), batch_size)

    def frozen_states(self, texts: Sequence[str], frozen: int, batch_size: int = 64) -> list[torch.Tensor]:
        """Each text's hidden states (one row per token) after the embeddings and the bottom ``frozen``
        layers, computed once: those layers do not learn, so a step only runs the layers above them."""

        def run(idx: list[int]) -> list[torch.Tensor]:
            batch = self.tokenizer(
                [texts[i] for i in idx], padding=True, truncation=True, max_length=self.max_len, return_tensors="pt"
            )
            h = self.model.embeddings(input_ids=batch["input_ids"], token_type_ids=batch.get("token_type_ids"))
            h = self._layers(h, batch["attention_mask"], 0, frozen)
            return [h[row, : int(batch["attention_mask"][row].sum())].clone() for row in range(len(idx))]

        return self._by_length([len(t) for t in texts], run, batch_size)

    def _layers(self, h: torch.Tensor, attention: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        from transformers.masking_utils import create_bidirectional_mask

        mask = create_bidirectional_mask(config=self.model.config, inputs_embeds=h, attention_mask=attention)
        for layer in self.model.encoder.layer[start:stop]:
            h = layer(h, mask)
        return h

    def forward_from(self, states: Sequence[torch.Tensor], frozen: int) -> torch.Tensor:
        """Unit vectors from :meth:`frozen_states` rows, through the layers above ``frozen``."""
        length = max(len(s) for s in states)
        h = self.torch.zeros(len(states), length, states[0].shape[-1], dtype=states[0].dtype)
        attention = self.torch.zeros(len(states), length, dtype=self.torch.long)
        for row, s in enumerate(states):
            h[row, : len(s)] = s
            attention[row, : len(s)] = 1
        out = self._layers(h, attention, frozen, len(self.model.encoder.layer))
        mask = attention.unsqueeze(-1).to(out.dtype)
        pooled = (out * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.torch.nn.functional.normalize(pooled, dim=-1)

    def encode_from(self, states: Sequence[torch.Tensor], frozen: int, batch_size: int = 64) -> npt.NDArray[np.float32]:
        """:meth:`encode` of the texts whose :meth:`frozen_states` are ``states``."""
        return self._vectors(
            [len(s) for s in states], lambda idx: self.forward_from([states[i] for i in idx], frozen), batch_size
        )


def mine_hard_negatives(vectors: npt.NDArray[np.float32], labels: Sequence[str], n: int) -> list[list[int]]:
    """For each row, its ``n`` nearest rows with another label, best first."""
    lab = np.asarray([hash(x) for x in labels])
    out: list[list[int]] = []
    for a in range(0, len(vectors), 512):
        s = vectors[a : a + 512] @ vectors.T
        s[lab[a : a + 512, None] == lab[None, :]] = -2.0
        take = min(n, s.shape[1] - 1)
        top = np.argpartition(-s, take, axis=1)[:, :take]
        order = np.argsort(-np.take_along_axis(s, top, axis=1), axis=1, kind="stable")
        out += [[int(j) for j in r if s[i, j] > -1.5] for i, r in enumerate(np.take_along_axis(top, order, axis=1))]
    return out


@dataclass
class Progress:
    stream: TextIO | None
    t0: float = 0.0

    def say(self, msg: str) -> None:
        if self.stream is not None:
            print(f"[{time.perf_counter() - self.t0:7.1f}s] {msg}", file=self.stream, flush=True)


def train(rows: Sequence[Example], config: TuneConfig, out_dir: Path, progress: Progress) -> dict[str, Any]:
    """Fine-tune on ``rows``; writes the checkpoint (safetensors and the files the builder reads) to ``out_dir``."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    torch.use_deterministic_algorithms(True)
    rng = random.Random(config.seed)
    checkpoint = base_checkpoint()
    enc = Encoder(checkpoint, config.max_len)
    texts = [r.text for r in rows]
    labels = [answer_key(r.category) for r in rows]
    groups: dict[str, list[int]] = defaultdict(list)
    for i, lab in enumerate(labels):
        groups[lab].append(i)
    anchors_all = [i for i in range(len(rows)) if len(groups[labels[i]]) >= 2]
    per_epoch = min(config.max_anchors, len(anchors_all))
    steps_per_epoch = max(1, per_epoch // config.batch_size)
    total = steps_per_epoch * config.epochs
    params = enc.trainable(config.train_layers)
    frozen = max(0, len(enc.model.encoder.layer) - config.train_layers)
    progress.say(f"running the {frozen} layers that do not learn over {len(rows)} questions, once")
    states = enc.frozen_states(texts, frozen)
    plain = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.01)
    warm = max(1, int(total * config.warmup))
    # linear warm-up, then linear decay to 0
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm))
    )
    losses: list[float] = []
    step = 0
    t_train = time.perf_counter()
    for epoch in range(config.epochs):
        progress.say(f"epoch {epoch + 1}/{config.epochs}: mining hard negatives among {len(rows)} questions")
        negatives = mine_hard_negatives(enc.encode_from(states, frozen), labels, config.hard_negatives)
        anchors = rng.sample(anchors_all, per_epoch)
        enc.model.train()
        for b in range(steps_per_epoch):
            batch = anchors[b * config.batch_size : (b + 1) * config.batch_size]
            pos = [rng.choice([j for j in groups[labels[i]] if j != i]) for i in batch]
            neg = [rng.choice(negatives[i]) if negatives[i] else rng.randrange(len(rows)) for i in batch]
            a = enc.forward_from([states[i] for i in batch], frozen)
            c = enc.forward_from([states[j] for j in pos + neg], frozen)
            logits = config.scale * a @ c.T
            cand_labels = [labels[j] for j in pos + neg]
            mask = torch.tensor(
                [[labels[i] == cl and col != row for col, cl in enumerate(cand_labels)] for row, i in enumerate(batch)]
            )
            logits = logits.masked_fill(mask, float("-inf"))
            loss = torch.nn.functional.cross_entropy(logits, torch.arange(len(batch)))
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            step += 1
            losses.append(float(loss.detach()))
            if step % 10 == 0 or step == total:
                recent = sum(losses[-10:]) / len(losses[-10:])
                progress.say(f"step {step}/{total} loss {recent:.4f}")
    with torch.no_grad():  # interpolate towards the plain weights (weight-space ensembling, as WiSE-FT)
        for p, p0 in zip(params, plain, strict=True):
            p.mul_(config.mix).add_(p0, alpha=1.0 - config.mix)
    train_s = time.perf_counter() - t_train
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in enc.model.state_dict().items() if not k.startswith("pooler.")}
    save_file(state, str(out_dir / "model.safetensors"))
    for name in _COPIED:
        shutil.copy(checkpoint / name, out_dir / name)
    shutil.copytree(checkpoint / "1_Pooling", out_dir / "1_Pooling", dirs_exist_ok=True)
    return {
        "questions": len(rows),
        "answers": len(groups),
        "anchors_per_epoch": per_epoch,
        "steps": total,
        "first_loss": losses[0] if losses else 0.0,
        "last_loss": sum(losses[-10:]) / max(1, len(losses[-10:])),
        "train_s": train_s,
    }


def tune(
    rows: Sequence[Example],
    out_path: Path,
    config: TuneConfig,
    *,
    source: str,
    stream: TextIO | None = sys.stderr,
    embedder_factory: Callable[[Path], Any] | None = None,
) -> dict[str, Any]:
    """Tune on ``rows`` (already read), calibrate on the held-back share, write the GGUF to ``out_path``."""
    from appliance.cache.calibrate import calibrate_embedder
    from appliance.cache.embedder import CALIBRATION_KEY, GgufEmbedder
    from appliance.models.builders.minilm_gguf import build

    config.validate()
    check_examples(rows, source)
    progress = Progress(stream, time.perf_counter())
    shuffled = list(rows)
    random.Random(config.seed).shuffle(shuffled)
    cut = int(len(shuffled) * (1 - config.calibration_fraction))
    train_rows, cal_rows = shuffled[:cut], shuffled[cut:]
    check_examples(train_rows, f"{source} (the tuning share)")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(out_path.name + ".partial")
    with tempfile.TemporaryDirectory(prefix="appliance-cache-tune-") as tmp:
        ckpt = Path(tmp) / "checkpoint"
        report = train(train_rows, config, ckpt, progress)
        progress.say(f"writing {partial.name}; calibrating on {len(cal_rows)} held-back questions")
        build(ckpt, partial)
        factory = embedder_factory or (lambda p: GgufEmbedder(p, n_threads=config.threads))
        with factory(partial) as emb:
            cal = calibrate_embedder(cal_rows, emb, target=config.target)
        cal["data"] = source
        cal["tune"] = {**asdict(config), **report, "tuning_rows": len(train_rows)}
        build(ckpt, partial, metadata={CALIBRATION_KEY: json.dumps(cal, sort_keys=True)})
    partial.replace(out_path)
    progress.say(f"wrote {out_path}")
    return {"out": str(out_path), **cal}

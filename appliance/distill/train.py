"""LoRA training on the served GGUF (PyTorch CPU, transformers, peft).

The model is the same GGUF file the appliance serves, loaded by transformers (which dequantizes it to
float32), so the adapter learns the weights that will run. The loss is the mean cross-entropy over the
answer tokens only, and logits are computed only there: the transformer body runs over the whole
batch, its final hidden states are gathered at the positions that predict an answer token, and only
those rows go through the (tied) output head. For Gemma 3 270M the 262,144 x 640 head is about two
thirds of a token's work; a classification answer is a few tokens after a prompt of dozens.

With `TrainConfig.layers` = N (mlx-lm's --num-layers), the LoRA is on the top N blocks only: the
blocks below never change, so they run once per example before training (FrozenBottom caches their
output) and each step runs, forward and backward, only the top N blocks and the head.

Determinism: the LoRA init, the epoch shuffles and dropout are seeded, torch runs with deterministic
algorithms, and the thread count is fixed: the same data, seed, options and thread count give the same
adapter bytes.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

from appliance.distill.data import Example, n_tokens, split

if TYPE_CHECKING:
    import torch

# every linear layer of the transformer blocks (llama, qwen2, qwen3, gemma3 all name them so)
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SCHEDULES = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 3
    rank: int = 16
    alpha: float = 32.0
    lr: float = 2e-4
    schedule: str = "cosine"  # after warmup: cosine or linear decay to 0, or constant
    warmup: float = 0.05  # share of the steps spent warming up linearly from 0
    batch_size: int = 8
    threads: int | None = None  # torch.set_num_threads; None: every CPU this process may use
    seed: int = 0
    max_len: int = 256  # tokens per example (prompt + answer); longer prompts lose their start
    val_fraction: float = 0.1
    patience: int = 1  # evaluations without a better validation loss before stopping; 0: never stop
    evals_per_epoch: int = 1
    dropout: float = 0.0
    weight_decay: float = 0.0
    target_modules: tuple[str, ...] = ALL_LINEAR
    # LoRA on the top `layers` transformer blocks only (mlx-lm's --num-layers); the frozen blocks below run
    # once per example, before training, and their output is cached. None (or >= the model's): every block
    layers: int | None = None

    def validate(self) -> None:
        checks = [
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.rank >= 1, "rank must be >= 1"),
            (self.alpha > 0, "alpha must be > 0"),
            (self.lr > 0, "lr must be > 0"),
            (self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}"),
            (0 <= self.warmup < 1, "warmup must be in [0, 1)"),
            (self.batch_size >= 1, "batch size must be >= 1"),
            (self.threads is None or self.threads >= 1, "threads must be >= 1"),
            (self.max_len >= 8, "max_len must be >= 8"),
            (self.patience >= 0, "patience must be >= 0"),
            (self.evals_per_epoch >= 1, "evals_per_epoch must be >= 1"),
            (0 <= self.dropout < 1, "dropout must be in [0, 1)"),
            (bool(self.target_modules), "target_modules is empty"),
            (self.layers is None or self.layers >= 1, f"layers must be >= 1 (got {self.layers})"),
        ]
        for ok, what in checks:
            if not ok:
                raise ValueError(what)


@dataclass
class TrainResult:
    train_examples: int
    val_examples: int
    seconds: float  # training, the frozen blocks' one-off pass included (loading and validation excluded)
    cpu_seconds: float  # CPU time of the process over those steps, all threads (a busy machine stretches `seconds`)
    tokens_per_s: float  # training tokens (prompt + answer) per second of training
    train_tokens: int
    val_loss_before: float | None
    val_loss_after: float | None  # of the adapter kept (the best validation loss seen)
    epochs_run: float
    steps: int
    stopped_early: bool
    load_seconds: float
    frozen_seconds: float = 0.0  # of `seconds`: running the frozen bottom blocks once over the training examples
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per evaluation

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- loading


def hf_config_from_gguf(path: str | os.PathLike[str]) -> Any:
    """transformers' config for a GGUF, corrected from the GGUF's own metadata where transformers'
    GGUF reader falls short, so the model computes what llama.cpp computes: head_dim from
    attention.key_length (qwen3), and for gemma3 the sliding-window layer pattern, the attention
    scale (llama.cpp: 1/sqrt(head_dim)), the sliding layers' RoPE base and logit soft-capping."""
    import gguf
    from transformers import AutoConfig

    p = Path(path)
    cfg = AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name)
    r = gguf.GGUFReader(str(p))
    arch = str(r.fields["general.architecture"].contents())

    def get(key: str) -> Any:
        f = r.fields.get(f"{arch}.{key}")
        return None if f is None else f.contents()

    key_length = get("attention.key_length")
    if key_length:
        cfg.head_dim = int(key_length)
    if arch == "gemma3":
        n_layer = int(cfg.num_hidden_layers)
        window, pattern = get("attention.sliding_window"), get("attention.sliding_window_pattern")
        if not window:
            swa = [False] * n_layer
        elif isinstance(pattern, list):
            swa = [bool(x) for x in pattern]
        else:  # llama.cpp's set_swa_pattern; 6 when the key is absent
            n = 6 if pattern is None else int(pattern)
            swa = [n == 0 or il % n < n - 1 for il in range(n_layer)]
        cfg.layer_types = ["sliding_attention" if s else "full_attention" for s in swa]
        cfg.query_pre_attn_scalar = cfg.hidden_size // cfg.num_attention_heads if n_layer == 62 else cfg.head_dim
        base_swa = get("rope.freq_base_swa")
        rope = getattr(cfg, "rope_parameters", None)
        if base_swa is not None and isinstance(rope, dict) and "sliding_attention" in rope:
            rope["sliding_attention"]["rope_theta"] = float(base_swa)
        softcap = get("final_logit_softcapping")
        cfg.final_logit_softcapping = float(softcap) if softcap else None
    return cfg


def load_model(path: str | os.PathLike[str]) -> Any:
    """The GGUF as a float32 transformers causal LM, offline (nothing is fetched from a hub)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    p = Path(path).resolve()
    cfg = hf_config_from_gguf(p)
    # transformers draws a tqdm bar on sys.stderr while it dequantizes; the caller reports progress
    with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, config=cfg, dtype=torch.float32)
    model.eval()  # type: ignore[no-untyped-call]
    return model


def frozen_blocks(model: Any, cfg: TrainConfig) -> int:
    """How many transformer blocks at the bottom carry no LoRA (0: every block is trained)."""
    n_layer = int(model.config.num_hidden_layers)
    return 0 if cfg.layers is None else max(0, n_layer - cfg.layers)


def attach_lora(model: Any, cfg: TrainConfig) -> Any:
    """A PEFT LoRA on `cfg.target_modules` of the top `cfg.layers` blocks, initialised from `cfg.seed`."""
    import torch
    from peft import LoraConfig, get_peft_model

    skip = frozen_blocks(model, cfg)
    torch.manual_seed(cfg.seed)
    lcfg = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,  # type: ignore[arg-type]  # peft annotates int; float works
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        layers_to_transform=list(range(skip, int(model.config.num_hidden_layers))) if skip else None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, lcfg)


def lora_weights(peft_model: Any) -> dict[str, tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]]:
    """module name ("model.layers.0.self_attn.q_proj") -> (lora_A.weight, lora_B.weight) as float32."""
    import torch
    from peft.tuners.lora import LoraLayer

    out: dict[str, tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]] = {}
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        layer: Any = module  # peft's LoraLayer attributes are not typed
        if "default" in layer.lora_A:
            a = layer.lora_A["default"].weight.detach().to("cpu", dtype=torch.float32).numpy().copy()
            b = layer.lora_B["default"].weight.detach().to("cpu", dtype=torch.float32).numpy().copy()
            out[name.removeprefix("base_model.model.")] = (a, b)
    return out


# ---------------------------------------------------------------- the loss


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] right-padded
    attention_mask: torch.Tensor  # [B, T]
    rows: torch.Tensor  # [N] batch row of each answer token
    cols: torch.Tensor  # [N] position whose hidden state predicts it (the token before)
    targets: torch.Tensor  # [N] the answer token ids
    n_tokens: int  # real (unpadded) tokens
    bottom: FrozenBottom | None = None  # the frozen bottom blocks' cached output, when they are skipped
    hidden: torch.Tensor | None = None  # [B, T, n_embd]: that output for this batch (right-padded with zeros)


def make_batch(examples: Sequence[Example], pad_id: int = 0, bottom: FrozenBottom | None = None) -> Batch:
    import torch

    width = max(len(e.tokens) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    rows: list[int] = []
    cols: list[int] = []
    targets: list[int] = []
    for i, e in enumerate(examples):
        toks = e.tokens
        ids[i, : len(toks)] = torch.tensor(toks, dtype=torch.long)
        mask[i, : len(toks)] = 1
        for j in range(len(e.prompt), len(toks)):
            rows.append(i)
            cols.append(j - 1)
            targets.append(toks[j])
    return Batch(
        ids,
        mask,
        torch.tensor(rows, dtype=torch.long),
        torch.tensor(cols, dtype=torch.long),
        torch.tensor(targets, dtype=torch.long),
        int(mask.sum()),
        bottom,
        None if bottom is None else bottom.padded(examples, width),
    )


class FrozenBottom:
    """The output of the bottom `blocks` transformer blocks (they carry no LoRA, so it never changes),
    computed once per example and kept: float32 [T, n_embd] per distinct token sequence.

    The blocks run on right-padded batches: attention is causal and padding is masked, so the real
    tokens' states are those of the example run alone. During a training step or validation pass the
    bottom blocks are swapped, in the decoder's own layer list, for pass-through modules, the last of
    which returns the cached states of the batch: the decoder's forward still builds the positions and
    the (full and sliding-window) masks for the blocks above, and nothing of the model is re-implemented.
    """

    def __init__(self, blocks: int) -> None:
        self.blocks = blocks
        self.states: dict[tuple[int, ...], torch.Tensor] = {}
        self.as_tuple = False  # whether a decoder block returns a tuple (hidden, ...) rather than a tensor

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.states.values())

    def add(
        self,
        model: Any,
        examples: Sequence[Example],
        batch_size: int,
        *,
        log: TextIO | None = None,
        progress_every_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Run the bottom blocks over those of `examples` not cached yet and keep their output."""
        import torch

        todo = sorted({e.tokens for e in examples if e.tokens not in self.states}, key=lambda t: (len(t), t))
        body = _causal(model).get_decoder()
        captured: list[Any] = []

        def keep(_module: Any, _args: Any, output: Any) -> None:
            captured.append(output)
            raise _Enough  # the blocks above are not run

        t0 = last = clock()
        hook = body.layers[self.blocks - 1].register_forward_hook(keep)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for i in range(0, len(todo), batch_size):
                    chunk = [Example(t, ()) for t in todo[i : i + batch_size]]
                    batch = make_batch(chunk)
                    with contextlib.suppress(_Enough):
                        body(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
                    out = captured[-1]
                    self.as_tuple = not isinstance(out, torch.Tensor)
                    hidden = (out[0] if self.as_tuple else out).float()
                    for row, toks in enumerate(todo[i : i + batch_size]):
                        self.states[toks] = hidden[row, : len(toks)].clone()
                    now = clock()
                    if log is not None and (now - last >= progress_every_s or i + batch_size >= len(todo)):
                        last = now
                        done = min(len(todo), i + batch_size)
                        print(
                            f"distill: frozen blocks 0-{self.blocks - 1}: {done}/{len(todo)} examples"
                            f" ({now - t0:.0f} s, cache {self.nbytes() / 2**20:.0f} MiB)",
                            file=log,
                            flush=True,
                        )
        finally:
            hook.remove()
            model.train(was_training)

    def padded(self, examples: Sequence[Example], width: int) -> torch.Tensor:
        """[B, width, n_embd]: the cached states of `examples`, right-padded with zeros."""
        import torch

        first = self.states[examples[0].tokens]
        out = torch.zeros((len(examples), width, first.shape[-1]), dtype=first.dtype)
        for i, e in enumerate(examples):
            s = self.states[e.tokens]
            out[i, : s.shape[0]] = s
        return out


@functools.cache
def _pass_through_class() -> type:
    import torch

    class PassThrough(torch.nn.Module):
        """A skipped decoder block: returns its input hidden states, or `states` when set (the cached
        output of the frozen blocks), as a tensor or as a 1-tuple like the block it stands for."""

        def __init__(self, states: torch.Tensor | None, as_tuple: bool) -> None:
            super().__init__()
            self.states = states
            self.as_tuple = as_tuple

        def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            out = hidden_states if self.states is None else self.states
            return (out,) if self.as_tuple else out

    return PassThrough


def _pass_through(states: torch.Tensor | None = None, as_tuple: bool = False) -> Any:
    """A torch module standing for a skipped decoder block (torch is imported only when training runs)."""
    return _pass_through_class()(states, as_tuple)


@contextlib.contextmanager
def _swapped(layers: Any, replacements: dict[int, Any]) -> Iterator[None]:
    """`layers` (a torch ModuleList) with some entries replaced, restored afterwards whatever happens."""
    original = {i: layers[i] for i in replacements}
    try:
        for i, m in replacements.items():
            layers[i] = m
        yield
    finally:
        for i, m in original.items():
            layers[i] = m


class _Enough(Exception):
    """Raised by a forward hook to stop the model after the frozen blocks."""


def _causal(model: Any) -> Any:
    """The transformers causal LM (under the PEFT wrapper, if any)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def answer_logits(model: Any, batch: Batch) -> torch.Tensor:
    """Logits [N, n_vocab] at the answer positions only: the body over the batch, the head on N rows.
    With `batch.hidden`, the bottom blocks are not run: their cached output enters the first block above."""
    import torch

    causal = _causal(model)
    body = causal.get_decoder()
    skip: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    if batch.bottom is not None and batch.hidden is not None:
        k, as_tuple = batch.bottom.blocks, batch.bottom.as_tuple
        below = {i: _pass_through(as_tuple=as_tuple) for i in range(k - 1)}
        below[k - 1] = _pass_through(batch.hidden, as_tuple)
        skip = _swapped(body.layers, below)
    with skip:
        hidden = body(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).last_hidden_state
    picked = hidden[batch.rows, batch.cols]  # [N, n_embd]
    logits: torch.Tensor = causal.get_output_embeddings()(picked)
    softcap = getattr(causal.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.float()


def answer_loss(model: Any, batch: Batch, *, reduction: str = "mean") -> torch.Tensor:
    import torch.nn.functional as F

    return F.cross_entropy(answer_logits(model, batch), batch.targets, reduction=reduction)


def evaluate(
    model: Any, examples: Sequence[Example], batch_size: int, bottom: FrozenBottom | None = None
) -> float | None:
    """Mean cross-entropy per answer token over `examples` (None when there are none); with `bottom`,
    from its cached states of the frozen blocks (`examples` must be cached)."""
    import torch

    if not examples:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    ordered = sorted(examples, key=lambda e: len(e.tokens))
    with torch.no_grad():
        for i in range(0, len(ordered), batch_size):
            batch = make_batch(ordered[i : i + batch_size], bottom=bottom)
            total += float(answer_loss(model, batch, reduction="sum"))
            count += int(batch.targets.numel())
    model.train(was_training)
    return total / count


# ---------------------------------------------------------------- schedule and batches


def lr_factor(step: int, total: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def epoch_batches(examples: Sequence[Example], batch_size: int, rng: random.Random) -> list[list[Example]]:
    """Shuffled batches of similar lengths: shuffle, sort within windows of 8 batches, shuffle the
    batches (less padding, still random)."""
    order = list(examples)
    rng.shuffle(order)
    window = batch_size * 8
    batches: list[list[Example]] = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w : w + window], key=lambda e: len(e.tokens))
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def _fmt_time(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


@contextlib.contextmanager
def _torch_settings(threads: int | None) -> Iterator[None]:
    import torch

    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads or max(1, len(os.sched_getaffinity(0))))
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)


# ---------------------------------------------------------------- training


def train(
    model: Any,
    examples: Sequence[Example],
    cfg: TrainConfig,
    *,
    log: TextIO | None = None,
    progress_every_s: float = 10.0,
    load_seconds: float = 0.0,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[Any, TrainResult]:
    """Train a LoRA on `model` (a transformers causal LM, see load_model) and return the PEFT model,
    holding the adapter with the best validation loss, and the figures. Progress goes to `log`
    (stderr by default)."""
    import torch

    cfg.validate()
    out = sys.stderr if log is None else log
    if not examples:
        raise ValueError("no training examples")
    train_set, val_set = split(examples, seed=cfg.seed, val_fraction=cfg.val_fraction)

    with _torch_settings(cfg.threads):
        peft_model = attach_lora(model, cfg)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
        total_steps = steps_per_epoch * cfg.epochs
        warmup_steps = int(total_steps * cfg.warmup)
        eval_at = {
            min(steps_per_epoch, math.ceil(steps_per_epoch * (k + 1) / cfg.evals_per_epoch))
            for k in range(cfg.evals_per_epoch)
        }
        n_params = sum(p.numel() for p in params)
        n_layer = int(model.config.num_hidden_layers)
        skip = frozen_blocks(model, cfg)
        where = f"blocks {skip}-{n_layer - 1}" if skip else f"all {n_layer} blocks"
        print(
            f"distill: {len(train_set)} training examples ({n_tokens(train_set)} tokens), {len(val_set)} held out;"
            f" LoRA r={cfg.rank} alpha={cfg.alpha:g} on {','.join(cfg.target_modules)} of {where}"
            f" ({n_params:,} parameters);"
            f" {cfg.epochs} epoch(s) x {steps_per_epoch} steps, batch {cfg.batch_size}, lr {cfg.lr:g} {cfg.schedule},"
            f" {torch.get_num_threads()} thread(s)",
            file=out,
            flush=True,
        )
        train_seconds = cache_seconds = 0.0
        cpu_seconds = 0.0
        bottom: FrozenBottom | None = None
        if skip:  # the frozen blocks' output, once per example; counted as training time (it is its cost)
            bottom = FrozenBottom(skip)
            t0, c0 = clock(), time.process_time()
            bottom.add(peft_model, train_set, cfg.batch_size, log=out, progress_every_s=progress_every_s, clock=clock)
            cache_seconds = clock() - t0
            train_seconds += cache_seconds
            cpu_seconds += time.process_time() - c0
            bottom.add(peft_model, val_set, cfg.batch_size, log=out, progress_every_s=progress_every_s, clock=clock)
        val_before = evaluate(peft_model, val_set, cfg.batch_size, bottom)
        if val_before is not None:
            print(f"distill: validation loss before training {val_before:.4f}", file=out, flush=True)

        best_loss = val_before
        best_state = _lora_state(peft_model)
        history: list[dict[str, float]] = []
        bad_evals = 0
        stopped = False
        step = 0
        trained_tokens = 0
        last_report = clock()
        loss_ema: float | None = None
        peft_model.train()
        rng = random.Random(cfg.seed)
        epoch = 0
        for epoch in range(cfg.epochs):
            for i, batch_examples in enumerate(epoch_batches(train_set, cfg.batch_size, rng), start=1):
                t0, c0 = clock(), time.process_time()
                for g in opt.param_groups:
                    g["lr"] = cfg.lr * lr_factor(step, total_steps, warmup_steps, cfg.schedule)
                batch = make_batch(batch_examples, bottom=bottom)
                loss = answer_loss(peft_model, batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
                opt.step()
                step += 1
                trained_tokens += batch.n_tokens
                train_seconds += clock() - t0
                cpu_seconds += time.process_time() - c0
                value = float(loss.detach())
                loss_ema = value if loss_ema is None else 0.9 * loss_ema + 0.1 * value
                now = clock()
                if now - last_report >= progress_every_s or step == total_steps:
                    last_report = now
                    rate = trained_tokens / train_seconds if train_seconds > 0 else 0.0
                    eta = (train_seconds - cache_seconds) / step * (total_steps - step)
                    print(
                        f"distill: epoch {epoch + 1}/{cfg.epochs} step {step}/{total_steps} loss {loss_ema:.4f}"
                        f" lr {opt.param_groups[0]['lr']:.2e} | {rate:.0f} tokens/s | ETA {_fmt_time(eta)}",
                        file=out,
                        flush=True,
                    )
                if val_set and i in eval_at:
                    val = evaluate(peft_model, val_set, cfg.batch_size, bottom)
                    assert val is not None
                    history.append(
                        {"epoch": epoch + i / steps_per_epoch, "step": step, "val_loss": val, "train_loss": loss_ema}
                    )
                    improved = best_loss is None or val < best_loss - 1e-4
                    print(
                        f"distill: epoch {epoch + i / steps_per_epoch:.2f} validation loss {val:.4f}"
                        + (" (best)" if improved else f" (best {best_loss:.4f})"),
                        file=out,
                        flush=True,
                    )
                    if improved:
                        best_loss, best_state, bad_evals = val, _lora_state(peft_model), 0
                    else:
                        bad_evals += 1
                        if cfg.patience and bad_evals >= cfg.patience:
                            stopped = True
                            break
            if stopped:
                print(
                    f"distill: stopping early: no better validation loss in {bad_evals} evaluation(s)",
                    file=out,
                    flush=True,
                )
                break
        if val_set:
            _load_lora_state(peft_model, best_state)
        else:
            best_state = _lora_state(peft_model)
        peft_model.eval()
    result = TrainResult(
        train_examples=len(train_set),
        val_examples=len(val_set),
        seconds=round(train_seconds, 3),
        cpu_seconds=round(cpu_seconds, 3),
        tokens_per_s=round(trained_tokens / train_seconds, 1) if train_seconds > 0 else 0.0,
        train_tokens=trained_tokens,
        val_loss_before=val_before,
        val_loss_after=best_loss,
        epochs_run=round(step / steps_per_epoch, 3),
        steps=step,
        stopped_early=stopped,
        load_seconds=round(load_seconds, 3),
        frozen_seconds=round(cache_seconds, 3),
        history=history,
    )
    return peft_model, result


def _lora_state(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _load_lora_state(model: Any, state: dict[str, torch.Tensor]) -> None:
    import torch

    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in state:
                p.copy_(state[n])

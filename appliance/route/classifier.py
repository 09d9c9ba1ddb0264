"""The difficulty classifier: logistic regression (numpy) over a sentence embedding (all-MiniLM-L6-v2,
the semantic cache's model) plus the cheap features, trained from `text,label` rows (label `local` or
`cloud`). A features-only model is trained alongside for when no embedding model is provisioned."""

from __future__ import annotations

import csv
import hashlib
import importlib.resources
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from appliance.cache.embedder import Embedder
from appliance.cache.errors import QueryError
from appliance.cache.text import clean_text
from appliance.route.features import extract, vector

Array = npt.NDArray[np.float32]
LABELS = ("local", "cloud")


class TrainingDataError(ValueError):
    """The training CSV is unreadable or has a bad row; the message names the file and row."""


def shipped_csv() -> Path:
    return Path(str(importlib.resources.files("appliance.route") / "data" / "default.csv"))


def read_labelled(path: Path, *, require_labels: bool = True) -> tuple[list[str], list[str | None]]:
    """(texts, labels) of a `text,label` CSV; a missing label is None unless labels are required."""
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or "text" not in reader.fieldnames:
                raise TrainingDataError(f"{path}: needs a header with a 'text' column (and 'label': local or cloud)")
            texts: list[str] = []
            labels: list[str | None] = []
            for n, row in enumerate(reader, start=2):
                text, label = (row.get("text") or "").strip(), (row.get("label") or "").strip() or None
                if not text:
                    raise TrainingDataError(f"{path}:{n}: empty text")
                if (label is None and require_labels) or (label is not None and label not in LABELS):
                    raise TrainingDataError(f"{path}:{n}: label must be 'local' or 'cloud', got {label!r}")
                texts.append(text)
                labels.append(label)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise TrainingDataError(f"{path}: cannot read: {e}") from None
    return texts, labels


def fit_logistic(x: Array, y: Array, *, l2: float = 1e-2, iters: int = 600, lr: float = 0.5) -> tuple[Array, float]:
    """Class-balanced L2-regularised logistic regression by full-batch gradient descent."""
    n, d = x.shape
    pos = float(y.sum())
    weight = np.where(y > 0.5, n / (2 * max(pos, 1.0)), n / (2 * max(n - pos, 1.0))).astype(np.float32)
    w, b = np.zeros(d, dtype=np.float32), 0.0
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(x @ w + b)))
        g = (p - y) * weight / n
        w -= lr * (x.T @ g + l2 * w)
        b -= lr * float(g.sum())
    return w.astype(np.float32), float(b)


class Linear:
    """Standardised inputs, then a logistic unit."""

    def __init__(self, mean: Array, std: Array, w: Array, b: float) -> None:
        self.mean, self.std, self.w, self.b = mean, std, w, b

    @classmethod
    def fit(cls, x: Array, y: Array) -> Linear:
        mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
        w, b = fit_logistic((x - mean) / std, y)
        return cls(mean.astype(np.float32), std.astype(np.float32), w, b)

    def prob(self, x: Array) -> Array:
        z = ((x - self.mean) / self.std) @ self.w + self.b
        return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)


class RouterModel:
    """P(cloud) for a text: from embedding + features when the embedder matches, else features only."""

    def __init__(self, full: Linear | None, feats: Linear, embedder_version: str, source: str) -> None:
        self.full, self.feats = full, feats
        self.embedder_version = embedder_version
        self.source = source  # what it was trained on (file name and hash)

    def p_cloud(self, text: str, embedder: Embedder | None) -> float:
        f = vector(extract(text))[None, :]
        if self.full is not None and embedder is not None and embedder.version == self.embedder_version:
            try:
                e = _embed(embedder, text)[None, :]
            except QueryError:  # longer than the embedding model takes: the features alone decide
                return float(self.feats.prob(f)[0])
            return float(self.full.prob(np.concatenate([e, f], axis=1))[0])
        return float(self.feats.prob(f)[0])

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, Any] = {"embedder_version": np.array(self.embedder_version), "source": np.array(self.source)}
        for prefix, part in (("feats", self.feats), ("full", self.full)):
            if part is not None:
                arrays.update({f"{prefix}_mean": part.mean, f"{prefix}_std": part.std, f"{prefix}_w": part.w})
                arrays[f"{prefix}_b"] = np.array(part.b)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")  # concurrent writers never share one
        np.savez(tmp, **arrays)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> RouterModel:
        try:
            with np.load(path) as z:
                parts = {k: z[k] for k in z.files}
        except (OSError, ValueError) as e:
            raise TrainingDataError(
                f"router model {path}: cannot read ({e}); retrain with `appliance router train`"
            ) from None

        def linear(prefix: str) -> Linear:
            return Linear(
                parts[f"{prefix}_mean"], parts[f"{prefix}_std"], parts[f"{prefix}_w"], float(parts[f"{prefix}_b"])
            )

        try:
            full = linear("full") if "full_w" in parts else None
            return cls(full, linear("feats"), str(parts["embedder_version"]), str(parts["source"]))
        except KeyError as e:
            raise TrainingDataError(
                f"router model {path}: missing {e}; retrain with `appliance router train`"
            ) from None


def _embed(embedder: Embedder, text: str) -> Array:
    """The text as the semantic cache embeds it (NFC, whitespace collapsed), so that a request the
    cache just looked up finds its vector in the embedder's memory instead of running the model."""
    return embedder.embed(clean_text(text, "text", max_chars=1 << 20, allow_empty=True)).astype(np.float32)


def train(texts: Sequence[str], labels: Sequence[str | None], embedder: Embedder | None, source: str) -> RouterModel:
    if any(label is None for label in labels):
        raise TrainingDataError(f"{source}: every row needs a label to train")
    y = np.array([label == "cloud" for label in labels], dtype=np.float32)
    if y.min() == y.max():
        raise TrainingDataError(f"{source}: needs examples of both labels, local and cloud")
    feats = np.stack([vector(extract(t)) for t in texts])
    full = None
    if embedder is not None:
        emb = np.stack([_embed(embedder, t) for t in texts])
        full = Linear.fit(np.concatenate([emb, feats], axis=1), y)
    version = embedder.version if embedder is not None else ""
    return RouterModel(full, Linear.fit(feats, y), version, source)


def file_source(path: Path) -> str:
    return f"{path.name}:{hashlib.sha256(path.read_bytes()).hexdigest()[:12]}"

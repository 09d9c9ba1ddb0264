"""Reference for the MiniLM embedding GGUF: a plain numpy BERT forward pass over the original
safetensors (float64, exact erf GELU), and a quiet CPU-only llama.cpp embedding loader."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import numpy.typing as npt

from appliance.models.builders.safetensors_np import SafetensorsFile

F64 = npt.NDArray[np.float64]
_erf = np.frompyfunc(math.erf, 1, 1)


class NumpyBert:
    """Sentence embedding = L2-normalised mean over tokens of the last hidden state."""

    def __init__(self, model_dir: Path) -> None:
        self.config: dict[str, Any] = json.loads((model_dir / "config.json").read_text())
        with SafetensorsFile(model_dir / "model.safetensors") as st:
            self.w = {name: st.load(name).astype(np.float64) for name in st.names() if "position_ids" not in name}

    def _ln(self, x: F64, prefix: str) -> F64:
        eps = float(self.config["layer_norm_eps"])
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        out: F64 = (x - mean) / np.sqrt(var + eps) * self.w[prefix + ".weight"] + self.w[prefix + ".bias"]
        return out

    def _dense(self, x: F64, prefix: str) -> F64:
        out: F64 = x @ self.w[prefix + ".weight"].T + self.w[prefix + ".bias"]
        return out

    def hidden(self, ids: Sequence[int]) -> F64:
        w, n = self.w, len(ids)
        x = w["embeddings.word_embeddings.weight"][list(ids)]
        x = x + w["embeddings.position_embeddings.weight"][:n] + w["embeddings.token_type_embeddings.weight"][0]
        x = self._ln(x, "embeddings.LayerNorm")
        heads = int(self.config["num_attention_heads"])
        dh = x.shape[1] // heads
        for i in range(int(self.config["num_hidden_layers"])):
            p = f"encoder.layer.{i}."
            q, k, v = (
                self._dense(x, p + f"attention.self.{t}").reshape(n, heads, dh).transpose(1, 0, 2)
                for t in ("query", "key", "value")
            )
            scores = q @ k.transpose(0, 2, 1) / math.sqrt(dh)
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            probs = scores / scores.sum(-1, keepdims=True)
            ctx = (probs @ v).transpose(1, 0, 2).reshape(n, heads * dh)
            x = self._ln(x + self._dense(ctx, p + "attention.output.dense"), p + "attention.output.LayerNorm")
            h = self._dense(x, p + "intermediate.dense")
            h = 0.5 * h * (1.0 + np.asarray(_erf(h / math.sqrt(2.0)), dtype=np.float64))
            x = self._ln(x + self._dense(h, p + "output.dense"), p + "output.LayerNorm")
        return x

    def embed(self, ids: Sequence[int]) -> F64:
        pooled = self.hidden(ids).mean(0)
        out: F64 = pooled / np.linalg.norm(pooled)
        return out


def load_embedding_model(path: Path, n_ctx: int = 512) -> Any:
    """llama_cpp.Llama(path, embedding=True) on the CPU, quiet, plain ggml kernels.

    Like tests/reference.py, turns off ggml-cpu's "extra" buffer types (repacking, AMX), which die
    with SIGILL on hosts that advertise AMX without enabling it.
    """
    import llama_cpp

    base_default = llama_cpp.llama_cpp.llama_model_default_params

    def default_params() -> Any:
        params = base_default()
        params.use_extra_bufts = False
        return params

    with mock.patch.object(llama_cpp.llama_cpp, "llama_model_default_params", default_params):
        return llama_cpp.Llama(
            model_path=str(path),
            embedding=True,
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_ubatch=n_ctx,
            n_threads=2,
            n_threads_batch=2,
            n_gpu_layers=0,
            verbose=False,
        )


def cosine(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))

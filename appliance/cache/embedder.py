"""Sentence embeddings from a GGUF embedding model through llama.cpp (llama-cpp-python's C API).

:class:`GgufEmbedder` loads any GGUF embedding model (by default the provisioned
all-MiniLM-L6-v2: BERT, WordPiece vocabulary, mean pooling) on the CPU, runs one query per call
through ``llama_encode`` and returns the L2-normalised pooled vector as float32. Weight
repacking ("extra" buffer types, e.g. AMX) is turned off: ggml dies with SIGILL on hosts that
advertise AMX without enabling it. :class:`Embedder` is the protocol the cache needs, so another
model (or a remote one) can be plugged in. :class:`MemoEmbedder` remembers the last few vectors, so
that the stages of one request (cache lookup, router, cache store) embed its text once.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

from appliance.cache.errors import EmbedderError, QueryError

Vector = npt.NDArray[np.float32]
DEFAULT_EMBEDDING_MODEL = "all-minilm-l6-v2"
# GGUF metadata key of a tuned embedder's own calibration (JSON; see appliance.cache.tune)
CALIBRATION_KEY = "appliance.cache.calibration"


class Embedder(Protocol):
    """What the cache needs from an embedding model."""

    @property
    def dim(self) -> int: ...

    @property
    def version(self) -> str:
        """Identifies the model and its weights; part of every cache fingerprint."""
        ...

    @property
    def max_tokens(self) -> int: ...

    def embed(self, text: str) -> Vector:
        """L2-normalised float32 vector of ``text``; raises QueryError when it has too many tokens."""
        ...


class MemoEmbedder:
    """An :class:`Embedder` that remembers its last ``size`` vectors by text. Thread-safe.

    One request's text is embedded by the cache lookup, again by the router and again by the cache
    store after the answer; with this in front of the model, the model runs once. ``close`` closes the
    wrapped embedder when it has a ``close``.
    """

    def __init__(self, inner: Embedder, size: int = 64) -> None:
        if size < 1:
            raise ValueError(f"MemoEmbedder size must be at least 1, got {size}")
        self.inner = inner
        self.size = size
        self.requests = 0  # embed() calls
        self.computed = 0  # of which the wrapped model ran (the rest came from memory)
        self._memo: OrderedDict[str, Vector] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def dim(self) -> int:
        return self.inner.dim

    @property
    def version(self) -> str:
        return self.inner.version

    @property
    def max_tokens(self) -> int:
        return self.inner.max_tokens

    def embed(self, text: str) -> Vector:
        with self._lock:
            self.requests += 1
            vec = self._memo.get(text)
            if vec is not None:
                self._memo.move_to_end(text)
                return vec
        vec = self.inner.embed(text)  # outside the lock: two threads may embed the same text at once
        if vec.shape != (self.inner.dim,):
            raise EmbedderError(f"embedder returned shape {vec.shape}, expected ({self.inner.dim},)")
        vec.setflags(write=False)  # shared between callers
        with self._lock:
            self.computed += 1
            self._memo[text] = vec
            while len(self._memo) > self.size:
                self._memo.popitem(last=False)
        return vec

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if callable(close):
            close()


def default_model_path() -> Path:
    """The provisioned default embedding GGUF (``appliance models pull`` puts it there)."""
    from appliance.models.manifest import load_manifest
    from appliance.models.provision import model_path

    path = model_path(load_manifest().get(DEFAULT_EMBEDDING_MODEL))
    if not path.is_file():
        raise EmbedderError(f"embedding model {path} is missing; run `appliance models pull {DEFAULT_EMBEDDING_MODEL}`")
    return path


def quiet_llama_cpp() -> None:
    """Only errors from llama.cpp's log, as ``llama_cpp.Llama(verbose=False)`` sets it (once, if unset)."""
    log = logging.getLogger("llama-cpp-python")
    if log.level == logging.NOTSET:
        log.setLevel(logging.ERROR)


def file_version(path: Path) -> str:
    """Name plus a hash of the first and last MiB and the size: cheap, and changes with the weights."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    h.update(str(size).encode())
    return f"{path.name}:{h.hexdigest()[:16]}"


class GgufEmbedder:
    """A GGUF embedding model on the CPU. Thread-safe (one query at a time); call :meth:`close`.

    ``n_threads`` defaults to 1: on a 2-core host shared with generation, two ggml threads
    spin-wait on each other (measured here: p50 26 ms, p99 1 s under load, against 9.5 / 15 ms with
    one thread); on an idle host two threads are faster (about 5 ms against 9.5 ms for MiniLM).
    So with ``busy`` given (the service passes "is the engine generating?"), each query runs on
    ``n_threads`` while ``busy()`` is true and on ``n_threads_idle`` otherwise.
    """

    def __init__(
        self,
        path: Path | str | None = None,
        *,
        n_threads: int = 1,
        n_ctx: int = 512,
        n_threads_idle: int | None = None,
        busy: Callable[[], bool] | None = None,
    ) -> None:
        import llama_cpp

        if n_threads < 1 or (n_threads_idle is not None and n_threads_idle < 1):
            raise EmbedderError(f"embedding threads must be at least 1, got {n_threads} / {n_threads_idle}")
        self.n_threads = n_threads
        self.n_threads_idle = n_threads_idle if n_threads_idle is not None else n_threads
        self._busy = busy
        self._threads = n_threads

        quiet_llama_cpp()
        self._lib = llama_cpp
        self.path = Path(path) if path is not None else default_model_path()
        if not self.path.is_file():
            raise EmbedderError(f"embedding model {self.path} does not exist")
        self._version = file_version(self.path)
        self._lock = threading.Lock()
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = 0
        mparams.use_extra_bufts = False
        self._model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not self._model:
            raise EmbedderError(f"llama.cpp could not load {self.path} as a model")
        n_ctx = min(n_ctx, int(llama_cpp.llama_model_n_ctx_train(self._model)))
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = n_ctx
        cparams.n_seq_max = 1
        cparams.n_threads = cparams.n_threads_batch = n_threads
        cparams.embeddings = True
        cparams.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_MEAN
        self._ctx = llama_cpp.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            raise EmbedderError(f"llama.cpp could not create an embedding context for {self.path}")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.calibration = self._metadata(CALIBRATION_KEY)
        self._dim = int(llama_cpp.llama_model_n_embd(self._model))
        self._n_ctx = n_ctx
        self._tokens = (llama_cpp.llama_token * n_ctx)()
        self._batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)
        self._closed = False

    def _metadata(self, key: str) -> str | None:
        """A string from the GGUF's metadata, or None when the file has no such key."""
        size = 1 << 12
        while True:
            buf = ctypes.create_string_buffer(size)
            n = int(self._lib.llama_model_meta_val_str(self._model, key.encode(), buf, size))
            if n < 0:
                return None
            if n < size:
                return buf.value.decode("utf-8", errors="replace")
            size = n + 1

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def version(self) -> str:
        return self._version

    @property
    def max_tokens(self) -> int:
        return self._n_ctx

    def tokenize(self, text: str) -> list[int]:
        """Token ids with the model's special tokens ([CLS] ... [SEP]); QueryError when too long."""
        data = text.encode("utf-8")
        n = self._lib.llama_tokenize(self._vocab, data, len(data), self._tokens, self._n_ctx, True, False)
        if n < 0:
            raise QueryError(
                f"query has {-n} tokens; the embedding model takes at most {self._n_ctx} ({len(text)} characters)"
            )
        return list(self._tokens[:n])

    def embed(self, text: str) -> Vector:
        lib = self._lib
        with self._lock:
            if self._closed:
                raise EmbedderError("embedder is closed")
            ids = self.tokenize(text)
            self._set_threads(self.n_threads if self._busy is None or self._busy() else self.n_threads_idle)
            batch = self._batch
            for i, tok in enumerate(ids):
                batch.token[i] = tok
                batch.pos[i] = i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = True
            batch.n_tokens = len(ids)
            lib.llama_memory_clear(lib.llama_get_memory(self._ctx), True)
            rc = lib.llama_encode(self._ctx, batch)
            if rc != 0:
                raise EmbedderError(f"llama_encode failed with code {rc} on a {len(ids)}-token query")
            ptr = lib.llama_get_embeddings_seq(self._ctx, 0)
            if not ptr:
                raise EmbedderError("the model returned no pooled embedding (is it an embedding model?)")
            arr = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(self._dim,))
            vec = np.array(arr, dtype=np.float32)
        norm = float(np.linalg.norm(vec))
        if not np.isfinite(norm) or norm == 0.0:
            raise EmbedderError("the model returned a zero or non-finite embedding")
        out: Vector = vec / np.float32(norm)
        return out

    def _set_threads(self, n: int) -> None:
        if n != self._threads:
            self._lib.llama_set_n_threads(self._ctx, n, n)
            self._threads = n

    @property
    def threads(self) -> int:
        """The threads the last query ran on."""
        return self._threads

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._lib.llama_batch_free(self._batch)
            self._lib.llama_free(self._ctx)
            self._lib.llama_model_free(self._model)

    def __enter__(self) -> GgufEmbedder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

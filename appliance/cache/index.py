"""One partition's approximate nearest-neighbour index (hnswlib, cosine) and its file on disk.

Labels are SQLite entry ids. :meth:`PartitionIndex.save` writes ``<base>.hnsw`` then a sidecar
``<base>.json`` (store id, partition, embedder, dim, the SQLite state it reflects, and the BLAKE2b
digest and size of the index file), each to a temporary file, fsynced and renamed into place.
:func:`load` returns the index only when the sidecar matches what the caller expects and the
file's digest matches the sidecar: hnswlib itself is never handed a damaged file.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hnswlib  # type: ignore[import-untyped]
import msgspec
import numpy as np

from appliance.cache.embedder import Vector

SIDE_VERSION = 1


class IndexMeta(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    version: int
    store_id: str
    partition: str
    embedder: str
    dim: int
    max_id: int
    tomb_seq: int
    count: int
    deleted: int
    size: int
    digest: str


@dataclass(frozen=True)
class HnswParams:
    m: int = 16
    ef_construction: int = 100
    ef_search: int = 64


def _digest(path: Path) -> tuple[str, int]:
    h = hashlib.blake2b(digest_size=32)
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _write_atomic(path: Path, data: bytes | None, src: Path | None = None) -> None:
    """Put ``data`` (or rename the already written ``src``) at ``path`` durably."""
    if src is None:
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("wb") as f:
            f.write(data or b"")
            f.flush()
            os.fsync(f.fileno())
        src = tmp
    os.replace(src, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PartitionIndex:
    """hnswlib index over unit vectors; :meth:`search` returns (entry id, cosine) best first."""

    def __init__(self, dim: int, params: HnswParams, capacity: int = 64, index: Any = None, live: int = 0) -> None:
        self.dim = dim
        self.params = params
        if index is None:
            index = hnswlib.Index(space="cosine", dim=dim)
            index.init_index(max_elements=max(capacity, 16), ef_construction=params.ef_construction, M=params.m)
        index.set_ef(params.ef_search)
        index.set_num_threads(1)
        self._index = index
        self.live = live
        self.deleted = 0

    @property
    def count(self) -> int:
        return int(self._index.get_current_count())

    def add(self, ids: list[int], vectors: list[Vector] | np.ndarray[Any, Any]) -> None:
        if not ids:
            return
        data = np.asarray(vectors, dtype=np.float32).reshape(len(ids), self.dim)
        need = self.count + len(ids)
        cap = int(self._index.get_max_elements())
        if need > cap:
            self._index.resize_index(max(need, cap * 2))
        self._index.add_items(data, np.asarray(ids, dtype=np.uint64), num_threads=1)
        self.live += len(ids)

    def mark_deleted(self, ids: list[int]) -> None:
        for i in ids:
            try:
                self._index.mark_deleted(i)
            except RuntimeError:
                continue  # not in this index (or already deleted)
            self.live -= 1
            self.deleted += 1

    def search(self, vector: Vector, k: int) -> list[tuple[int, float]]:
        k = min(k, self.live)
        if k <= 0:
            return []
        try:
            labels, dists = self._index.knn_query(vector.reshape(1, -1), k=k, num_threads=1)
        except RuntimeError:
            return []  # hnswlib found fewer than k live neighbours
        return [(int(lab), 1.0 - float(d)) for lab, d in zip(labels[0], dists[0], strict=True)]

    def save(self, base: Path, meta_fields: dict[str, Any]) -> IndexMeta:
        base.parent.mkdir(parents=True, exist_ok=True)
        data_path = base.with_suffix(".hnsw")
        tmp = data_path.with_name(data_path.name + ".tmp")
        self._index.save_index(str(tmp))
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        digest, size = _digest(tmp)
        meta = IndexMeta(
            version=SIDE_VERSION, count=self.count, deleted=self.deleted, size=size, digest=digest, **meta_fields
        )
        _write_atomic(data_path, None, src=tmp)
        _write_atomic(base.with_suffix(".json"), msgspec.json.encode(meta))
        return meta


def load(
    base: Path, dim: int, params: HnswParams, expect: dict[str, Any]
) -> tuple[PartitionIndex | None, IndexMeta | None, str]:
    """(index, its sidecar, "") when the files at ``base`` are intact and match ``expect``; else
    (None, sidecar or None, why not)."""
    side, data_path = base.with_suffix(".json"), base.with_suffix(".hnsw")
    try:
        meta = msgspec.json.decode(side.read_bytes(), type=IndexMeta)
    except FileNotFoundError:
        return None, None, "no index file"
    except (OSError, msgspec.DecodeError, msgspec.ValidationError) as e:
        return None, None, f"index sidecar unreadable: {e}"
    for key, want in expect.items():
        if getattr(meta, key) != want:
            return None, meta, f"index {key} is {getattr(meta, key)!r}, expected {want!r}"
    try:
        digest, size = _digest(data_path)
    except OSError as e:
        return None, meta, f"index file unreadable: {e}"
    if (digest, size) != (meta.digest, meta.size):
        return None, meta, "index file does not match its digest (corrupt or replaced)"
    index = hnswlib.Index(space="cosine", dim=dim)
    try:
        index.load_index(str(data_path), max_elements=meta.count + 16)
    except (RuntimeError, ValueError, MemoryError) as e:
        return None, meta, f"hnswlib could not load the index: {e}"
    if int(index.get_current_count()) != meta.count:
        return None, meta, "index element count differs from its sidecar"
    # hnswlib persists the deletion marks; the sidecar keeps their number.
    out = PartitionIndex(dim, params, index=index, live=meta.count - meta.deleted)
    out.deleted = meta.deleted
    return out, meta, ""

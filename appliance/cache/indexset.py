"""The loaded partition indexes of one cache, kept in step with SQLite.

Before each search :meth:`IndexSet.get` compares the partition's SQLite state (highest entry id,
latest deletion) with what the index reflects and catches up: rows added since are inserted,
tombstoned ids are marked deleted. A partition seen for the first time is loaded from its file
when that is intact and matches this store, embedder and dimension, else rebuilt from SQLite (the
reason is counted in :attr:`IndexSet.rebuilds`). A file changed or removed under a running cache is
noticed (at most once a second per partition) and rewritten from the in-memory index, which was
itself built from SQLite. Indexes with few entries are not written at all: rebuilding them is
cheaper than reading a file.
"""

from __future__ import annotations

import os
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from appliance.cache.index import HnswParams, PartitionIndex, load
from appliance.cache.store import PartitionState, Store

FileStamp = tuple[int, int, int] | None


@dataclass
class _Loaded:
    index: PartitionIndex
    max_id: int
    tomb_seq: int
    dirty: bool = False
    stamp: FileStamp = None
    checked: float = 0.0


def _stamp(path: Path) -> FileStamp:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class IndexSet:
    def __init__(
        self,
        root: Path,
        store: Store,
        dim: int,
        embedder_version: str,
        params: HnswParams,
        persist_min_entries: int = 512,
        max_loaded: int = 256,
    ) -> None:
        self.root = root
        self.store = store
        self.dim = dim
        self.embedder_version = embedder_version
        self.params = params
        self.persist_min_entries = persist_min_entries
        self.max_loaded = max_loaded
        self._loaded: OrderedDict[str, _Loaded] = OrderedDict()
        self.rebuilds: Counter[str] = Counter()

    def _base(self, partition: str) -> Path:
        return self.root / partition[:2] / partition

    def _expect(self, partition: str) -> dict[str, object]:
        return {
            "store_id": self.store.store_id,
            "partition": partition,
            "embedder": self.embedder_version,
            "dim": self.dim,
        }

    def get(self, partition: str) -> PartitionIndex:
        state = self.store.partition_state(partition)
        loaded = self._loaded.get(partition)
        if loaded is None:
            loaded = self._open(partition, state)
        else:
            self._loaded.move_to_end(partition)
            self._check_file(partition, loaded)
        self._catch_up(partition, loaded, state)
        return loaded.index

    # ------------------------------------------------------------------ internals

    def _open(self, partition: str, state: PartitionState) -> _Loaded:
        base = self._base(partition)
        index, meta, why = load(base, self.dim, self.params, self._expect(partition))
        if index is not None and meta is not None and meta.max_id <= state.max_id and meta.tomb_seq <= state.tomb_seq:
            loaded = _Loaded(index, meta.max_id, meta.tomb_seq, stamp=_stamp(base.with_suffix(".hnsw")))
        else:
            if index is not None:
                why = "index is ahead of the database (database replaced?)"
            loaded = self._rebuild(partition, state)
            loaded.dirty = True
            if why != "no index file" or loaded.index.live >= self.persist_min_entries:
                self.rebuilds[why.split(":")[0]] += 1
        self._loaded[partition] = loaded
        while len(self._loaded) > self.max_loaded:
            old, evicted = self._loaded.popitem(last=False)
            self._save(old, evicted)
        return loaded

    def _rebuild(self, partition: str, state: PartitionState) -> _Loaded:
        ids, blobs = self.store.vectors(partition, 0, state.max_id)
        index = PartitionIndex(self.dim, self.params, capacity=len(ids) + 64)
        if ids:
            index.add(ids, np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(ids), self.dim))
        return _Loaded(index, state.max_id, state.tomb_seq)

    def _catch_up(self, partition: str, loaded: _Loaded, state: PartitionState) -> None:
        if state.max_id < loaded.max_id or state.tomb_seq < loaded.tomb_seq:
            self.rebuilds["database went back in time"] += 1
            fresh = self._rebuild(partition, state)
            loaded.index, loaded.max_id, loaded.tomb_seq, loaded.dirty = fresh.index, fresh.max_id, fresh.tomb_seq, True
            return
        if state.max_id > loaded.max_id:
            ids, blobs = self.store.vectors(partition, loaded.max_id, state.max_id)
            if ids:
                loaded.index.add(ids, np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(ids), self.dim))
            loaded.max_id, loaded.dirty = state.max_id, True
        if state.tomb_seq > loaded.tomb_seq:
            loaded.index.mark_deleted(self.store.tombstones(partition, loaded.tomb_seq, state.tomb_seq))
            loaded.tomb_seq, loaded.dirty = state.tomb_seq, True
            if loaded.index.deleted > max(1024, loaded.index.live):
                fresh = self._rebuild(partition, state)
                loaded.index = fresh.index

    def _check_file(self, partition: str, loaded: _Loaded) -> None:
        now = time.monotonic()
        if loaded.stamp is None or now - loaded.checked < 1.0:
            return
        loaded.checked = now
        if _stamp(self._base(partition).with_suffix(".hnsw")) != loaded.stamp:
            self.rebuilds["index file changed under a running cache"] += 1
            loaded.dirty = True  # ours was built from SQLite: write it again at the next flush

    def _save(self, partition: str, loaded: _Loaded) -> None:
        if not loaded.dirty or loaded.index.live < self.persist_min_entries:
            return
        base = self._base(partition)
        fields = dict(self._expect(partition), max_id=loaded.max_id, tomb_seq=loaded.tomb_seq)
        loaded.index.save(base, fields)
        loaded.dirty, loaded.stamp = False, _stamp(base.with_suffix(".hnsw"))

    def flush(self) -> int:
        """Write every changed index that is big enough to keep; returns how many were written."""
        n = 0
        for partition, loaded in self._loaded.items():
            if loaded.dirty and loaded.index.live >= self.persist_min_entries:
                self._save(partition, loaded)
                n += 1
        return n

    def drop_files(self) -> None:
        """Forget every loaded index and remove the files (after the database was cleared)."""
        self._loaded.clear()
        for path in self.root.glob("*/*"):
            if path.suffix in (".hnsw", ".json", ".tmp"):
                os.unlink(path)

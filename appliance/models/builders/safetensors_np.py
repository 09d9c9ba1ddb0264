"""Minimal, dependency-free (json + numpy) reader for the safetensors format.

Layout: 8-byte little-endian header length N, N bytes of JSON mapping tensor names to
``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the end of the header),
then the raw little-endian tensor bytes.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import numpy as np
import numpy.typing as npt

_MAX_HEADER = 100 * 1024 * 1024
_DTYPES: dict[str, np.dtype[np.generic]] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # widened to float32 on load
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
}


class SafetensorsError(ValueError):
    pass


class TensorInfo:
    __slots__ = ("begin", "dtype", "end", "shape")

    def __init__(self, dtype: str, shape: tuple[int, ...], begin: int, end: int) -> None:
        self.dtype = dtype
        self.shape = shape
        self.begin = begin
        self.end = end


class SafetensorsFile:
    """Open with ``with SafetensorsFile(path) as st:``; ``st.load(name)`` returns a fresh array."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: BinaryIO = path.open("rb")
        try:
            self.tensors, self.metadata, self._data_start = _read_header(self._fh, path)
        except BaseException:
            self._fh.close()
            raise

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._fh.close()

    def names(self) -> list[str]:
        return list(self.tensors)

    def load(self, name: str) -> npt.NDArray[np.generic]:
        """The tensor as a C-contiguous array (F32 for F32/BF16 sources, else the stored dtype)."""
        try:
            info = self.tensors[name]
        except KeyError:
            raise SafetensorsError(f"{self.path}: no tensor named {name!r}") from None
        dtype = _DTYPES[info.dtype]
        count = math.prod(info.shape)
        self._fh.seek(self._data_start + info.begin)
        arr = np.fromfile(self._fh, dtype=dtype, count=count)
        if arr.size != count:
            raise SafetensorsError(f"{self.path}: tensor {name!r} is truncated")
        if info.dtype == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        return arr.reshape(info.shape)


def _read_header(fh: BinaryIO, path: Path) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    raw_len = fh.read(8)
    if len(raw_len) != 8:
        raise SafetensorsError(f"{path}: too short to be a safetensors file")
    (header_len,) = struct.unpack("<Q", raw_len)
    if header_len > _MAX_HEADER:
        raise SafetensorsError(f"{path}: implausible header length {header_len}")
    try:
        header = json.loads(fh.read(header_len))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SafetensorsError(f"{path}: bad header: {exc}") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object")
    data_start = 8 + header_len
    data_size = path.stat().st_size - data_start
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{path}: malformed header entry for {name!r}") from None
        if dtype not in _DTYPES:
            raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        nbytes = math.prod(shape) * _DTYPES[dtype].itemsize
        if not (0 <= begin <= end <= data_size) or end - begin != nbytes:
            raise SafetensorsError(f"{path}: tensor {name!r} has inconsistent offsets")
        tensors[name] = TensorInfo(dtype, shape, begin, end)
    return tensors, metadata, data_start

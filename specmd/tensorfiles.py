"""Where each tensor's bytes lie in a safetensors file, from its header alone (no tensor is read).

A safetensors file is an 8-byte little-endian header length, a JSON header giving each tensor's dtype,
shape and `data_offsets` [begin, end) relative to the end of the header, then the data. The storage tiers
that read experts straight from files use these ranges; the header is checked against the file so that
a range never points past its end or disagrees with its tensor's dtype and shape.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
MAX_HEADER = 100_000_000  # safetensors' own limit


class TensorFileError(ValueError):
    """A safetensors file whose header is unreadable or disagrees with the file."""


@dataclass(frozen=True)
class TensorRange:
    """One tensor of a safetensors file: its dtype name ("F32", "BF16", ...), shape and absolute byte range."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class FileRange:
    """`nbytes` contiguous bytes of `path` from byte `start`: what one read fetches."""

    path: Path
    start: int
    nbytes: int


def tensor_ranges(path: str | os.PathLike[str]) -> dict[str, TensorRange]:
    """Every tensor of the safetensors file `path` and where its bytes lie; a `TensorFileError` names a bad one."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise TensorFileError(f"{path} is {size} B long: too short for a safetensors header")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(MAX_HEADER, size - 8):
                raise TensorFileError(f"{path}: its header claims {length} B, more than the file holds (truncated?)")
            header = json.loads(handle.read(length))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TensorFileError(f"{path} is not a readable safetensors file ({exc})") from exc
    if not isinstance(header, dict):
        raise TensorFileError(f"{path}: its header is not a JSON object")
    base = 8 + length
    ranges = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            expected = math.prod(shape) * ITEMSIZE[dtype]
        except (KeyError, TypeError, ValueError) as exc:
            raise TensorFileError(f"{path}: the header entry of {name} is malformed ({exc!r})") from exc
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
            raise TensorFileError(f"{path}: tensor {name} has invalid data offsets {[begin, end]}")
        if end - begin != expected:
            raise TensorFileError(
                f"{path}: tensor {name} is {dtype} {list(shape)} ({expected} B), but its header gives it "
                f"{end - begin} B of data"
            )
        if base + end > size:
            raise TensorFileError(
                f"{path}: tensor {name}'s bytes end at {base + end}, past the end of the file ({size} B): truncated"
            )
        ranges[name] = TensorRange(dtype, shape, base + begin, base + end)
    return ranges

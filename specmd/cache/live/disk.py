"""The disk tier: expert bytes stay in their files and are read on demand, one expert per request.

At the model's own dtype an expert is read from the checkpoint's safetensors files: its gate, up and down
tensors (the hub's per-expert layout), or its slice of each fused [E, ...] tensor (one contiguous range
each), in whichever shard holds them. Another float dtype is read at the checkpoint's and cast as it
arrives (the cast transformers makes when it loads at that dtype). A quantized precision is read from
its persisted copy (`specmd.quant.persist`), one row per expert, so one expert is one read; a checkpoint
without one is quantized once, a layer at a time.

Memory: no expert is held by the tier. On the CPU (a CPU cache, or a host-RAM tier's block) a read lands
straight in its slot; otherwise (a GPU cache, or a cast) it goes through one of two staging buffers allocated
once, on first need (pinned on CUDA), so nothing is allocated per read; a reader that finds both in use waits
for one (at most one read).

Reads are buffered `pread`s of exactly the bytes an expert needs (ranges that touch are merged into one
read), with `POSIX_FADV_RANDOM` so the kernel reads no further ahead. Queue depth: the transfer threads read
`READ_EXPERTS` experts at once (`readers`; prefetches and misses issued together), and an expert larger than
`READ_CHUNK` is read in chunks, `READ_THREADS` at a time, by a small pool the tier starts on first need and
joins on close. The page cache then keeps recently read experts while memory is free, and gives it back under
pressure; O_DIRECT is not used (safetensors offsets are not block-aligned, and a cached expert is a free
hit).

A file that is shorter, or has another size or modification time than when it was opened (rewritten
under the running model) is an `ExpertReadError` naming the file and the expert, raised by the read;
the transfer thread hands it to the main thread. A file replaced by a rename is not an error: the open
file is the one the model loaded, and it stays readable.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from tqdm.auto import tqdm

from specmd.cache.keys import ExpertKey
from specmd.cache.live.copiers import DONE, Completion, Copier
from specmd.quant.formats import DenseFormat, ExpertFormat, ExpertShape
from specmd.tensorfiles import FileRange

if TYPE_CHECKING:
    from specmd.quant.persist import QuantizedCopies

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
READ_CHUNK = 4 << 20  # bytes per read request: long enough to stream, short enough to keep several in flight
READ_THREADS = 4  # chunk requests in flight (an NVMe drive needs queue depth to reach its bandwidth)
READ_EXPERTS = 4  # experts the transfer threads read at once
STAGING_BUFFERS = 2  # bounded: more readers than this wait for one (each holds it for one read)


class ExpertFiles(Protocol):
    """What the disk tier needs of a checkpoint (an `ExpertCheckpoint`): where each expert's bytes lie."""

    layers: tuple[int, ...]
    num_experts: int
    dtype: str | None

    def ranges(self, layer: int, expert: int) -> tuple[FileRange, ...]:
        """The byte ranges of one expert in dense packing order (gate, up, down)."""
        ...


class ExpertReadError(OSError):
    """An expert's bytes could not be read as they were when the model loaded."""


class _File:
    """One file opened for reads, with the size and modification time it had then."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        stat = os.fstat(self.fd)
        self.seen = (stat.st_size, stat.st_mtime_ns)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)  # exact reads: no readahead
        self._lock = threading.Lock()  # for systems without preadv, whose reads seek

    def read(self, dst: memoryview, start: int, what: str) -> None:
        """Fill `dst` with the file's bytes from `start`, which hold part of `what`."""
        stat = os.fstat(self.fd)
        if (stat.st_size, stat.st_mtime_ns) != self.seen:
            raise ExpertReadError(
                f"{self.path} changed since the model loaded it (size {self.seen[0]} -> {stat.st_size} B, or "
                f"rewritten); {what} cannot be read as loaded: load the model again"
            )
        done = 0
        while done < len(dst):
            try:
                got = self._read_at(dst[done:], start + done)
            except OSError as exc:
                raise ExpertReadError(f"reading {what} from {self.path} failed: {exc}") from exc
            if got == 0:
                raise ExpertReadError(
                    f"{self.path} ends before the bytes of {what} ([{start}, {start + len(dst)})): it is truncated"
                )
            done += got

    def _read_at(self, dst: memoryview, offset: int) -> int:
        if hasattr(os, "preadv"):
            return os.preadv(self.fd, [dst], offset)
        with self._lock:
            os.lseek(self.fd, offset, os.SEEK_SET)
            return os.readv(self.fd, [dst])

    def close(self) -> None:
        os.close(self.fd)


@dataclass(frozen=True)
class _Copy:
    """How one precision is read: bytes as stored (`source` dtype for a cast, None: as the format packs them)."""

    nbytes: int
    source: torch.dtype | None = None
    target: torch.dtype | None = None

    @property
    def read_nbytes(self) -> int:
        if self.source is None or self.target is None:
            return self.nbytes
        return self.nbytes // self.target.itemsize * self.source.itemsize


class DiskStore:
    """Every expert at every stored precision read from files on demand; see the module docstring."""

    def __init__(self, ranges: dict[ExpertKey, tuple[FileRange, ...]], copies: dict[str, _Copy], *, pin: bool) -> None:
        self._ranges = ranges
        self._copies = copies
        self._pin = pin
        self._open: dict[Path, _File] = {}
        try:
            for path in dict.fromkeys(piece.path for pieces in ranges.values() for piece in pieces):
                self._open[path] = _File(path)
        except OSError as exc:
            self.close()
            raise ExpertReadError(f"cannot open {exc.filename} to read experts from it: {exc.strerror}") from exc
        # Staging: STAGING_BUFFERS pairs (bytes as read, bytes as cast), each as large as the largest expert
        # needs; made on first use (a CPU cache at the checkpoint's dtype never needs them), never again.
        self._raw_nbytes = max(copy.read_nbytes for copy in copies.values())
        self._cast_nbytes = max((copy.nbytes for copy in copies.values() if copy.source is not None), default=0)
        self._staging: queue.SimpleQueue[tuple[torch.Tensor, torch.Tensor]] = queue.SimpleQueue()
        self._staging_lock = threading.Lock()
        self.staging_bytes = 0  # allocated so far: at most STAGING_BUFFERS expert copies (twice with a cast)
        self._pool: ThreadPoolExecutor | None = None

    def _take_staging(self) -> tuple[torch.Tensor, torch.Tensor]:
        with self._staging_lock:
            if not self.staging_bytes:
                for _ in range(STAGING_BUFFERS):
                    raw = torch.empty(self._raw_nbytes, dtype=torch.uint8, pin_memory=self._pin)
                    self._staging.put((raw, torch.empty(self._cast_nbytes, dtype=torch.uint8, pin_memory=self._pin)))
                self.staging_bytes = STAGING_BUFFERS * (self._raw_nbytes + self._cast_nbytes)
        return self._staging.get()  # waits at most for one read: each reader returns its pair

    @classmethod
    def build(
        cls,
        experts: ExpertFiles,
        formats: Sequence[ExpertFormat],
        shape: ExpertShape,
        *,
        pin: bool,
        progress: bool = True,
        copies: QuantizedCopies | None = None,
    ) -> DiskStore:
        """Plan the reads of each expert of `experts` at each of `formats` (quantizing those with no copy yet)."""
        ranges: dict[ExpertKey, tuple[FileRange, ...]] = {}
        plans: dict[str, _Copy] = {}
        for fmt in formats:
            if isinstance(fmt, DenseFormat):
                plans[fmt.name], where = _dense_plan(experts, fmt, shape)
            elif fmt.persist and copies is not None:
                plans[fmt.name], where = _copy_plan(experts, fmt, shape, copies, progress)
            else:
                raise ValueError(
                    f"storage='disk' cannot store {fmt.name!r} experts: it reads float precisions from the checkpoint "
                    "and quantized ones from their persisted copies; use storage='ram' for this precision"
                )
            for layer in experts.layers:
                for expert in range(experts.num_experts):
                    ranges[ExpertKey(layer, expert, fmt.name)] = _merged(where(layer, expert))
        return cls(ranges, plans, pin=pin)

    readers = READ_EXPERTS
    """How many experts are usefully read at once (the transfer threads a model starts for this tier)."""

    def nbytes(self, key: ExpertKey) -> int:
        return self._copies[key.precision].nbytes

    def read_into(self, key: ExpertKey, dst: torch.Tensor, copier: Copier) -> Completion:
        if not self._open:
            raise ExpertReadError("the disk tier is closed (the model was closed)")
        plan = self._copies[key.precision]
        what = f"expert {key.expert} of layer {key.layer} at {key.precision}"
        if plan.source is None and dst.device.type == "cpu":
            self._read(key, dst, what)  # straight into the cache slot
            return DONE
        raw, out = self._take_staging()  # free again once its bytes have landed
        try:
            staged = raw[: plan.read_nbytes]
            self._read(key, staged, what)
            if plan.source is not None:
                assert plan.target is not None
                target = dst if dst.device.type == "cpu" else out[: plan.nbytes]
                target.view(plan.target).copy_(staged.view(plan.source))  # the cast loading at this dtype makes
                if target is dst:
                    return DONE
                staged = target
            completion = copier.copy(dst, staged)
            completion.synchronize()  # the staging buffer is reused next
            return completion
        finally:
            self._staging.put((raw, out))

    def _read(self, key: ExpertKey, dst: torch.Tensor, what: str) -> None:
        view = memoryview(dst.numpy())  # type: ignore[arg-type]
        chunks = []  # (file, destination, file offset)
        offset = 0
        for piece in self._ranges[key]:
            for start in range(0, piece.nbytes, READ_CHUNK):
                size = min(READ_CHUNK, piece.nbytes - start)
                target = view[offset + start : offset + start + size]
                chunks.append((self._open[piece.path], target, piece.start + start))
            offset += piece.nbytes
        assert offset == len(view), f"{what}: its ranges hold {offset} B, its copy {len(view)} B"
        if len(chunks) == 1:
            file, target, start = chunks[0]
            file.read(target, start, what)
            return
        with self._staging_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="specmd-disk")
        reads = [self._pool.submit(file.read, target, start, what) for file, target, start in chunks]
        wait(reads)  # every chunk has landed or failed before the slot is handed on
        for read in reads:
            read.result()  # the first error, raised on this (the calling) thread

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)  # idle: the transfer thread has stopped before the tier closes
        opened, self._open = self._open, {}
        for file in opened.values():
            file.close()


def _source_dtype(experts: ExpertFiles) -> torch.dtype:
    """The torch dtype of the checkpoint's expert tensors."""
    if experts.dtype not in DTYPES:
        raise ValueError(f"storage='disk' reads float experts (F32, F16, BF16); the checkpoint's are {experts.dtype}")
    return DTYPES[experts.dtype]


Where = Callable[[int, int], tuple[FileRange, ...]]
"""(layer, expert) -> the byte ranges of that expert's copy, in packing order."""


def _dense_plan(experts: ExpertFiles, fmt: DenseFormat, shape: ExpertShape) -> tuple[_Copy, Where]:
    """A float precision, read from the checkpoint (cast on arrival when the checkpoint is at another dtype)."""
    source = _source_dtype(experts)
    plan = _Copy(fmt.nbytes(shape)) if source == fmt.dtype else _Copy(fmt.nbytes(shape), source, fmt.dtype)
    return plan, experts.ranges


def _copy_plan(
    experts: ExpertFiles, fmt: ExpertFormat, shape: ExpertShape, copies: QuantizedCopies, progress: bool
) -> tuple[_Copy, Where]:
    """A quantized precision, read from its persisted copy (made now, streaming, if there is none)."""
    layers = copies.locate(fmt)
    if layers is None:
        copies.save(fmt, _quantized_layers(experts, fmt, shape, progress))
        layers = copies.locate(fmt)
    if layers is None:
        raise ValueError(
            f"storage='disk' reads {fmt.name} experts from a quantized copy, which could not be written under "
            f"{copies.root}; set SPECMD_CACHE_DIR to a writable directory"
        )
    size = fmt.nbytes(shape)

    def where(layer: int, expert: int) -> tuple[FileRange, ...]:
        rows = layers[layer]
        return (FileRange(rows.path, rows.start + expert * size, size),)

    return _Copy(size), where


def _quantized_layers(
    experts: ExpertFiles, fmt: ExpertFormat, shape: ExpertShape, progress: bool
) -> Iterator[tuple[int, torch.Tensor]]:
    """Each layer's experts packed at `fmt` [experts, bytes], one layer in memory at a time.

    Each expert is read from the checkpoint into one reused buffer (no mmap, whose touched pages would count
    against the process until the last expert), then packed.
    """
    source = _source_dtype(experts)
    dense = DenseFormat(f"checkpoint {experts.dtype}", source)  # the checkpoint's bytes as a dense format packs them
    buffer = torch.empty(dense.nbytes(shape), dtype=torch.uint8)
    view = memoryview(buffer.numpy())  # type: ignore[arg-type]
    files: dict[Path, _File] = {}
    bar = tqdm(total=len(experts.layers) * experts.num_experts, desc=f"specmd: quantizing experts to {fmt.name}",
               unit="expert", disable=not progress)  # fmt: skip
    try:
        for layer in experts.layers:
            rows = torch.empty((experts.num_experts, fmt.nbytes(shape)), dtype=torch.uint8)
            for expert in range(experts.num_experts):
                offset = 0
                for piece in _merged(experts.ranges(layer, expert)):
                    if piece.path not in files:
                        files[piece.path] = _File(piece.path)
                    what = f"expert {expert} of layer {layer} (quantizing to {fmt.name})"
                    files[piece.path].read(view[offset : offset + piece.nbytes], piece.start, what)
                    offset += piece.nbytes
                rows[expert].copy_(fmt.pack(*dense.unpack(buffer, shape)))
                bar.update()
            yield layer, rows
    finally:
        bar.close()
        for file in files.values():
            file.close()


def _merged(ranges: Sequence[FileRange]) -> tuple[FileRange, ...]:
    """`ranges` with each run of byte-adjacent ranges of one file read as one."""
    merged: list[FileRange] = []
    for piece in ranges:
        last = merged[-1] if merged else None
        if last is not None and last.path == piece.path and last.start + last.nbytes == piece.start:
            merged[-1] = FileRange(last.path, last.start, last.nbytes + piece.nbytes)
        else:
            merged.append(piece)
    return tuple(merged)

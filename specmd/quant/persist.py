"""Quantized copies of a checkpoint's experts, computed once and kept under the user cache dir.

A copy is one directory per (checkpoint content, expert layout, format and its parameters):
`<cache_dir>/quant/<precision>-<key>/` holds `layer-<L>.safetensors` (one uint8 tensor [experts, bytes]
per MoE layer: each row is one packed expert) and `manifest.json` (what the key was made from, and the
SHA-256 of each layer's bytes), written last: a directory is published by one atomic rename, so a
half-written copy is never read. Each layer's bytes are checked against their digest on load: a copy
damaged since (flipped or zeroed bytes) is quantized again, with a warning.

The checkpoint's content is the SHA-256 of its safetensors files. Hashing a large checkpoint takes a
while, so each file's digest is remembered in `<cache_dir>/quant/file-digests.json` with the file's
size, inode and modification and change times; a file whose stat differs is hashed again. A changed
checkpoint therefore gets new keys (its old copies are simply no longer found); a re-saved identical
one keeps its copies.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from specmd.quant.formats import ExpertFormat, ExpertShape
from specmd.tensorfiles import FileRange, TensorFileError, tensor_ranges

VERSION = 2  # bump when the directory layout changes (2: per-layer digests)
DIGESTS = "file-digests.json"
MANIFEST = "manifest.json"
TENSOR = "experts"


def quant_dir() -> Path:
    """Where quantized copies live: `quant/` under specmd's cache dir (`SPECMD_CACHE_DIR` overrides it)."""
    from specmd.default_model import cache_dir

    return cache_dir() / "quant"


def _sha256(path: Path, start: int = 0, end: int | None = None) -> str:
    """SHA-256 of bytes [start, end) of `path` (to its end by default), read 16 MiB at a time."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        handle.seek(start)
        left = float("inf") if end is None else end - start
        while left > 0 and (chunk := handle.read(int(min(1 << 24, left)))):
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def _digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a host tensor's bytes (read in place)."""
    return hashlib.sha256(tensor.contiguous().view(torch.uint8).reshape(-1).numpy().data).hexdigest()


def _write_json(path: Path, data: Any) -> None:
    """Write `data` to `path` atomically (a temporary file in the same directory, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as out:
            json.dump(data, out, indent=1, sort_keys=True)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def checkpoint_digest(files: Sequence[Path], root: Path | None = None) -> str:
    """SHA-256 over the content of a checkpoint's `files` (file digests remembered under `root`)."""
    root = quant_dir() if root is None else root
    memo_path = root / DIGESTS
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    changed = False
    parts = []
    for file in sorted(Path(f) for f in files):
        resolved = file.resolve()
        stat = resolved.stat()
        seen = [stat.st_size, stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns]
        entry = memo.get(str(resolved))
        if not (isinstance(entry, dict) and entry.get("stat") == seen):
            entry = {"stat": seen, "sha256": _sha256(resolved)}
            memo[str(resolved)] = entry
            changed = True
        parts.append(f"{file.name}:{entry['sha256']}")
    if changed:
        try:
            _write_json(memo_path, memo)
        except OSError as exc:  # a read-only cache only costs hashing again next time
            warnings.warn(f"specmd: could not remember checkpoint digests in {memo_path} ({exc})", stacklevel=2)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


class QuantizedCopies:
    """The on-disk copies of one checkpoint's experts: `load` a format's, or `save` them once packed.

    Attributes:
        files: the checkpoint's safetensors files (their content names the copies).
        model_type, layers, num_experts, shape: which experts the copies hold.
        root: the directory holding every copy (default `quant_dir()`).
    """

    def __init__(
        self,
        files: Sequence[Path],
        *,
        model_type: str,
        layers: Sequence[int],
        num_experts: int,
        shape: ExpertShape,
        root: Path | None = None,
    ) -> None:
        self.files = [Path(f) for f in files]
        self.model_type = model_type
        self.layers = tuple(layers)
        self.num_experts = num_experts
        self.shape = shape
        self.root = quant_dir() if root is None else Path(root)
        self._digest: str | None = None

    @property
    def checkpoint(self) -> str:
        """The checkpoint's content digest (computed on first use)."""
        if self._digest is None:
            self._digest = checkpoint_digest(self.files, self.root)
        return self._digest

    def manifest(self, fmt: ExpertFormat) -> dict[str, Any]:
        """Everything a copy of `fmt` depends on."""
        return {
            "version": VERSION,
            "checkpoint_sha256": self.checkpoint,
            "model_type": self.model_type,
            "layers": list(self.layers),
            "experts_per_layer": self.num_experts,
            "shape": [self.shape.hidden, self.shape.intermediate],
            "format": fmt.params(),
            "expert_bytes": fmt.nbytes(self.shape),
        }

    def directory(self, fmt: ExpertFormat) -> Path:
        """Where the copy of `fmt` lives (whether or not it exists yet)."""
        key = hashlib.sha256(json.dumps(self.manifest(fmt), sort_keys=True).encode()).hexdigest()[:32]
        return self.root / f"{fmt.name}-{key}"

    def _saved(self, fmt: ExpertFormat) -> dict[str, Any] | None:
        """The manifest of the complete copy of `fmt`, or None (no copy, or one made from something else)."""
        try:
            saved = json.loads((self.directory(fmt) / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        return saved if isinstance(saved, dict) and saved.get("key") == self.manifest(fmt) else None

    def _damaged(self, fmt: ExpertFormat, layer: int) -> None:
        warnings.warn(
            f"specmd: the saved {fmt.name} experts of layer {layer} in {self.directory(fmt)} are damaged (their "
            "digest differs from the one written with them); quantizing them again",
            stacklevel=3,
        )

    def locate(self, fmt: ExpertFormat) -> dict[int, FileRange] | None:
        """Where each layer's packed experts [experts, bytes] lie in the saved copy of `fmt` (row e is expert e, so
        one expert is one read), checked against their digests by streaming each file once; None when there is no
        complete, intact copy. Nothing is held in memory."""
        directory, saved = self.directory(fmt), self._saved(fmt)
        if saved is None:
            return None
        expected = self.num_experts * fmt.nbytes(self.shape)
        found = {}
        try:
            for layer in self.layers:
                path = directory / f"layer-{layer}.safetensors"
                tensor = tensor_ranges(path).get(TENSOR)
                if tensor is None or tensor.dtype != "U8" or tensor.nbytes != expected:
                    return None
                if _sha256(path, tensor.start, tensor.end) != saved["sha256"][str(layer)]:
                    self._damaged(fmt, layer)
                    return None
                found[layer] = FileRange(path, tensor.start, tensor.nbytes)
        except (OSError, KeyError, TypeError, TensorFileError):
            return None
        return found

    def load(self, fmt: ExpertFormat) -> dict[int, torch.Tensor] | None:
        """Each layer's packed experts [experts, bytes] as saved, or None when there is no complete, intact copy."""
        directory = self.directory(fmt)
        try:
            saved = self._saved(fmt)
            if saved is None:
                return None
            layers = {}
            for layer in self.layers:
                tensor = load_file(directory / f"layer-{layer}.safetensors")[TENSOR]
                if tensor.dtype != torch.uint8 or tuple(tensor.shape) != (self.num_experts, fmt.nbytes(self.shape)):
                    return None
                if _digest(tensor) != saved["sha256"][str(layer)]:
                    self._damaged(fmt, layer)
                    return None
                layers[layer] = tensor
        except (OSError, ValueError, KeyError, TypeError, SafetensorError):
            return None
        return layers

    def save(
        self, fmt: ExpertFormat, layers: Mapping[int, torch.Tensor] | Iterable[tuple[int, torch.Tensor]]
    ) -> Path | None:
        """Write a copy of `fmt` from each layer's packed experts; returns its directory (None if it could not).

        `layers` maps each layer to its [experts, bytes] tensor, or yields (layer, tensor) pairs one at a time, so
        a copy can be written streaming, never holding more than one layer's experts.
        """
        pairs = layers.items() if isinstance(layers, Mapping) else layers
        target = self.directory(fmt)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=self.root))
            try:
                digests = {}
                for layer, rows in pairs:
                    tensor = rows.contiguous()
                    save_file({TENSOR: tensor}, staging / f"layer-{layer}.safetensors")
                    digests[str(layer)] = _digest(tensor)
                _write_json(staging / MANIFEST, {"key": self.manifest(fmt), "sha256": digests})
                shutil.rmtree(target, ignore_errors=True)  # an incomplete or stale copy under the same key
                os.replace(staging, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        except OSError as exc:
            warnings.warn(f"specmd: could not save {fmt.name} experts under {self.root} ({exc})", stacklevel=2)
            return None
        return target

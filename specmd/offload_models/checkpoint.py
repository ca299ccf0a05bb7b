"""Reading routed experts straight from a checkpoint's safetensors files, one expert at a time.

Handles the hub's per-expert layout (one tensor per expert and projection), the fused layout
(one [E, ...] tensor per layer, read one expert slice at a time) and sharded files.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassFieldValidationError
from safetensors import SafetensorError, safe_open

from specmd.cache.live.store import ExpertWeights
from specmd.quant.formats import ExpertShape
from specmd.tensorfiles import FileRange, TensorFileError, TensorRange, tensor_ranges

if TYPE_CHECKING:
    from transformers import PretrainedConfig

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# from_pretrained's keywords that say where a hub checkpoint's files are; specmd reads its config and experts so too
HUB_KEYWORDS = ("revision", "subfolder", "cache_dir", "token", "local_files_only", "proxies")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: missing, truncated, or lacking expert weights."""


@contextmanager
def config_errors(source: str | os.PathLike[str]) -> Iterator[None]:
    """Inside, a config value transformers refuses (a string for a count, a float for an integer...) is a
    `CheckpointError` naming it, not transformers' validation error: the checkpoint is at fault, not the code."""
    try:
        yield
    except (StrictDataclassFieldValidationError, StrictDataclassClassValidationError) as exc:
        cause = " ".join(str(exc.__cause__ or exc).split())
        raise CheckpointError(f"{source}: the config has a value of the wrong type: {cause}") from exc


def read_config(
    path: str | os.PathLike[str], *, trust_remote_code: bool | None = False, **hub_kwargs: Any
) -> PretrainedConfig:
    """The config of a checkpoint directory, config.json or hub id, through `AutoConfig`.

    A checkpoint's own code (its config's `auto_map`) runs only with `trust_remote_code=True`; anything else,
    None included, is False, so transformers never asks on a terminal (a checkpoint that needs its code is then
    a ValueError). `hub_kwargs` go to `AutoConfig.from_pretrained` (`revision`, `cache_dir`, ...). A config
    value of the wrong type is a `CheckpointError` (`config_errors`).
    """
    from transformers import AutoConfig

    with config_errors(path):
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code is True, **hub_kwargs)


# transformers' runtime layout: what `save_pretrained(..., save_original_format=False)` writes, for every model.
FUSED_EXPERTS = "model.layers.{layer}.mlp.experts"


@dataclass(frozen=True)
class ExpertKeyPatterns:
    """Where a checkpoint keeps routed-expert weights; ``{layer}`` and ``{expert}`` mark the indices.

    Attributes:
        gate, up, down: per-expert tensors [I, H], [I, H], [H, I].
        gate_up, down_fused: fused per-layer tensors [E, 2I, H] (gate rows first) and [E, H, I].
    """

    gate: str
    up: str
    down: str
    gate_up: str = FUSED_EXPERTS + ".gate_up_proj"
    down_fused: str = FUSED_EXPERTS + ".down_proj"

    def _regex(self, template: str) -> re.Pattern[str]:
        pattern = (
            re.escape(template).replace(r"\{layer\}", r"(?P<layer>\d+)").replace(r"\{expert\}", r"(?P<expert>\d+)")
        )
        return re.compile(pattern + "$")

    def matchers(self) -> list[tuple[str, re.Pattern[str]]]:
        names = ("gate", "up", "down", "gate_up", "down_fused")
        return [(name, self._regex(getattr(self, name))) for name in names]


# The hub's two per-expert layouts (transformers' conversion_mapping.py shares them the same way).
MLP_EXPERT_KEYS = ExpertKeyPatterns(  # OLMoE, Qwen2-MoE
    gate="model.layers.{layer}.mlp.experts.{expert}.gate_proj.weight",
    up="model.layers.{layer}.mlp.experts.{expert}.up_proj.weight",
    down="model.layers.{layer}.mlp.experts.{expert}.down_proj.weight",
)
BLOCK_SPARSE_EXPERT_KEYS = ExpertKeyPatterns(  # Mixtral, PhiMoE: w1 = gate, w3 = up, w2 = down
    gate="model.layers.{layer}.block_sparse_moe.experts.{expert}.w1.weight",
    up="model.layers.{layer}.block_sparse_moe.experts.{expert}.w3.weight",
    down="model.layers.{layer}.block_sparse_moe.experts.{expert}.w2.weight",
)


def checkpoint_files(
    path: str | os.PathLike[str], *, subfolder: str | None = None, variant: str | None = None, **hub_kwargs: object
) -> list[Path]:
    """The safetensors files of a local checkpoint directory or a hub id (resolved through the HF cache).

    Found as transformers finds them: in `subfolder`, named for `variant` (`model.<variant>.safetensors`), a
    single file before an index; `hub_kwargs` (`revision`, `cache_dir`, ...) go to the HF cache lookup.
    """
    single, index = _with_variant(SINGLE_FILE, variant), _with_variant(INDEX_FILE, variant)
    if Path(path).is_dir():
        root = Path(path) / (subfolder or "")
        if (root / single).is_file():
            return [root / single]
        if (root / index).is_file():
            return [root / name for name in _shards(root / index)]
        raise CheckpointError(f"{root} holds no {single} or {index}; specmd reads safetensors checkpoints")
    from transformers.utils import cached_file

    kwargs = {k: v for k, v in hub_kwargs.items() if v is not None} | {"subfolder": subfolder or ""}
    single_path = cached_file(str(path), single, _raise_exceptions_for_missing_entries=False, **kwargs)
    if single_path is not None:
        return [Path(single_path)]
    index_path = cached_file(str(path), index, _raise_exceptions_for_missing_entries=False, **kwargs)
    if index_path is None:
        raise CheckpointError(f"{path} has no {single} or {index}; specmd reads safetensors checkpoints")
    return [Path(cached_file(str(path), name, **kwargs)) for name in _shards(Path(index_path))]


def _with_variant(name: str, variant: str | None) -> str:
    """`model.safetensors` as transformers names it for `variant`: `model.<variant>.safetensors`."""
    if variant is None:
        return name
    stem, suffix = name.rsplit(".", 1)
    return f"{stem}.{variant}.{suffix}"


def _shards(index: Path) -> list[str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{index} is not a valid safetensors index ({exc})") from exc
    return sorted(set(weight_map.values()))


class ExpertCheckpoint:
    """Every routed expert of `layers` in the checkpoint `files`, validated up front, read lazily.

    Each expert tensor is checked by name, shape and dtype against `shape` (one expert's) and
    `num_experts`: a transposed or resized matrix, a fused tensor with the wrong number of experts, an expert
    beyond `num_experts` or an expert stored at another dtype than the rest is a `CheckpointError` naming
    the file, the tensor, and the expected and found shape or dtype.
    """

    def __init__(
        self,
        files: Sequence[Path],
        patterns: ExpertKeyPatterns,
        layers: Sequence[int],
        num_experts: int,
        shape: ExpertShape,
    ) -> None:
        self.files = list(files)
        self.layers = tuple(layers)
        self.num_experts = num_experts
        self.shape = shape
        self._where: dict[tuple[int, int | None, str], tuple[Path, str]] = {}
        self._ranges: dict[Path, dict[str, TensorRange]] | None = None
        matchers = patterns.matchers()
        dtypes: dict[str, tuple[Path, str]] = {}  # dtype -> the first tensor found at it
        for file in self.files:
            if not file.is_file():
                raise CheckpointError(f"checkpoint file {file} is missing")
            try:
                with safe_open(file, "pt") as handle:
                    for name in handle.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                        for part, regex in matchers:
                            if match := regex.match(name):
                                view = handle.get_slice(name)
                                where = self._check(file, name, part, match, view.get_shape())
                                self._where[where] = (file, name)
                                dtypes.setdefault(view.get_dtype(), (file, name))
            except (SafetensorError, OSError) as exc:
                try:  # safetensors' own message names no tensor; ours does where the header disagrees with the file
                    tensor_ranges(file)
                except TensorFileError as precise:
                    raise CheckpointError(f"checkpoint file is unreadable or truncated: {precise}") from exc
                raise CheckpointError(f"checkpoint file {file} is unreadable or truncated ({exc})") from exc
        self.dtype = next(iter(dtypes), None)  # the safetensors name ("F32", "BF16", ...) of the experts' dtype
        if len(dtypes) > 1:
            (first, (file1, name1)), (other, (file2, name2)) = list(dtypes.items())[:2]
            raise CheckpointError(
                f"{file2}: expert tensor {name2} is {other}, but {name1} in {file1.name} is {first}: a checkpoint's "
                "experts share one dtype"
            )
        for layer in self.layers:
            if (layer, None, "gate_up") in self._where and (layer, None, "down_fused") in self._where:
                continue
            for expert in range(num_experts):
                for part, template in (("gate", patterns.gate), ("up", patterns.up), ("down", patterns.down)):
                    if (layer, expert, part) not in self._where:
                        missing = template.format(layer=layer, expert=expert)
                        raise CheckpointError(
                            f"the checkpoint has no weights for expert {expert} of layer {layer} ({missing})"
                        )

    def _check(
        self, file: Path, name: str, part: str, match: re.Match[str], found: Sequence[int]
    ) -> tuple[int, int | None, str]:
        """Where the expert tensor `name` belongs, once its indices and shape are right."""
        layer, expert = int(match["layer"]), match.groupdict().get("expert")
        hidden, intermediate, experts = self.shape.hidden, self.shape.intermediate, self.num_experts
        if expert is not None and int(expert) >= experts:
            raise CheckpointError(f"{file}: {name} is expert {expert}, but the config has {experts} experts per layer")
        expected = {
            "gate": (intermediate, hidden),
            "up": (intermediate, hidden),
            "down": (hidden, intermediate),
            "gate_up": (experts, 2 * intermediate, hidden),
            "down_fused": (experts, hidden, intermediate),
        }[part]
        if tuple(found) != expected:
            raise CheckpointError(
                f"{file}: {name} has shape {list(found)}, expected {list(expected)} (hidden {hidden}, expert "
                f"intermediate {intermediate}, {experts} experts per layer)"
            )
        return (layer, None if expert is None else int(expert), part)

    def __len__(self) -> int:
        return len(self.layers) * self.num_experts

    def ranges(self, layer: int, expert: int) -> tuple[FileRange, ...]:
        """Where the bytes of one expert lie, in the order a dense format packs them: gate, up, down (per-expert
        tensors: three ranges) or gate_up, down (a fused layout: each one contiguous slice of its [E, ...] tensor).

        The files' headers are read on first use and checked against the files (`tensorfiles.tensor_ranges`).
        """
        if self._ranges is None:
            try:
                self._ranges = {file: tensor_ranges(file) for file in self.files}
            except TensorFileError as exc:
                raise CheckpointError(str(exc)) from exc
        if (layer, None, "gate_up") in self._where:
            parts = [(layer, None, "gate_up"), (layer, None, "down_fused")]
        else:
            parts = [(layer, expert, "gate"), (layer, expert, "up"), (layer, expert, "down")]
        found = []
        for part in parts:
            file, name = self._where[part]
            tensor = self._ranges[file][name]
            if part[1] is None:  # a fused [E, ...] tensor: expert `expert`'s slice along dim 0
                size = tensor.nbytes // self.num_experts
                found.append(FileRange(file, tensor.start + expert * size, size))
            else:
                found.append(FileRange(file, tensor.start, tensor.nbytes))
        return tuple(found)

    def __iter__(self) -> Iterator[ExpertWeights]:
        with ExitStack() as stack:
            handles: dict[Path, object] = {}

            def tensor(part: tuple[int, int | None, str], expert: int | None = None) -> torch.Tensor:
                file, name = self._where[part]
                if file not in handles:
                    handles[file] = stack.enter_context(safe_open(file, "pt"))
                if expert is None:
                    return handles[file].get_tensor(name)  # type: ignore[attr-defined]
                return handles[file].get_slice(name)[expert]  # type: ignore[attr-defined]

            for layer in self.layers:
                fused = (layer, None, "gate_up") in self._where
                for expert in range(self.num_experts):
                    if fused:
                        gate_up = tensor((layer, None, "gate_up"), expert)
                        down = tensor((layer, None, "down_fused"), expert)
                    else:
                        gate = tensor((layer, expert, "gate"))
                        up = tensor((layer, expert, "up"))
                        gate_up = torch.cat([gate, up], dim=0)
                        down = tensor((layer, expert, "down"))
                    yield layer, expert, gate_up, down

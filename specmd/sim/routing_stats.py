"""How cache-friendly a model's routing is, per MoE layer, measured with forward hooks on its routers.

Works on a stock transformers MoE model or an offloaded one (both keep the native router modules):
each sparse block's input and its router's chosen experts are captured while the model runs over text.

* **entropy**: of the layer's expert usage (share of all top-k assignments per expert), in bits;
  `log2(E)` when every expert is used equally. Low entropy means a few hot experts.
* **top-1 reuse**: share of consecutive token pairs (within a sequence) whose top-1 expert is the same
  (uniform random routing: `1/E`). Mixtral's paper measures this.
* **any reuse**: share of a token's `k` experts that the previous token also used (uniform: `k/E`), i.e. the
  hit rate of a cache that holds exactly the previous token's experts.
* **prefetch recall@k**: share of a layer's `k` experts found in the top `k` of its router applied to the
  previous MoE layer's block input (uniform: `k/E`): the signal top-k prefetch uses
  (`specmd/offload_models/runtime.py`). The first MoE layer has no previous layer, so it has none.

Shapes: S = tokens of one sequence, H = hidden size, E = experts per layer, K = experts per token.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LayerRouting:
    """Routing statistics of one MoE layer; each rate has its uniform-random value beside it."""

    layer: int
    entropy_bits: float
    max_entropy_bits: float
    top1_reuse: float
    top1_reuse_uniform: float
    any_reuse: float
    any_reuse_uniform: float
    prefetch_recall: float | None
    prefetch_recall_uniform: float


@dataclass(frozen=True)
class RoutingStats:
    """Per-layer routing statistics of a model over some sequences, and what they were measured on."""

    num_experts: int
    top_k: int
    sequences: int
    tokens: int
    layers: list[LayerRouting]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values, with means over layers under `"mean"`."""
        return asdict(self) | {"mean": self.mean()}

    def mean(self) -> dict[str, float | None]:
        """Each rate averaged over layers (prefetch recall over the layers that have it)."""
        fields = ("entropy_bits", "top1_reuse", "any_reuse", "prefetch_recall")
        result: dict[str, float | None] = {}
        for name in fields:
            values = [getattr(row, name) for row in self.layers if getattr(row, name) is not None]
            result[name] = sum(values) / len(values) if values else None
        return result


def moe_blocks(model: nn.Module) -> list[tuple[int, nn.Module, nn.Module]]:
    """(decoder layer index, sparse block, its router) for each MoE layer of a transformers causal LM."""
    blocks = []
    for index, layer in enumerate(model.model.layers):
        mlp = getattr(layer, "mlp", None)
        router = getattr(mlp, "gate", None) or getattr(mlp, "router", None)
        if mlp is not None and hasattr(mlp, "experts") and router is not None:
            blocks.append((index, mlp, router))
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no MoE layers with a router (`model.layers[i].mlp.gate`)")
    return blocks


class _Recorder:
    """Hooks that keep, per MoE layer, the chosen experts and the next layer's router applied to the input."""

    def __init__(self, model: nn.Module) -> None:
        self.blocks = moe_blocks(model)
        self.chosen: dict[int, list[torch.Tensor]] = {layer: [] for layer, _, _ in self.blocks}
        self.predicted: dict[int, list[torch.Tensor]] = {layer: [] for layer, _, _ in self.blocks}
        nexts = {layer: (nxt, router) for (layer, _, _), (nxt, _, router) in pairwise(self.blocks)}
        self.handles = []
        for layer, block, router in self.blocks:
            self.handles.append(router.register_forward_hook(self._on_route(layer)))
            if layer in nexts:
                self.handles.append(block.register_forward_pre_hook(self._on_input(*nexts[layer]), with_kwargs=True))

    def _on_route(self, layer: int):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not isinstance(output, tuple):
                raise ValueError(f"the router of layer {layer} returned {type(output).__name__}, not (..., indices)")
            self.chosen[layer].append(output[-1].detach().reshape(-1, output[-1].shape[-1]).cpu())  # [S, K]

        return hook

    def _on_input(self, next_layer: int, next_router: nn.Module):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: Any, kwargs: Any) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            hidden = hidden.detach().reshape(-1, hidden.shape[-1])  # [S, H]
            logits = F.linear(hidden, next_router.weight, getattr(next_router, "bias", None))  # [S, E]
            self.predicted[next_layer].append(logits.float().cpu())

        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def routing_stats(model: nn.Module, sequences: Iterable[torch.Tensor]) -> RoutingStats:
    """Run `model` over each 1-D token sequence (one forward each) and measure its routing."""
    recorder = _Recorder(model)
    count = tokens = 0
    try:
        with torch.no_grad():
            for ids in sequences:
                ids = ids.reshape(1, -1).to(model.device)  # [1, S]
                model(input_ids=ids, use_cache=False)
                count += 1
                tokens += ids.shape[1]
    finally:
        recorder.close()
    if not tokens:
        raise ValueError("routing_stats needs at least one non-empty sequence")
    num_experts = int(recorder.blocks[0][2].weight.shape[0])  # router weight: [E, H]
    top_k = recorder.chosen[recorder.blocks[0][0]][0].shape[-1]
    rows = [
        _layer_stats(layer, recorder.chosen[layer], recorder.predicted[layer], num_experts)
        for layer, _, _ in recorder.blocks
    ]
    return RoutingStats(num_experts=num_experts, top_k=top_k, sequences=count, tokens=tokens, layers=rows)


def _layer_stats(
    layer: int, chosen: Sequence[torch.Tensor], predicted: Sequence[torch.Tensor], num_experts: int
) -> LayerRouting:
    k = chosen[0].shape[-1]
    usage = torch.zeros(num_experts, dtype=torch.float64)  # [E]
    same_top1 = overlap = pairs = 0.0
    hits = targets = 0.0
    for i, idx in enumerate(chosen):  # [S, K], experts in descending router score
        usage += torch.bincount(idx.reshape(-1), minlength=num_experts).double()
        used = F.one_hot(idx, num_experts).sum(dim=1).bool()  # [S, E]
        same_top1 += float((idx[1:, 0] == idx[:-1, 0]).sum())
        overlap += float((used[1:] & used[:-1]).sum()) / k
        pairs += idx.shape[0] - 1
        if predicted:
            guess = F.one_hot(predicted[i].topk(k, dim=-1).indices, num_experts).sum(dim=1).bool()  # [S, E]
            hits += float((guess & used).sum())
            targets += idx.numel()
    share = usage / usage.sum()
    entropy = -float((share[share > 0] * share[share > 0].log2()).sum())
    return LayerRouting(
        layer=layer,
        entropy_bits=entropy,
        max_entropy_bits=math.log2(num_experts),
        top1_reuse=same_top1 / pairs if pairs else math.nan,
        top1_reuse_uniform=1 / num_experts,
        any_reuse=overlap / pairs if pairs else math.nan,
        any_reuse_uniform=k / num_experts,
        prefetch_recall=hits / targets if predicted else None,
        prefetch_recall_uniform=k / num_experts,
    )


def text_sequences(tokenizer: Any, text: str, window: int, max_tokens: int | None = None) -> list[torch.Tensor]:
    """`text` tokenized and cut into consecutive windows of at most `window` tokens (the last may be shorter)."""
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)  # [N]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return [chunk for chunk in ids.split(window) if len(chunk) >= 2]

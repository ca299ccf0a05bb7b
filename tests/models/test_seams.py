"""The model side's seams: routing observers, and storage tiers added by registering one class."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from specmd import OffloadOLMoE
from specmd.cache.live.store import STORAGE_TIERS, RamStore
from specmd.sim import TraceRecorder
from tests.conftest import EXPERT_BYTES

PROMPT = torch.tensor([[5, 17, 33, 8, 91, 2]])


class Counter:
    """An observer that counts what it is told."""

    def __init__(self) -> None:
        self.passes: list[tuple[int, bool]] = []
        self.layers: list[int] = []
        self.ended = 0

    def begin_pass(self, rows, batch, prefill) -> None:  # type: ignore[no-untyped-def]
        self.passes.append((len(rows), prefill))

    def layer(self, layer, experts, weights, logits, next_logits, predictions) -> None:  # type: ignore[no-untyped-def]
        assert len(experts) == len(weights) == len(logits) == self.passes[-1][0]
        assert predictions is None  # the model runs the default predictor, whose rows are next_logits
        self.layers.append(layer)

    def end_pass(self) -> None:
        self.ended += 1


def test_several_observers_see_every_pass_and_only_while_attached(checkpoint: Path) -> None:
    with OffloadOLMoE.from_pretrained(checkpoint, cache_frac=0.5, progress=False) as model:
        alone = TraceRecorder(model.trace_meta())
        with model.observe_routing(alone):
            model.generate(PROMPT, max_new_tokens=3, do_sample=False)
        counter, recorder = Counter(), TraceRecorder(model.trace_meta())
        with model.observe_routing(counter), model.observe_routing(recorder):
            model.generate(PROMPT, max_new_tokens=3, do_sample=False)
            with pytest.raises(RuntimeError, match="already observes"), model.observe_routing(counter):
                pass
        model.generate(PROMPT, max_new_tokens=2, do_sample=False)
    assert counter.passes == [(6, True), (1, False), (1, False)] and counter.ended == 3
    assert counter.layers == [0, 1, 2, 3] * 3
    assert recorder.trace().events == alone.trace().events


class CountingStore(RamStore):
    """A storage tier that is RAM with a read counter: all a new tier needs is its class, registered."""

    reads = 0

    def read_into(self, key, dst, copier):  # type: ignore[no-untyped-def]
        CountingStore.reads += 1
        return super().read_into(key, dst, copier)


def test_a_new_storage_tier_is_one_registered_class(checkpoint: Path, stock, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setitem(STORAGE_TIERS, "counting", CountingStore.build)
    with OffloadOLMoE.from_pretrained(checkpoint, cache_frac=0.25, storage="counting", progress=False) as model:
        logits = model(PROMPT).logits
        moved = model.cache_stats().bytes_transferred
    assert torch.equal(logits, stock(PROMPT).logits)
    assert 0 < CountingStore.reads <= moved // EXPERT_BYTES  # an expert evicted before its copy starts is never read
    with pytest.raises(ValueError, match="storage 'tape' is not available; available: ram, disk, counting"):
        OffloadOLMoE.from_pretrained(checkpoint, cache_frac=0.25, storage="tape", progress=False)

"""A pass that raises, an error or an interrupt anywhere in it, leaves a model that runs on as if just loaded;
waits on copies are bounded; concurrent callers take turns."""

from __future__ import annotations

import _thread
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from specmd import OffloadOLMoE
from specmd.cache.live.store import STORAGE_TIERS, RamStore
from specmd.cache.live.watchdog import Ticket, TransferError
from specmd.cache.policies import spec
from specmd.cache.policies.eviction import LRU
from specmd.cache.policies.miss import FetchOnMiss
from specmd.cache.policies.prefetch import TopK
from specmd.offload_models.experts import ExpertJob
from specmd.offload_models.predictors import NextLayerRouter

PROMPT = torch.tensor([[5, 17, 33, 8, 91, 2, 40, 40, 12, 7, 66, 3]])
TOKENS = 6
SETTING = {"cache_frac": 0.1, "bandwidth_gbps": 5.0, "progress": False}
MIX = "trip-topk/trip-lru/trip-fetch/standard"


class Trip:
    """Raise `error` at the `at`-th call of whatever counts through `hit` (0: never)."""

    at = 0
    calls = 0
    error: type[BaseException] = RuntimeError

    @classmethod
    def arm(cls, at: int, error: type[BaseException]) -> None:
        cls.at, cls.calls, cls.error = at, 0, error

    @classmethod
    def hit(cls) -> None:
        cls.calls += 1
        if cls.calls == cls.at:
            raise cls.error(f"tripped at call {cls.at}")


class TripLRU(LRU):
    site = "lru"

    def on_access(self, key, now):  # type: ignore[no-untyped-def]
        Trip.hit() if SITE[0] == "lookup" else None
        super().on_access(key, now)

    def on_insert(self, key, now):  # type: ignore[no-untyped-def]
        Trip.hit() if SITE[0] == "insert" else None
        super().on_insert(key, now)

    def choose_victim(self, candidates, now):  # type: ignore[no-untyped-def]
        Trip.hit() if SITE[0] == "eviction" else None
        return super().choose_victim(candidates, now)


class TripFetch(FetchOnMiss):
    def on_miss(self, key, now, context):  # type: ignore[no-untyped-def]
        Trip.hit() if SITE[0] == "miss" else None
        return super().on_miss(key, now, context)


class TripTopK(TopK):
    def on_route(self, route, now):  # type: ignore[no-untyped-def]
        Trip.hit() if SITE[0] == "prefetch" else None
        return super().on_route(route, now)


SITE = [""]  # which call site trips


@pytest.fixture(autouse=True)
def tripping_policies(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Policies that behave as LRU, fetch and top-k, and can raise at a chosen call (built afresh by name)."""
    for kind, name, cls in (("eviction", "trip-lru", TripLRU), ("miss", "trip-fetch", TripFetch),
                            ("prefetch", "trip-topk", TripTopK)):  # fmt: skip
        monkeypatch.setitem(spec._REGISTRY[kind], name, cls)
    for target, name in ((Ticket, "wait"), (ExpertJob, "compute"), (NextLayerRouter, "predict")):
        original = getattr(target, name)

        def tripping(*args: Any, _original: Any = original, _site: str = name, **kwargs: Any) -> Any:
            Trip.hit() if SITE[0] == _site else None
            return _original(*args, **kwargs)

        monkeypatch.setattr(target, name, tripping)
    Trip.arm(0, RuntimeError)
    yield
    SITE[0] = ""


def run(model: OffloadOLMoE) -> tuple[torch.Tensor, dict[str, Any]]:
    model.reset_cache_stats()
    out = model.generate(input_ids=PROMPT, max_new_tokens=TOKENS, do_sample=False)
    stats = {k: v for k, v in model.cache_stats().to_dict().items() if not k.startswith("wall_")}
    return out, stats


@pytest.fixture(scope="module")
def fresh(checkpoint: Path) -> tuple[torch.Tensor, dict[str, Any]]:
    """What a freshly loaded model gives."""
    with pytest.MonkeyPatch.context() as patch:
        for kind, name, cls in (("eviction", "trip-lru", TripLRU), ("miss", "trip-fetch", TripFetch),
                                ("prefetch", "trip-topk", TripTopK)):  # fmt: skip
            patch.setitem(spec._REGISTRY[kind], name, cls)
        with OffloadOLMoE.from_pretrained(checkpoint, policy=MIX, **SETTING) as model:
            return run(model)


SITES = ["lookup", "miss", "insert", "eviction", "prefetch", "wait", "compute", "predict"]


@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize(("at", "error"), [(1, RuntimeError), (2, KeyboardInterrupt), (4, RuntimeError)])
def test_after_a_pass_raises_anywhere_the_model_runs_as_if_just_loaded(
    checkpoint: Path, fresh, site: str, at: int, error: type[BaseException]
) -> None:  # type: ignore[no-untyped-def]
    with OffloadOLMoE.from_pretrained(checkpoint, policy=MIX, **SETTING) as model:
        run(model)  # a warm cache, so that recovering must empty it
        SITE[0] = site
        Trip.arm(at, error)
        with pytest.raises(error, match="tripped") as raised:
            run(model)
        assert "the model can run again" in "".join(raised.value.__notes__)
        SITE[0] = ""
        out, stats = run(model)
    assert torch.equal(out, fresh[0]) and stats == fresh[1]


def stop(timer: threading.Timer) -> None:
    """Stop `timer` and take here an interrupt it raised as the run ended (caught, not counted: on a busy machine it
    can come after the run, which then was not interrupted). `interrupt_main` only flags the main thread, which
    raises at a later bytecode boundary that checks the flag: the loop's back edges check it before this returns."""
    while True:
        try:
            timer.cancel()
            timer.join()
            for _ in range(1000):
                pass
            return
        except KeyboardInterrupt:
            continue


def test_real_interrupts_at_random_moments_never_break_the_model(checkpoint: Path, fresh) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(0)
    interrupted = 0
    with OffloadOLMoE.from_pretrained(checkpoint, policy=MIX, **SETTING) as model:
        start = time.perf_counter()
        run(model)
        span = time.perf_counter() - start  # how long one generate takes here
        for _ in range(12):
            timer = threading.Timer(rng.uniform(0, span), _thread.interrupt_main)
            try:
                timer.start()
                run(model)
            except KeyboardInterrupt:
                interrupted += 1
            finally:
                stop(timer)
            out, stats = run(model)
            assert torch.equal(out, fresh[0])
            assert stats["hits"] + stats["late_prefetches"] + stats["misses"] == stats["requests"]
            assert stats["peak_resident_bytes"] <= stats["capacity_bytes"]
    assert interrupted >= 6


class StuckStore(RamStore):
    """RAM whose copies hang on the transfer thread (not on the main thread) until released. A read on the main
    thread first gives the transfer thread a moment to claim a copy and hang: on a busy machine it may otherwise
    not be scheduled before the main thread has done every copy itself, and then nothing hangs."""

    release = threading.Event()
    stuck = threading.Event()

    def read_into(self, key, dst, copier):  # type: ignore[no-untyped-def]
        if threading.current_thread() is threading.main_thread():
            StuckStore.stuck.wait(0.1)
        else:
            StuckStore.stuck.set()
            StuckStore.release.wait(30)
        return super().read_into(key, dst, copier)


def test_a_copy_that_hangs_is_an_error_naming_the_expert_not_a_hang(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(STORAGE_TIERS, "stuck", StuckStore.build)
    StuckStore.release.clear()
    StuckStore.stuck.clear()
    model = OffloadOLMoE.from_pretrained(
        checkpoint, storage="stuck", transfer_timeout_s=0.3, policy="topk/lru/fetch/standard", **SETTING
    )
    try:
        start = time.perf_counter()
        with pytest.raises(
            TransferError, match=r"the copy of expert \d+ of layer \d+ at fp32 did not finish within 0.3 s"
        ):
            model.generate(input_ids=PROMPT, max_new_tokens=2, do_sample=False)
        assert time.perf_counter() - start < 5
        with pytest.warns(RuntimeWarning, match="still in a copy"):
            model.close()
    finally:
        StuckStore.release.set()
        model.close()
    with pytest.raises(ValueError, match="transfer_timeout_s must be a number of seconds > 0"):
        OffloadOLMoE.from_pretrained(checkpoint, transfer_timeout_s=0, **SETTING)


def test_concurrent_generate_calls_take_turns_and_get_their_own_answers(checkpoint: Path, fresh) -> None:  # type: ignore[no-untyped-def]
    outputs: list[torch.Tensor] = []
    errors: list[BaseException] = []
    with OffloadOLMoE.from_pretrained(checkpoint, policy=MIX, **SETTING) as model:

        def call() -> None:
            try:
                outputs.append(model.generate(input_ids=PROMPT, max_new_tokens=TOKENS, do_sample=False))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=call) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert model.cache_stats().decode_passes == 3 * (TOKENS - 1)
    assert errors == [] and len(outputs) == 3
    assert all(torch.equal(out, fresh[0]) for out in outputs)


DISK = {"storage": "disk", "host_cache_frac": 0.3, "disk": "nvme4"}


@pytest.fixture(scope="module")
def fresh_disk(checkpoint: Path) -> tuple[torch.Tensor, dict[str, Any]]:
    """What a freshly loaded model with experts on disk behind a host-RAM tier gives."""
    with pytest.MonkeyPatch.context() as patch:
        for kind, name, cls in (("eviction", "trip-lru", TripLRU), ("miss", "trip-fetch", TripFetch),
                                ("prefetch", "trip-topk", TripTopK)):  # fmt: skip
            patch.setitem(spec._REGISTRY[kind], name, cls)
        with OffloadOLMoE.from_pretrained(checkpoint, policy=MIX, **SETTING, **DISK) as model:
            return run(model)


@pytest.mark.parametrize("site", ["insert", "eviction", "compute"])  # main-thread sites: "wait" also runs on the
# transfer threads, where an error of a prefetch nothing waits for is raised at the next pass's check, by design
def test_after_a_pass_raises_a_host_tier_model_runs_as_if_just_loaded(checkpoint: Path, fresh_disk, site: str) -> None:  # type: ignore[no-untyped-def]
    with OffloadOLMoE.from_pretrained(checkpoint, policy=MIX, **SETTING, **DISK) as model:
        run(model)  # a warm cache and host tier, so that recovering must empty both
        SITE[0] = site
        Trip.arm(2, RuntimeError)
        with pytest.raises(RuntimeError, match="tripped"):
            run(model)
        SITE[0] = ""
        out, stats = run(model)
    assert torch.equal(out, fresh_disk[0]) and stats == fresh_disk[1]
    assert stats["host_hits"] > 0 and stats["host_misses"] > 0

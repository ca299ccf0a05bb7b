"""The disk tier (`storage="disk"`): experts read from their files on demand, bit-identical to stock
transformers, holding no expert in RAM beyond the cache and a bounded staging set, and failing clearly
on bad or changing files. Every architecture and layout: `test_architectures.py::test_disk_tier_*`."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from transformers import OlmoeForCausalLM

from specmd import OffloadOLMoE
from specmd.cache.live import disk
from specmd.cache.live.disk import DiskStore
from specmd.cache.live.store import RamStore
from specmd.cache.live.watchdog import TransferError
from specmd.offload_models.checkpoint import CheckpointError
from tests.conftest import EXPERT_BYTES, TOTAL_EXPERT_BYTES

PROMPT = torch.tensor([[5, 17, 33, 8, 91, 2, 40, 40, 12, 7, 66, 3]])
BATCH = torch.tensor([[0, 0, 0, 0, 14, 9, 27, 81], [11, 52, 3, 3, 70, 18, 6, 44]])
BATCH_MASK = (BATCH != 0).long()


def load(path: Path, **kwargs) -> OffloadOLMoE:  # type: ignore[no-untyped-def]
    if "cache_bytes" not in kwargs:
        kwargs.setdefault("cache_frac", 0.05)
    return OffloadOLMoE.from_pretrained(path, storage="disk", progress=False, bandwidth_gbps=5.0, **kwargs)


def greedy(model, ids, mask=None):  # type: ignore[no-untyped-def]
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)


def store_of(model: OffloadOLMoE) -> DiskStore:
    store = model._specmd.manager.payload.store  # type: ignore[union-attr]
    assert isinstance(store, DiskStore)
    return store


@pytest.mark.parametrize("policy", ["none/lru/fetch/standard", "topk:overfetch=2/ls/fetch/standard"])
@pytest.mark.parametrize("capacity", [{"cache_frac": 1.0}, {"cache_frac": 0.05}, {"cache_bytes": EXPERT_BYTES}])
def test_disk_is_bit_identical_to_stock_eager(checkpoint: Path, stock: OlmoeForCausalLM, capacity, policy) -> None:  # type: ignore[no-untyped-def]
    with load(checkpoint, policy=policy, **capacity) as model, torch.no_grad():
        assert torch.equal(model(PROMPT).logits, stock(PROMPT).logits)
        assert torch.equal(greedy(model, PROMPT), greedy(stock, PROMPT))
        real = BATCH_MASK.bool()
        assert torch.equal(
            model(BATCH, attention_mask=BATCH_MASK).logits[real], stock(BATCH, attention_mask=BATCH_MASK).logits[real]
        )
        assert model.cache_stats().bytes_transferred > 0


@pytest.mark.parametrize("policy", ["none/lru/fetch/standard", "topk:overfetch=2/ls/fetch/standard"])
@pytest.mark.parametrize(
    "host", [{"host_cache_frac": 0.3}, {"host_cache_bytes": 8 * EXPERT_BYTES, "host_eviction": "lfu"}]
)
def test_a_host_ram_tier_is_bit_identical_and_serves_experts_from_ram(  # type: ignore[no-untyped-def]
    checkpoint: Path, stock: OlmoeForCausalLM, host, policy
) -> None:
    with load(checkpoint, policy=policy, cache_bytes=2 * EXPERT_BYTES, **host) as model, torch.no_grad():
        assert torch.equal(model(PROMPT).logits, stock(PROMPT).logits)
        assert torch.equal(greedy(model, PROMPT), greedy(stock, PROMPT))
        real = BATCH_MASK.bool()
        assert torch.equal(
            model(BATCH, attention_mask=BATCH_MASK).logits[real], stock(BATCH, attention_mask=BATCH_MASK).logits[real]
        )
        stats = model.cache_stats()
        assert stats.host_hits > 0 and stats.host_misses > 0 and stats.disk_bytes_read < stats.bytes_transferred
        host_tier = model._specmd.manager.path.host  # type: ignore[union-attr]
        assert stats.peak_host_resident_bytes <= stats.host_capacity_bytes == host_tier.capacity_bytes


def test_a_host_tier_larger_than_this_machine_is_refused_before_loading(checkpoint: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(os, "sysconf", lambda name: 4096 if name == "SC_PAGE_SIZE" else 2)  # an 8 KiB machine
    before = set(threading.enumerate())
    with pytest.raises(ValueError, match=r"would hold \d+ B of experts, more than this machine's 8192 B of memory"):
        load(checkpoint, host_cache_frac=0.5)
    assert set(threading.enumerate()) <= before


@pytest.mark.parametrize("layout", ["legacy", "fused", "sharded"])
def test_disk_bf16_from_fp32_files_casts_as_transformers_does(checkpoints: dict[str, Path], layout: str) -> None:
    legacy = checkpoints["legacy"]
    stock = OlmoeForCausalLM.from_pretrained(legacy, experts_implementation="eager", dtype=torch.bfloat16)
    with load(checkpoints[layout], dtype=torch.bfloat16) as model, torch.no_grad():
        assert torch.equal(model(PROMPT).logits, stock(PROMPT).logits)
        assert torch.equal(greedy(model, PROMPT), greedy(stock, PROMPT))
        # one fp32 read buffer and one bf16 cast buffer per reading thread, allocated once
        assert store_of(model).staging_bytes == 2 * (EXPERT_BYTES + EXPERT_BYTES // 2)


def test_reads_are_exact_ranges_merged_where_they_touch(checkpoints: dict[str, Path]) -> None:
    with load(checkpoints["fused"]) as fused, load(checkpoints["legacy"]) as legacy:
        for model, most in ((fused, 2), (legacy, 3)):
            store = store_of(model)
            for pieces in store._ranges.values():
                assert 1 <= len(pieces) <= most  # gate_up + down, or gate + up + down (fewer when adjacent)
                assert sum(piece.nbytes for piece in pieces) == EXPERT_BYTES


def reading_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("specmd-disk") and t.is_alive()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_expert_larger_than_a_chunk_is_read_with_several_requests_in_flight(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    stock = OlmoeForCausalLM.from_pretrained(checkpoint, experts_implementation="eager", dtype=dtype)
    monkeypatch.setattr(disk, "READ_CHUNK", 1000)  # an fp32 expert (6144 B in 3 ranges) is 9 requests
    with load(checkpoint, cache_bytes=EXPERT_BYTES, dtype=dtype) as model, torch.no_grad():
        assert torch.equal(model(PROMPT).logits, stock(PROMPT).logits)
        assert 1 < len(reading_threads()) <= disk.READ_THREADS
    assert reading_threads() == []  # joined on close


def test_several_experts_are_read_at_once(checkpoint: Path, stock: OlmoeForCausalLM, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The transfer threads read up to READ_EXPERTS experts at once (a slowed read makes their overlap visible),
    straight into their CPU slots or host-tier blocks, and the logits stay exact."""
    reading: set[str] = set()
    most = [0]
    lock = threading.Lock()
    read = disk._File.read

    def slow_read(self, dst, start, what):  # type: ignore[no-untyped-def]
        with lock:
            reading.add(what)
            most[0] = max(most[0], len(reading))
        try:
            threading.Event().wait(0.02)
            read(self, dst, start, what)
        finally:
            with lock:
                reading.discard(what)

    monkeypatch.setattr(disk._File, "read", slow_read)
    for host in ({}, {"host_cache_frac": 0.5}):
        most[0] = 0
        with load(checkpoint, cache_frac=0.5, **host) as model, torch.no_grad():
            assert len([t for t in threading.enumerate() if t.name.startswith("specmd-watchdog")]) == disk.READ_EXPERTS
            assert torch.equal(model(PROMPT).logits, stock(PROMPT).logits)
        assert 1 < most[0] <= disk.READ_EXPERTS + 1  # the transfer threads, and the main thread taking one over


def test_no_expert_is_held_in_ram(checkpoint: Path) -> None:
    """Direct accounting: the tier holds file handles and byte ranges, never expert bytes; a CPU cache at the
    checkpoint's dtype is read into straight, with no staging at all."""
    with load(checkpoint) as model, torch.no_grad():
        model(PROMPT)
        store = store_of(model)
        held = [value for value in vars(store).values() if isinstance(value, torch.Tensor)]
        assert held == [] and store.staging_bytes == 0 and store._staging.empty()
        assert model.expert_cache.capacity_bytes < TOTAL_EXPERT_BYTES // 10
    with OffloadOLMoE.from_pretrained(checkpoint, cache_frac=0.05, progress=False) as ram:  # what the check catches
        store = ram._specmd.manager.payload.store  # type: ignore[union-attr]
        assert isinstance(store, RamStore) and sum(store[key].numel() for key in store) == TOTAL_EXPERT_BYTES


PEAK_RSS = """
import sys, torch
from specmd import OffloadOLMoE
def peak():  # this process's own high-water mark (ru_maxrss would carry the parent's from before exec)
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
torch.set_num_threads(1)
precisions = tuple(sys.argv[3:]) or None
if precisions:
    import bitsandbytes  # its own import is not what is measured
before = peak()
with OffloadOLMoE.from_pretrained(
    sys.argv[1], cache_frac=0.05, storage=sys.argv[2], expert_precisions=precisions, progress=False
) as model:
    model(torch.tensor([[5, 17, 33, 8]]))
print(peak() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.launch
def test_peak_rss_stays_far_below_the_experts(tmp_path: Path) -> None:
    """A model with 384 MiB of experts: loading it with storage='ram' raises the peak RSS by all of them,
    with storage='disk' by a small part (the 5% cache, the dense weights, and some 35-55 MB the first load
    of a model costs whatever its size: modules imported, buffers), also while it quantizes them."""
    from tests.conftest import tiny_model

    model = tiny_model(
        hidden_size=256,
        intermediate_size=512,
        num_experts=32,
        num_experts_per_tok=2,
        vocab_size=64,
        num_hidden_layers=8,
    )
    experts = 8 * 32 * 3 * 256 * 512 * 4
    model.save_pretrained(tmp_path / "big")
    del model

    def peak(storage: str, *precisions: str) -> int:
        env = os.environ | {"PYTHONPATH": str(Path.cwd()), "SPECMD_CACHE_DIR": str(tmp_path / "cache")}
        command = [sys.executable, "-c", PEAK_RSS, str(tmp_path / "big"), storage, *precisions]
        run = subprocess.run(command, capture_output=True, text=True, env=env)
        assert run.returncode == 0, run.stderr
        return int(run.stdout.split()[-1])

    ram, disk = peak("ram"), peak("disk")
    assert ram > 0.9 * experts, (ram, disk, experts)  # the check can fail: RAM holds every expert
    assert disk < 0.25 * experts, (disk, experts)
    if importlib.util.find_spec("bitsandbytes") is not None:  # quantizing streams: one layer of int8 at a time
        # every int8 expert alone would be half the fp32 bytes; one layer's (a quarter of that) and the 16 MiB
        # chunks hashing reads stay well below
        quantizing = peak("disk", "int8")
        assert quantizing < 0.5 * experts, (quantizing, experts)
        assert list((tmp_path / "cache" / "quant").glob("int8-*/manifest.json"))


# ---- bad files -------------------------------------------------------------------------------------
def copy_of(checkpoint: Path, tmp_path: Path) -> Path:
    target = tmp_path / "ckpt"
    shutil.copytree(checkpoint, target)
    return target


@pytest.mark.parametrize("chunk", [disk.READ_CHUNK, 1000], ids=["one-request", "several-in-flight"])
def test_a_file_rewritten_under_the_running_model_is_one_error_naming_file_and_expert(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    monkeypatch.setattr(disk, "READ_CHUNK", chunk)
    path = copy_of(checkpoint, tmp_path)
    weights = path / "model.safetensors"
    model = load(path, cache_bytes=EXPERT_BYTES, transfer_timeout_s=5)
    try:
        stat = weights.stat()
        with weights.open("r+b") as handle:  # same size, other bytes, as an in-place re-save would leave it
            handle.seek(stat.st_size - 64)
            handle.write(bytes(64))
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
        with pytest.raises(TransferError, match=r"expert \d+ of layer \d+ at fp32") as raised, torch.no_grad():
            model(PROMPT)
        assert "model.safetensors changed since the model loaded it" in str(raised.value)
    finally:
        model.close()


def test_a_file_truncated_under_the_running_model_is_one_error(checkpoint: Path, tmp_path: Path) -> None:
    path = copy_of(checkpoint, tmp_path)
    weights = path / "model.safetensors"
    with load(path, cache_bytes=EXPERT_BYTES, transfer_timeout_s=5) as model:
        os.truncate(weights, weights.stat().st_size // 2)
        with pytest.raises(TransferError, match=r"model\.safetensors changed .*size \d+ -> \d+ B"), torch.no_grad():
            model(PROMPT)
        with pytest.raises(TransferError, match=r"expert \d+ of layer \d+"), torch.no_grad():  # again, not a hang
            model(PROMPT)


def test_a_truncated_file_is_refused_at_load_naming_the_tensor(checkpoint: Path, tmp_path: Path) -> None:
    path = copy_of(checkpoint, tmp_path)
    weights = path / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 100)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor .* past the end of the file .*truncated"):
        load(path)


def test_a_tensor_whose_bytes_disagree_with_its_header_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    path = copy_of(checkpoint, tmp_path)
    weights = path / "model.safetensors"
    raw = weights.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin, end - 4]  # a header that gives the tensor 4 bytes too few
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    weights.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + length :])
    with pytest.raises(CheckpointError, match=rf"tensor {name} is F32 \[32, 16\] \(2048 B\), but its header gives"):
        load(path)


def test_quantized_copies_are_written_once_and_read_per_expert(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("bitsandbytes")
    from specmd.quant.formats import get_format

    precisions = ("int8", "fp32")
    monkeypatch.setenv("SPECMD_CACHE_DIR", str(tmp_path / "ram"))
    with OffloadOLMoE.from_pretrained(checkpoint, cache_frac=0.25, expert_precisions=precisions, progress=False) as ram:
        expected = ram(PROMPT).logits  # quantized by the RAM tier, from the mmapped checkpoint
    monkeypatch.setenv("SPECMD_CACHE_DIR", str(tmp_path / "disk"))
    with load(checkpoint, cache_frac=0.25, expert_precisions=precisions) as model, torch.no_grad():
        assert torch.equal(model(PROMPT).logits, expected)  # quantized now, a layer at a time, from the files
    monkeypatch.setattr(type(get_format("int8")), "pack", None)  # from here on nothing may quantize
    with load(checkpoint, cache_frac=0.25, expert_precisions=precisions) as model, torch.no_grad():
        assert torch.equal(model(PROMPT).logits, expected)
        pieces = [p for key, p in store_of(model)._ranges.items() if key.precision == "int8"]
        assert len(pieces) == 4 * 16
        assert all(len(p) == 1 and p[0].path.parent.parent == tmp_path / "disk" / "quant" for p in pieces)
    saved = [path.read_bytes() for path in sorted((tmp_path / "ram" / "quant").glob("int8-*/layer-*"))]
    assert saved == [path.read_bytes() for path in sorted((tmp_path / "disk" / "quant").glob("int8-*/layer-*"))]


def test_a_precision_the_disk_cannot_hold_is_refused(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("bitsandbytes")
    from specmd.quant.formats import get_format

    monkeypatch.setattr(type(get_format("int8")), "persist", False)
    with pytest.raises(ValueError, match=r"storage='disk' cannot store 'int8' experts.*use storage='ram'"):
        load(checkpoint, expert_precisions=("int8",))

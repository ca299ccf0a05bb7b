"""The disk tier (storage="disk") on an OLMoE-sized checkpoint: read throughput against the drive's raw
sequential read of the same files, and peak memory against the checkpoint's size.

The benchmark writes a synthetic checkpoint with the real OLMoE-1B-7B expert shape (hidden 2048, intermediate
1024, 64 experts, top-8; specmd/data/configs/olmoe-1b-7b) and a few layers (a small vocabulary keeps the dense
part small), one safetensors shard per layer, and deletes it at the end.

(a) Throughput, in interleaved rounds (the drive is shared, so its speed drifts; each round's ratio compares
measurements made a minute apart). Raw: each shard read front to back in 16 MiB `pread`s. specmd: `generate` with
storage="disk", native speed, 5% cache, no prefetch, once per compared number of chunk reads in flight (a model
each, loaded before the first round); every expert read is timed (the union of the intervals when at least one
is in flight), so "bytes per second while the model waits on the disk" is bytes read / that busy time. The
page cache is kept out of both instead of needing files larger than RAM: the files' pages are dropped with
posix_fadvise(POSIX_FADV_DONTNEED) before the raw read, and each expert's pages just before specmd reads it
(outside the timed interval; an expert read again would otherwise come from the page cache), so both read the
drive; the "device" columns are the share of the bytes /proc/self/io's read_bytes says came from it. Dropping is
not complete for specmd (about 70% of its bytes come from the drive: pages the raw read just cached that the
kernel does not drop at once), so the ratio counts only the drive's bytes: "dev GB/s" = those bytes / the
seconds of reading (all of which count), a lower bound of specmd's rate from the drive.

(b) Memory. In a fresh process per checkpoint size: the peak RSS while loading and generating, minus the peak
before, minus the dense weights, the cache's arena and the disk tier's staging buffers. It should not grow
with the checkpoint.

    python benchmarks/disk_tier.py [--layers 4 --small-layers 2 --tokens 8 --rounds 3 --read-threads 4 8 --dir /tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import OlmoeConfig, OlmoeForCausalLM

from specmd import OffloadOLMoE
from specmd.cache.live import disk

CONFIG = Path(__file__).resolve().parent.parent / "specmd" / "data" / "configs" / "olmoe-1b-7b" / "config.json"
PROMPT = [[17, 942, 3051, 88, 2040, 611, 12, 3999, 250, 73, 1200, 5]]


def write_checkpoint(directory: Path, layers: int) -> int:
    """A random OLMoE-shaped checkpoint of `layers` layers, one shard per layer; returns its expert bytes."""
    values = json.loads(CONFIG.read_text()) | {"num_hidden_layers": layers, "vocab_size": 4096, "eos_token_id": 2}
    config = OlmoeConfig(**values)
    with torch.device("meta"):
        shapes = {name: tensor.shape for name, tensor in OlmoeForCausalLM(config).state_dict().items()}
    directory.mkdir(parents=True)
    config.save_pretrained(directory)
    generator = torch.Generator().manual_seed(0)
    weight_map, expert_bytes = {}, 0
    for shard in range(layers + 1):  # shard 0: embeddings, final norm, head; shard i: layer i - 1
        prefix = f"model.layers.{shard - 1}." if shard else None
        names = [n for n in shapes if (n.startswith(prefix) if prefix else not n.startswith("model.layers."))]
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shapes[name], dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shapes[name], generator=generator) * 0.02).to(torch.bfloat16)
            if ".experts." in name:
                expert_bytes += tensors[name].nbytes
        file = f"model-{shard:05d}-of-{layers + 1:05d}.safetensors"
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(names, file)
        del tensors
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return expert_bytes


def drop_pages(directory: Path) -> None:
    """Drop the checkpoint's pages from the page cache (written pages are flushed first)."""
    for path in directory.glob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def device_read_bytes() -> int:
    """Bytes this process has had fetched from storage (not the page cache)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no read_bytes")


def raw_read(directory: Path) -> tuple[int, float]:
    """Bytes and seconds of reading every shard front to back."""
    buffer = bytearray(16 << 20)
    view = memoryview(buffer)
    total, start = 0, time.perf_counter()
    for path in sorted(directory.glob("*.safetensors")):
        fd = os.open(path, os.O_RDONLY)
        try:
            offset = 0
            while got := os.preadv(fd, [view], offset):
                offset += got
            total += offset
        finally:
            os.close(fd)
    return total, time.perf_counter() - start


class ReadClock:
    """Times every expert read of the disk tier: bytes, and the seconds at least one read was in flight."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.in_flight = 0
        self.since = 0.0
        self.busy = 0.0
        self.bytes = 0
        self.reads = 0
        self.most = 0

    def wrap(self, read):  # type: ignore[no-untyped-def]
        def timed(store, key, dst, what):  # type: ignore[no-untyped-def]
            for piece in store._ranges[key]:  # its pages leave the page cache: the read is the drive's
                os.posix_fadvise(store._open[piece.path].fd, piece.start, piece.nbytes, os.POSIX_FADV_DONTNEED)
            with self.lock:
                if not self.in_flight:
                    self.since = time.perf_counter()
                self.in_flight += 1
                self.most = max(self.most, self.in_flight)
            try:
                read(store, key, dst, what)
            finally:
                with self.lock:
                    self.in_flight -= 1
                    self.bytes += dst.numel()
                    self.reads += 1
                    if not self.in_flight:
                        self.busy += time.perf_counter() - self.since

        return timed


def load(directory: Path, read_threads: int) -> OffloadOLMoE:
    """The checkpoint with storage="disk", whose disk tier reads `read_threads` chunks at once, warmed up."""
    disk.READ_THREADS = read_threads  # read when the tier starts its pool, at its first chunked read
    model = OffloadOLMoE.from_pretrained(
        directory, cache_frac=0.05, storage="disk", policy="none/lru/fetch/standard", dtype=torch.bfloat16,
        progress=False,
    )  # fmt: skip
    with torch.inference_mode():
        model.generate(torch.tensor(PROMPT), max_new_tokens=2, do_sample=False)  # first-call costs, pool started
    return model


def generate_reads(model: OffloadOLMoE, clock: ReadClock, tokens: int) -> dict[str, float]:
    """Generate `tokens` tokens, timing the disk tier's reads."""
    clock.__init__()  # type: ignore[misc]
    before = device_read_bytes()
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(torch.tensor(PROMPT), max_new_tokens=tokens, do_sample=False)
    return {"gbps": clock.bytes / clock.busy / 1e9, "device_share": (device_read_bytes() - before) / clock.bytes,
            "bytes": clock.bytes, "reads": clock.reads, "at_once": clock.most, "busy_s": clock.busy,
            "wall_s": time.perf_counter() - start}  # fmt: skip


def throughput(directory: Path, tokens: int, rounds: int, read_threads: list[int]) -> None:
    """Rounds of: the raw read, then a generate per chunk-read setting; each round's rates side by side."""
    clock = ReadClock()
    disk.DiskStore._read = clock.wrap(disk.DiskStore._read)  # type: ignore[method-assign]
    models = {n: load(directory, n) for n in read_threads}
    ratios: dict[int, list[float]] = {n: [] for n in read_threads}
    print("round  raw GB/s  device  " + "  ".join(f"x{n}: GB/s  device  dev GB/s  ratio" for n in read_threads))
    try:
        for round_ in range(1, rounds + 1):
            drop_pages(directory)
            before = device_read_bytes()
            raw_bytes, raw_s = raw_read(directory)
            raw, raw_share = raw_bytes / raw_s / 1e9, (device_read_bytes() - before) / raw_bytes
            cells = []
            for n, model in models.items():
                ours = generate_reads(model, clock, tokens)
                device = ours["gbps"] * ours["device_share"]  # only the bytes the drive delivered, per second read
                ratios[n].append(device / raw)
                cells.append(f"{ours['gbps']:8.3f}  {ours['device_share']:6.0%}  {device:8.3f}  {device / raw:5.2f}")
            print(f"{round_:5d}  {raw:8.3f}  {raw_share:6.0%}  " + "  ".join(cells))
        print(
            f"each generate: {ours['reads']} expert reads, {ours['bytes'] / 1e9:.2f} GB, up to {ours['at_once']} at "
            f"once, {ours['busy_s']:.1f} s reading of {ours['wall_s']:.1f} s (the last)"
        )
        for n, values in ratios.items():
            print(f"specmd (device bytes) / raw, {n} chunk reads in flight: median {statistics.median(values):.2f}")
    finally:
        for model in models.values():
            model.close()


MEMORY = """
import sys, torch
from specmd import OffloadOLMoE
def peak():
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
before = peak()
with OffloadOLMoE.from_pretrained(sys.argv[1], cache_frac=0.05, storage="disk", dtype=torch.bfloat16,
                                  progress=False) as model, torch.inference_mode():
    model.generate(torch.tensor([[17, 942, 3051, 88, 2040, 611, 12, 3999]]), max_new_tokens=8, do_sample=False)
    dense = sum(t.nbytes for t in (*model.parameters(), *model.buffers()))
    payload = model._specmd.manager.payload
    arena, staging = payload.arena.nbytes, payload.store.staging_bytes
print(peak() - before, dense, arena, staging)
"""


def memory(directory: Path) -> dict[str, int]:
    out = subprocess.run([sys.executable, "-c", MEMORY, str(directory)], capture_output=True, text=True, check=True)
    grown, dense, arena, staging = map(int, out.stdout.split())
    return {"peak_growth": grown, "dense": dense, "arena": arena, "staging": staging,
            "other": grown - dense - arena - staging}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4, help="layers of the larger checkpoint (throughput, memory)")
    parser.add_argument("--small-layers", type=int, default=2, help="layers of the smaller one (memory)")
    parser.add_argument("--tokens", type=int, default=8, help="tokens generated while reads are timed")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of raw read + generates, interleaved")
    parser.add_argument(
        "--read-threads", type=int, nargs="+", default=[disk.READ_THREADS], help="chunk reads in flight (compared)"
    )
    parser.add_argument("--dir", default=None, help="where to write the checkpoints (default: the temp folder)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    root = Path(tempfile.mkdtemp(prefix="specmd-disk-bench-", dir=args.dir))
    try:
        print(
            f"torch {torch.__version__}, {os.cpu_count()} cores, {platform.machine()}; {disk.READ_EXPERTS} experts "
            f"read at once at most; checkpoints under {root}"
        )
        sizes = {}
        for layers in (args.layers, args.small_layers):
            start = time.perf_counter()
            sizes[layers] = write_checkpoint(root / f"{layers}-layers", layers)
            print(
                f"wrote {layers} layers: {sizes[layers] / 1e9:.2f} GB of experts in {time.perf_counter() - start:.0f} s"
            )
        big = root / f"{args.layers}-layers"
        print(f"\n(a) read throughput, {args.layers} layers, {args.tokens} tokens per generate, page cache kept out")
        throughput(big, args.tokens, args.rounds, args.read_threads)
        print("\n(b) peak RSS growth of load + generate, 5% cache, MB")
        print("expert GB   peak growth     dense     arena   staging     other")
        for layers in (args.small_layers, args.layers):
            m = memory(root / f"{layers}-layers")
            print(f"{sizes[layers] / 1e9:9.2f}   {m['peak_growth'] / 1e6:11.1f} {m['dense'] / 1e6:9.1f} "
                  f"{m['arena'] / 1e6:9.1f} {m['staging'] / 1e6:9.1f} {m['other'] / 1e6:9.1f}")  # fmt: skip
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()

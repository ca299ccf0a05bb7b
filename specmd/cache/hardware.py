"""Hardware profiles: the target machine the emulated clock prices compute and transfers for.

Each figure says where it comes from. Compute peaks are dense (no sparsity) tensor-core rates for
16-bit floats; memory bandwidth is the vendor's peak; link figures are host-to-device. Disk profiles
(`DISKS`) price the disk-to-host link of experts stored on disk (`storage="disk"`): each drive's
sequential read rate from its vendor's datasheet.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from specmd.cache.clock import PassInfo, RooflineCompute
from specmd.cache.layout import ExpertLayout


@dataclass(frozen=True)
class HardwareProfile:
    """A target machine.

    Attributes:
        name: registry name.
        description: what machine this is.
        peak_tflops: dense bf16/fp16 tensor throughput, TFLOP/s.
        memory_bandwidth_gbps: device memory bandwidth, GB/s.
        link_bandwidth_gbps: host-to-device bandwidth, GB/s (used when a run asks for bandwidth "profile").
        link_latency_us: fixed cost of one host-to-device transfer, microseconds.
        source: where the figures come from.
        layer_overhead_us: fixed time each decoder layer takes per pass on top of its roofline (kernel launches,
            framework and host overheads a real system has); 0 for an ideal machine, set by `calibrate`.
        disk: the drive (a `DISKS` name) experts stored on disk are read from (used when a run asks for disk
            "profile").
    """

    name: str
    description: str
    peak_tflops: float
    memory_bandwidth_gbps: float
    link_bandwidth_gbps: float
    link_latency_us: float
    source: str
    layer_overhead_us: float = 0.0
    disk: str = "nvme4"

    @property
    def peak_flops(self) -> float:
        return self.peak_tflops * 1e12

    @property
    def memory_bandwidth(self) -> float:
        """Bytes per second."""
        return self.memory_bandwidth_gbps * 1e9

    @property
    def link_latency_s(self) -> float:
        return self.link_latency_us * 1e-6

    @property
    def layer_overhead_s(self) -> float:
        return self.layer_overhead_us * 1e-6

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_LATENCY_NOTE = (
    "The 10 us per-transfer latency is an assumed order of magnitude for a cudaMemcpyAsync launch plus DMA setup."
)
_PCIE_NOTE = "Achievable host-to-device rates are taken as about 80% of the PCIe link's theoretical rate."

PROFILES: dict[str, HardwareProfile] = {
    profile.name: profile
    for profile in (
        HardwareProfile(
            name="a100",
            description="NVIDIA A100 80GB PCIe with the SpecMD paper's 5 GB/s host link",
            peak_tflops=312.0,
            memory_bandwidth_gbps=1935.0,
            link_bandwidth_gbps=5.0,
            link_latency_us=10.0,
            source=(
                "NVIDIA A100 datasheet: 312 TFLOP/s dense BF16, 1,935 GB/s HBM2e (80GB PCIe card). 5 GB/s is the "
                "host-to-device rate the SpecMD paper measured on its machine. " + _LATENCY_NOTE
            ),
        ),
        HardwareProfile(
            name="rtx4090",
            description="NVIDIA GeForce RTX 4090 on PCIe 4.0 x16",
            peak_tflops=165.2,
            memory_bandwidth_gbps=1008.0,
            link_bandwidth_gbps=25.0,
            link_latency_us=10.0,
            source=(
                "NVIDIA Ada (AD102) whitepaper: 165.2 TFLOP/s dense BF16 tensor with FP32 accumulate, 1,008 GB/s "
                "GDDR6X (384-bit, 21 Gbps). PCIe 4.0 x16: 31.5 GB/s theoretical. " + _PCIE_NOTE + " " + _LATENCY_NOTE
            ),
        ),
        HardwareProfile(
            name="h100-pcie",
            description="NVIDIA H100 80GB PCIe on PCIe 5.0 x16",
            peak_tflops=756.0,
            memory_bandwidth_gbps=2000.0,
            link_bandwidth_gbps=50.0,
            link_latency_us=10.0,
            source=(
                "NVIDIA H100 datasheet (PCIe card): 756 TFLOP/s dense BF16 (1,513 with sparsity), 2,000 GB/s HBM2e. "
                "PCIe 5.0 x16: 63 GB/s theoretical. " + _PCIE_NOTE + " " + _LATENCY_NOTE
            ),
        ),
        HardwareProfile(
            name="laptop-rtx4060",
            description="a laptop GPU: NVIDIA GeForce RTX 4060 Laptop on PCIe 4.0 x8",
            peak_tflops=29.0,
            memory_bandwidth_gbps=256.0,
            link_bandwidth_gbps=12.0,
            link_latency_us=10.0,
            source=(
                "Derived estimates (laptop clocks vary by design): 3,072 CUDA cores at up to 2.37 GHz give 14.6 "
                "TFLOP/s FP32, and Ada GeForce tensor cores run dense BF16 with FP32 accumulate at twice the FP32 "
                "rate (as the RTX 4090's 165.2 vs 82.6), so about 29 TFLOP/s; 128-bit GDDR6 at 16 Gbps gives "
                "256 GB/s. PCIe 4.0 x8: 15.75 GB/s theoretical. " + _PCIE_NOTE + " " + _LATENCY_NOTE
            ),
        ),
        HardwareProfile(
            name="a100-paper",
            description="the SpecMD paper's system as measured: a100 plus 36.9 ms per decoder layer per pass",
            peak_tflops=312.0,
            memory_bandwidth_gbps=1935.0,
            link_bandwidth_gbps=5.0,
            link_latency_us=10.0,
            layer_overhead_us=36903.9,
            source=(
                "The a100 profile's figures, with the per-layer overhead calibrated (specmd.cache.hardware.calibrate) "
                "so that OLMoE-1B-7B (specmd/data/configs/olmoe-1b-7b) decodes at 1.69 tokens/s with 512 tokens of "
                "context: SpecMD Table 1, config 5 (score prefetch, Least-Stale, fetch) at 5% capacity and 5 GB/s. "
                "Its roofline alone would decode at 798 tokens/s; the paper's system spends about 37 ms per layer."
            ),
        ),
    )
}

DEFAULT_HARDWARE = "a100"


@dataclass(frozen=True)
class DiskProfile:
    """A drive experts are read from: one read at a time, each taking ``latency + bytes / bandwidth``.

    Attributes:
        name: registry name.
        description: what drive this is.
        read_bandwidth_gbps: sequential read rate, GB/s (1e9 bytes/s).
        read_latency_us: fixed cost of one read (one expert), microseconds.
        source: where the figures come from.
    """

    name: str
    description: str
    read_bandwidth_gbps: float
    read_latency_us: float
    source: str

    @property
    def read_latency_s(self) -> float:
        return self.read_latency_us * 1e-6

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_DISK_LATENCY_NOTE = (
    "The per-read latency is an assumed order of magnitude (datasheets give queue-depth-1 random 4 KB reads in the "
    "tens of microseconds for NVMe drives, about a hundred for SATA); an expert's megabytes make it small beside "
    "the transfer."
)

DISKS: dict[str, DiskProfile] = {
    disk.name: disk
    for disk in (
        DiskProfile(
            name="nvme3",
            description="an NVMe PCIe 3.0 x4 SSD: Samsung 970 EVO Plus",
            read_bandwidth_gbps=3.5,
            read_latency_us=50.0,
            source="Samsung 970 EVO Plus datasheet: sequential read up to 3,500 MB/s (PCIe 3.0 x4, NVMe 1.3). "
            + _DISK_LATENCY_NOTE,
        ),
        DiskProfile(
            name="nvme4",
            description="an NVMe PCIe 4.0 x4 SSD: Samsung 990 PRO",
            read_bandwidth_gbps=7.45,
            read_latency_us=50.0,
            source="Samsung 990 PRO datasheet: sequential read up to 7,450 MB/s (PCIe 4.0 x4, NVMe 2.0). "
            + _DISK_LATENCY_NOTE,
        ),
        DiskProfile(
            name="nvme5",
            description="an NVMe PCIe 5.0 x4 SSD: Crucial T705",
            read_bandwidth_gbps=14.5,
            read_latency_us=50.0,
            source="Crucial T705 product flyer: sequential read up to 14,500 MB/s (2 TB and 4 TB models, PCIe 5.0 x4). "
            + _DISK_LATENCY_NOTE,
        ),
        DiskProfile(
            name="sata",
            description="a SATA 6 Gb/s SSD: Samsung 870 EVO",
            read_bandwidth_gbps=0.56,
            read_latency_us=100.0,
            source="Samsung 870 EVO datasheet: sequential read up to 560 MB/s (SATA 6 Gb/s). " + _DISK_LATENCY_NOTE,
        ),
    )
}


def get_disk(name: str) -> DiskProfile:
    """The disk profile registered as `name`; anything else is a ValueError listing the disks."""
    if name not in DISKS:
        raise ValueError(f"unknown disk profile {name!r}; available: {', '.join(DISKS)}")
    return DISKS[name]


def get_profile(name: str) -> HardwareProfile:
    """The profile registered as `name`; anything else is a ValueError listing the profiles."""
    if name not in PROFILES:
        raise ValueError(f"unknown hardware profile {name!r}; available: {', '.join(PROFILES)}")
    return PROFILES[name]


def decode_roofline_s(layout: ExpertLayout, profile: HardwareProfile, context: int = 512) -> float:
    """The roofline time of one decode token of `layout`'s model on `profile`, batch 1 with `context` tokens
    cached and every expert resident: its layers' dense parts, top-k experts per MoE layer, and the head."""
    if layout.shape is None:
        raise ValueError("calibrating needs the model's shape (a layout with `shape`)")
    compute = RooflineCompute(layout.shape, profile.peak_flops, profile.memory_bandwidth)
    token = PassInfo(sequences=1, tokens=1, attended=context, context=context, prefill=False)
    dense = sum(compute.dense_s(layer, token) for layer in range(layout.num_layers))
    experts = len(layout.moe_layers) * layout.top_k * compute.expert_s(layout.expert_bytes[layout.precision], 1)
    return dense + experts + compute.head_s(token)


def calibrate(
    profile: HardwareProfile,
    layout: ExpertLayout,
    tokens_per_s: float,
    *,
    context: int = 512,
    name: str | None = None,
    source: str = "",
) -> HardwareProfile:
    """`profile` with the per-layer overhead that makes one decode token of `layout`'s model take 1 / `tokens_per_s`.

    overhead per layer = (1 / tokens_per_s - decode_roofline_s(layout, profile, context)) / num_layers

    The measured throughput is charged to compute alone, so the emulated link still adds its transfer stalls
    on top: calibrate from a run whose transfers were mostly hidden (a high hit rate), or expect the
    emulation to run somewhat slower than the measurement.
    """
    if not (isinstance(tokens_per_s, int | float) and tokens_per_s > 0):
        raise ValueError(f"tokens_per_s must be a number > 0, got {tokens_per_s!r}")
    roofline = decode_roofline_s(layout, profile, context)
    spare = 1.0 / tokens_per_s - roofline
    if spare < 0:
        raise ValueError(
            f"{tokens_per_s} tokens/s is faster than {profile.name}'s roofline allows ({1 / roofline:,.1f} tokens/s)"
        )
    return replace(
        profile,
        name=name or f"{profile.name}-calibrated",
        layer_overhead_us=spare / layout.num_layers * 1e6,
        source=source or f"{profile.source} Calibrated to {tokens_per_s} tokens/s (context {context}).",
    )

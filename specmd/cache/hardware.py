"""Hardware profiles: the target machine the emulated clock prices compute and transfers for.

Each figure says where it comes from. Compute peaks are dense (no sparsity) tensor-core rates for
16-bit floats; memory bandwidth is the vendor's peak; link figures are host-to-device.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


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
    """

    name: str
    description: str
    peak_tflops: float
    memory_bandwidth_gbps: float
    link_bandwidth_gbps: float
    link_latency_us: float
    source: str

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
    )
}

DEFAULT_HARDWARE = "a100"


def get_profile(name: str) -> HardwareProfile:
    """The profile registered as `name`; anything else is a ValueError listing the profiles."""
    if name not in PROFILES:
        raise ValueError(f"unknown hardware profile {name!r}; available: {', '.join(PROFILES)}")
    return PROFILES[name]

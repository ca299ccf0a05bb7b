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
        link_latency_us: fixed cost of one host-to-device transfer, microseconds.
        source: where the figures come from.
    """

    name: str
    description: str
    peak_tflops: float
    memory_bandwidth_gbps: float
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


PROFILES: dict[str, HardwareProfile] = {
    profile.name: profile
    for profile in (
        HardwareProfile(
            name="a100",
            description="NVIDIA A100 80GB PCIe, the SpecMD paper's machine",
            peak_tflops=312.0,
            memory_bandwidth_gbps=1935.0,
            link_latency_us=10.0,
            source=(
                "NVIDIA A100 datasheet (312 TFLOP/s dense BF16, 1,935 GB/s HBM2e for the 80GB PCIe card); the 10 us "
                "per-transfer latency is an assumed order of magnitude for a cudaMemcpyAsync launch plus DMA setup. "
                "The paper's link ran at 5 GB/s host-to-device: pass bandwidth_gbps=5 to emulate it"
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

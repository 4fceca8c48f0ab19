"""What a GPU and a node's storage tiers are, as plain data (the catalog is `sim.hardware.GPUS`)."""

from __future__ import annotations

from dataclasses import dataclass

GiB = 2**30


@dataclass(slots=True, frozen=True)
class GpuSpec:
    name: str  # catalog name
    memory_bytes: int  # device memory the arena may use
    bf16_flops: float  # dense bf16 peak, FLOP/s
    hbm_bps: float  # device memory bandwidth, bytes/s
    pcie_bps: float  # achievable pinned host->device bandwidth, bytes/s
    d2d_bps: float  # device-to-device copy bandwidth inside the GPU (compaction), bytes/s



@dataclass(slots=True, frozen=True)
class TierSpec:
    host_cache_bytes: int = 256 * GiB  # pinned host-DRAM checkpoint cache per node (LRU over units)
    ssd_bps: float = 6e9  # local NVMe read bandwidth per node, shared by its GPUs
    network_bps: float = 1.25e9  # remote store link per node (10 Gb/s), shared by its GPUs
    ssd_holds_all: bool = True  # every checkpoint starts on every node's SSD (else: remote only)
    unit_overhead_s: float = 0.0  # fixed cost per loaded unit (allocation, descriptor setup)


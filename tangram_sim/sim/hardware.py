"""GPU catalog and the node's storage tiers. Every figure can be overridden per experiment."""

from __future__ import annotations

import math
from dataclasses import fields, replace
from typing import Any

from tangram_sim.errors import ConfigError
from tangram_sim.specs.hardware import GiB, GpuSpec, TierSpec

__all__ = ["GPUS", "GiB", "GpuSpec", "TierSpec", "gpu_spec"]



# Public datasheet peaks; pcie is what pinned copies reach in practice (Gen4 ~25, Gen5 ~50 GB/s);
# d2d is roughly half the HBM bandwidth because a copy reads and writes.
GPUS: dict[str, GpuSpec] = {
    g.name: g
    for g in [
        GpuSpec("a100-40gb", 40 * GiB, 312e12, 1.555e12, 25e9, 0.7e12),
        GpuSpec("a100-80gb", 80 * GiB, 312e12, 2.039e12, 25e9, 0.9e12),
        GpuSpec("h100-80gb", 80 * GiB, 989e12, 3.35e12, 50e9, 1.5e12),
        GpuSpec("h200-141gb", 141 * GiB, 989e12, 4.8e12, 50e9, 2.1e12),
        GpuSpec("l40-48gb", 48 * GiB, 181e12, 0.864e12, 25e9, 0.4e12),
        GpuSpec("rtx4090-24gb", 24 * GiB, 165e12, 1.008e12, 25e9, 0.45e12),
        GpuSpec("a10-24gb", 24 * GiB, 125e12, 0.6e12, 25e9, 0.28e12),
    ]
}


def gpu_spec(name: str, overrides: dict[str, Any] | None = None, memory_gib: float | None = None) -> GpuSpec:
    """A catalog GPU with field overrides (e.g. {'pcie_bps': 20e9}); errors name the bad field."""
    if name not in GPUS:
        raise ConfigError(f"cluster.gpu: unknown GPU {name!r}; expected one of: {', '.join(GPUS)}")
    spec = GPUS[name]
    changes = dict(overrides or {})
    valid = {f.name for f in fields(GpuSpec)} - {"name"}
    for key, value in changes.items():
        if key not in valid:
            raise ConfigError(f"cluster.gpu_overrides.{key}: unknown field; expected one of {sorted(valid)}")
        changes[key] = _positive(value, f"cluster.gpu_overrides.{key}")
    if memory_gib is not None:
        changes["memory_bytes"] = _positive(memory_gib, "cluster.gpu_memory_gib") * GiB
    if "memory_bytes" in changes:
        changes["memory_bytes"] = int(changes["memory_bytes"])
        if changes["memory_bytes"] < 1:  # a positive size that rounds down to no byte at all
            where = "cluster.gpu_memory_gib" if memory_gib is not None else "cluster.gpu_overrides.memory_bytes"
            raise ConfigError(f"{where}: expected at least one byte of GPU memory, got {changes['memory_bytes']}")
    return replace(spec, **changes)


def _positive(value: Any, where: str) -> float:
    """A finite number > 0 (NaN compares false with everything, so `value <= 0` alone lets it through)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok:
        try:
            ok = math.isfinite(value) and value > 0
        except OverflowError:  # an integer too large for a float
            ok = False
    if not ok:
        raise ConfigError(f"{where}: expected a positive number, got {value!r}")
    return float(value)

"""Sources: where each missing unit of a cold start is read from.

A unit's host copy is the nearest one the node has: its pinned DRAM cache, else its SSD (every
checkpoint is there when `ssd_holds_all`, else the units it fetched before), else the remote store.
Other GPUs may hold the same bytes, resident in their arenas (a running instance's weights or a copy
retained after one ended): a GPU of the same node (`peer-gpu`, over NVLink or PCIe) or, with RDMA, of
another node (`remote-gpu`). The lifecycle (`core.sources`) describes each copy as a `GpuCopy` with its
rate alone on its path (`topology.Topology.source_bps`) and the policy picks one of them, or None for
the host copy. A policy that never reads GPU copies says so (`gpu_copies = False`): the lifecycle then
does not look for them and every unit comes from its host copy, as in a cluster without the topology.

- `tiers` (default): the host copy, always (the cluster as it was before sources existed).
- `fastest`: the copy with the highest rate alone, a GPU copy only when it beats the host copy (ties: a
  peer of the node before another node, then the lowest GPU).
- `gpu-first`: any GPU copy before the host copy (peers of the node first, then the highest rate,
  then the lowest GPU): what a system that spares its storage and host links does (BlitzScale loads
  parameters over the GPU network from running instances).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from tangram_sim.registry import Registry

__all__ = ["SOURCE", "FastestSource", "GpuCopy", "GpuFirstSource", "SourcePolicy", "TiersSource"]


@dataclass(frozen=True, slots=True)
class GpuCopy:
    """A GPU whose arena holds the unit, resident."""

    gpu: int  # the GPU holding it
    source: str  # "peer-gpu" (same node) or "remote-gpu" (another node, RDMA)
    bps: float  # rate of one transfer alone on the path from it, bytes/s


class SourcePolicy:
    """The contract of every source policy (see the module docstring)."""

    needs: ClassVar[frozenset[str]] = frozenset()  # what the run passes it (`policies.needs`)
    gpu_copies: ClassVar[bool] = True  # whether it reads GPU copies (False: the host copy always)

    def choose(self, host: str, host_bps: float, copies: Sequence[GpuCopy]) -> int | None:
        """Index into `copies` (never empty) of the copy to read, or None for the host copy `host`
        ("dram", "ssd" or "remote", at `host_bps` alone)."""
        raise NotImplementedError


SOURCE = Registry[SourcePolicy]("source policy")


@SOURCE.register("tiers")
class TiersSource(SourcePolicy):
    """The host copy, always."""

    gpu_copies: ClassVar[bool] = False

    def choose(self, host: str, host_bps: float, copies: Sequence[GpuCopy]) -> int | None:
        return None


def _peer_first(copy: GpuCopy) -> int:
    return 0 if copy.source == "peer-gpu" else 1


@SOURCE.register("fastest")
class FastestSource(SourcePolicy):
    """The highest rate alone; a GPU copy only when strictly faster than the host copy."""

    def choose(self, host: str, host_bps: float, copies: Sequence[GpuCopy]) -> int | None:
        best = min(range(len(copies)), key=lambda i: (-copies[i].bps, _peer_first(copies[i]), copies[i].gpu))
        return best if copies[best].bps > host_bps else None


@SOURCE.register("gpu-first")
class GpuFirstSource(SourcePolicy):
    """Any GPU copy before the host copy: peers of the node first, then the highest rate, lowest GPU."""

    def choose(self, host: str, host_bps: float, copies: Sequence[GpuCopy]) -> int | None:
        return min(range(len(copies)), key=lambda i: (_peer_first(copies[i]), -copies[i].bps, copies[i].gpu))

"""Where a cold start's missing units come from: the host tiers of the node, or another GPU's copy.

`split_sources` runs when a rank's transfers start (the modelled device calls it then, so the node's
DRAM cache is read, and its LRU order touched, at the moment the bytes leave it): each unit's host copy
is the node's DRAM cache, else its SSD, else the remote store; when the system's source policy reads
GPU copies (`policies.source`), the GPUs whose arenas hold the unit resident are offered too, each with
its rate alone on its path in the cluster's topology, and the policy picks. A GPU copy is read as it
stands when the transfer starts: an eviction on the holder during the copy does not interrupt it (the
model's simplification; an NVLink or RDMA copy of a unit takes milliseconds).

The result is the groups of units by source, in plan order inside each, host tiers first (DRAM, SSD,
remote), then GPU copies by holder; each rank's worker counts the bytes per source (`source_bytes`),
which the summary reports (`SOURCE_COLUMNS`): they add up to the bytes loaded by cold starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from tangram_sim.arena import Key, State
from tangram_sim.policies.source import GpuCopy
from tangram_sim.topology import SOURCES

if TYPE_CHECKING:
    from tangram_sim.core.device import RankLoad
    from tangram_sim.core.worker import GpuWorker

__all__ = ["SOURCE_COLUMNS", "source_totals", "split_sources"]

SOURCE_COLUMNS = tuple(f"bytes_from_{s.replace('-', '_')}" for s in SOURCES)  # summary columns, per source

Group = tuple[str, int, list[tuple[Key, int]]]  # (source, holder GPU or -1, units in plan order)


def split_sources(load: RankLoad) -> list[Group]:
    """The rank's missing units grouped by source (see the module docstring); counts their bytes."""
    worker = load.worker
    node = worker.node
    cache, on_ssd, ssd_holds_all = node.cache, node.on_ssd, node.tiers.ssd_holds_all
    policy = worker.cluster.source
    dram: list[tuple[Key, int]] = []
    ssd: list[tuple[Key, int]] = []
    remote: list[tuple[Key, int]] = []
    if not policy.gpu_copies:
        for unit in load.missing:
            key = unit[0]
            if key in cache:
                dram.append(unit)
                cache.move_to_end(key)
            elif ssd_holds_all or key in on_ssd:
                ssd.append(unit)
            else:
                remote.append(unit)
        groups: list[Group] = [("dram", -1, dram), ("ssd", -1, ssd), ("remote", -1, remote)]
    else:
        groups = _with_gpu_copies(load, dram, ssd, remote)
    out = [g for g in groups if g[2]]
    counts = worker.source_bytes
    for source, _gpu, units in out:
        counts[source] += sum(nbytes for _key, nbytes in units)
    return out


def _with_gpu_copies(load: RankLoad, dram: list[tuple[Key, int]], ssd: list[tuple[Key, int]],
                     remote: list[tuple[Key, int]]) -> list[Group]:
    worker = load.worker
    cluster = worker.cluster
    node = worker.node
    topology = cluster.topology
    cache, on_ssd, ssd_holds_all = node.cache, node.on_ssd, node.tiers.ssd_holds_all
    policy = cluster.source
    gpu = worker.gpu_id
    here = node.node_id
    holders = [w for w in cluster.workers if w is not worker and (topology.spec.rdma or w.node is node)]
    host_bps = {s: topology.source_bps(s, gpu) for s in ("dram", "ssd", "remote")}
    copy_bps: dict[int, float] = {}
    from_gpu: dict[tuple[str, int], list[tuple[Key, int]]] = {}
    resident = State.RESIDENT
    for unit in load.missing:
        key = unit[0]
        host = "dram" if key in cache else "ssd" if ssd_holds_all or key in on_ssd else "remote"
        copies = []
        for w in holders:
            region = w.arena.lookup(key)
            if region is not None and region.state is resident:
                bps = copy_bps.get(w.gpu_id)
                source = "peer-gpu" if w.node.node_id == here else "remote-gpu"
                if bps is None:
                    bps = copy_bps[w.gpu_id] = topology.source_bps(source, gpu, w.gpu_id)
                copies.append(GpuCopy(w.gpu_id, source, bps))
        choice = policy.choose(host, host_bps[host], copies) if copies else None
        if choice is not None:
            picked = copies[choice]
            from_gpu.setdefault((picked.source, picked.gpu), []).append(unit)
        elif host == "dram":
            dram.append(unit)
            cache.move_to_end(key)
        else:
            (ssd if host == "ssd" else remote).append(unit)
    groups: list[Group] = [("dram", -1, dram), ("ssd", -1, ssd), ("remote", -1, remote)]
    groups.extend((source, src, units) for (source, src), units in sorted(from_gpu.items(), key=lambda g: g[0][1]))
    return groups


def source_totals(workers: Sequence[GpuWorker]) -> dict[str, int]:
    """The summary's bytes per source over every GPU (`SOURCE_COLUMNS`)."""
    return {col: sum(w.source_bytes[s] for w in workers) for col, s in zip(SOURCE_COLUMNS, SOURCES)}

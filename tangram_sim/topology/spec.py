"""`cluster.topology`: the links beyond a node's own tiers, checked with one-line errors.

The node's host-DRAM cache, SSD and NIC bandwidth stay where they were (`cluster.tiers`: the NIC is
`network_gbps`); this section adds what lies between GPUs and nodes. Every default leaves the cluster as
it was before the section existed: peers copy over PCIe, no RDMA, no limit on the remote store beyond
each node's NIC.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tangram_sim.errors import ConfigError, shown

TOPOLOGY_KEYS = ("nvlink_gbps", "rdma", "remote_store_gbps", "nics_per_node")


@dataclass(slots=True, frozen=True)
class TopologySpec:
    # NVLink bandwidth of each GPU, each way, bytes/s; None: a GPU reads a peer of its node over both
    # GPUs' PCIe links (device -> host -> device), as servers without NVLink do
    nvlink_bps: float | None = None
    # NICs read and write GPU memory directly (GPUDirect RDMA): only then may a GPU of another node be a
    # unit's source, or a multicast cross nodes (staging every block through host memory on both ends
    # is what the systems that use remote GPUs avoid)
    rdma: bool = False
    # total bandwidth of the shared remote checkpoint store, bytes/s, split fairly by every node reading
    # from it; None: unlimited, each node's NIC (`cluster.tiers.network_gbps`) is the only limit
    remote_store_bps: float | None = None
    # NICs of each node, each at `cluster.tiers.network_gbps` each way; the node's GPUs are paired with
    # them in turn (local GPU i with NIC i mod n), as GPU servers pair each GPU with its nearest RDMA NIC.
    # A GPU's remote reads and cross-node copies cross its own NIC; 1: one NIC that every GPU shares
    nics_per_node: int = 1


def _gbps(section: dict[str, Any], key: str, where: str) -> float | None:
    value = section.get(key)
    if value is None:
        return None
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok:
        try:
            ok = math.isfinite(value) and value > 0
        except OverflowError:
            ok = False
    if not ok:
        raise ConfigError(f"{where}.{key}: expected a number > 0 (GB/s), got {shown(value)}")
    return float(value) * 1e9


def topology_from_config(section: Any, where: str = "cluster.topology") -> TopologySpec:
    """The section as a `TopologySpec` (None or absent keys: the defaults); errors name the dotted key."""
    if section is None:
        return TopologySpec()
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: expected a mapping, got {shown(section)}")
    for key in section:
        if key not in TOPOLOGY_KEYS:
            raise ConfigError(f"{where}.{key}: unknown key; expected one of: {', '.join(TOPOLOGY_KEYS)}")
    rdma = section.get("rdma", False)
    if rdma is None:
        rdma = False
    if not isinstance(rdma, bool):
        raise ConfigError(f"{where}.rdma: expected true or false, got {shown(rdma)}")
    nics = section.get("nics_per_node", 1)
    if nics is None:
        nics = 1
    if isinstance(nics, bool) or not isinstance(nics, int) or nics < 1:
        raise ConfigError(f"{where}.nics_per_node: expected an integer >= 1, got {shown(nics)}")
    return TopologySpec(nvlink_bps=_gbps(section, "nvlink_gbps", where), rdma=rdma,
                        remote_store_bps=_gbps(section, "remote_store_gbps", where), nics_per_node=nics)

"""The cluster's links, and the path a unit takes from each kind of source to a GPU.

Links (each a fair-share bandwidth, `links.Link`):

- per GPU: `pcie` (host -> GPU: every load ends on it), `pcie_up` (GPU -> host: the first hop when a
  GPU's copy is read over PCIe), and with NVLink `nvlink_out` / `nvlink_in` (each way);
- per node: `ssd` (local NVMe reads), and per NIC (`cluster.topology.nics_per_node` of them, one by
  default) `nic_in` and `nic_out` (full duplex, each way at `cluster.tiers.network_gbps`: a node can
  receive a model and forward it at once); a GPU uses NIC `nic_of(gpu)` (local GPU i: NIC i mod n);
- one `store`: the shared remote checkpoint store, only when it has a limit of its own.

Paths, by source (`SOURCES`): `dram` = the node's pinned host cache -> PCIe; `ssd` = SSD -> PCIe;
`remote` = [store] -> its NIC in -> PCIe; `peer-gpu` (a GPU of the same node) = NVLink out -> NVLink in, or
without NVLink the peer's PCIe up -> this GPU's PCIe; `remote-gpu` (a GPU of another node, RDMA only) =
the peer's PCIe up -> the peer's NIC out -> this GPU's NIC in -> this PCIe. Bytes stream through a path pipelined, so
a transfer runs at the smallest fair share of its links (`core.links`). The first three paths are the
ones the cluster had before the topology existed, link for link.
"""

from __future__ import annotations

from tangram_sim.specs.hardware import TierSpec
from tangram_sim.topology.links import Link
from tangram_sim.topology.spec import TopologySpec

# Where a unit may come from, slowest first as a rule (a source policy decides per unit)
SOURCES = ("remote", "ssd", "dram", "peer-gpu", "remote-gpu")


class Topology:
    """Nodes x GPUs and their links (see the module docstring); plain data, no clock."""

    def __init__(self, nodes: int, gpus_per_node: int, pcie_bps: float, tiers: TierSpec,
                 spec: TopologySpec | None = None) -> None:
        spec = spec or TopologySpec()
        self.nodes = nodes  # machines
        self.gpus_per_node = gpus_per_node  # GPUs per machine
        self.tiers = tiers  # host cache, SSD and NIC figures per node
        self.spec = spec  # NVLink, RDMA, remote store
        n_gpus = nodes * gpus_per_node
        self.pcie = [Link(f"gpu{g}.pcie", pcie_bps) for g in range(n_gpus)]  # host -> GPU
        self.pcie_up = [Link(f"gpu{g}.pcie-up", pcie_bps) for g in range(n_gpus)]  # GPU -> host
        nv = spec.nvlink_bps
        # NVLink per GPU, each way (None: no NVLink, peers copy over PCIe)
        self.nvlink_out = [Link(f"gpu{g}.nvlink-out", nv) for g in range(n_gpus)] if nv else None
        self.nvlink_in = [Link(f"gpu{g}.nvlink-in", nv) for g in range(n_gpus)] if nv else None
        self.ssd = [Link(f"node{n}.ssd", tiers.ssd_bps) for n in range(nodes)]
        self.nics = min(spec.nics_per_node, gpus_per_node)  # NICs per node (one more than GPUs carries nothing)
        nics = [f"node{n}.net" + (f"{j}" if self.nics > 1 else "") for n in range(nodes) for j in range(self.nics)]
        self.nic_in = [Link(name, tiers.network_bps) for name in nics]  # per NIC (node n: n*nics ...): into the node
        self.nic_out = [Link(f"{name}-out", tiers.network_bps) for name in nics]  # out of it
        # the shared remote store's own limit (None: unlimited, the NICs alone limit reads from it)
        self.store = Link("store", spec.remote_store_bps) if spec.remote_store_bps else None
        self._fixed: dict[tuple[str, int], tuple[Link, ...]] = {}  # (source, gpu) -> path of a host source

    def node_of(self, gpu: int) -> int:
        return gpu // self.gpus_per_node

    def nic_of(self, gpu: int) -> int:
        """The NIC (index into `nic_in` / `nic_out`) that `gpu` reaches other nodes through."""
        node, local = divmod(gpu, self.gpus_per_node)
        return node * self.nics + local % self.nics

    def path(self, source: str, gpu: int, src_gpu: int = -1) -> tuple[Link, ...]:
        """The links a unit crosses from `source` to `gpu` (`src_gpu`: the GPU holding it, for the GPU
        sources). ValueError for a source this topology cannot offer (a bug in the caller)."""
        if src_gpu < 0:
            found = self._fixed.get((source, gpu))
            if found is not None:
                return found
        node = gpu // self.gpus_per_node
        pcie = self.pcie[gpu]
        if source == "dram":
            links: tuple[Link, ...] = (pcie,)
        elif source == "ssd":
            links = (self.ssd[node], pcie)
        elif source == "remote":
            nic = self.nic_in[self.nic_of(gpu)]
            links = (nic, pcie) if self.store is None else (self.store, nic, pcie)
        elif source == "peer-gpu":
            if src_gpu < 0 or src_gpu == gpu or src_gpu // self.gpus_per_node != node:
                raise ValueError(f"gpu {src_gpu} is not a peer of gpu {gpu} in its node")
            if self.nvlink_out is not None and self.nvlink_in is not None:
                return (self.nvlink_out[src_gpu], self.nvlink_in[gpu])
            return (self.pcie_up[src_gpu], pcie)
        elif source == "remote-gpu":
            src_node = src_gpu // self.gpus_per_node
            if src_gpu < 0 or src_node == node:
                raise ValueError(f"gpu {src_gpu} is not on another node than gpu {gpu}")
            if not self.spec.rdma:
                raise ValueError("a GPU of another node is a source only with cluster.topology.rdma")
            return (self.pcie_up[src_gpu], self.nic_out[self.nic_of(src_gpu)], self.nic_in[self.nic_of(gpu)], pcie)
        else:
            raise ValueError(f"unknown source {source!r}; expected one of {SOURCES}")
        self._fixed[(source, gpu)] = links
        return links

    def source_bps(self, source: str, gpu: int, src_gpu: int = -1) -> float:
        """The rate of one transfer alone on its path: its slowest link."""
        return min(link.bps for link in self.path(source, gpu, src_gpu))

    def storage_bps(self, node: int) -> float:
        """Read bandwidth of where a checkpoint is when the node's host cache does not hold it: its SSD when
        every checkpoint starts there, else the remote store through its NIC (the load estimates')."""
        if self.tiers.ssd_holds_all:
            return self.ssd[node].bps
        bps = self.nic_in[node * self.nics].bps  # one load reads through one NIC (all alike)
        return bps if self.store is None else min(bps, self.store.bps)

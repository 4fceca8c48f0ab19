"""Cold starts of one model that overlap in time, as one multicast (`topology.multicast`).

With a system's `multicast` set (chain or binomial), a rank's cold start that needs exactly the units
another GPU is receiving in one stream right now (the same units in the same order: both start from
the same state, e.g. nothing of the model resident) does not read them from its own node's tiers: it
joins that stream as its next receiver and reads from the previous receiver's GPU (a peer of its node,
or with RDMA one of another node), block by block, a number of blocks behind the first receiver (the
root) that the multicast's shape sets (`lag_blocks`); the fabric keeps it behind (`core.links`
`follow`). A cold start whose units come from one source and that joins no stream opens one as its
root; the stream closes to newcomers when the root's transfer ends. Without RDMA a stream stays inside
its node. Receivers' bytes count as read from a GPU (`peer-gpu` or `remote-gpu`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import simpy

from tangram_sim.arena import Key
from tangram_sim.topology import Topology
from tangram_sim.topology.multicast import lag_blocks

if TYPE_CHECKING:
    from tangram_sim.core.device import RankLoad

__all__ = ["Joined", "Multicasts"]


@dataclass(slots=True)
class _Stream:
    """One open multicast: its receivers in join order (GPU, transfer's completion event)."""

    members: list[tuple[int, simpy.Event]] = field(default_factory=list)  # [0] is the root


@dataclass(slots=True, frozen=True)
class Joined:
    """A receiver's place in a stream: where it reads from and whom it follows."""

    source: str  # "peer-gpu" or "remote-gpu"
    src_gpu: int  # the previous receiver's GPU, whose uplink it crosses
    follow: simpy.Event  # the transfer it stays behind: the previous receiver's (chain), the root's (binomial)
    lag_bytes: float  # how far behind it stays


class Multicasts:
    """The cluster's open streams, per (units in order, node or -1 with RDMA)."""

    def __init__(self, kind: str, block_bytes: int, topology: Topology) -> None:
        self.kind = kind  # chain | binomial
        self.block_bytes = block_bytes  # bytes a receiver must hold before forwarding them
        self.topology = topology
        self.open: dict[tuple[tuple[Key, ...], int], _Stream] = {}  # streams newcomers may join

    def _key(self, load: RankLoad) -> tuple[tuple[Key, ...], int]:
        node = -1 if self.topology.spec.rdma else load.worker.node.node_id
        return tuple(key for key, _n in load.missing), node

    def join(self, load: RankLoad) -> Joined | None:
        """This rank's place in an open stream of exactly its units, or None."""
        stream = self.open.get(self._key(load))
        if stream is None:
            return None
        k = len(stream.members)
        src_gpu, previous = stream.members[-1]
        gpu = load.worker.gpu_id
        topology = self.topology
        source = "peer-gpu" if topology.node_of(src_gpu) == topology.node_of(gpu) else "remote-gpu"
        model_bytes = sum(n for _key, n in load.missing)
        block = min(self.block_bytes, model_bytes)
        if self.kind == "chain":
            follow, lag = previous, float(block)
        else:
            follow, lag = stream.members[0][1], float(lag_blocks(self.kind, k) * block)
        load.worker.source_bytes[source] += model_bytes
        return Joined(source, src_gpu, follow, lag)

    def joined(self, load: RankLoad, done: simpy.Event) -> None:
        """The rank's transfer as a receiver has started (`done`: its completion)."""
        self.open[self._key(load)].members.append((load.worker.gpu_id, done))

    def opened(self, load: RankLoad, done: simpy.Event) -> None:
        """The rank's units stream from one source in the transfer `done`: it is a root newcomers join."""
        key = self._key(load)
        if key in self.open:  # a stream of the same units opened meanwhile (this one joined none): keep it
            return
        self.open[key] = _Stream([(load.worker.gpu_id, done)])

        def close(_event: object) -> None:
            if self.open.get(key) is not None and self.open[key].members[0][1] is done:
                del self.open[key]

        done.callbacks.append(close)

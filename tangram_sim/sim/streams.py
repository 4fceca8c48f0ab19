"""How bytes reach a modelled GPU (`sim.device.ModelledDevice`'s transfers): a cold start's missing units
stream from their sources (`core.sources`, or the previous receiver of a multicast, `core.multicast`) over
the links of the cluster's topology as fluid transfers that share links fairly (`core.links`); with
execute-while-load the transfers carry marks where each unit and each layer's bytes inside it end, so
units land and layers become ready the moment their bytes arrive (`_stream`). A prefetch copies one unit
from the node's DRAM cache over the GPU's PCIe link, and can be cancelled at once (`_PrefetchCopy`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import simpy

from tangram_sim.arena import Key
from tangram_sim.core.device import Landed, LayerProgress, RankLoad, Work
from tangram_sim.core.links import Fabric, Link
from tangram_sim.core.multicast import Joined
from tangram_sim.core.sources import split_sources
from tangram_sim.core.storage import Node
from tangram_sim.models.layers import unit_parts
from tangram_sim.models.spec import ModelSpec
from tangram_sim.models.units import ReuseUnit

__all__ = ["Streams"]


class Streams:
    """The transfers of a `ModelledDevice` (the module docstring); a mixin over its state."""

    env: simpy.Environment
    gpu_id: int
    fabric: Fabric  # every link of the cluster
    pcie: Link  # this GPU's host link
    landing: Link | None  # a layered start's reads beside its compute (None: not crossed)
    unit_overhead_s: float
    _paths: dict[tuple[str, int], tuple[Link, ...]]

    def _stream(self, progress: LayerProgress, spec: ModelSpec, units: tuple[ReuseUnit, ...],
                rank_keys: tuple[tuple[Key, ...], ...], loads: Sequence[RankLoad], landed: Landed,
                copy_s: float) -> Work:
        env = self.env
        if copy_s:
            yield env.timeout(copy_s)
        ready = progress.ready
        for i in range(len(ready)):  # a layer of reused units only is ready once the copies are done
            ready[i] = env.now
        pending = progress.pending
        if pending is not None:  # from here, the marks of each layer still to come (counted as they are made)
            pending[:] = [0] * len(pending)
        parts = unit_parts(spec, units)
        transfers = []
        for rank, load in enumerate(loads):
            if not load.missing:
                landed(load, ())
                continue
            position = {key: i for i, key in enumerate(rank_keys[rank])}
            device = load.worker.device
            sources = device._tiers(load)
            started = []
            for links, tier_units, joined in sources:
                marks: list[float] = []
                what: list[tuple[int, tuple[Key, int] | None]] = []  # (layer, None) or (-1, unit landed)
                offset = 0
                for key, nbytes in tier_units:
                    for fraction, layer in parts[position[key]]:
                        marks.append(offset + fraction * nbytes)
                        what.append((layer, None))
                        if pending is not None:
                            pending[layer] += 1
                    offset += nbytes
                    marks.append(float(offset))
                    what.append((-1, (key, nbytes)))

                def on_mark(i: int, what=what, load=load) -> None:
                    layer, unit = what[i]
                    if unit is not None:
                        landed(load, (unit,))
                        return
                    if env.now > ready[layer]:
                        ready[layer] = env.now
                    if pending is not None:
                        pending[layer] -= 1
                        if not pending[layer]:
                            progress.landed(layer)

                if device.landing is not None:
                    links = (*links, device.landing)
                started.append(device._transfer(offset, links, joined, marks, on_mark))
            device._streaming(load, sources, started)
            transfers.extend(started)
        if pending is not None:  # no mark fires before this process waits: a layer with none is in place
            for layer, left in enumerate(pending):
                if not left:
                    progress.landed(layer)
        if transfers:
            yield env.all_of(transfers)
        for layer in list(progress.waiters):
            progress.landed(layer)
        progress.finish(env.now)

    def _tiers(self, load: RankLoad) -> list[tuple[tuple[Link, ...], list[tuple[Key, int]], Joined | None]]:
        """The missing units by source, as (links crossed, units in plan order, the place in a multicast
        stream or None): one part following the previous receiver when the rank joins a stream
        (`core.multicast`), else one part per source (`core.sources`)."""
        path = self._path
        multicast = load.worker.cluster.multicast
        if multicast is not None:
            joined = multicast.join(load)
            if joined is not None:
                return [(path(load, joined.source, joined.src_gpu), list(load.missing), joined)]
        return [(path(load, source, src), units, None) for source, src, units in split_sources(load)]

    def _transfer(self, nbytes: float, links: tuple[Link, ...], joined: Joined | None,
                  marks: list[float] | None = None, on_mark: Callable[[int], None] | None = None) -> simpy.Event:
        if joined is None:
            return self.fabric.transfer(nbytes, links, marks, on_mark)
        return self.fabric.transfer(nbytes, links, marks, on_mark, joined.follow, joined.lag_bytes)

    def _streaming(self, load: RankLoad, parts: list[tuple[tuple[Link, ...], list[tuple[Key, int]], Joined | None]],
                   events: list[simpy.Event]) -> None:
        """Tell the cluster's multicasts of a rank's transfers: a receiver's, or a stream newcomers may join
        (its units from one source)."""
        multicast = load.worker.cluster.multicast
        if multicast is None or len(events) != 1:
            return
        if parts[0][2] is not None:
            multicast.joined(load, events[0])
        else:
            multicast.opened(load, events[0])

    def _path(self, load: RankLoad, source: str, src_gpu: int = -1) -> tuple[Link, ...]:
        """The links from `source` (held by `src_gpu` for a GPU source) to this GPU, in the cluster's
        topology, ending on this GPU's own PCIe link."""
        links = self._paths.get((source, src_gpu))
        if links is None:
            topology = load.worker.cluster.topology
            links = topology.path(source, self.gpu_id, src_gpu)
            if links[-1] is topology.pcie[self.gpu_id] and links[-1] is not self.pcie:
                links = (*links[:-1], self.pcie)
            self._paths[(source, src_gpu)] = links
        return links

    def _transfers(self, load: RankLoad) -> list[simpy.Event]:
        """Missing units stream to the GPU from their sources, one transfer per source."""
        parts = self._tiers(load)
        transfer = self._transfer
        events = [transfer(sum(nbytes for _key, nbytes in units), links, joined) for links, units, joined in parts]
        self._streaming(load, parts, events)
        return events

    def prefetch_source(self, node: Node, key: Key) -> bool:
        """Only units in the node's DRAM cache: their transfer crosses this GPU's PCIe link alone."""
        return key in node.cache

    def prefetch_unit(self, key: Key, nbytes: int) -> tuple[simpy.Event, Callable[[], float | None]]:
        copy = _PrefetchCopy(self, nbytes)
        return copy.done, copy.cancel


class _PrefetchCopy:
    """One prefetched unit: the per-unit overhead, then its transfer over the GPU's PCIe link."""

    __slots__ = ("device", "nbytes", "done", "transfer", "cancelled")

    def __init__(self, device: Streams, nbytes: int) -> None:
        self.device = device
        self.nbytes = nbytes
        self.done = device.env.event()  # the unit is in place
        self.transfer: simpy.Event | None = None  # the link transfer, once started
        self.cancelled = False
        if device.unit_overhead_s:
            device.env.timeout(device.unit_overhead_s).callbacks.append(self._begin)
        else:
            self._begin(None)

    def _begin(self, _event: object) -> None:
        if self.cancelled:
            return
        self.transfer = self.device.fabric.transfer(self.nbytes, (self.device.pcie,))
        self.transfer.callbacks.append(self._arrived)

    def _arrived(self, _event: object) -> None:
        if not self.cancelled:
            self.done.succeed()

    def cancel(self) -> float | None:
        """Stop now: the bytes moved so far (wasted), or None when the unit had arrived."""
        if self.done.triggered or (self.transfer is not None and self.transfer.triggered):
            return None
        self.cancelled = True
        if self.transfer is None:
            return 0.0
        moved = self.device.fabric.cancel(self.transfer)
        return 0.0 if moved is None else moved

"""Storage tiers of a node: a pinned host-DRAM checkpoint cache (LRU over units), an SSD and a network.

The cache's contents are lifecycle state (the scheduler asks whether a node holds a model, loads fill
it), so they live here for both drivers; how long a transfer through the tiers takes is the modelled
device's business (the simulator's modelled device); the links are the cluster's `topology`. A real replay reads every unit from its files, so its
experiment runs with no host cache.
"""

from __future__ import annotations

import operator
from collections import OrderedDict
from collections.abc import Sequence

from tangram_sim.arena import Key
from tangram_sim.core.records import ModelEntry
from tangram_sim.specs.hardware import TierSpec
from tangram_sim.topology import Topology

_key = operator.itemgetter(0)  # of a (key, nbytes) unit


class Node:
    """Host side of a machine: a pinned DRAM checkpoint cache (LRU over units), SSD and network."""

    def __init__(self, node_id: int, tiers: TierSpec, key_owners: dict[Key, tuple[str, ...]],
                 topology: Topology) -> None:
        self.node_id = node_id
        self.tiers = tiers
        self.key_owners = key_owners  # unit key -> models whose weights include it
        self.ssd = topology.ssd[node_id]  # local NVMe reads
        self.cache: OrderedDict[Key, int] = OrderedDict()  # unit key -> bytes, LRU first
        self.cache_bytes = 0
        self.on_ssd: set[Key] = set()  # units fetched from remote (when the SSD is not pre-filled)
        self.cached_by_model: dict[str, int] = {}  # model -> bytes of its units in the cache

    def cache_insert_many(self, units: Sequence[tuple[Key, int]]) -> None:
        """Insert (key, nbytes) units in order, each becoming the most recently used."""
        cache, key_owners, by_model = self.cache, self.key_owners, self.cached_by_model
        limit = self.tiers.host_cache_bytes
        for key, nbytes in units:
            if nbytes > limit:
                continue
            if key in cache:
                cache.move_to_end(key)
                continue
            while self.cache_bytes + nbytes > limit:
                old, size = cache.popitem(last=False)
                self.cache_bytes -= size
                for model in key_owners[old]:
                    by_model[model] -= size
            cache[key] = nbytes
            self.cache_bytes += nbytes
            for model in key_owners[key]:
                by_model[model] = by_model.get(model, 0) + nbytes

    def after_load(self, units: Sequence[tuple[Key, int]]) -> None:
        """Units just loaded to a GPU of this node are on its SSD and in its DRAM cache now."""
        if not self.tiers.ssd_holds_all:
            self.on_ssd.update(map(_key, units))
        self.cache_insert_many(units)

    def holds(self, entry: ModelEntry, model: str) -> bool:
        """The whole checkpoint of `model` is in this node's DRAM cache."""
        return self.cached_by_model.get(model, 0) >= entry.nbytes

"""Example policies, one of each kind, registered by name so an experiment can choose them.

An experiment imports this file with `plugins: [my_policy.py]` (see my-policy.yaml and
docs/policies.md); its systems then name the policies like the built-in ones.
"""

from __future__ import annotations

from tangram_sim.policies import PACKING, RETENTION, SCHEDULER, PackingPolicy, RetentionPolicy, Scheduler
from tangram_sim.policies.packing import CompactAll, FirstFit


@RETENTION.register("largest-first")
class LargestFirst(RetentionPolicy):
    """Evict the largest idle units first, so many small ones stay (ties: lowest address first)."""

    def value(self, region, now):
        return -float(region.size)  # higher = kept longer


@SCHEDULER.register("most-free")
class MostFree(Scheduler):
    """Start the instance on the GPU with the most free memory (ties: shortest queue, lowest index)."""

    def _choose(self, model, options, rng):
        return min(range(len(options)), key=lambda i: (-options[i].free_bytes, options[i].queue_wait_s, i))


@PACKING.register("compact-if-fragmented")
class CompactIfFragmented(PackingPolicy):
    """Never move data while the free memory is mostly one hole; compact everything otherwise."""

    def plan(self, arena, units, eviction_order):
        fragmented = arena.fragmentation() > 0.1  # 1 - largest hole / free bytes
        return (CompactAll() if fragmented else FirstFit()).plan(arena, units, eviction_order)

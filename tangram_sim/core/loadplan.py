"""What a GPU may evict, and where a cold start's missing units go.

Three things take memory from retained weights: a cold start (its missing units), a running batch's KV
growth (`core.kvbook`) and a prefetch (`core.prefetch`). Each asks the retention policy for its
eviction order through `eviction_order`, so a policy that plans with the queue (`uses_queue`, e.g.
model-value's lookahead) sees the GPU's queue before every order it gives. `plan_rank` is one GPU's part
of a cold start: the units of the model that are not resident, the ones reused, and the packing plan.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from tangram_sim.arena import Key, Region
from tangram_sim.core.records import LifecycleError, ModelEntry
from tangram_sim.policies.packing import PackingPlan

if TYPE_CHECKING:
    from tangram_sim.core.worker import GpuWorker

_nbytes = operator.itemgetter(1)


def eviction_order(worker: GpuWorker, now: float, candidates: Iterable[Region] | None = None) -> list[Key]:
    """The retention policy's eviction order over the GPU's evictable units (or `candidates`); a policy
    that plans with the queue is shown it first (model -> arrival of its oldest waiting request)."""
    retention = worker.retention
    if retention.uses_queue:
        retention.observe_queue(worker.queues.oldest_arrivals(), now)
    return retention.eviction_order(worker.arena.evictable() if candidates is None else candidates, now)


def plan_rank(worker: GpuWorker, entry: ModelEntry, rank: int, model: str, now: float
              ) -> tuple[Sequence[tuple[Key, int]], int, list[Key], PackingPlan]:
    """This GPU's part of a cold start: the missing shards, their bytes, the reused shards' keys, and
    the packing plan (evicting in retention order only when the free bytes are short)."""
    arena = worker.arena
    packing = worker.cluster.packing
    found = arena.lookup_many(entry.rank_keys[rank])
    missing: Sequence[tuple[Key, int]]
    reused_keys: list[Key] = []
    if found.count(None) == len(found):  # nothing retained: the model's units as they are
        missing = entry.rank_units[rank]
        missing_aligned = sum(entry.rank_aligned[rank])
    else:
        missing = []
        missing_aligned = 0
        for region, unit, aligned in zip(found, entry.rank_units[rank], entry.rank_aligned[rank]):
            if region is None:
                missing.append(unit)
                missing_aligned += aligned
            else:
                reused_keys.append(unit[0])
    missing_bytes = sum(map(_nbytes, missing))
    plan = None
    if arena.free_bytes >= missing_aligned:
        plan = packing.plan(arena, missing, ())  # no eviction needed: skip ranking candidates
    if plan is None:
        order = eviction_order(worker, now)
        if reused_keys:
            protected = set(reused_keys)  # reused units may move but must stay
            order = [k for k in order if k not in protected]
        plan = packing.plan(arena, missing, order)
    if plan is None:  # cannot happen for models validated to fit; never hang on it
        raise LifecycleError(f"gpu {worker.gpu_id}: no packing plan for {model}")
    return missing, missing_bytes, reused_keys, plan

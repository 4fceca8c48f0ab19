"""One GPU's part of a cold start: which of the model's units it must load and where they go.

`plan_rank` looks the rank's units up in the arena: those resident are reused (the plan may move them
but must not evict them), the rest are missing and go where the memory entry point (`core.memory`)
plans them, evicting retained units in retention order when the free bytes are short.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING

from tangram_sim.arena import Key
from tangram_sim.core.memory import Ask, acquire
from tangram_sim.core.records import LifecycleError, ModelEntry
from tangram_sim.policies.packing import PackingPlan

if TYPE_CHECKING:
    from tangram_sim.core.worker import GpuWorker

_nbytes = operator.itemgetter(1)


def plan_rank(worker: GpuWorker, entry: ModelEntry, rank: int, model: str, now: float
              ) -> tuple[Sequence[tuple[Key, int]], int, list[Key], PackingPlan]:
    """This GPU's part of a cold start: the missing shards, their bytes, the reused shards' keys, and
    the packing plan (to be applied with `core.memory.commit`)."""
    return plan_units(worker, entry.rank_keys[rank], entry.rank_units[rank], entry.rank_aligned[rank], model, now)


def plan_units(worker: GpuWorker, keys: Sequence[Key], units: Sequence[tuple[Key, int]], aligned_sizes: Sequence[int],
               model: str, now: float) -> tuple[Sequence[tuple[Key, int]], int, list[Key], PackingPlan]:
    """`plan_rank` over any of the model's units (`keys`, their (key, bytes) and aligned sizes): a pipeline
    stage's share (`core.pipeline`)."""
    arena = worker.arena
    found = arena.lookup_many(keys)
    missing: Sequence[tuple[Key, int]]
    reused_keys: list[Key] = []
    if found.count(None) == len(found):  # nothing retained: the model's units as they are
        missing = units
        missing_aligned = sum(aligned_sizes)
    else:
        missing = []
        missing_aligned = 0
        for region, unit, aligned in zip(found, units, aligned_sizes):
            if region is None:
                missing.append(unit)
                missing_aligned += aligned
            else:
                reused_keys.append(unit[0])
    missing_bytes = sum(map(_nbytes, missing))
    # reused units may move but must stay
    plan = acquire(worker, Ask("weights", units=missing, aligned=missing_aligned, protect=reused_keys), now)
    if plan is None:  # cannot happen for models validated to fit; never hang on it
        raise LifecycleError(f"gpu {worker.gpu_id}: no packing plan for {model}")
    return missing, missing_bytes, reused_keys, plan

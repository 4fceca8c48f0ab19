"""One GPU's memory, asked for in one place: `acquire` plans bytes for a purpose, `commit` applies it.

Four things take a GPU's memory, and may take it from retained weights:

- `"weights"`: a cold start's missing units on one rank (`core.loadplan.plan_rank`);
- `"kv"`: a running request's KV growth, blocks taken on demand (`core.kvbook.kv_take`);
- `"kv-pool"`: an instance's static KV reservation when it starts (`core.kvbook.reserve_static_kv`);
- `"prefetch"`: an idle GPU's speculative load of a model's units (`core.prefetch`).

Each describes what it wants in an `Ask` and calls `acquire(worker, ask, now)`, which returns a plan
(the packing policy's `PackingPlan` for units, `policies.kv`'s `KvPlan` for KV) or None when the memory
is not there. The arena is read, never changed: a caller that needs every rank (KV, tensor parallel)
plans them all before committing any.

`acquire` first tries without evicting anything; only when that fails does it rank retained units.
The ranking is the retention policy's eviction order over the ask's candidates (the GPU's evictable
units unless the ask names others), the policy being shown the GPU's queue just before when it plans
with it (`uses_queue`, e.g. model-value's lookahead). The order then passes the ask's one filter,
which drops:

- `protect`: keys that must stay (a cold start's reused units: they may move but not go);
- `spare_queued`: units of any model with a request waiting on this GPU (ElasticKV-spare: a request
  joining a running batch waits rather than evict a model the queue will start next);
- `owners`: units whose owner set is not listed (the owner sets a prefetch policy allows it to displace).

What each purpose does when there is no room without evicting, exactly as the paths did before they
shared this module (the simulator's committed results depend on it):

- weights: the no-eviction packing is tried only when the free bytes cover the units' aligned bytes
  (it could not succeed otherwise, and skipping it saves a packing attempt per cold start);
- prefetch: the same, but a speculative load is not worth moving resident data: a plan with compaction
  moves is replaced by one over the eviction order, and if that moves too, by first-fit's over the same
  order (which evicts further down it instead); the plan returned never moves;
- kv: `plan_kv` uses the free space when its whole blocks suffice, else evicts down the order;
- kv-pool: as kv, and when even evicting everything allowed is short (fragmentation), the whole
  blocks the holes hold: a pool is always reserved, however small.

`commit` tells retention of a plan's evictions (`on_evict_many`) and applies the plan to the arena. A
prefetch evicts unit by unit as it loads (a cancelled prefetch must not have evicted for units it never
loaded), through `evict`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from tangram_sim.arena import Key, Region
from tangram_sim.policies.kv import KvPlan, execute_kv_plan, plan_kv
from tangram_sim.policies.packing import PACKING, Move, PackingPlan, execute_plan

if TYPE_CHECKING:
    from tangram_sim.core.worker import GpuWorker

Purpose = Literal["weights", "kv", "kv-pool", "prefetch"]
_FIRST_FIT = PACKING.create("first-fit")


@dataclass(slots=True)
class Ask:
    """What one memory request wants (see the module docstring)."""

    purpose: Purpose
    units: Sequence[tuple[Key, int]] = ()  # weights, prefetch: (key, bytes) of the units to place
    aligned: int = 0  # weights, prefetch: their aligned bytes (no eviction tried below this much free)
    nbytes: int = 0  # kv, kv-pool: bytes wanted (whole blocks)
    block: int = 0  # kv, kv-pool: bytes per block
    protect: Collection[Key] = ()  # keys never evicted
    spare_queued: bool = False  # evict no unit of a model with a request waiting on this GPU
    owners: Collection[frozenset[str]] | None = None  # evict only units with one of these owner sets
    candidates: Iterable[Region] | None = None  # regions to rank (None: the arena's evictable ones)


def acquire(worker: GpuWorker, ask: Ask, now: float) -> PackingPlan | KvPlan | None:
    """The plan that gives `ask` its memory on `worker`'s GPU, or None when there is none now."""
    arena = worker.arena
    purpose = ask.purpose
    if purpose == "kv" or purpose == "kv-pool":
        plan = plan_kv(arena, ask.nbytes, ask.block, ())
        if not plan.must_wait:
            return plan
        plan = plan_kv(arena, ask.nbytes, ask.block, eviction_order(worker, ask, now))
        if not plan.must_wait:
            return plan
        if purpose == "kv":
            return None
        fits = sum(r.size - r.size % ask.block for r in arena.free_regions())
        return plan_kv(arena, fits, ask.block, ())
    packing = worker.cluster.packing
    units = ask.units
    packed = packing.plan(arena, units, ()) if arena.free_bytes >= ask.aligned else None
    fussy = purpose == "prefetch"  # takes no plan that moves resident data
    if packed is None or (fussy and packed.moves):
        order = eviction_order(worker, ask, now)
        packed = packing.plan(arena, units, order)
        if fussy and packed is not None and packed.moves:
            packed = _FIRST_FIT.plan(arena, units, order)
    return packed


def eviction_order(worker: GpuWorker, ask: Ask, now: float) -> list[Key]:
    """The retention policy's eviction order over the ask's candidates, through the ask's filter; a
    policy that plans with the queue is shown it first (model -> arrival of its oldest waiting request).

    The filter applies to the order, not to the candidates: a policy may rank by groups (model-value
    ties groups by their lowest offset), so leaving units out before ranking could reorder the rest."""
    retention = worker.retention
    if retention.uses_queue:
        retention.observe_queue(worker.queues.oldest_arrivals(), now)
    arena = worker.arena
    candidates = arena.evictable() if ask.candidates is None else ask.candidates
    order = retention.eviction_order(candidates, now)
    if ask.protect:
        protect = set(ask.protect)
        order = [k for k in order if k not in protect]
    owners = ask.owners
    if ask.spare_queued:
        waiting = worker.queues.oldest_arrivals().keys()
        lookup = arena.lookup
        order = [k for k in order if waiting.isdisjoint(lookup(k).owners)]
    if owners is not None:
        lookup = arena.lookup
        order = [k for k in order if lookup(k).owners in owners]
    return order


def commit(worker: GpuWorker, plan: PackingPlan | KvPlan, now: float, *, key_prefix: tuple = (),
           first_index: int = 0, on_move: Callable[[Move], object] | None = None) -> list[Key]:
    """Tell retention of `plan`'s evictions and apply it: a packing plan's units are booked as loading
    (`on_move` sees its compaction moves), a KV plan's extents are placed as regions keyed
    `key_prefix + (first_index + i,)`, whose keys are returned."""
    worker.retention.on_evict_many(plan.evictions, now)
    if type(plan) is KvPlan:
        return execute_kv_plan(worker.arena, plan, key_prefix, first_index)
    execute_plan(worker.arena, plan, owners=worker.cluster.unit_owners.__getitem__, on_move=on_move)
    return []


def evict(worker: GpuWorker, keys: Sequence[Key], now: float) -> None:
    """Evict some of a committed plan's evictions now (a prefetch's, unit by unit as it loads)."""
    worker.retention.on_evict_many(keys, now)
    worker.arena.evict_many(keys)

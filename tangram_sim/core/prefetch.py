"""One GPU's prefetch: a model's units loaded while the GPU has nothing queued, stopped by any request.

Hooks: the worker (`core.worker`) calls `start` when the GPU enters its idle branch (no queued request:
idle, or an instance idling in keep-alive), `cancel` when a request is submitted to the GPU (before the
worker sees it) and `on_cold_start` with each cold start's units; the router calls `observe` for each
request routed to the GPU. A system with `prefetch: none` builds no `Prefetcher`: nothing changes.

A prefetch asks the system's prefetch policy (`policies.prefetch`) for a model and the owner sets it may
displace, then plans the model's missing units that the device can prefetch through the one memory
entry point (`core.memory`, purpose "prefetch"): the system's packing policy, as for a cold start, with
no eviction at all when the free bytes suffice, else over the retention policy's eviction order of the
units the spell did not load itself, restricted to those owner sets. A speculative load is not worth
moving resident data: a plan with compaction moves is replaced by one over the order, then by
first-fit's over the same order (which evicts further down it instead), and when there is none the
prefetch stops until the GPU next becomes idle. It runs the plan unit by unit, in plan order: before
each unit it evicts the planned evictions that overlap the unit's range (`core.memory.evict`, which
tells retention), books the unit as loading, has the device load it (`Device.prefetch_unit`), then
finishes it unpinned, so it is retained and evictable like any retained unit. Retention's
`record_access` is not called: a prefetch is not a request. A plan whose arena changed under it (an
instance's static KV released, say) is dropped and the policy asked again. When a model is done the policy is
asked again; within one prefetch (one idle spell) a model is prefetched at most once and the units it
loaded are never displaced by a later choice, so a spell ends.

Cancellation is synchronous: the unit in flight is cancelled on the device (the modelled device
removes its transfer from the link, which the other transfers re-share; the bytes it moved are
wasted) and its region is freed, so a cold start that follows plans on an arena without loading
regions and finds its link as if the prefetch had never run. Units finished before stay resident.

What a device may prefetch (`Device.prefetch_source`): the modelled device only units held in the
node's DRAM cache, so a prefetch crosses this GPU's PCIe link and no link that another GPU's cold start
could share (the node's SSD and network); the cache's LRU order is left as it is. The real device reads
any unit from its files, on the device's own thread (`real.device`).

Pre-warms (`core.keepalive`): a keep-alive policy that expects a model soon has the GPU it last ran on
load it through the same path (`prewarm`): due pre-warms come before the policy's own choices, each
once, while the model is still expected; one may displace the evictable units of models that have
nothing queued and are not expected themselves. A system without a prefetch policy whose keep-alive
pre-warms gets a prefetcher with `NoPrefetch`, which loads nothing on its own. Pre-warmed bytes are
prefetched bytes in the accounting below.

Accounting, per GPU: `prefetched_bytes` (units whose load completed), `used_bytes` (of those, found
resident by a later cold start, which reuses them), `wasted_bytes` (evicted before any use, plus
`cancelled_bytes`, what cancelled units had moved) and `resident_bytes` (still resident and unused at
the end): prefetched = used + (wasted - cancelled) + resident. An eviction is noticed when it matters:
a prefetched unit that a cold start or a prefetch must load again, or that is gone at the end, was
evicted before use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import simpy

from tangram_sim.arena import Key, Region, State
from tangram_sim.core.memory import Ask, acquire, evict
from tangram_sim.policies.packing import PackingPlan
from tangram_sim.policies.prefetch import PrefetchCandidate, PrefetchChoice, PrefetchPolicy, ResidentGroup

if TYPE_CHECKING:
    from tangram_sim.core.worker import GpuWorker

PREFETCH_COLUMNS = ("prefetched_bytes", "prefetch_used_bytes", "prefetch_wasted_bytes",
                    "prefetch_cancelled_bytes", "prefetch_resident_bytes")


class _Spell:
    """One prefetch: from an idle GPU's first choice until nothing is left to do or a request came."""

    __slots__ = ("stop", "stopped", "done", "keys", "inflight", "version")

    def __init__(self, stop: simpy.Event) -> None:
        self.stop = stop  # fires when the spell is cancelled
        self.stopped = False
        self.done: set[str] = set()  # models prefetched in this spell
        self.keys: set[Key] = set()  # units it loaded: no later choice of the spell displaces them
        self.inflight: tuple[Key, int, Callable[[], float | None]] | None = None  # (key, bytes, cancel)
        self.version = -1  # the arena's version after the spell's own last change


class Prefetcher:
    """One GPU's prefetches and their accounting (see the module docstring)."""

    def __init__(self, worker: GpuWorker, policy: PrefetchPolicy) -> None:
        self.worker = worker
        self.policy = policy
        self.spell: _Spell | None = None  # the running prefetch
        self.unused: dict[Key, int] = {}  # prefetched units not yet used (or evicted, noticed lazily)
        self.prefetched_bytes = 0
        self.used_bytes = 0
        self.wasted_bytes = 0  # evicted before use, plus cancelled_bytes
        self.cancelled_bytes = 0
        self.due: list[str] = []  # models the keep-alive policy asked to pre-warm, oldest first

    def prewarm(self, model: str) -> None:
        """The keep-alive policy expects a request for `model` soon (`core.keepalive`): load its missing
        units first, now when the GPU is idle, else when it next is, while the model is still expected."""
        if model not in self.due:
            self.due.append(model)
        worker = self.worker
        # Only a GPU waiting in its idle branch prefetches (as when the worker calls `start`): not one
        # that prefills or decodes with an empty queue, nor one a tensor-parallel gang holds.
        if worker._wake is not None and worker._wake_any and worker.held_by is None:
            self.start()

    # ------------------------------------------------------------ hooks
    def observe(self, model: str, now: float) -> None:
        """A request for `model` was routed to this GPU."""
        self.policy.observe(model, now)

    def start(self) -> None:
        """The GPU has nothing queued: start a prefetch unless one runs or there is nothing to load."""
        if self.spell is not None or self.worker.queued:
            return
        spell = _Spell(self.worker.cluster.env.event())
        step = self._next(spell)
        if step is not None:
            self.spell = spell
            self.worker.cluster.env.process(self._run(spell, *step))

    def cancel(self) -> None:
        """A request came: stop now, the unit in flight cancelled and its region freed."""
        spell = self.spell
        if spell is None:
            return
        self.spell = None
        spell.stopped = True
        if spell.inflight is not None:
            key, nbytes, cancel = spell.inflight
            spell.inflight = None
            moved = cancel()
            if moved is None:  # its last byte had just arrived
                self._finished(spell, key, nbytes)
            else:
                self.worker.arena.release(key)
                self.cancelled_bytes += round(moved)
                self.wasted_bytes += round(moved)
                self._log("prefetch_cancelled", f"{key} moved={round(moved)}")
        if not spell.stop.triggered:
            spell.stop.succeed()

    def on_cold_start(self, missing: Iterable[tuple[Key, int]], reused: Iterable[Key]) -> None:
        """A cold start on this GPU loads `missing` and reuses `reused`."""
        unused = self.unused
        if not unused:
            return
        for key, _ in missing:  # prefetched, then evicted before any use
            if key in unused:
                self.wasted_bytes += unused.pop(key)
        for key in reused:
            if key in unused:
                self.used_bytes += unused.pop(key)

    def totals(self) -> dict[str, int]:
        """This GPU's counters (PREFETCH_COLUMNS), with the evictions not noticed yet counted as waste."""
        arena = self.worker.arena
        resident = sum(n for key, n in self.unused.items() if key in arena)
        gone = sum(self.unused.values()) - resident
        return dict(zip(PREFETCH_COLUMNS, (self.prefetched_bytes, self.used_bytes, self.wasted_bytes + gone,
                                           self.cancelled_bytes, resident)))

    # ------------------------------------------------------------ the prefetch
    def _next(self, spell: _Spell) -> tuple[str, PackingPlan, dict[Key, int]] | None:
        """The policy's next model and the plan of its units, or None."""
        worker = self.worker
        if worker.queued:
            return None
        c = worker.cluster
        arena, device, node = worker.arena, worker.device, worker.node
        now = c.env.now
        policy = self.policy
        values: dict[str, float] = {}

        def value(model: str) -> float:
            v = values.get(model)
            if v is None:
                v = values[model] = policy.value(model, now)
            return v

        evictable = [r for r in arena.evictable() if r.key not in spell.keys]
        grouped: dict[frozenset[str], int] = {}
        for r in evictable:
            grouped[r.owners] = grouped.get(r.owners, 0) + r.size
        groups = [ResidentGroup(owners, sum(value(m) for m in sorted(owners)), nbytes,
                                any(worker.queued_for(m) for m in owners))
                  for owners, nbytes in grouped.items()]
        while self.due:  # pre-warms first: the keep-alive policy expects these models now
            choice = self._prewarm_choice(spell, groups, now)
            if choice is None:
                break
            step = self._plan(spell, choice, evictable, now, prewarm=True)
            if step is not None:
                return step
        candidates = []
        for model, entry in c.entries.items():
            if entry.tp != 1 or model in spell.done or value(model) <= 0:
                continue
            missing = sum(aligned for key, aligned in zip(entry.rank_keys[0], entry.rank_aligned[0])
                          if key not in arena and device.prefetch_source(node, key))
            homes = c.scheduler.home_of(model)
            candidates.append(PrefetchCandidate(model, value(model), missing,
                                                None if homes is None else worker.gpu_id in homes,
                                                worker.queued_for(model) > 0))
        choice = policy.choose(candidates, arena.free_bytes, groups)
        if choice is None:
            return None
        step = self._plan(spell, choice, evictable, now)
        if step is None:
            self._log("prefetch_skipped", f"{choice.model} no room")
        return step

    def _prewarm_choice(self, spell: _Spell, groups: Sequence[ResidentGroup], now: float) -> PrefetchChoice | None:
        """The oldest due pre-warm still wanted, free to displace units of no expected and no queued
        model; None when there is none left (each is tried once)."""
        keep_alive = self.worker.cluster.keep_alive
        while self.due:
            model = self.due.pop(0)
            if model in spell.done or not keep_alive.wants(model, now):
                continue
            return PrefetchChoice(model, frozenset(
                g.owners for g in groups
                if not g.queued and model not in g.owners and keep_alive.displaceable(g.owners, now)))
        return None

    def _plan(self, spell: _Spell, choice: PrefetchChoice, evictable: Sequence[Region], now: float,
              prewarm: bool = False) -> tuple[str, PackingPlan, dict[Key, int]] | None:
        """The plan of `choice`'s missing units, or None (no room; for a pre-warm, nothing missing)."""
        worker = self.worker
        arena, device, node = worker.arena, worker.device, worker.node
        entry = worker.cluster.entries[choice.model]
        missing = [(key, n) for key, n in entry.rank_units[0]
                   if key not in arena and device.prefetch_source(node, key)]
        if prewarm and not missing:
            return None  # resident already: nothing to pre-warm
        for key, _ in missing:  # prefetched before, evicted since without a use
            if key in self.unused:
                self.wasted_bytes += self.unused.pop(key)
        # Ranked among the units this spell did not load (no later choice displaces them), evicting
        # only units of the owner sets the policy allows; the plan never moves resident data.
        plan = acquire(worker, Ask("prefetch", units=missing, aligned=sum(arena.align(n) for _, n in missing),
                                   owners=choice.evictable, candidates=evictable), now)
        if plan is None or not plan.placed:
            return None
        spell.version = arena.version
        return choice.model, plan, dict(missing)

    def _run(self, spell: _Spell, model: str, plan: PackingPlan, nbytes: dict[Key, int]):
        worker = self.worker
        arena, device, node = worker.arena, worker.device, worker.node
        owners = worker.cluster.unit_owners.__getitem__
        try:
            while True:
                self._log("prefetch_start", model)
                evictions = [(r.offset, r.offset + r.size, r.key) for r in arena.lookup_many(plan.evictions)]
                complete = True
                for key, offset, size in plan.placed:
                    if spell.stopped:
                        return
                    if arena.version != spell.version or not device.prefetch_source(node, key):
                        complete = False  # the arena or the host cache changed under the plan
                        break
                    end = offset + size
                    overlap = [e for e in evictions if e[0] < end and e[1] > offset]
                    if overlap:
                        evictions = [e for e in evictions if not (e[0] < end and e[1] > offset)]
                        self._evict(model, [k for _, _, k in overlap])
                    arena.place_many(((key, offset, size),), State.LOADING, owners)
                    event, cancel = device.prefetch_unit(key, nbytes[key])
                    spell.inflight = (key, nbytes[key], cancel)
                    spell.version = arena.version
                    self._log("prefetch_unit", str(key))
                    yield event | spell.stop
                    if spell.stopped:
                        return  # `cancel` did the books
                    spell.inflight = None
                    self._finished(spell, key, nbytes[key])
                if complete:
                    spell.done.add(model)
                    self._log("prefetch_done", model)
                step = self._next(spell)
                if step is None:
                    return
                model, plan, nbytes = step
        finally:
            if self.spell is spell:
                self.spell = None

    def _evict(self, model: str, keys: Sequence[Key]) -> None:
        """Evict retained units for the prefetch of `model` (the policy allowed their owner sets)."""
        evict(self.worker, keys, self.worker.cluster.env.now)

    def _finished(self, spell: _Spell, key: Key, nbytes: int) -> None:
        arena = self.worker.arena
        arena.finish_load_many((key,), pin=False)
        spell.version = arena.version
        spell.keys.add(key)
        self.unused[key] = nbytes
        self.prefetched_bytes += nbytes
        self._log("prefetch_loaded", str(key))

    def _log(self, kind: str, detail: str) -> None:
        c = self.worker.cluster
        c.recorder.log(c.env.now, self.worker.gpu_id, kind, -1, detail)


def prefetch_totals(workers: Iterable[GpuWorker]) -> dict[str, int] | None:
    """The cluster's prefetch counters (PREFETCH_COLUMNS summed over GPUs); None without prefetch."""
    totals = [w.prefetch.totals() for w in workers if w.prefetch is not None]
    if not totals:
        return None
    return {col: sum(t[col] for t in totals) for col in PREFETCH_COLUMNS}

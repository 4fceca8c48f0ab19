"""The SimPy cluster: GPU workers running instances, node storage tiers, and request routing.

Lifecycle of a request: arrival -> routing (an active instance of its model whose queue holds only
that model, else the system's scheduler places a new instance) -> the GPU's queue -> when its
model is not active there and it is the oldest queued request, a cold start (engine overhead, then
the packing plan: evictions, device-to-device moves, loads of the missing units through the storage
tiers) -> batched prefill (first token = TTFT) -> decode in a continuous batch, KV growing chunk by
chunk -> completion.

Each GPU runs one instance at a time and starts instances in FCFS order of the requests that need
them. Queued requests of the active model join its batch even past an older request of another
model, but only while that one has waited less than `fairness_window_s`; without this, interleaved
models would force a switch per request, and without the bound a hot model would starve the rest.
An idle instance stays active for `keep_alive_s` unless a request for another model is queued on its
GPU, which ends it at once. When an
instance ends, its weights are unpinned: retention systems keep them resident (evictable,
reusable); `none` retention frees them as ServerlessLLM does.

A model with `tensor_parallel: N` runs on an aligned group of N GPUs of one node: the first is the
leader (it queues the requests and runs the instance), the others are held by a gang barrier; each
GPU keeps its own 1/N shard of every unit in its own arena and loads it over its own PCIe link.
Members join a gang in request order, like every instance start, so gangs cannot deadlock.

Decode is simulated as a fluid: between events (arrival that can join, completion, KV growth) every
running sequence advances at one token per step, step time from the time model for the current
batch and KV size. This keeps events per request O(1) instead of O(output tokens).
"""

from __future__ import annotations

import math
import operator
import random
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import simpy

from tangram_sim.arena import Arena, Key, State
from tangram_sim.models.spec import ModelSpec
from tangram_sim.models.units import ReuseUnit
from tangram_sim.policies.kv import KvPolicy, KvPool, execute_kv_plan, kv_block_bytes, plan_kv
from tangram_sim.policies.lifecycle import ModelQueues, must_yield, preemption_victim
from tangram_sim.policies.packing import PackingPolicy, execute_plan
from tangram_sim.policies.retention import RetentionPolicy
from tangram_sim.policies.scheduler import PlacementOption, Scheduler
from tangram_sim.sim.hardware import GpuSpec, TierSpec
from tangram_sim.sim.links import Fabric, Link
from tangram_sim.sim.systems import SystemSpec
from tangram_sim.sim.timemodel import TimeModel

EPS_TOKENS = 1e-6
_key, _nbytes = operator.itemgetter(0), operator.itemgetter(1)  # of a (key, nbytes) unit


class Request:
    """One invocation and everything measured about it."""

    __slots__ = (
        "rid", "arrival", "model", "input_tokens", "output_tokens",
        "gpu", "cold", "queue_s", "load_s", "bytes_needed", "bytes_loaded", "bytes_reused",
        "bytes_moved", "bytes_evicted", "bytes_extra_evicted", "startup_s", "ttft_s", "e2e_s", "waited_for_kv_s", "preemptions", "outcome", "reason",
        "done_tokens", "kv_limit", "kv_bytes", "kv_keys", "kv_wait_since", "admitted_at", "gang", "slot_of",
    )

    def __init__(self, rid: int, arrival: float, model: str, input_tokens: int, output_tokens: int) -> None:
        self.rid = rid  # row in the trace
        self.arrival = arrival  # seconds
        self.model = model  # model name
        self.input_tokens = input_tokens  # prompt length
        self.output_tokens = output_tokens  # tokens to generate (>= 1; the first comes from prefill)
        self.gpu = -1  # GPU that served it (the leader of a tensor-parallel group)
        self.cold = False  # it started its instance (paid the load)
        self.queue_s = 0.0  # arrival -> start of its cold start or its admission to the batch
        self.load_s = 0.0  # cold start: evictions, compaction and weight loading (0 when warm)
        self.startup_s = 0.0  # cold start: engine overhead before weights load (0 when warm)
        self.bytes_needed = 0  # cold start: the model's bytes on the GPU(s)
        self.bytes_loaded = 0  # cold start: bytes that crossed PCIe
        self.bytes_reused = 0  # cold start: bytes already resident in the arena
        self.bytes_moved = 0  # cold start: bytes compaction copied device-to-device
        self.bytes_evicted = 0  # cold start: retained bytes its packing plan evicted
        self.bytes_extra_evicted = 0  # of those, evicted beyond the free-byte shortfall (fragmentation)
        self.ttft_s = math.nan  # arrival -> first token
        self.e2e_s = math.nan  # arrival -> last token
        self.waited_for_kv_s = 0.0  # time it could not be admitted for lack of KV memory
        self.preemptions = 0  # times it was evicted from the batch to free KV (recomputed later)
        self.outcome = ""  # "completed" or "rejected"
        self.reason = ""  # why rejected
        self.done_tokens = 0.0  # tokens generated so far (fluid)
        self.kv_limit = 0  # tokens whose KV is allocated
        self.kv_bytes = 0  # bytes of KV held
        self.kv_keys: list[tuple[Arena, Key]] = []  # arena regions of its KV (on-demand KV), all ranks
        self.kv_wait_since = -1.0  # when it first could not get KV (-1: not waiting)
        self.admitted_at = 0.0  # when it joined the batch
        self.gang: Gang | None = None  # tensor parallel: the GPUs that must start its instance together
        self.slot_of: Request | None = None  # set on a follower's placeholder for a gang's request


class Gang:
    """Barrier of a tensor-parallel instance start: every member GPU must be free first."""

    __slots__ = ("workers", "arrived", "ready", "released")

    def __init__(self, env: simpy.Environment, workers: tuple[GpuWorker, ...]) -> None:
        self.workers = workers  # leader first; rank = position
        self.arrived = 0  # members that have reached the barrier
        self.ready = env.event()  # all members are free: the cold start may begin
        self.released = env.event()  # the instance ended: followers go back to their own queues

    def arrive(self) -> None:
        self.arrived += 1
        if self.arrived == len(self.workers):
            self.ready.succeed()


@dataclass(slots=True)
class ModelEntry:
    spec: ModelSpec  # inventory and sizes
    units: tuple[ReuseUnit, ...]  # reuse units at the system's granularity
    tp: int  # tensor-parallel degree: GPUs per instance
    rank_keys: tuple[tuple[Key, ...], ...]  # per rank: the keys of its unit shards
    rank_bytes: tuple[tuple[int, ...], ...]  # per rank: shard sizes (1/tp of each unit, rounded up)
    rank_aligned: tuple[tuple[int, ...], ...]  # per rank: shard sizes in the arena (aligned)
    nbytes: int  # total bytes over all ranks
    sensitivity: float  # retention weight from the experiment
    # per rank: (key, shard bytes) of each unit, made once so that a cold start that misses every
    # unit passes it on instead of rebuilding it unit by unit
    rank_units: tuple[tuple[tuple[Key, int], ...], ...] = field(init=False)

    def __post_init__(self) -> None:
        self.rank_units = tuple(tuple(zip(k, n)) for k, n in zip(self.rank_keys, self.rank_bytes))

    @property
    def unit_keys(self) -> tuple[Key, ...]:
        """Every key of the model, all ranks."""
        return tuple(k for keys in self.rank_keys for k in keys)


class Node:
    """Host side of a machine: a pinned DRAM checkpoint cache (LRU over units), SSD and network."""

    def __init__(self, node_id: int, tiers: TierSpec, key_owners: dict[Key, tuple[str, ...]]) -> None:
        self.node_id = node_id
        self.tiers = tiers
        self.key_owners = key_owners  # unit key -> models whose weights include it
        self.ssd = Link(f"node{node_id}.ssd", tiers.ssd_bps)
        self.network = Link(f"node{node_id}.net", tiers.network_bps)
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

    def holds(self, entry: ModelEntry, model: str) -> bool:
        """The whole checkpoint of `model` is in this node's DRAM cache."""
        return self.cached_by_model.get(model, 0) >= entry.nbytes


class Instance:
    __slots__ = ("model", "entry", "running", "pool", "pool_keys", "started", "group", "gang")

    def __init__(self, model: str, entry: ModelEntry, started: float, group: tuple[GpuWorker, ...],
                 gang: Gang | None) -> None:
        self.model = model  # model it serves
        self.entry = entry  # its units
        self.running: list[Request] = []  # the continuous batch, in admission order
        self.pool: KvPool | None = None  # static KV reservation per rank (None with on-demand KV)
        self.pool_keys: list[tuple[Arena, Key]] = []  # arena regions holding that reservation
        self.started = started  # sim time the cold start began
        self.group = group  # GPUs it runs on, leader first (rank = position)
        self.gang = gang  # barrier the followers wait on (None for one GPU)


class Recorder:
    """Event log (optional) and memory timeline samples; tests assert on the log."""

    def __init__(self, record_events: bool, sample_interval_s: float, check_invariants: bool) -> None:
        self.events: list[tuple[float, int, str, int, str]] | None = [] if record_events else None
        self.timeline: list[tuple] = []
        self.sample_interval_s = sample_interval_s
        self.check_invariants = check_invariants
        self.samples_checked = 0

    def log(self, now: float, gpu: int, kind: str, rid: int = -1, detail: str = "") -> None:
        if self.events is not None:
            self.events.append((now, gpu, kind, rid, detail))


class GpuWorker:
    """One GPU: its arena, FCFS queue and the instance it runs; `run` is its SimPy process."""

    def __init__(self, cluster: Cluster, gpu_id: int, node: Node) -> None:
        self.cluster = cluster
        self.gpu_id = gpu_id
        self.node = node
        self.arena = Arena(cluster.gpu.memory_bytes, alignment=cluster.alignment)
        self.pcie = Link(f"gpu{gpu_id}.pcie", cluster.gpu.pcie_bps)
        self.queues: ModelQueues[Request] = ModelQueues()  # per model, each in arrival order
        self.instance: Instance | None = None
        self.retention: RetentionPolicy = cluster.make_retention()
        self.busy_until = 0.0  # scheduler's estimate of when queued work ends
        self.tail_model: str | None = None  # model of the last queued request (for estimates)
        self._wake: simpy.Event | None = None
        self._wake_any = False  # idle: any arrival wakes; decoding: only an admissible one
        self.held_by: GpuWorker | None = None  # leader of the tensor-parallel gang holding this GPU
        self.busy_s = 0.0  # time spent loading, prefilling or decoding
        self.compaction_bytes = 0
        self.cold_starts = 0
        self._last_sample = -math.inf

    # ------------------------------------------------------------ routing support
    def submit(self, req: Request) -> None:
        self.queues.push(req)
        c = self.cluster
        now = c.env.now
        real = req if req.slot_of is None else req.slot_of
        est = c.service_estimate(real, cold=self.tail_model != req.model, worker=self)
        self.busy_until = max(self.busy_until, now) + est
        self.tail_model = req.model
        if self.held_by is not None:
            self.held_by.wake_if_idle()  # its instance must end so that this GPU can serve
        wake = self._wake
        if wake is not None and not wake.triggered:
            inst = self.instance
            if self._wake_any or (
                inst is not None and inst.model == req.model and len(inst.running) < c.system.max_batch
            ):
                wake.succeed()

    def wake_if_idle(self) -> None:
        wake = self._wake
        if wake is not None and not wake.triggered and self._wake_any:
            wake.succeed()

    def resident_bytes(self, model: str) -> int:
        return self.arena.model_bytes(model)

    def queued_for(self, model: str) -> int:
        return self.queues.count_for(model)

    @property
    def queued(self) -> int:
        """Requests in all of this GPU's queues."""
        return self.queues.count

    def _dequeue(self, model: str) -> Request:
        req = self.queues.pop(model)
        if not self.queues.count:
            self.tail_model = self.instance.model if self.instance is not None else None
        return req

    # ------------------------------------------------------------ the process
    def _followers_waiting(self) -> bool:
        inst = self.instance
        # (a one-GPU group, the common case, has no followers: no generator to build)
        return inst is not None and len(inst.group) > 1 and any(w.queued for w in inst.group[1:])

    def run(self):
        env = self.cluster.env
        while True:
            if not self.queued:
                if self._followers_waiting():  # a gang member has its own work: free the group
                    self._end_instance()
                    continue
                self._wake = env.event()
                self._wake_any = True
                if self.instance is None:
                    yield self._wake
                else:
                    timer = env.timeout(self.cluster.system.keep_alive_s)
                    yield self._wake | timer
                    if not self.queued and not self._followers_waiting():
                        self.cluster.recorder.log(env.now, self.gpu_id, "keep_alive_expired", -1,
                                                  self.instance.model)
                        self._end_instance()
                self._wake = None
                continue
            head = self.queues.head()  # FCFS order of instance starts
            assert head is not None
            if head.slot_of is not None:  # a tensor-parallel instance needs this GPU as a follower
                self._dequeue(head.model)
                if self.instance is not None:
                    self._end_instance()
                gang = head.slot_of.gang
                self.held_by = gang.workers[0]
                self.cluster.recorder.log(env.now, self.gpu_id, "gang_join", head.rid, head.model)
                gang.arrive()
                yield gang.released
                self.held_by = None
                continue
            if self.instance is None or self.instance.model != head.model:
                if self.instance is not None:
                    self._end_instance()
                    continue  # ending a gang instance may have re-placed queued requests
                if head.gang is not None:
                    head.gang.arrive()
                    yield head.gang.ready
                yield from self._cold_start(head)
            yield from self._serve()
            if self.instance is not None and self._followers_waiting():
                self._end_instance()  # the batch drained and gang members have their own work

    # ------------------------------------------------------------ instance start / end
    def _cold_start(self, head: Request):
        """Start `head`'s instance on this GPU (or its gang): plan, evict, move, load, pin."""
        c = self.cluster
        env = c.env
        entry = c.entries[head.model]
        t0 = env.now
        group = head.gang.workers if head.gang is not None else (self,)
        head.cold = True
        head.queue_s = t0 - head.arrival
        head.gpu = self.gpu_id
        self.instance = Instance(head.model, entry, t0, group, head.gang)
        c.warm_workers.setdefault(head.model, set()).add(self)
        self.cold_starts += 1
        c.recorder.log(t0, self.gpu_id, "cold_start", head.rid, head.model)

        loads: list[tuple[GpuWorker, list[tuple[Key, int]]]] = []
        reused = loaded = moved = evicted = extra = 0
        copy_s = 0.0
        for rank, worker in enumerate(group):
            missing, rank_loaded, reused_keys, plan = worker._plan_rank(entry, rank, head.model, t0)
            worker.retention.on_evict_many(plan.evictions, t0)
            execute_plan(worker.arena, plan, owners=c.unit_owners.__getitem__)
            worker.arena.pin_many(reused_keys)
            loaded += rank_loaded
            reused += sum(entry.rank_bytes[rank]) - rank_loaded
            moved += plan.moved_bytes
            evicted += plan.evicted_bytes
            extra += plan.extra_evicted_bytes
            worker.compaction_bytes += plan.moved_bytes
            # Ranks copy and load in parallel; the slowest one sets the pace.
            copy_s = max(copy_s, plan.moved_bytes / c.d2d_bps + c.unit_overhead_s * len(missing))
            loads.append((worker, missing))
        head.bytes_needed = entry.nbytes
        head.bytes_reused = reused
        head.bytes_loaded = loaded
        head.bytes_moved = moved
        head.bytes_evicted = evicted
        head.bytes_extra_evicted = extra

        # Time: engine start, then compaction copies, then the loads through the tiers.
        if c.engine_overhead_s:
            yield env.timeout(c.engine_overhead_s)
        t_load = env.now
        if copy_s:
            yield env.timeout(copy_s)
        transfers = [ev for worker, missing in loads if missing for ev in worker._transfers(missing)]
        if transfers:
            yield env.all_of(transfers)
        for worker, missing in loads:
            worker._after_load(missing)
        head.startup_s = t_load - t0
        head.load_s = env.now - t_load
        self.busy_s += env.now - t0
        c.recorder.log(env.now, self.gpu_id, "loaded", head.rid,
                       f"loaded={loaded} reused={reused} moved={moved} evicted={evicted}")
        if not c.kv.on_demand:
            self._reserve_static_kv()
        for worker in group:
            worker.sample()

    def _plan_rank(self, entry: ModelEntry, rank: int, model: str, now: float):
        """This GPU's part of a cold start: the missing shards and their bytes, the reused ones, and
        the plan."""
        arena = self.arena
        packing = self.cluster.packing
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
            order = self.retention.eviction_order(arena.evictable(), now)
            if reused_keys:
                protected = set(reused_keys)  # reused units may move but must stay
                order = [k for k in order if k not in protected]
            plan = packing.plan(arena, missing, order)
        if plan is None:  # cannot happen for models validated to fit; never hang on it
            raise RuntimeError(f"gpu {self.gpu_id}: no packing plan for {model}")
        return missing, missing_bytes, reused_keys, plan

    def _transfers(self, missing: Sequence[tuple[Key, int]]) -> list[simpy.Event]:
        """Missing units stream host->GPU; those not in the DRAM cache come from SSD or remote first."""
        node = self.node
        cache, on_ssd, ssd_holds_all = node.cache, node.on_ssd, node.tiers.ssd_holds_all
        from_dram = from_ssd = from_remote = 0
        for key, nbytes in missing:
            if key in cache:
                from_dram += nbytes
                cache.move_to_end(key)
            elif ssd_holds_all or key in on_ssd:
                from_ssd += nbytes
            else:
                from_remote += nbytes
        fabric = self.cluster.fabric
        events = []
        if from_dram:
            events.append(fabric.transfer(from_dram, (self.pcie,)))
        if from_ssd:
            events.append(fabric.transfer(from_ssd, (node.ssd, self.pcie)))
        if from_remote:
            events.append(fabric.transfer(from_remote, (node.network, self.pcie)))
        return events

    def _after_load(self, missing: Sequence[tuple[Key, int]]) -> None:
        node = self.node
        if not node.tiers.ssd_holds_all:
            node.on_ssd.update(map(_key, missing))
        node.cache_insert_many(missing)
        self.arena.finish_load_many(map(_key, missing), pin=True)

    def _reserve_static_kv(self) -> None:
        """vLLM-style: reserve `fraction` of memory minus weights for KV when the instance starts."""
        c = self.cluster
        inst = self.instance
        block = c.block_bytes[inst.model]
        plans = []
        for rank, worker in enumerate(inst.group):
            arena = worker.arena
            weights = sum(inst.entry.rank_aligned[rank])
            want = c.kv.reservation_bytes(arena.capacity, weights)
            if want < arena.capacity - weights - want:
                # The fraction leaves less KV than it leaves unused (a model near the GPU's size): like
                # raising vLLM's gpu_memory_utilization, reserve everything the weights leave.
                want = arena.capacity - weights
            want -= want % block
            plan = plan_kv(arena, want, block, ())
            if plan.must_wait:
                plan = plan_kv(arena, want, block, worker.retention.eviction_order(arena.evictable(), c.env.now))
            if plan.must_wait:  # fragmentation: take the whole blocks the holes hold
                fits = sum(r.size - r.size % block for r in arena.free_regions())
                plan = plan_kv(arena, fits, block, ())
            plans.append((worker, plan))
        capacity = min(plan.nbytes for _, plan in plans)  # ranks hold equal shards of every block
        for worker, plan in plans:
            worker.retention.on_evict_many(plan.evictions, c.env.now)
            keys = execute_kv_plan(worker.arena, plan, ("pool", worker.gpu_id, inst.started))
            inst.pool_keys += [(worker.arena, key) for key in keys]
        inst.pool = KvPool(capacity=capacity)

    def _end_instance(self) -> None:
        inst = self.instance
        assert inst is not None and not inst.running
        c = self.cluster
        for arena, key in inst.pool_keys:
            arena.release(key)
        for rank, worker in enumerate(inst.group):
            unpinned = worker.arena.unpin_many(inst.entry.rank_keys[rank])
            if not worker.retention.retains:
                worker.arena.evict_many(unpinned)
        c.warm_workers[inst.model].discard(self)
        c.recorder.log(c.env.now, self.gpu_id, "instance_end", -1, inst.model)
        self.instance = None
        for worker in inst.group:
            worker.sample()
        if inst.gang is not None:
            if not inst.gang.released.triggered:
                inst.gang.released.succeed()
            # Requests routed to the running instance need a new group: place them again, in order.
            while self.queues.count_for(inst.model):
                c.route(self._dequeue(inst.model), replace=True)

    # ------------------------------------------------------------ KV
    def _kv_take(self, req: Request, tokens: int) -> bool:
        """Grow `req`'s KV to cover `tokens` on every rank; False when the memory is not there."""
        c = self.cluster
        inst = self.instance
        block_tokens = c.system.kv_block_tokens
        blocks_now = req.kv_limit // block_tokens
        blocks_new = -(-tokens // block_tokens)
        if blocks_new <= blocks_now:
            return True
        block = c.block_bytes[inst.model]
        nbytes = (blocks_new - blocks_now) * block
        if inst.pool is not None:
            if not inst.pool.can_take(nbytes):
                return False
            inst.pool.take(nbytes)
        else:
            now = c.env.now
            plans = []
            for worker in inst.group:  # plan every rank first: all or nothing
                arena = worker.arena
                plan = plan_kv(arena, nbytes, block, ())
                if plan.must_wait:
                    plan = plan_kv(arena, nbytes, block, worker.retention.eviction_order(arena.evictable(), now))
                    if plan.must_wait:
                        return False
                plans.append((worker, plan))
            for worker, plan in plans:
                worker.retention.on_evict_many(plan.evictions, now)
                keys = execute_kv_plan(worker.arena, plan, ("kv", req.rid), first_index=len(req.kv_keys))
                req.kv_keys += [(worker.arena, key) for key in keys]
        req.kv_bytes += nbytes
        req.kv_limit = blocks_new * block_tokens
        return True

    def _kv_free(self, req: Request) -> None:
        inst = self.instance
        if inst.pool is not None:
            inst.pool.give_back(req.kv_bytes)
        else:
            for arena, key in req.kv_keys:
                arena.release(key)
        req.kv_keys = []
        req.kv_bytes = 0
        req.kv_limit = 0

    def _want_tokens(self, req: Request, extra: int) -> int:
        """KV tokens to hold: prompt + generated + one growth chunk, never past what it will need."""
        need = req.input_tokens + req.output_tokens
        have = req.input_tokens + int(req.done_tokens + EPS_TOKENS)
        chunk = self.cluster.system.kv_block_tokens * self.cluster.system.kv_chunk_blocks
        return min(need, have + extra if extra else have + chunk)

    # ------------------------------------------------------------ serving
    def _serve(self):
        """Run the continuous batch of the active instance until it drains and cannot admit more."""
        c = self.cluster
        env = c.env
        system = c.system
        inst = self.instance
        spec = inst.entry.spec
        tm = c.time_model
        tp = len(inst.group)
        running = inst.running
        while True:
            # Admit our queued requests in order while the batch, KV memory and fairness allow.
            admitted: list[Request] = []
            queues = self.queues
            while len(running) + len(admitted) < system.max_batch:
                req = queues.first(inst.model)
                if req is None:
                    break
                if must_yield(self._blocker(inst), req, env.now, system.fairness_window_s):
                    break  # an older request of another model has waited long enough
                if not self._kv_take(req, self._want_tokens(req, 0)):
                    if not running and not admitted:
                        self._dequeue(inst.model)
                        self._reject(req, "kv-capacity")
                        continue
                    if req.kv_wait_since < 0:
                        req.kv_wait_since = env.now
                    break
                self._dequeue(inst.model)
                if req.gang is not None and req.gang is not inst.gang:
                    # placed on this group as a new instance, but the instance is already up
                    if not req.gang.released.triggered:
                        req.gang.released.succeed()  # followers skip the barrier that never fills
                    req.gang = None
                if req.kv_wait_since >= 0:
                    req.waited_for_kv_s += env.now - req.kv_wait_since
                    req.kv_wait_since = -1.0
                if not req.cold:
                    req.queue_s = env.now - req.arrival
                    req.gpu = self.gpu_id
                req.admitted_at = env.now
                admitted.append(req)
            if admitted:
                # One prefill iteration for the whole admission, or `prefill_batch` requests at a time
                # (each group pays the per-iteration base cost and gets its first tokens at its end).
                group = system.prefill_batch or len(admitted)
                for first in range(0, len(admitted), group):
                    batch = admitted[first : first + group]
                    dt = tm.prefill_s(spec, sum(r.input_tokens for r in batch), tp)
                    yield env.timeout(dt)
                    self.busy_s += dt
                    now = env.now
                    for req in batch:
                        req.done_tokens = 1.0
                        if math.isnan(req.ttft_s):  # a preempted request keeps its first TTFT
                            req.ttft_s = now - req.arrival
                        c.recorder.log(now, self.gpu_id, "first_token", req.rid, "")
                        if req.output_tokens <= 1:
                            self._complete(req)
                        else:
                            running.append(req)
                continue
            if not running:
                return
            # Decode until the next completion or KV growth point, or an admissible arrival.
            kv_tokens = 0.0
            horizon = math.inf
            for req in running:
                kv_tokens += req.input_tokens + req.done_tokens
                left = min(req.output_tokens, req.kv_limit - req.input_tokens) - req.done_tokens
                if left < horizon:
                    horizon = left
            horizon = max(horizon, 0.0)
            step = tm.decode_step_s(spec, len(running), kv_tokens, tp)
            start = env.now
            can_join = len(running) < system.max_batch
            if can_join:
                self._wake = env.event()
                self._wake_any = False
                yield self._wake | env.timeout(horizon * step)
                self._wake = None
            else:
                yield env.timeout(horizon * step)
            elapsed = env.now - start
            self.busy_s += elapsed
            progressed = min(horizon, elapsed / step) if step > 0 else horizon
            for req in running:
                req.done_tokens += progressed
            # Completions first (they free KV), then growth.
            still: list[Request] = []
            for req in running:
                if req.done_tokens >= req.output_tokens - EPS_TOKENS:
                    self._complete(req)
                else:
                    still.append(req)
            running[:] = still
            for req in list(running):
                if req not in running:
                    continue  # preempted while growing another request
                if req.input_tokens + req.done_tokens < req.kv_limit - EPS_TOKENS:
                    continue
                while not self._kv_take(req, self._want_tokens(req, 0)):
                    victim = preemption_victim(running, growing=req)
                    if victim is None:  # alone and still too large
                        running.remove(req)
                        self._reject(req, "kv-capacity")
                        break
                    self._preempt(victim)

    def _blocker(self, inst: Instance) -> Request | None:
        """The oldest request waiting on this instance's GPUs for something else than it."""
        best = None
        for worker in inst.group:
            oldest = worker.queues.head(exclude=inst.model if worker is self else None)
            if oldest is not None and (best is None or oldest.rid < best.rid):
                best = oldest
        return best

    def _preempt(self, req: Request) -> None:
        """Free a running request's KV and put it back at the queue head; it recomputes later."""
        self.instance.running.remove(req)
        self._kv_free(req)
        req.preemptions += 1
        req.done_tokens = 0.0
        self.queues.push_front(req)
        self.cluster.recorder.log(self.cluster.env.now, self.gpu_id, "preempted", req.rid, "")

    def _complete(self, req: Request) -> None:
        now = self.cluster.env.now
        self._kv_free(req)
        req.e2e_s = now - req.arrival
        req.outcome = "completed"
        self.cluster.finished += 1
        self.cluster.recorder.log(now, self.gpu_id, "completed", req.rid, "")
        self.sample()

    def _reject(self, req: Request, reason: str) -> None:
        if req.kv_bytes:
            self._kv_free(req)
        req.outcome = "rejected"
        req.reason = reason
        req.gpu = self.gpu_id
        self.cluster.finished += 1
        self.cluster.recorder.log(self.cluster.env.now, self.gpu_id, "rejected", req.rid, reason)

    # ------------------------------------------------------------ timeline
    def _active_model(self) -> str:
        """Model this GPU runs, as leader or as a held member of a tensor-parallel gang."""
        inst = self.instance
        if inst is None and self.held_by is not None:
            inst = self.held_by.instance
        return inst.model if inst is not None else ""

    def sample(self, force: bool = False) -> None:
        rec = self.cluster.recorder
        now = self.cluster.env.now
        if not force and now - self._last_sample < rec.sample_interval_s:
            return
        self._last_sample = now
        arena = self.arena
        if rec.check_invariants:
            arena.check_invariants()
            rec.samples_checked += 1
        pinned = 0
        resident_state = State.RESIDENT
        for region in arena.regions():
            if region.pin_count and region.state is resident_state:
                pinned += region.size
        resident = arena.bytes_in(State.RESIDENT)
        rec.timeline.append((
            now, self.gpu_id, self._active_model(),
            pinned, resident - pinned, arena.bytes_in(State.KV), arena.bytes_in(State.LOADING),
            arena.free_bytes, arena.largest_free(), arena.fragmentation(),
        ))


class Cluster:
    """Nodes x GPUs, the shared fabric, the system's policies, and the routing of arrivals."""

    def __init__(
        self,
        env: simpy.Environment,
        *,
        nodes: int,
        gpus_per_node: int,
        gpu: GpuSpec,
        tiers: TierSpec,
        system: SystemSpec,
        entries: dict[str, ModelEntry],
        time_model: TimeModel,
        make_retention: Callable[[], RetentionPolicy],
        packing: PackingPolicy,
        kv: KvPolicy,
        scheduler: Scheduler,
        rng: random.Random,
        recorder: Recorder,
        engine_overhead_s: float,
        unit_overhead_s: float,
        d2d_bps: float,
        alignment: int = 512,
    ) -> None:
        self.env = env
        self.gpu = gpu
        self.system = system
        self.entries = entries
        self.time_model = time_model
        self.make_retention = make_retention
        self.packing = packing
        self.kv = kv
        self.scheduler = scheduler
        self.rng = rng
        self.recorder = recorder
        self.engine_overhead_s = engine_overhead_s
        self.unit_overhead_s = unit_overhead_s
        self.d2d_bps = d2d_bps
        self.alignment = alignment
        self.fabric = Fabric(env)
        # KV of a tensor-parallel model is split by heads: each rank holds 1/tp of every block.
        self.block_bytes = {
            name: kv_block_bytes(-(-e.spec.kv_bytes_per_token // e.tp), system.kv_block_tokens)
            for name, e in entries.items()
        }
        self.gpus_per_node = gpus_per_node
        self._groups: dict[int, list[tuple[GpuWorker, ...]]] = {}
        self.key_owners: dict[Key, tuple[str, ...]] = {}
        for name, entry in entries.items():
            for key in entry.unit_keys:
                self.key_owners[key] = (*self.key_owners.get(key, ()), name)
        # The same owner sets as frozensets, one per distinct set: every arena region of a unit shares it.
        interned: dict[tuple[str, ...], frozenset[str]] = {}
        self.unit_owners: dict[Key, frozenset[str]] = {
            key: interned.setdefault(owners, frozenset(owners)) for key, owners in self.key_owners.items()
        }
        self.nodes = [Node(n, tiers, self.key_owners) for n in range(nodes)]
        self.workers = [
            GpuWorker(self, n * gpus_per_node + g, self.nodes[n]) for n in range(nodes) for g in range(gpus_per_node)
        ]
        self.warm_workers: dict[str, set[GpuWorker]] = {}
        self.finished = 0
        self._estimates: dict[tuple[str, int, int], float] = {}
        for w in self.workers:
            env.process(w.run())

    def service_estimate(self, req: Request, cold: bool, worker: GpuWorker) -> float:
        """Rough busy time a request adds to a GPU, for queue-wait estimates (not the simulation)."""
        key = (req.model, req.input_tokens, req.output_tokens)
        est = self._estimates.get(key)
        if est is None:
            spec = self.entries[req.model].spec
            tm = self.time_model
            est = tm.prefill_s(spec, req.input_tokens) + (req.output_tokens - 1) * tm.decode_step_s(
                spec, 1, req.input_tokens
            )
            if len(self._estimates) < 200_000:
                self._estimates[key] = est
        if cold:
            entry = self.entries[req.model]
            missing = entry.nbytes - worker.resident_bytes(req.model)
            est += self.engine_overhead_s + missing / worker.pcie.bps
        return est

    def route(self, req: Request, replace: bool = False) -> None:
        """Warm instance with a clean queue if any, else the scheduler's choice (a GPU or a gang)."""
        entry = self.entries[req.model]
        best = None
        best_load = 0
        for w in self.warm_workers.get(req.model, ()):
            queued = w.queued
            if w.queued_for(req.model) != queued or w._followers_waiting():
                continue  # another model waits there: the request would queue behind a switch
            load = queued + len(w.instance.running)
            if best is None or load < best_load or (load == best_load and w.gpu_id < best.gpu_id):
                best, best_load = w, load
        if best is not None and best_load < self.system.max_batch:
            group = best.instance.group
        else:
            options = self.placement_options(req)
            choice = self.scheduler.choose(req.model, options, self.rng)
            group = tuple(self.workers[g] for g in options[choice].gpus)
            best = group[0]
            if entry.tp > 1:
                req.gang = Gang(self.env, group)
        self.recorder.log(self.env.now, best.gpu_id, "rerouted" if replace else "routed", req.rid, req.model)
        if not replace:
            now = self.env.now
            for rank, worker in enumerate(group):
                worker.retention.record_access(req.model, entry.rank_keys[rank], now)
        best.submit(req)
        if req.gang is not None:
            for follower in group[1:]:
                slot = Request(req.rid, req.arrival, req.model, 0, 0)
                slot.slot_of = req
                follower.submit(slot)

    def placement_groups(self, tp: int) -> list[tuple[GpuWorker, ...]]:
        """Aligned groups of `tp` GPUs inside one node (a GPU always has the same rank in them)."""
        groups = self._groups.get(tp)
        if groups is None:
            groups = []
            for node in range(len(self.nodes)):
                first = node * self.gpus_per_node
                for start in range(0, self.gpus_per_node - tp + 1, tp):
                    groups.append(tuple(self.workers[first + start + r] for r in range(tp)))
            self._groups[tp] = groups
        return groups

    def placement_options(self, req: Request) -> list[PlacementOption]:
        entry = self.entries[req.model]
        now = self.env.now
        tp = entry.tp
        prefill = self.time_model.prefill_s(entry.spec, req.input_tokens, tp)
        options = []
        in_cache: dict[int, bool] = {}
        for group in self.placement_groups(tp):
            node = group[0].node
            if node.node_id not in in_cache:
                in_cache[node.node_id] = node.holds(entry, req.model)
            options.append(
                PlacementOption(
                    gpus=tuple(w.gpu_id for w in group),
                    node=node.node_id,
                    queue_wait_s=max(0.0, max(w.busy_until for w in group) - now),
                    free_bytes=min(w.arena.free_bytes for w in group),
                    resident_bytes=sum(w.resident_bytes(req.model) for w in group),
                    model_bytes=entry.nbytes,
                    in_host_cache=in_cache[node.node_id],
                    # ranks load their shards in parallel, each over its own link
                    host_to_gpu_bps=group[0].pcie.bps * tp,
                    storage_bps=node.ssd.bps if node.tiers.ssd_holds_all else node.network.bps,
                    prefill_s=prefill,
                    load_overhead_s=self.engine_overhead_s,
                )
            )
        return options

"""A cold start, sequenced: plan every rank's units, book the plan, hand it to the device, book units
resident as they land.

`cold_start` is driven by the worker (`core.worker`) with `yield from`. It plans each rank's units
(`core.loadplan`: a packing plan over the arena from the one memory entry point, `core.memory`,
evicting in retention order only when free bytes are short), books the plan in the arena
(`core.memory.commit`, which also tells retention of the evictions; the missing units are then LOADING),
then has the device run it (`Device.start_instance`). The device calls back as units land and each unit
is booked resident (and pinned for the instance) at that moment, with its node's DRAM cache told:
the modelled device lands a serial start's units when its last transfer ends (the loader hands the
weights over as a whole), an execute-while-load start's one by one as their bytes arrive; the real
device a serial start's all of them when its start returns, an execute-while-load start's as its
backend notes each layer's reads done (`real.landing`).

A serial start returns when the engine serves. An execute-while-load start returns as soon as the engine
may compute (its stages that gate compute are done: `core.startup`), the weights still landing: the
instance then carries the device's `LayerProgress` (`Instance.loading`), which its first prefill
consumes (`core.device.pipeline`), and the load's figures (`load_s`, the `loaded` event, the first
layer's time) are recorded when the last unit lands. The worker never ends such an instance before
that (`settle`).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING

from tangram_sim.arena import Key
from tangram_sim.core.device import LayerProgress, RankLoad
from tangram_sim.core.kvbook import reserve_static_kv
from tangram_sim.core.loadplan import plan_rank, plan_units
from tangram_sim.core.memory import commit
from tangram_sim.core.pipeline import consolidate, merge
from tangram_sim.core.records import Gang, ModelEntry, Request, Stages
from tangram_sim.policies.kv import KvPool
from tangram_sim.policies.packing import Move

if TYPE_CHECKING:
    from tangram_sim.core.worker import GpuWorker

# of a (key, nbytes) unit; C-level, so that per-unit loops of a cold start cost no Python call per unit
_key = operator.itemgetter(0)


class Instance:
    __slots__ = ("model", "entry", "running", "pool", "pool_keys", "started", "group", "gang", "head", "loading",
                 "tp", "kv_group", "rank_keys", "stages")

    def __init__(self, model: str, entry: ModelEntry, started: float, group: tuple[GpuWorker, ...],
                 gang: Gang | None, head: Request) -> None:
        stages = gang.stages if gang is not None else None
        self.model = model  # model it serves
        self.entry = entry  # its units
        self.running: list[Request] = []  # the continuous batch, in admission order
        self.pool: KvPool | None = None  # static KV reservation per rank (None with on-demand KV)
        self.pool_keys: list[tuple[GpuWorker, Key]] = []  # arena regions holding that reservation
        self.started = started  # time the cold start began
        self.group = group  # GPUs it runs on, leader first (rank = position)
        self.gang = gang  # barrier the followers wait on (None for one GPU)
        self.head = head  # request that started it: admitted first, whatever the fairness rule says
        self.loading: LayerProgress | None = None  # execute-while-load: its weights still landing
        # pipelined (`core.pipeline`): its stages until it consolidates onto the leader; None otherwise
        self.stages: Stages | None = stages
        self.tp = entry.tp  # tensor-parallel degree the time model computes with (1 for a pipeline)
        # GPUs holding its KV: every rank of a tensor-parallel group; a pipeline's leader alone (the whole
        # model's KV is booked there from the start, the room it needs once consolidated)
        self.kv_group = group if stages is None else group[:1]
        # per rank (position in `group`): the keys of the units it holds pinned while the instance runs
        self.rank_keys: tuple[tuple[Key, ...], ...] = entry.rank_keys if stages is None else stages.rank_keys


def cold_start(worker: GpuWorker, head: Request, gang: Gang | None):
    """Start `head`'s instance on `worker`'s GPU (or its gang): plan, evict, move, load, pin."""
    c = worker.cluster
    env = c.env
    entry = c.entries[head.model]
    t0 = env.now
    group = gang.workers if gang is not None else (worker,)
    head.cold = True
    head.queue_s = t0 - head.arrival
    head.gpu = worker.gpu_id
    inst = worker.instance = Instance(head.model, entry, t0, group, gang, head)
    c.warm_workers.setdefault(head.model, set()).add(worker)
    worker.cold_starts += 1
    c.recorder.log(t0, worker.gpu_id, "cold_start", head.rid, head.model)

    loads: list[RankLoad] = []
    reused = loaded = moved = evicted = extra = 0
    stages = inst.stages
    for rank, member in enumerate(group):
        if stages is None:
            missing, rank_loaded, reused_keys, plan = plan_rank(member, entry, rank, head.model, t0)
        else:
            missing, rank_loaded, reused_keys, plan = plan_units(
                member, stages.rank_keys[rank], stages.rank_units[rank], stages.rank_aligned[rank], head.model, t0)
        if member.prefetch is not None:
            member.prefetch.on_cold_start(missing, reused_keys)
        moves: list[Move] = []
        commit(member, plan, t0, on_move=moves.append if plan.moved_bytes else None)
        member.arena.pin_many(reused_keys)
        loaded += rank_loaded
        reused += (sum(entry.rank_bytes[rank]) if stages is None else stages.rank_bytes[rank]) - rank_loaded
        moved += plan.moved_bytes
        evicted += plan.evicted_bytes
        extra += plan.extra_evicted_bytes
        member.compaction_bytes += plan.moved_bytes
        loads.append(RankLoad(member, missing, moves, plan.moved_bytes))
    head.bytes_needed = entry.nbytes if stages is None else sum(stages.rank_bytes)  # a tied table twice
    head.bytes_reused = reused
    head.bytes_loaded = loaded
    head.bytes_moved = moved
    head.bytes_evicted = evicted
    head.bytes_extra_evicted = extra
    first_landing: list[float] = []

    def landed(load: RankLoad, units: Sequence[tuple[Key, int]]) -> None:
        load.worker.node.after_load(units)
        load.worker.arena.finish_load_many(map(_key, units), pin=True)
        if not first_landing:
            first_landing.append(env.now)

    def log_loaded() -> None:
        c.recorder.log(env.now, worker.gpu_id, "loaded", head.rid,
                       f"loaded={loaded} reused={reused} moved={moved} evicted={evicted}")

    started = yield from worker.device.start_instance(inst, head, loads, landed)
    head.startup_s = started.startup_s
    progress = started.progress
    if progress is None:
        head.load_s = started.load_s
        head.first_layer_s = (first_landing[0] if first_landing else env.now) - t0
        log_loaded()
    else:
        inst.loading = progress
        progress.head = head

        def on_loaded(p: LayerProgress) -> None:
            head.load_s = p.load_end - p.load_start
            head.first_layer_s = p.ready[0] - t0 if p.ready else p.load_end - t0
            log_loaded()
            for member in group:
                c.recorder.sample(member)

        if progress.finished:
            on_loaded(progress)
        else:
            progress.on_loaded = on_loaded
    worker.busy_s += env.now - t0
    if stages is not None:
        env.process(merge(worker, inst))  # the leader loads the other stages' units in the background
    if not c.kv.on_demand:
        reserve_static_kv(worker)
    for member in group:
        c.recorder.sample(member)


def settle(inst: Instance):
    """Wait until every unit of `inst` has landed (an execute-while-load instance must not end, nor its
    GPU turn to other work, while its weights are still landing)."""
    loading = inst.loading
    if loading is not None and not loading.finished:
        yield loading.done
    if inst.stages is not None:
        yield from consolidate(inst.group[0], inst)

"""A running instance's KV memory: the static pool reserved at its start (vLLM-style) or blocks taken
on demand from the arena (ElasticKV), grown `kv_chunk_blocks` blocks at a time, on every rank at once.

The decisions and the arena's books are here; the memory itself is planned and taken through the one
memory entry point (`core.memory`: a "kv-pool" ask for the static pool, a "kv" ask per growth, which
spares models waiting on the GPU when the KV policy `spares_queued` and the request joins a running
batch). Each rank's device binds the memory behind them (`Device.pool_reserved`, `kv_grown`, `kv_freed`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tangram_sim.core.memory import Ask, acquire, commit
from tangram_sim.core.records import EPS_TOKENS, Request
from tangram_sim.policies.kv import KvPool
from tangram_sim.specs.system import SystemSpec

if TYPE_CHECKING:
    from tangram_sim.core.worker import GpuWorker


def reserve_static_kv(leader: GpuWorker) -> None:
    """vLLM-style: reserve `fraction` of memory minus weights for KV when the instance starts."""
    c = leader.cluster
    inst = leader.instance
    block = c.block_bytes[inst.model]
    now = c.env.now
    plans = []
    for rank, worker in enumerate(inst.kv_group):
        arena = worker.arena
        weights = sum(inst.entry.rank_aligned[rank])
        want = c.kv.reservation_bytes(arena.capacity, weights)
        if want < arena.capacity - weights - want:
            # The fraction leaves less KV than it leaves unused (a model near the GPU's size): like
            # raising vLLM's gpu_memory_utilization, reserve everything the weights leave.
            want = arena.capacity - weights
        want -= want % block
        plan = acquire(worker, Ask("kv-pool", nbytes=want, block=block), now)  # never None: holes at worst
        plans.append((worker, plan))
    capacity = min(plan.nbytes for _, plan in plans)  # ranks hold equal shards of every block
    for worker, plan in plans:
        keys = commit(worker, plan, now, key_prefix=("pool", worker.gpu_id, inst.started))
        inst.pool_keys += [(worker, key) for key in keys]
        if worker.device.binds_memory:
            worker.device.pool_reserved(inst, keys)
    inst.pool = KvPool(capacity=capacity)


def kv_take(leader: GpuWorker, req: Request, tokens: int, joining: bool = False) -> bool:
    """Grow `req`'s KV to cover `tokens` on every rank; False when the memory is not there.
    `joining`: `req` is being admitted into a batch that already runs; a KV policy that `spares_queued`
    then evicts no unit of a model with a request waiting on that GPU (the request waits instead)."""
    c = leader.cluster
    inst = leader.instance
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
        for worker in inst.kv_group:
            worker.device.kv_grown(inst, req, (), nbytes)
    else:
        now = c.env.now
        ask = Ask("kv", nbytes=nbytes, block=block, spare_queued=joining and c.kv.spares_queued)
        plans = []
        for worker in inst.kv_group:  # plan every rank first: all or nothing
            plan = acquire(worker, ask, now)
            if plan is None:
                return False
            plans.append((worker, plan))
        for worker, plan in plans:
            keys = commit(worker, plan, now, key_prefix=("kv", req.rid), first_index=len(req.kv_keys))
            req.kv_keys += [(worker.arena, key) for key in keys]
            if worker.device.binds_memory:
                worker.device.kv_grown(inst, req, keys, nbytes)
    req.kv_bytes += nbytes
    req.kv_limit = blocks_new * block_tokens
    return True


def kv_free(leader: GpuWorker, req: Request) -> None:
    inst = leader.instance
    for worker in inst.kv_group:
        if worker.device.binds_memory:
            worker.device.kv_freed(inst, req)
    if inst.pool is not None:
        inst.pool.give_back(req.kv_bytes)
    else:
        for arena, key in req.kv_keys:
            arena.release(key)
    req.kv_keys = []
    req.kv_bytes = 0
    req.kv_limit = 0


def want_tokens(system: SystemSpec, req: Request) -> int:
    """KV tokens to hold: prompt + generated + one growth chunk, never past what it will need."""
    need = req.input_tokens + req.output_tokens
    have = req.input_tokens + int(req.done_tokens + EPS_TOKENS)
    chunk = system.kv_block_tokens * system.kv_chunk_blocks
    return min(need, have + chunk)

"""One GPU's lifecycle: its queue, instance starts, the continuous batch, KV growth and keep-alive.

Each GPU runs one instance at a time and starts instances in FCFS order of the requests that need
them. Queued requests of the active model join its batch even past an older request of another
model, but only while the system's fairness rule allows (`core.fairness`: that one has waited less
than `fairness_window_s`, or its predicted wait stays under `fairness_bound_s`); without this,
interleaved models would force a switch per request, and without a bound a hot model would starve the
rest.
An idle instance stays active for as long as the system's keep-alive policy says (`core.keepalive`:
`keep_alive_s` with the default `fixed`; 0 when its model is to be pre-warmed later instead) unless a
request for another model is queued on its GPU, which ends it at once. When an instance ends, its
weights are unpinned: retention systems keep them resident (evictable, reusable); `none` retention
frees them as ServerlessLLM does.

A cold start (`core.coldstart`) plans every rank's units, books the plan in the arena, then hands the
copies and loads to the device (`core.device`), booking units resident as they land. Admitted requests are prefilled in groups of `prefill_batch` (0: all at once);
the batch decodes until the next completion or KV growth point, or an admissible arrival; KV grows by
`kv_chunk_blocks` blocks at a time from the arena (on demand) or the instance's static pool, and a
batch that cannot grow preempts a member (the system's preemption policy's victim: by default the
newest), which recomputes later; a growing request that is itself the newest and was preempted before
yields instead (two requests re-admitted in turn would otherwise preempt each other forever).

A model with `tensor_parallel: N` runs on an aligned group of N GPUs of one node: the first is the
leader (it queues the requests and runs the instance), the others are held by a gang barrier; each
GPU keeps its own 1/N shard of every unit in its own arena. Members join gangs in the order of their
queue heads, like every instance start, and withdraw when the head changes, so gangs cannot deadlock
(`core.gang`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import simpy

from tangram_sim.core.coldstart import Instance, cold_start, settle
from tangram_sim.core.device import Device
from tangram_sim.core.fairness import stop_admitting
from tangram_sim.core.gang import cancel, follow, join, place_again
from tangram_sim.core.kvbook import kv_free, kv_take, want_tokens
from tangram_sim.core.pipeline import consolidate
from tangram_sim.core.prefetch import Prefetcher
from tangram_sim.core.records import EPS_TOKENS, LifecycleError, Request
from tangram_sim.core.storage import Node
from tangram_sim.policies.lifecycle import ModelQueues
from tangram_sim.policies.retention import RetentionPolicy
from tangram_sim.topology import SOURCES

if TYPE_CHECKING:
    from tangram_sim.core.router import Cluster

__all__ = ["GpuWorker", "Instance"]  # Instance lives in core.coldstart; devices import it from here too


class GpuWorker:
    """One GPU: its arena, FCFS queue and the instance it runs; `run` is its SimPy process."""

    def __init__(self, cluster: Cluster, device: Device, node: Node) -> None:
        self.cluster = cluster
        self.device = device  # does the work the lifecycle decides
        self.gpu_id = device.gpu_id
        self.node = node
        self.arena = device.arena
        self.queues: ModelQueues[Request] = ModelQueues()  # per model, each in arrival order
        self.instance: Instance | None = None
        self.retention: RetentionPolicy = cluster.make_retention()
        self.busy_until = 0.0  # scheduler's estimate of when queued work ends
        self.tail_model: str | None = None  # model of the last queued request (for estimates)
        self._wake: simpy.Event | None = None
        self._wake_any = False  # idle: any arrival wakes; decoding: only an admissible one
        self.held_by: GpuWorker | None = None  # leader of the tensor-parallel gang holding this GPU
        self.busy_s = 0.0  # time spent loading, prefilling or decoding
        self.held_s = 0.0  # time an instance occupied this GPU, busy or idle: the GPU time billed
        self.compaction_bytes = 0
        # bytes its cold starts loaded, per source (`core.sources`)
        self.source_bytes: dict[str, int] = dict.fromkeys(SOURCES, 0)
        self.cold_starts = 0
        self.last_sample = -math.inf  # when the timeline last sampled this GPU
        make_prefetch = cluster.make_prefetch  # what an idle GPU loads unasked (core.prefetch); None: nothing
        self.prefetch = Prefetcher(self, make_prefetch()) if make_prefetch is not None else None

    # ------------------------------------------------------------ routing support
    def submit(self, req: Request) -> None:
        if self.prefetch is not None:
            self.prefetch.cancel()  # before anything else: a prefetch never delays a request
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

    def idle(self) -> bool:
        """Waiting for work: nothing queued, not held by a gang, and its process parked in the idle wait
        (not starting, prefilling, decoding or settling an instance, whose batch may be empty meanwhile)."""
        wake = self._wake
        return (not self.queues.count and self.held_by is None and wake is not None and self._wake_any
                and not wake.triggered and (self.instance is None or not self.instance.running))

    def followers_waiting(self) -> bool:
        inst = self.instance
        # (a one-GPU group, the common case, has no followers: no generator to build)
        return inst is not None and len(inst.group) > 1 and any(w.queued for w in inst.group[1:])

    # ------------------------------------------------------------ the process
    def run(self):
        env = self.cluster.env
        while True:
            if not self.queued:
                if self.followers_waiting():  # a gang member has its own work: free the group
                    self._end_instance()
                    continue
                self._wake = env.event()
                self._wake_any = True
                if self.prefetch is not None:
                    self.prefetch.start()
                if self.instance is None:
                    yield self._wake
                else:
                    timer = env.timeout(self.cluster.keep_alive.window_s(self))  # 0: pre-warmed later
                    yield self._wake | timer
                    if not self.queued and not self.followers_waiting():
                        self.cluster.recorder.log(env.now, self.gpu_id, "keep_alive_expired", -1,
                                                  self.instance.model)
                        self._end_instance()
                self._wake = None
                continue
            head = self.queues.head()  # FCFS order of instance starts
            assert head is not None
            if self.instance is not None and (head.slot_of is not None or self.instance.model != head.model):
                self._end_instance()
                continue  # ending a gang instance may have re-placed queued requests
            if head.slot_of is not None:  # a tensor-parallel instance needs this GPU as a follower
                yield from follow(self, head)
                continue
            if self.instance is None:
                gang = head.gang
                if gang is not None:
                    if (yield from join(self, head)) is None:
                        continue  # an older request became the head
                    head.gang = None  # started: the instance keeps the gang
                elif self.cluster.entries[head.model].tp > 1:
                    raise LifecycleError(f"gpu {self.gpu_id}: request {head.rid} ({head.model}) has no gang")
                yield from cold_start(self, head, gang)
            yield from self._serve()
            yield from settle(self.instance)  # execute-while-load: its weights may still be landing
            if self.instance is not None and self.followers_waiting():
                self._end_instance()  # the batch drained and gang members have their own work

    # ------------------------------------------------------------ instance end
    def _end_instance(self) -> None:
        inst = self.instance
        assert inst is not None and not inst.running
        c = self.cluster
        for worker, key in inst.pool_keys:
            worker.arena.release(key)
        held = c.env.now - inst.started  # from the start of its cold start (loading included)
        for rank, worker in enumerate(inst.group):
            worker.held_s += held
            unpinned = worker.arena.unpin_many(inst.rank_keys[rank])
            if not worker.retention.retains:
                worker.arena.evict_many(unpinned)
            if worker.device.binds_memory:
                worker.device.end_instance(inst)
        c.warm_workers[inst.model].discard(self)
        c.recorder.log(c.env.now, self.gpu_id, "instance_end", -1, inst.model)
        self.instance = None
        for worker in inst.group:
            c.recorder.sample(worker)
        if inst.gang is not None:
            if inst.gang.released.triggered:
                raise LifecycleError(f"gpu {self.gpu_id}: the gang of {inst.model} was released twice")
            inst.gang.released.succeed()
            place_again(self, inst.model)  # requests queued for this instance need a new one

    # ------------------------------------------------------------ serving
    def _serve(self):
        """Run the continuous batch of the active instance until it drains and cannot admit more."""
        c = self.cluster
        env = c.env
        system = c.system
        inst = self.instance
        device = self.device
        running = inst.running
        while True:
            stages = inst.stages
            if stages is not None and stages.merged.triggered:  # pipelined: the leader holds every layer now
                yield from consolidate(self, inst)
            # Admit our queued requests in order while the batch, KV memory and fairness allow.
            admitted: list[Request] = []
            queues = self.queues
            while len(running) + len(admitted) < system.max_batch:
                req = queues.first(inst.model)
                if req is None:
                    break
                if req is not inst.head and stop_admitting(self, inst, req, admitted):
                    break  # an older request of another model has waited long enough (core.fairness)
                if not kv_take(self, req, want_tokens(c.system, req), joining=bool(running or admitted)):
                    if not running and not admitted:
                        self._dequeue(inst.model)
                        self._reject(req, "kv-capacity")
                        continue
                    if req.kv_wait_since < 0:
                        req.kv_wait_since = env.now
                    break
                self._dequeue(inst.model)
                if req.gang is not None:  # placed on this group as a new instance, but the instance is up
                    cancel(self, req)
                if req.kv_wait_since >= 0:
                    req.waited_for_kv_s += env.now - req.kv_wait_since
                    req.kv_wait_since = -1.0
                if not req.cold:  # warm: the whole model is resident, nothing to load
                    req.queue_s = env.now - req.arrival
                    req.gpu = self.gpu_id
                    req.bytes_needed = req.bytes_reused = inst.entry.nbytes
                req.admitted_at = env.now
                admitted.append(req)
            if admitted:
                # One prefill iteration for the whole admission, or `prefill_batch` requests at a time
                # (each group pays the per-iteration base cost and gets its first tokens at its end).
                group = system.prefill_batch or len(admitted)
                for first in range(0, len(admitted), group):
                    batch = admitted[first : first + group]
                    done, seconds = device.prefill(inst, batch)
                    yield done
                    self.busy_s += seconds()
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
            if len(running) < system.max_batch:
                self._wake = env.event()
                self._wake_any = False
            done, advanced = device.decode(inst, running, horizon, kv_tokens, self._wake)
            yield done
            elapsed, progressed = advanced()
            self._wake = None
            self.busy_s += elapsed
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
                while not kv_take(self, req, want_tokens(c.system, req)):
                    victim = c.preemption.victim(running, growing=req)
                    if victim is None:  # alone and still too large
                        running.remove(req)
                        self._reject(req, "kv-capacity")
                        break
                    if req.preemptions and running[-1] is req:  # it yields: two requests re-admitted
                        self._preempt(req)  # in turn would otherwise preempt each other forever
                        break
                    self._preempt(victim)

    def _preempt(self, req: Request) -> None:
        """Free a running request's KV and put it back at the queue head; it recomputes later."""
        self.instance.running.remove(req)
        kv_free(self, req)
        req.preemptions += 1
        req.done_tokens = 0.0
        self.queues.push_front(req)
        self.cluster.recorder.log(self.cluster.env.now, self.gpu_id, "preempted", req.rid, "")

    def _complete(self, req: Request) -> None:
        now = self.cluster.env.now
        kv_free(self, req)
        req.e2e_s = now - req.arrival
        req.outcome = "completed"
        self.cluster.finish(req)
        self.cluster.recorder.log(now, self.gpu_id, "completed", req.rid, "")
        self.cluster.recorder.sample(self)

    def _reject(self, req: Request, reason: str) -> None:
        if req.kv_bytes:
            kv_free(self, req)
        if req.gang is not None:  # its own instance start was pending: the followers' places go
            cancel(self, req)
        req.outcome = "rejected"
        req.reason = reason
        req.gpu = self.gpu_id
        self.cluster.finish(req)
        self.cluster.recorder.log(self.cluster.env.now, self.gpu_id, "rejected", req.rid, reason)

    def active_model(self) -> str:
        """Model this GPU runs, as leader or as a held member of a tensor-parallel gang."""
        inst = self.instance
        if inst is None and self.held_by is not None:
            inst = self.held_by.instance
        return inst.model if inst is not None else ""

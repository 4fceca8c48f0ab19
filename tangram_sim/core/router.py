"""The cluster: nodes x GPUs, each a `GpuWorker` over a device, and the routing of arrivals.

Lifecycle of a request: arrival -> routing (an active instance of its model that the system's warm
routing policy picks, by default the least loaded one whose queue holds only that model, else the
system's scheduler places a new instance) -> the GPU's queue -> a cold start when
its model is not active there and it is the oldest queued request -> batched prefill (first token =
TTFT) -> decode in a continuous batch, KV growing chunk by chunk -> completion (see `core.worker`).
The retention policy of every GPU the request may run on records one access per request, at arrival.
"""

from __future__ import annotations

import math
import operator
import random
from collections.abc import Callable, Sequence

import simpy

from tangram_sim.arena import Key, State
from tangram_sim.core.device import Device
from tangram_sim.core.keepalive import KeepAlive
from tangram_sim.core.multicast import Multicasts
from tangram_sim.core.pipeline import Layout, propose
from tangram_sim.core.records import Gang, LifecycleError, ModelEntry, Request
from tangram_sim.core.storage import Node
from tangram_sim.core.worker import GpuWorker
from tangram_sim.models.layers import layer_blocks
from tangram_sim.policies.keep_alive import KeepAlivePolicy
from tangram_sim.policies.kv import KvPolicy, kv_block_bytes
from tangram_sim.policies.lifecycle import FairnessPolicy, PreemptionPolicy
from tangram_sim.policies.packing import PackingPolicy
from tangram_sim.policies.pipeline import NoPipeline, PipelinePolicy
from tangram_sim.policies.prefetch import PrefetchPolicy
from tangram_sim.policies.retention import RetentionPolicy
from tangram_sim.policies.scheduler import (
    PlacementOption,
    Scheduler,
    missing_bytes,
    pipelined_load_s,
    reads_storage,
)
from tangram_sim.policies.source import SourcePolicy, TiersSource
from tangram_sim.policies.warm_routing import WarmInstance, WarmRoutingPolicy
from tangram_sim.specs.hardware import TierSpec
from tangram_sim.specs.system import SystemSpec
from tangram_sim.specs.timemodel import TimeModel
from tangram_sim.topology import Topology

_gpu_id = operator.attrgetter("gpu_id")


class Recorder:
    """Event log (optional) and memory timeline samples; tests assert on the log."""

    def __init__(self, record_events: bool, sample_interval_s: float, check_invariants: bool) -> None:
        self.events: list[tuple[float, int, str, int, str]] | None = [] if record_events else None
        self.timeline: list[tuple] = []  # TIMELINE_COLUMNS rows
        self.sample_interval_s = sample_interval_s  # at most one sample per GPU this often
        self.check_invariants = check_invariants  # arena invariants at every sample
        self.samples_checked = 0

    def log(self, now: float, gpu: int, kind: str, rid: int = -1, detail: str = "") -> None:
        if self.events is not None:
            self.events.append((now, gpu, kind, rid, detail))

    def sample(self, worker: GpuWorker, force: bool = False) -> None:
        """One timeline row of a GPU's arena (at most one per `sample_interval_s` unless forced); the
        arena's invariants are checked at each."""
        now = worker.cluster.env.now
        if not force and now - worker.last_sample < self.sample_interval_s:
            return
        worker.last_sample = now
        arena = worker.arena
        if self.check_invariants:
            arena.check_invariants()
            self.samples_checked += 1
        pinned = 0
        resident_state = State.RESIDENT
        for region in arena.regions():
            if region.pin_count and region.state is resident_state:
                pinned += region.size
        resident = arena.bytes_in(State.RESIDENT)
        self.timeline.append((
            now, worker.gpu_id, worker.active_model(),
            pinned, resident - pinned, arena.bytes_in(State.KV), arena.bytes_in(State.LOADING),
            arena.free_bytes, arena.largest_free(), arena.fragmentation(),
        ))
        if worker.device.binds_memory:
            worker.device.sampled(now)


class Cluster:
    """Nodes x GPUs, the system's policies, and the routing of arrivals."""

    def __init__(
        self,
        env: simpy.Environment,
        *,
        devices: Sequence[Device],
        gpus_per_node: int,
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
        pcie_bps: float,
        keep_alive: KeepAlivePolicy,
        fairness: FairnessPolicy,
        preemption: PreemptionPolicy,
        warm_routing: WarmRoutingPolicy,
        make_prefetch: Callable[[], PrefetchPolicy] | None = None,
        topology: Topology | None = None,
        source: SourcePolicy | None = None,
        pipeline: PipelinePolicy | None = None,
    ) -> None:
        self.env = env
        self.system = system
        self.entries = entries
        # The scheduler's estimates come from the configuration (time model, engine overhead, PCIe), never
        # from a calibration or a device, so that a simulation and a replay route alike.
        self.time_model = time_model
        self.make_retention = make_retention
        self.packing = packing
        self.kv = kv
        self.scheduler = scheduler
        self.rng = rng
        self.recorder = recorder
        # what a cold start's stages add to its load, for the estimates: the engine overhead, or the
        # serial stages of the system's `startup` (core.startup; stages beside the load assumed hidden)
        self.engine_overhead_s = system.startup_plan(engine_overhead_s).fixed_s if system.startup \
            else engine_overhead_s
        # execute-while-load: a cold start's first prefill pipelines with its load over these many layers
        self.pipeline_layers: dict[str, int] | None = (
            {name: len(layer_blocks(e.spec)) for name, e in entries.items()} if system.execute_while_load else None
        )
        self.pcie_bps = pcie_bps
        self.make_prefetch = make_prefetch  # one prefetch policy per GPU (None: no prefetch)
        self.keep_alive = KeepAlive(self, keep_alive)  # idle instances, idle times, pre-warms
        self.fairness = fairness  # when a running instance stops admitting (core.fairness)
        self.preemption = preemption  # which running request gives its KV back
        self.warm_routing = warm_routing  # which active instance an arrival joins
        self.source = source or TiersSource()  # where each missing unit is read from (core.sources)
        self.pipeline = pipeline or NoPipeline()  # how many stages a cold start runs as (core.pipeline)
        self.pipeline_layouts: dict[tuple[str, int], Layout | None] = {}  # (model, k) -> its stages' units
        self.total_requests: float = math.inf  # requests of the run, when known (`run_lifecycle`)
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
        n_nodes = len(devices) // gpus_per_node
        # the cluster's links (None: the default topology of `tiers`: peers over PCIe, no RDMA)
        self.topology = topology or Topology(n_nodes, gpus_per_node, pcie_bps, tiers)
        self.nodes = [Node(n, tiers, self.key_owners, self.topology) for n in range(n_nodes)]
        # cold starts of one model that overlap join one stream (core.multicast); None: each loads alone
        self.multicast = (Multicasts(system.multicast, system.multicast_block_bytes, self.topology)
                          if system.multicast != "none" else None)
        self.workers = [GpuWorker(self, d, self.nodes[i // gpus_per_node]) for i, d in enumerate(devices)]
        self.gpu_model_bytes = {name: sum(e.rank_bytes[0]) for name, e in entries.items()}  # one rank's
        self.warm_workers: dict[str, set[GpuWorker]] = {}
        self.finished = 0  # requests with an outcome
        self.on_finished: Callable[[Request], None] | None = None  # told of each outcome (a stream)
        self._estimates: dict[tuple[str, int, int], float] = {}
        # per node: when its storage will have read what the cold starts placed on it read from it (an
        # estimate, as ServerlessLLM's loading queue: placements only, not the fabric)
        self.storage_until = [0.0] * n_nodes
        for w in self.workers:
            env.process(w.run())

    def service_estimate(self, req: Request, cold: bool, worker: GpuWorker) -> float:
        """Rough busy time a request adds to a GPU, for queue-wait estimates (not the lifecycle)."""
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
            load = missing / self.pcie_bps
            if self.pipeline_layers is not None:
                prefill = self.time_model.prefill_s(entry.spec, req.input_tokens)
                load = pipelined_load_s(load, prefill, self.pipeline_layers[req.model])
            est += self.engine_overhead_s + load
        return est

    def route(self, req: Request, replace: bool = False) -> None:
        """Warm instance with a clean queue if any, else the scheduler's choice (a GPU or a gang).
        `replace`: the request was queued for a gang instance that ended before admitting it."""
        if req.gang is not None or req.slot_of is not None:
            raise LifecycleError(f"request {req.rid} ({req.model}) is placed while it holds a gang's place")
        entry = self.entries[req.model]
        if not replace:
            self.scheduler.observe(req.model, self.gpu_model_bytes[req.model], self.env.now)
        best = self.warm_instance(req.model)
        rank_keys = entry.rank_keys  # per GPU of the group: the units it holds for the model
        if best is not None:
            group = best.instance.group
            rank_keys = best.instance.rank_keys  # a pipeline's stages until it consolidates
        else:
            options = self.placement_options(req)
            choice = self.scheduler.choose(req.model, options, self.rng)
            chosen = options[choice]
            group = tuple(self.workers[g] for g in chosen.gpus)
            best = group[0]
            if reads_storage(chosen) and chosen.resident_bytes < chosen.model_bytes:
                start = max(self.env.now, self.storage_until[chosen.node])
                self.storage_until[chosen.node] = start + missing_bytes(chosen) / chosen.storage_bps
            if entry.tp > 1:
                req.gang = Gang(self.env, group)
            elif self.pipeline.max_k > 1:
                req.gang = propose(self, req, best)  # a pipelined cold start (None: on one GPU)
                if req.gang is not None:
                    group = req.gang.workers
                    rank_keys = req.gang.stages.rank_keys
        self.recorder.log(self.env.now, best.gpu_id, "rerouted" if replace else "routed", req.rid, req.model)
        if not replace:
            now = self.env.now
            self.keep_alive.arrived(req.model, now)
            for rank, worker in enumerate(group):
                worker.retention.record_access(req.model, rank_keys[rank], now)
                if worker.prefetch is not None:
                    worker.prefetch.observe(req.model, now)
        best.submit(req)
        if req.gang is not None:
            for follower in group[1:]:
                slot = Request(req.rid, req.arrival, req.model, 0, 0)
                slot.slot_of = req
                slot.gang = req.gang
                follower.submit(slot)

    def warm_instance(self, model: str) -> GpuWorker | None:
        """The leader of the active instance of `model` that the warm routing policy picks, or None."""
        warm = self.warm_workers.get(model)
        if not warm:
            return None
        workers = sorted(warm, key=_gpu_id)  # a set: the policy sees them in GPU order
        instances = [WarmInstance(w.gpu_id, w.queued, len(w.instance.running),
                                  w.queued_for(model) == w.queued and not w.followers_waiting())
                     for w in workers]
        choice = self.warm_routing.choose(model, instances)
        return None if choice is None else workers[choice]

    def finish(self, req: Request) -> None:
        """`req` has its outcome (completed or rejected): count it, tell keep-alive and the stream."""
        self.finished += 1
        self.keep_alive.finished(req.model, self.env.now)
        if self.on_finished is not None:
            self.on_finished(req)

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

    def copy_bps(self, model: str, group: Sequence[GpuWorker]) -> float:
        """Rate alone of the fastest whole copy of `model` on GPUs outside `group` that `group` can read (a
        peer of its node, or with RDMA any GPU): the estimates' view of the system's source policy when it
        reads GPU copies. A tensor-parallel model's ranks each read their own shards, from GPUs of the same
        rank (a GPU always has the same rank in its aligned groups), in parallel: the slowest rank's rate
        times the degree, as `host_to_gpu_bps` counts the ranks' links, and no more than the NICs the
        group's GPUs receive through when a rank reads from another node (one NIC per node: all ranks
        share it). 0.0: no rank has a copy."""
        tp = self.entries[model].tp
        need = self.gpu_model_bytes[model]
        topology = self.topology
        slowest = math.inf
        remote = False
        for reader in group:
            best, best_remote = 0.0, False
            for w in self.workers:
                if w in group or w.resident_bytes(model) < need:
                    continue
                if tp > 1 and (w.gpu_id % self.gpus_per_node) % tp != (reader.gpu_id % self.gpus_per_node) % tp:
                    continue
                if w.node is reader.node:
                    bps, far = topology.source_bps("peer-gpu", reader.gpu_id, w.gpu_id), False
                elif topology.spec.rdma:
                    bps, far = topology.source_bps("remote-gpu", reader.gpu_id, w.gpu_id), True
                else:
                    continue
                if bps > best:
                    best, best_remote = bps, far
            slowest = min(slowest, best)
            remote = remote or best_remote
            if slowest == 0.0:
                return 0.0
        total = slowest * tp
        if not remote:
            return total
        # the group's ranks receive through their NICs: one shared NIC caps them all, one per GPU adds up
        return min(total, sum(topology.nic_in[n].bps for n in {topology.nic_of(w.gpu_id) for w in group}))

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
                    host_to_gpu_bps=self.pcie_bps * tp,
                    storage_bps=self.topology.storage_bps(node.node_id),
                    prefill_s=prefill,
                    load_overhead_s=self.engine_overhead_s,
                    capacity_bytes=min(w.arena.capacity for w in group),
                    layers=self.pipeline_layers[req.model] if self.pipeline_layers is not None else 0,
                    copy_bps=self.copy_bps(req.model, group) if self.source.gpu_copies else 0.0,
                    storage_wait_s=max(0.0, self.storage_until[node.node_id] - now),
                )
            )
        return options

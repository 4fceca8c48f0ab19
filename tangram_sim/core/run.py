"""One run of the lifecycle: policies from a `SystemSpec`, arrivals, the clock, then the end checks.

`simulate` (modelled devices, `simpy.Environment`) and the real replay (real devices, the wall clock)
both call `run_lifecycle`, so a request meets the same router, worker and policies in both.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import simpy

from tangram_sim.arena import State
from tangram_sim.core.clock import WallClockEnvironment
from tangram_sim.core.device import Device
from tangram_sim.core.metrics import accounting_problems, requests_frame, summarize, timeline_frame
from tangram_sim.core.prefetch import prefetch_totals
from tangram_sim.core.records import ModelEntry, Request
from tangram_sim.core.router import Cluster, Recorder
from tangram_sim.core.slo import Slo
from tangram_sim.core.sources import source_totals
from tangram_sim.core.stream import RequestStream
from tangram_sim.errors import ConfigError
from tangram_sim.policies import KV, POLICY_FIELDS
from tangram_sim.policies.keep_alive import KeepAlivePolicy
from tangram_sim.policies.kv import KvPolicy
from tangram_sim.policies.lifecycle import FairnessPolicy, PreemptionPolicy
from tangram_sim.policies.needs import PolicyField, check_needs, policy_kwargs
from tangram_sim.policies.packing import PackingPolicy
from tangram_sim.policies.pipeline import PipelinePolicy
from tangram_sim.policies.prefetch import NoPrefetch, PrefetchPolicy
from tangram_sim.policies.retention import RetentionPolicy
from tangram_sim.policies.scheduler import Scheduler
from tangram_sim.policies.source import SourcePolicy
from tangram_sim.policies.warm_routing import WarmRoutingPolicy
from tangram_sim.specs.hardware import TierSpec
from tangram_sim.specs.system import SystemSpec, system_field_names
from tangram_sim.specs.timemodel import TimeModel
from tangram_sim.topology import Topology


class RunInvariantError(AssertionError):
    """A conservation check failed at the end of a run: a bug, never a user mistake."""


@dataclass(slots=True)
class Policies:
    make_retention: Callable[[], RetentionPolicy]  # one retention policy per GPU (per-GPU access counts)
    packing: PackingPolicy  # stateless: shared
    kv: KvPolicy  # stateless: shared
    scheduler: Scheduler  # placement of new instances
    make_prefetch: Callable[[], PrefetchPolicy] | None  # one per GPU; None: no prefetch
    keep_alive: KeepAlivePolicy  # one per cluster (idle times per model)
    fairness: FairnessPolicy  # shared
    preemption: PreemptionPolicy  # shared
    warm_routing: WarmRoutingPolicy  # shared
    source: SourcePolicy  # shared: where each missing unit is read from
    pipeline: PipelinePolicy  # shared: how many pipeline stages a cold start runs as


class RunFacts:
    """What a run gives the policies that declare they need it (`policies.needs`), computed on demand:
    a run whose policies need no trace never builds the arrivals."""

    def __init__(self, system: SystemSpec, h2d_bps: float, sensitivity: dict[str, float],
                 trace: pd.DataFrame) -> None:
        self.system = system
        self.trace = trace
        self._facts: dict[str, Any] = {"h2d_bps": h2d_bps, "sensitivity": sensitivity, "trace": trace}

    def __call__(self, need: str) -> Any:
        if need == "arrivals" and need not in self._facts:
            arrivals: dict[str, list[float]] = {}
            for t, m in zip(self.trace["arrival_s"].to_numpy(dtype=np.float64).tolist(),
                            self.trace["model"].astype(str).tolist()):
                arrivals.setdefault(m, []).append(t)
            self._facts[need] = arrivals
        if need in self._facts:
            value = self._facts[need]
            return dict(value) if need == "sensitivity" else value  # each policy its own copy to keep
        return getattr(self.system, need)  # a system field (check_needs allowed only those)

    def factory(self, kind: PolicyField) -> Callable[[], Any]:
        """A maker of the system's policy of this kind: its needs from the run, then its parameters.
        The needs are checked now (ConfigError naming the policy); the policy is not built yet."""
        name = getattr(self.system, kind.field)
        needs = check_needs(kind.registry, name, system_field_names())
        params = getattr(self.system, kind.params) if kind.params else {}
        registry = kind.registry

        def make() -> Any:
            return registry.create(name, **policy_kwargs(needs, self, params))

        return make


def build_policies(system: SystemSpec, *, h2d_bps: float, sensitivity: dict[str, float],
                   trace: pd.DataFrame) -> Policies:
    """The system's policies, each given what it declares it needs (`policies.needs`): the configured
    host-to-GPU bandwidth, the models' sensitivities, the trace's arrivals, system fields."""
    facts = RunFacts(system, h2d_bps, dict(sensitivity), trace)
    make = {kind.field: facts.factory(kind) for kind in POLICY_FIELDS}
    make_retention = make["retention"]
    retains = make_retention().retains  # fail on bad parameters before the run starts
    keep_alive = make["keep_alive"]()
    make_prefetch = None
    if system.prefetch != "none":
        make_prefetch = make["prefetch"]
        make_prefetch()
    elif keep_alive.prewarms and retains:
        make_prefetch = NoPrefetch  # pre-warms go through the prefetch path; nothing else is prefetched
    return Policies(make_retention, make["packing"](), kv_policy(system), make["scheduler"](), make_prefetch,
                    keep_alive, make["fairness"](), make["preemption"](), make["warm_routing"](),
                    make["source"](), make["pipeline"]())


def kv_policy(system: SystemSpec) -> KvPolicy:
    """The system's KV policy (static reservations take its fraction)."""
    extra = {"fraction": system.kv_fraction} if system.kv == "static" else {}
    return KV.create(system.kv, block_tokens=system.kv_block_tokens, **extra)


def trace_requests(trace: pd.DataFrame) -> list[Request]:
    """One request record per trace row, `rid` = row."""
    arrivals = trace["arrival_s"].to_numpy(dtype=np.float64)
    models = trace["model"].astype(str).to_numpy()
    inputs = trace["input_tokens"].to_numpy(dtype=np.int64)
    outputs = trace["output_tokens"].to_numpy(dtype=np.int64)
    return [Request(i, float(arrivals[i]), str(models[i]), int(inputs[i]), int(outputs[i]))
            for i in range(len(arrivals))]


def iter_requests(trace: pd.DataFrame, chunk: int = 10_000) -> Iterator[Request]:
    """The same records made one at a time, when they arrive (a streamed run keeps none it finished):
    the trace's columns stay numpy arrays, turned into Python values a chunk at a time; model names are
    shared string objects."""
    arrivals = trace["arrival_s"].to_numpy(dtype=np.float64)
    names = trace["model"].astype(str).astype("category")
    cats = [str(c) for c in names.cat.categories]
    codes = names.cat.codes.to_numpy()
    inputs = trace["input_tokens"].to_numpy(dtype=np.int64)
    outputs = trace["output_tokens"].to_numpy(dtype=np.int64)
    for first in range(0, len(arrivals), chunk):
        part = slice(first, first + chunk)
        rows = zip(arrivals[part].tolist(), codes[part].tolist(), inputs[part].tolist(), outputs[part].tolist())
        for i, (arrival, code, n_in, n_out) in enumerate(rows, first):
            yield Request(i, arrival, cats[code], n_in, n_out)


@dataclass(slots=True)
class LifecycleRun:
    requests: list[Request]  # every trace request, with its outcome
    cluster: Cluster  # workers, their arenas and counters at the end
    recorder: Recorder  # events and timeline

    def frames(self, slo: Slo | None = None) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
        """The request table, the timeline and the summary row (without the system's name), its SLO
        columns against `slo` (None: the default SLO)."""
        frame = requests_frame(self.requests)
        workers = self.cluster.workers
        summary = summarize(frame, sum(w.busy_s for w in workers), sum(w.compaction_bytes for w in workers),
                            self.cluster.entries, prefetch_totals(workers), slo=slo,
                            gpu_held_s=sum(w.held_s for w in workers))
        return frame, timeline_frame(self.recorder.timeline), summary


def run_lifecycle(
    env: simpy.Environment,
    devices: Sequence[Device],
    requests: Iterable[Request],
    *,
    gpus_per_node: int,
    tiers: TierSpec,
    system: SystemSpec,
    entries: dict[str, ModelEntry],
    time_model: TimeModel,
    policies: Policies,
    seed: int,
    recorder: Recorder,
    engine_overhead_s: float,
    pcie_bps: float,
    progress: Callable[[int], Any] | None = None,
    stream: RequestStream | None = None,
    n_requests: int | None = None,
    topology: Topology | None = None,
) -> LifecycleRun:
    """Route `requests` (in arrival order) through a cluster of `devices` until every one has an outcome,
    then check the accounting; raises RunInvariantError on any failure. `time_model`,
    `engine_overhead_s` and `pcie_bps` are the scheduler's estimates (from the configuration).

    With `stream`, finished requests go to it and are not kept (`requests` may then be an iterator of
    `n_requests` records, e.g. `iter_requests`); the returned run's `requests` is empty. `topology`: the
    cluster's links, shared with the devices (None: the default topology of `tiers`)."""
    n = len(requests) if n_requests is None else n_requests  # type: ignore[arg-type]
    if system.execute_while_load and not all(d.overlaps_load for d in devices):
        raise ConfigError(f"systems ({system.name}): execute_while_load needs devices that compute while the "
                          "weights land (overlaps_load), expected such devices or execute_while_load false")
    if system.source != "tiers" and not all(getattr(d, "reads_gpu_copies", False) for d in devices):
        raise ConfigError(f"systems ({system.name}): source {system.source} reads units from other GPUs; these "
                          "devices read their node's tiers only, expected source tiers")
    if system.multicast != "none" and not all(getattr(d, "joins_multicast", False) for d in devices):
        raise ConfigError(f"systems ({system.name}): multicast {system.multicast} streams a model from GPU to GPU; "
                          "not yet supported by the real executor, expected multicast none")
    if system.pipeline != "none" and not all(getattr(d, "runs_pipelines", False) for d in devices):
        raise ConfigError(f"systems ({system.name}): pipeline {system.pipeline} runs a cold start as stages on "
                          "several GPUs; not yet supported by the real executor")
    cluster = Cluster(
        env, devices=devices, gpus_per_node=gpus_per_node, tiers=tiers, system=system, entries=entries,
        time_model=time_model, make_retention=policies.make_retention, packing=policies.packing,
        kv=policies.kv, scheduler=policies.scheduler, rng=random.Random(seed), recorder=recorder,
        engine_overhead_s=engine_overhead_s, pcie_bps=pcie_bps, make_prefetch=policies.make_prefetch,
        keep_alive=policies.keep_alive, fairness=policies.fairness, preemption=policies.preemption,
        warm_routing=policies.warm_routing, source=policies.source, topology=topology,
        pipeline=policies.pipeline,
    )
    cluster.total_requests = n  # a pre-warm after the last outcome would load for nobody
    cluster.on_finished = stream

    if isinstance(env, WallClockEnvironment):  # once all is served, the keep-alives need no waiting
        env.finished = lambda: cluster.finished == n

    def arrivals():
        step = max(1, n // 200)
        for i, req in enumerate(requests):
            delay = req.arrival - env.now
            if delay > 0:
                yield env.timeout(delay)
            cluster.route(req)
            if progress is not None and i % step == 0:
                progress(i)

    env.process(arrivals())
    env.run()
    for w in cluster.workers:
        recorder.sample(w, force=True)
    if stream is not None:
        stream.close()
        check_run([], cluster, stream, n)
        return LifecycleRun([], cluster, recorder)
    requests = list(requests)
    check_run(requests, cluster)
    return LifecycleRun(requests, cluster, recorder)


def check_run(requests: list[Request], cluster: Cluster, stream: RequestStream | None = None,
              n_requests: int = 0) -> None:
    """Every request has an outcome; every cold start's bytes add up; every arena is consistent and holds
    no KV, loading or pinned bytes; no instance or queue is left. A streamed run's requests were checked
    as they finished; then the count must be `n_requests`."""
    if stream is None:
        problems = accounting_problems(requests, cluster.finished)
    else:
        problems = list(stream.problems)
        if not stream.count == cluster.finished == n_requests:
            problems.append(f"{stream.count} requests streamed, {cluster.finished} outcomes recorded, "
                            f"{n_requests} requests in the trace")
    for w in cluster.workers:
        arena = w.arena
        arena.check_invariants()
        if w.instance is not None:
            problems.append(f"gpu {w.gpu_id}: instance of {w.instance.model} still active at the end")
        leaked_kv = arena.bytes_in(State.KV) + arena.bytes_in(State.LOADING)
        pinned = sum(r.size for r in arena.regions() if r.pin_count)
        if leaked_kv or pinned:
            problems.append(f"gpu {w.gpu_id}: {leaked_kv} KV/loading and {pinned} pinned bytes left after the run")
        if w.queued:
            problems.append(f"gpu {w.gpu_id} still has {w.queued} queued requests")
    if problems:
        raise RunInvariantError("; ".join(problems))


@dataclass(slots=True)
class WallClockRun:
    requests: pd.DataFrame  # REQUEST_COLUMNS
    timeline: pd.DataFrame  # TIMELINE_COLUMNS
    summary: dict[str, Any]  # `summarize` plus lag_p50_s/lag_p99_s/lag_max_s/lag_events, replay_end_s,
    # device_s (seconds of device work measured on the devices' threads)
    wall_s: float  # seconds the run took
    devices: Sequence[Device]  # as the run left them (their own records: loads, memory readings)


def run_on_wall_clock(
    make_devices: Callable[[WallClockEnvironment], Sequence[Device]],
    trace: pd.DataFrame,
    system: SystemSpec,
    *,
    entries: dict[str, ModelEntry],
    sensitivity: dict[str, float],
    h2d_bps: float,
    time_model: TimeModel,
    seed: int = 0,
    sample_interval_s: float = 0.01,
    factor: float = 1.0,
    progress: Callable[[int], Any] | None = None,
    slo: Slo | None = None,
) -> WallClockRun:
    """The replay driver: the lifecycle on one node of `make_devices(env)`'s GPUs, arrivals at their wall
    time (`factor` wall seconds per trace second), the storage tiers of a replay (every unit read from its
    files: no host cache). `time_model`, `h2d_bps` and the system's engine overhead only feed the
    scheduler's estimates (and `h2d_bps` tangram's cost rule), as in `simulate`; the devices take the
    time they take. The summary's SLO columns are against `slo` (None: the default SLO)."""
    policies = build_policies(system, h2d_bps=h2d_bps, sensitivity=sensitivity, trace=trace)
    env = WallClockEnvironment(factor)
    devices = make_devices(env)
    recorder = Recorder(False, sample_interval_s, check_invariants=True)
    requests = trace_requests(trace)
    env.restart()
    t0 = time.perf_counter()
    run = run_lifecycle(
        env, devices, requests, gpus_per_node=len(devices), tiers=TierSpec(host_cache_bytes=0), system=system,
        entries=entries, time_model=time_model, policies=policies, seed=seed, recorder=recorder,
        engine_overhead_s=system.engine_overhead_s, pcie_bps=h2d_bps, progress=progress,
    )
    wall = time.perf_counter() - t0
    frame, timeline, numbers = run.frames(slo)
    summary: dict[str, Any] = {"system": system.name}
    summary.update(numbers)
    summary.update(env.lag_stats())
    summary.update(source_totals(run.cluster.workers))  # cold starts' bytes per source, as `simulate` reports
    summary["replay_end_s"] = float(env.now)
    summary["device_s"] = env.device_s
    return WallClockRun(frame, timeline, summary, wall, devices)

"""Run one system on one cluster over one trace, then check conservation and summarise."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import simpy
from tqdm import tqdm

from tangram_sim.arena import State
from tangram_sim.errors import CapacityError, ConfigError
from tangram_sim.models.spec import ModelSpec
from tangram_sim.models.units import build_units
from tangram_sim.policies import KV, PACKING, RETENTION, SCHEDULER
from tangram_sim.sim.cluster import Cluster, ModelEntry, Recorder, Request
from tangram_sim.sim.hardware import GpuSpec, TierSpec
from tangram_sim.sim.metrics import accounting_problems, requests_frame, summarize, timeline_frame
from tangram_sim.sim.systems import SystemSpec
from tangram_sim.sim.timemodel import Calibrated, Calibration, Roofline


class SimulationInvariantError(AssertionError):
    """A conservation check failed at the end of a run: a bug, never a user mistake."""


@dataclass(slots=True, frozen=True)
class ModelChoice:
    spec: ModelSpec  # inventory and sizes
    sensitivity: float = 1.0  # retention weight (tangram's cost rule)
    tensor_parallel: int = 1  # GPUs per instance


@dataclass(slots=True, frozen=True)
class ClusterSpec:
    nodes: int  # machines
    gpus_per_node: int  # GPUs per machine
    gpu: GpuSpec  # every GPU is the same kind
    tiers: TierSpec = field(default_factory=TierSpec)  # host cache, SSD, network per node
    compute_efficiency: float = 0.5  # roofline: share of peak FLOP/s reached
    memory_efficiency: float = 0.7  # roofline: share of HBM bandwidth reached
    alignment: int = 512  # arena alignment in bytes


@dataclass(slots=True)
class SimResult:
    system: str  # system name
    requests: pd.DataFrame  # one row per trace request
    timeline: pd.DataFrame  # per-GPU memory samples
    summary: dict[str, Any]  # one row of numbers
    events: list[tuple[float, int, str, int, str]] | None  # (time, gpu, kind, rid, detail) if recorded


def _validate(models: dict[str, ModelChoice], trace: pd.DataFrame, cluster: ClusterSpec,
              system: SystemSpec) -> None:
    unknown = sorted(set(trace["model"].unique()) - set(models))
    if unknown:
        raise ConfigError(
            f"trace uses model(s) {', '.join(map(str, unknown))} that are not in models; "
            f"expected one of: {', '.join(models)}"
        )
    capacity = cluster.gpu.memory_bytes
    for name, choice in models.items():
        tp = choice.tensor_parallel
        if tp > cluster.gpus_per_node:
            raise ConfigError(
                f"models.{name}.tensor_parallel: {tp} GPUs per instance, but a node has only "
                f"{cluster.gpus_per_node} (cluster.gpus_per_node)"
            )
        need = (choice.spec.weight_bytes + choice.spec.kv_bytes_per_token * system.kv_block_tokens) / tp
        if need > capacity:
            hint = "set tensor_parallel" if tp == 1 else "raise tensor_parallel"
            raise CapacityError(
                f"model {name} needs {need / 1e9:.2f} GB per GPU (weights + one KV block, tensor_parallel "
                f"{tp}) but a {cluster.gpu.name} GPU has {capacity / 1e9:.2f} GB; use a larger cluster.gpu "
                f"or cluster.gpu_memory_gib, or {hint}"
            )
        if choice.spec.kv_bytes_per_token <= 0:
            raise ConfigError(f"model {name}: KV bytes per token unknown (no architecture config)")


def simulate(
    models: dict[str, ModelChoice],
    trace: pd.DataFrame,
    cluster: ClusterSpec,
    system: SystemSpec,
    *,
    seed: int = 0,
    calibration: Calibration | None = None,
    record_events: bool = False,
    sample_interval_s: float = 1.0,
    check_invariants: bool = True,
    progress: bool = False,
) -> SimResult:
    """Simulate `trace` (canonical columns) under `system`; raises on any conservation failure."""
    _validate(models, trace, cluster, system)
    gpu = cluster.gpu
    roofline = Roofline(gpu, cluster.compute_efficiency, cluster.memory_efficiency)
    time_model = roofline if calibration is None else Calibrated(calibration, roofline)
    h2d = calibration.h2d_bps if calibration and calibration.h2d_bps else None
    if h2d:
        gpu = type(gpu)(**{**{f: getattr(gpu, f) for f in gpu.__slots__}, "pcie_bps": h2d})
    d2d = calibration.d2d_bps if calibration and calibration.d2d_bps else gpu.d2d_bps
    engine_overhead = (
        calibration.engine_overhead_s
        if calibration and calibration.engine_overhead_s is not None
        else system.engine_overhead_s
    )
    tiers = cluster.tiers
    if calibration and calibration.read_bps:  # the measured checkpoint read rate replaces the SSD's
        tiers = dataclasses.replace(tiers, ssd_bps=calibration.read_bps)
    unit_overhead = (
        calibration.unit_overhead_s
        if calibration and calibration.unit_overhead_s is not None
        else cluster.tiers.unit_overhead_s
    )

    entries: dict[str, ModelEntry] = {}
    align = cluster.alignment
    for name, choice in models.items():
        units = build_units(choice.spec, system.granularity, system.min_unit_bytes)
        tp = choice.tensor_parallel
        # Each rank holds 1/tp of every unit; shards of different ranks are different bytes.
        shard = tuple(-(-u.nbytes // tp) for u in units)
        rank_keys = tuple(
            tuple(u.key if tp == 1 else f"{u.key}/tp{tp}.{rank}" for u in units) for rank in range(tp)
        )
        entries[name] = ModelEntry(
            spec=choice.spec,
            units=units,
            tp=tp,
            rank_keys=rank_keys,
            rank_bytes=(shard,) * tp,
            rank_aligned=(tuple(-(-n // align) * align for n in shard),) * tp,
            nbytes=sum(shard) * tp,
            sensitivity=choice.sensitivity,
        )

    arrivals = trace["arrival_s"].to_numpy(dtype=np.float64)
    model_col = trace["model"].astype(str).to_numpy()
    inputs = trace["input_tokens"].to_numpy(dtype=np.int64)
    outputs = trace["output_tokens"].to_numpy(dtype=np.int64)

    retention_params = dict(system.retention_params)
    if system.retention in ("tangram", "decayed-frequency"):
        retention_params.setdefault("host_to_gpu_bps", gpu.pcie_bps)
        retention_params.setdefault("sensitivity", {n: c.sensitivity for n, c in models.items()})
    if system.retention == "belady":
        future: dict[str, list[float]] = {}
        for t, m in zip(arrivals.tolist(), model_col.tolist()):
            future.setdefault(m, []).append(t)
        retention_params["future"] = future

    def make_retention():
        return RETENTION.create(system.retention, **retention_params)

    make_retention()  # fail on bad parameters before the run starts
    env = simpy.Environment()
    recorder = Recorder(record_events, sample_interval_s, check_invariants)
    c = Cluster(
        env,
        nodes=cluster.nodes,
        gpus_per_node=cluster.gpus_per_node,
        gpu=gpu,
        tiers=tiers,
        system=system,
        entries=entries,
        time_model=time_model,
        make_retention=make_retention,
        packing=PACKING.create(system.packing),
        kv=KV.create(system.kv, **({"fraction": system.kv_fraction} if system.kv == "static" else {}),
                     block_tokens=system.kv_block_tokens),
        scheduler=SCHEDULER.create(system.scheduler),
        rng=random.Random(seed),
        recorder=recorder,
        engine_overhead_s=engine_overhead,
        unit_overhead_s=unit_overhead,
        d2d_bps=d2d,
        alignment=cluster.alignment,
    )
    requests = [
        Request(i, float(arrivals[i]), str(model_col[i]), int(inputs[i]), int(outputs[i]))
        for i in range(len(arrivals))
    ]
    bar = tqdm(total=len(requests), desc=f"simulating {system.name}", unit="req", disable=not progress,
               leave=False, mininterval=0.5)

    def arrivals_process():
        step = max(1, len(requests) // 200)
        for i, req in enumerate(requests):
            delay = req.arrival - env.now
            if delay > 0:
                yield env.timeout(delay)
            c.route(req)
            if i % step == 0:
                bar.n = i
                bar.refresh()

    env.process(arrivals_process())
    env.run()
    bar.close()
    for w in c.workers:
        w.sample(force=True)

    _check_conservation(requests, c)
    frame = requests_frame(requests)
    summary = {"system": system.name}
    summary.update(
        summarize(frame, sum(w.busy_s for w in c.workers), sum(w.compaction_bytes for w in c.workers))
    )
    summary["sim_end_s"] = float(env.now)
    return SimResult(system.name, frame, timeline_frame(recorder.timeline), summary, recorder.events)


def _check_conservation(requests: list[Request], cluster: Cluster) -> None:
    """Every request has an outcome; every cold start's bytes add up; every arena is consistent."""
    problems = accounting_problems(requests, cluster.finished)
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
        raise SimulationInvariantError("; ".join(problems))

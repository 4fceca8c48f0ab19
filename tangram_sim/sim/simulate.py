"""Simulate one system on one cluster over one trace: the shared lifecycle over modelled devices."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import simpy
from tqdm import tqdm

from tangram_sim.arena import ARENA_ALIGNMENT
from tangram_sim.core.links import Fabric
from tangram_sim.core.metrics import timeline_frame
from tangram_sim.core.prefetch import prefetch_totals
from tangram_sim.core.records import build_entries
from tangram_sim.core.router import Recorder
from tangram_sim.core.run import (
    RunInvariantError,
    build_policies,
    iter_requests,
    run_lifecycle,
    trace_requests,
)
from tangram_sim.core.slo import Slo
from tangram_sim.core.sources import source_totals
from tangram_sim.core.stream import RequestStream
from tangram_sim.errors import CapacityError, ConfigError
from tangram_sim.models.spec import ModelSpec
from tangram_sim.sim.device import ModelledDevice
from tangram_sim.sim.hardware import GiB, GpuSpec, TierSpec
from tangram_sim.sim.systems import SystemSpec
from tangram_sim.sim.timemodel import Calibrated, Calibration, Roofline
from tangram_sim.topology import Topology, TopologySpec

SimulationInvariantError = RunInvariantError  # the name tests and callers know


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
    alignment: int = ARENA_ALIGNMENT  # arena alignment in bytes
    decode_admission: str = "fluid"  # "step": arrivals join a decoding batch when its step ends
    topology: TopologySpec = field(default_factory=TopologySpec)  # NVLink, RDMA, remote store (`topology`)


@dataclass(slots=True)
class SimResult:
    system: str  # system name
    requests: pd.DataFrame | None  # one row per trace request (None when streamed to `requests_path`)
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
                f"model {name} needs {need / GiB:.2f} GiB per GPU (weights + one KV block, tensor_parallel "
                f"{tp}) but the {cluster.gpu.name} GPU has {capacity / GiB:.2f} GiB; use a larger cluster.gpu "
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
    requests_path: str | Path | None = None,
    slo: Slo | None = None,
) -> SimResult:
    """Simulate `trace` (canonical columns) under `system`; raises on any conservation failure.

    With `requests_path`, finished requests are written there (Parquet, in batches, in the order they
    finished) instead of being kept: memory then stays flat in the number of requests. The summary's
    SLO columns are against `slo` (None: the default SLO, `core.slo`)."""
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
    # a system without stages keeps the single engine overhead of before (None: exactly that code path)
    startup = system.startup_plan(engine_overhead) if system.startup else None
    tiers = cluster.tiers
    if calibration and calibration.read_bps:  # the measured checkpoint read rate replaces the SSD's
        tiers = dataclasses.replace(tiers, ssd_bps=calibration.read_bps)
    unit_overhead = (
        calibration.unit_overhead_s
        if calibration and calibration.unit_overhead_s is not None
        else cluster.tiers.unit_overhead_s
    )

    entries = build_entries(
        {n: (c.spec, c.sensitivity, c.tensor_parallel) for n, c in models.items()}, system, cluster.alignment
    )
    # the policies' and the scheduler's view of the hardware is the configuration's, calibrated or not
    configured_pcie = cluster.gpu.pcie_bps
    policies = build_policies(
        system, h2d_bps=configured_pcie, sensitivity={n: c.sensitivity for n, c in models.items()}, trace=trace
    )
    env = simpy.Environment()
    fabric = Fabric(env)
    links = cluster.topology
    if calibration and calibration.peer_bps:  # the measured copy between two GPUs of a node replaces the path
        links = dataclasses.replace(links, nvlink_bps=calibration.peer_bps)
    topology = Topology(cluster.nodes, cluster.gpus_per_node, gpu.pcie_bps, tiers, links)
    devices = [
        ModelledDevice(env, i, gpu.memory_bytes, cluster.alignment, gpu.pcie_bps, fabric, time_model,
                       engine_overhead, unit_overhead, d2d, whole_steps=cluster.decode_admission == "step",
                       load_overhead_s=(calibration.load_overhead_s or 0.0) if calibration else 0.0,
                       startup=startup, execute_while_load=system.execute_while_load, topology=topology,
                       layered_load_bps=calibration.layered_load_bps if calibration else None)
        for i in range(cluster.nodes * cluster.gpus_per_node)
    ]
    recorder = Recorder(record_events, sample_interval_s, check_invariants)
    stream = RequestStream(requests_path) if requests_path is not None else None
    requests = trace_requests(trace) if stream is None else iter_requests(trace)
    bar = tqdm(total=len(trace), desc=f"simulating {system.name}", unit="req", disable=not progress,
               leave=False, mininterval=0.5)

    def tick(i: int) -> None:
        bar.n = i
        bar.refresh()

    try:
        run = run_lifecycle(
            env, devices, requests, gpus_per_node=cluster.gpus_per_node, tiers=tiers, system=system,
            entries=entries, time_model=roofline, policies=policies, seed=seed, recorder=recorder,
            engine_overhead_s=system.engine_overhead_s, pcie_bps=configured_pcie, progress=tick,
            stream=stream, n_requests=len(trace), topology=topology,
        )
    finally:
        bar.close()
    summary: dict[str, Any] = {"system": system.name}
    if stream is None:
        frame, timeline, numbers = run.frames(slo)
    else:
        workers = run.cluster.workers
        frame, timeline = None, timeline_frame(recorder.timeline)
        numbers = stream.summary(sum(w.busy_s for w in workers), sum(w.compaction_bytes for w in workers),
                                 entries, prefetch_totals(workers), slo=slo,
                                 gpu_held_s=sum(w.held_s for w in workers))
    summary.update(numbers)
    summary["sim_end_s"] = float(env.now)
    summary.update(source_totals(run.cluster.workers))  # cold starts' bytes per source (core.sources)
    return SimResult(system.name, frame, timeline, summary, recorder.events)

"""Trace replay on real devices: the simulator's lifecycle (`core`) over `RealDevice`s, on the wall clock.

The router, the workers, the policies and the end checks are the simulator's own (`core.run`); only the
devices (torch copies and forward passes, durations measured on each device's thread) and the clock
(`core.clock.WallClockEnvironment`: arrivals at their wall time, device work for as long as it took)
differ. So a replay and the simulation of its `experiment.sim.yaml` differ where the time model differs
from the device. The lag (how much later than their trace time events ran by the wall clock) is
reported (p50/p99/max); a replay whose p99 lag exceeds `real.lag_bound_s` says so loudly, because its
device work then ran at other moments than the trace placed it (other idle gaps, other overlaps).
"""

from __future__ import annotations

import contextlib
import gc
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from tangram_sim.arena import ARENA_ALIGNMENT
from tangram_sim.core.clock import WallClockEnvironment
from tangram_sim.core.records import build_entries
from tangram_sim.core.run import run_on_wall_clock
from tangram_sim.core.slo import Slo
from tangram_sim.errors import ConfigError
from tangram_sim.experiments.config import load_yaml
from tangram_sim.real.backend import BackendSpec
from tangram_sim.real.device import LAYER_COLUMNS, LOAD_COLUMNS, MEMORY_COLUMNS, STEP_COLUMNS, RealDevice
from tangram_sim.real.link import core_sets
from tangram_sim.real.loader import DEFAULT_CHUNK_BYTES, Checkpoint
from tangram_sim.real.peers import connect
from tangram_sim.real.pipelined import check_stage_units
from tangram_sim.real.setup import (
    ReplaySetup,
    check_replayable,
    default_capacity,
    loader_options,
    prepare_replay,
    resolve_device,
)
from tangram_sim.sim.hardware import GPUS
from tangram_sim.sim.systems import SystemSpec
from tangram_sim.sim.timemodel import Roofline, TimeModel

__all__ = [
    "LAG_BOUND_S",
    "ReplayResult",
    "load_experiment",
    "prepare_replay",
    "replay_system",
    "replay_trace",
    "run_replay",
    "torch_threads",
]

LAG_BOUND_S = 0.05  # default bound on the p99 lag (trace seconds) of a replay that follows its trace


@dataclass(slots=True)
class ReplayResult:
    system: str  # system name
    requests: pd.DataFrame  # REQUEST_COLUMNS, one row per trace request
    timeline: pd.DataFrame  # TIMELINE_COLUMNS from the arenas, sampled
    memory: pd.DataFrame  # MEMORY_COLUMNS: device memory readings at the same instants
    loads: pd.DataFrame  # LOAD_COLUMNS: one row per cold start (where its time went)
    steps: pd.DataFrame  # STEP_COLUMNS: every piece of device work, when it ran and how long it took
    summary: dict[str, Any]  # `summarize` of the requests, plus the replay's figures (lag, wall time)
    wall_s: float  # seconds the replay took
    tokens: dict[int, list[int]]  # rid -> the tokens it generated (greedy), first token first
    layers: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=LAYER_COLUMNS))  # LAYER_COLUMNS:
    # the measured layer spans of execute-while-load first prefills (empty for serial starts)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set for the duration (None: unchanged).

    On a CPU device with tiny models one thread is as fast as several, and it avoids the worker
    threads' wake-up after an idle gap (milliseconds on a 2-core VM), which no simulator models.
    """
    if threads is None:
        yield
        return
    if threads < 1:
        raise ConfigError(f"real.threads {threads}: expected a positive number of threads")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _prompts(trace: pd.DataFrame, vocab: dict[str, int], seed: int) -> dict[int, list[int]]:
    """Random prompt token ids per request, from the experiment seed (made before the clock starts)."""
    rng = np.random.default_rng([seed, 0x7E41])
    models = trace["model"].astype(str).tolist()
    lengths = trace["input_tokens"].astype(int).tolist()
    return {i: rng.integers(0, vocab[m], size=max(1, n)).tolist()
            for i, (m, n) in enumerate(zip(models, lengths))}


def replay_trace(
    ckpts: dict[str, Checkpoint],
    trace: pd.DataFrame,
    system: SystemSpec,
    *,
    devices: Sequence[str | torch.device] = ("cpu",),
    capacity: int | None = None,
    sensitivity: dict[str, float] | None = None,
    seed: int = 0,
    readers: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    staging: str = "auto",
    sample_interval_s: float = 0.01,
    h2d_bps: float = 25e9,
    time_model: TimeModel | None = None,
    warmup: bool = True,
    threads: int | None = None,
    lag_bound_s: float = LAG_BOUND_S,
    progress: Callable[[int], Any] | None = None,
    processes: bool | None = None,
    prompts: dict[int, list[int]] | None = None,
    verify: bool = False,
    slo: Slo | None = None,
) -> ReplayResult:
    """Replay `trace` (canonical columns; `arrival_s` already compressed) under `system`, one arena of
    `capacity` bytes per entry of `devices` (default: 90% of free memory on CUDA), all on one node.

    `processes`: each arena's backend in a process of its own, pinned to its own CPUs with `threads`
    torch threads each (default: when there are several arenas); else in this process.
    `prompts` (rid -> token ids) replaces the random prompts drawn from the seed; `verify` checks every
    tensor of each cold start's model against its file. `time_model` only feeds the scheduler's
    estimates, as in the simulator (default: the roofline of an a100-80gb); `slo` is what the summary's
    SLO columns measure against (None: the default SLO). Raises RunInvariantError if a request is
    unaccounted or anything is left bound."""
    check_replayable(system)
    unknown = sorted(set(trace["model"].astype(str)) - set(ckpts))
    if unknown:
        raise ConfigError(f"trace uses model(s) {', '.join(unknown)} without a checkpoint")
    devs = [resolve_device(d) for d in devices]
    vocab = {m: int(c.spec.arch.vocab_size or 0) if c.spec.arch else 0 for m, c in ckpts.items()}
    bad = [m for m, v in vocab.items() if v <= 0]
    if bad:
        raise ConfigError(f"model {bad[0]!r}: vocabulary size unknown, expected a decoder checkpoint")
    if capacity is None:
        capacity = default_capacity(devs, "capacity")
    if prompts is None:
        prompts = _prompts(trace, vocab, seed)
    sens = {m: float((sensitivity or {}).get(m, 1.0)) for m in ckpts}
    entries = build_entries({m: (c.spec, sens[m], 1) for m, c in ckpts.items()}, system, ARENA_ALIGNMENT)
    loader = dict(readers=readers, chunk_bytes=chunk_bytes, staging=staging)
    separate = len(devs) > 1 if processes is None else processes
    # CPU arenas compute on their cores: each process gets its own; a GPU's process is left unpinned, its
    # loader's reader threads need the host's cores and its kernels run on the card
    pin = separate and all(d.type == "cpu" for d in devs)
    cores = core_sets(len(devs), threads) if pin else [()] * len(devs)
    if system.pipeline != "none":
        for name, entry in entries.items():
            check_stage_units(name, entry, system.name)
    # units may be copied between arenas (`real.peers`), a pipeline's later stages use its leader's KV blocks
    copies = (system.source != "tiers" or system.pipeline != "none") and len(devs) > 1
    specs = [BackendSpec(str(dev), capacity, ARENA_ALIGNMENT, {m: str(c.path) for m, c in ckpts.items()},
                         system.granularity, system.min_unit_bytes, system.unit_divisor, system.kv_block_tokens,
                         loader, threads if separate else None, cores[i], shared=copies and separate)
             for i, dev in enumerate(devs)]
    gpus: list[RealDevice] = []

    def make_devices(env: WallClockEnvironment) -> list[RealDevice]:
        for i, spec in enumerate(specs):
            gpus.append(RealDevice(env, i, spec, ckpts, prompts, process=separate, verify=verify,
                                  execute_while_load=system.execute_while_load,
                                  startup=system.startup_plan() if system.startup else None))
        if warmup:  # every arena at once (each on its own thread, or its own process)
            for f in [g.thread.submit(g.link.call, "warm_up", ARENA_ALIGNMENT) for g in gpus]:
                f.result()
        if copies:
            connect(gpus)
        gc.collect()
        return gpus

    with torch_threads(None if separate else threads):
        gc_was = gc.isenabled()
        gc.disable()  # a collection pause inside a sub-millisecond load would be charged to that load
        try:
            run = run_on_wall_clock(
                make_devices, trace, system, entries=entries, sensitivity=sens, h2d_bps=h2d_bps,
                time_model=time_model or Roofline(GPUS["a100-80gb"]), seed=seed,
                sample_interval_s=sample_interval_s, progress=progress, slo=slo,
            )
            for g in gpus:
                g.close()
                g.check()
        finally:
            if gc_was:
                gc.enable()
            for g in gpus:
                g.close()
    summary = dict(run.summary)
    summary["lag_bound_s"] = lag_bound_s
    loads = pd.DataFrame([row for g in gpus for row in g.loads], columns=LOAD_COLUMNS)
    memory = pd.DataFrame([row for g in gpus for row in g.memory], columns=MEMORY_COLUMNS)
    steps = pd.DataFrame([row for g in gpus for row in g.steps], columns=STEP_COLUMNS)
    if system.prefetch != "none":  # how long cold starts waited for a prefetch read that had begun
        waits = steps.loc[steps["kind"] == "prefetch-wait", "seconds"]
        summary["prefetch_waits"] = int(len(waits))
        summary["prefetch_wait_max_s"] = float(waits.max()) if len(waits) else 0.0
    tokens = {rid: t for g in gpus for rid, t in g.tokens.items()}
    layers = pd.DataFrame([row for g in gpus for row in g.layers], columns=LAYER_COLUMNS)
    return ReplayResult(system.name, run.requests, run.timeline, memory, loads, steps, summary, run.wall_s, tokens,
                        layers)


def replay_system(setup: ReplaySetup, system: SystemSpec, progress: bool = False) -> ReplayResult:
    """Replay the setup's trace under one of its systems."""
    from tqdm import tqdm

    real = setup.real
    interval = setup.config["outputs"]["sample_interval_s"]
    if interval == "auto":
        duration = float(setup.trace["arrival_s"].iloc[-1]) if len(setup.trace) else 0.0
        interval = max(0.002, duration / 400)
    gpu = setup.config["cluster"]
    spec = GPUS[gpu["gpu"]]
    h2d = float(gpu["gpu_overrides"].get("pcie_bps", spec.pcie_bps))
    bar = tqdm(total=len(setup.trace), desc=f"replaying {system.name}", unit="req",
               disable=not (progress and sys.stderr.isatty()), leave=False, mininterval=0.5)
    try:
        return replay_trace(
            setup.ckpts, setup.trace, system, devices=setup.devices, capacity=setup.capacity,
            sensitivity={m["name"]: m["sensitivity"] for m in setup.config["models"]},
            seed=setup.config["seed"], **loader_options(real), sample_interval_s=float(interval), h2d_bps=h2d,
            time_model=Roofline(spec, gpu["compute_efficiency"], gpu["memory_efficiency"]),
            threads=real.get("threads"), lag_bound_s=float(real.get("lag_bound_s", LAG_BOUND_S)),
            processes=real.get("processes"),
            progress=(lambda n: bar.update(n - bar.n)) if progress else None,
            slo=Slo.from_config(setup.config.get("slo")),
        )
    finally:
        bar.close()


def lag_warning(summary: dict[str, Any]) -> str | None:
    """The line to print when a replay fell behind its trace, else None."""
    p99, bound = summary.get("lag_p99_s", 0.0), summary.get("lag_bound_s", LAG_BOUND_S)
    if p99 <= bound:
        return None
    return (f"warning: {summary['system']}: the replay fell behind the wall clock (lag p99 {p99 * 1e3:.2f} ms, "
            f"max {summary.get('lag_max_s', 0.0) * 1e3:.2f} ms > bound {bound * 1e3:.2f} ms): device work ran "
            "later than the trace placed it, so idle gaps and the overlap of GPUs differ from the trace's; "
            "lower real.time_scale or the load")


def run_replay(
    raw: dict[str, Any],
    base_dir: Any,
    out_dir: Any,
    *,
    devices: Sequence[str] = ("cpu",),
    split: int = 1,
    time_scale: float | None = None,
    systems: Sequence[str] | None = None,
    checkpoints: Any = None,
    sets: Sequence[str] = (),
    progress: bool = False,
    plots: bool | None = None,
    force: bool = False,
) -> pd.DataFrame:
    """Replay every (chosen) system into a run directory (`tangram_sim.rundir`): each system's results
    are stored as soon as it is done, run.json is written last; returns the summary table."""
    from pathlib import Path

    from tangram_sim.real.results import replay_config_text, write_meta, write_system
    from tangram_sim.rundir import JobKey, RunWriter, check_out_dir

    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    box: list[RunWriter] = []

    def claim(config: dict[str, Any], devs: list[torch.device]) -> RunWriter:
        writer = RunWriter(out_dir, config, kind="replay", force=force,
                           hash_extra={"devices": [str(d) for d in devs]})
        writer.check([JobKey(0, i) for i in range(len(config["systems"]))])
        writer.open()
        box.append(writer)
        return writer

    status = "interrupted"
    try:
        setup = prepare_replay(raw, base_dir, out_dir, devices=devices, split=split, time_scale=time_scale,
                               systems=systems, checkpoints=checkpoints, sets=sets, claim=claim)
        writer = box[0]
        writer.write_text("config.yaml", replay_config_text(setup))
        for note in setup.notes:
            print(f"note: {note}", file=sys.stderr)
        results = []
        for i, s in enumerate(setup.systems):
            r = replay_system(setup, s, progress)
            warning = lag_warning(r.summary)
            if warning:
                print(warning, file=sys.stderr)
            write_system(writer, i, r)
            results.append(r)
        summary = writer.combine()
        write_meta(writer, setup, results)
        if plots if plots is not None else setup.config["outputs"]["plots"]:
            from tangram_sim.experiments.runner import render

            writer.add_files(render(out_dir))
        status = None
    except Exception:
        status = "failed"
        raise
    finally:
        if box:  # the folder was claimed: run.json says how the replay ended
            box[0].close(status=status)
    return summary


def load_experiment(path: Any) -> tuple[dict[str, Any], Any]:
    """`load_yaml`, re-exported so callers need one import."""
    return load_yaml(path)

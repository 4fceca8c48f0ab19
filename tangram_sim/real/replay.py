"""Trace replay on a real device: the simulator's request lifecycle, in wall-clock time, on `RealGpu`.

Why a second event loop instead of driving the real device from SimPy: the replay must take the time
the device takes, so its clock is `time.perf_counter`, not an event queue. Everything else mirrors
`tangram_sim.sim.cluster` for one GPU, so the two can be compared request by request:

- routing: every request goes to the one device; the retention policy records one access per request
  at arrival (as the simulator's router does), not one per instance start;
- the device starts instances in FCFS order of the requests that need them; queued requests of the
  active model join its batch past an older request of another model only while that one has waited
  less than `fairness_window_s`; an idle instance stays for `keep_alive_s` unless another model's
  request is queued, which ends it at once (the queues and these rules are
  `tangram_sim.policies.lifecycle`, which the simulator uses too);
- cold start = `RealGpu.start_instance` (packing plan, evictions, compaction, loads; the static KV pool
  of the baseline) then building the engine (the engine overhead); `load_s` is the first, `startup_s`
  the second;
- admitted requests are prefilled one by one (the engine has no ragged batching), each records its own
  first token; running requests decode in one continuous batch, one `decode_step` per token;
- KV that cannot be had makes a request wait (counted), or rejects it when nothing else runs; a batch
  that cannot grow preempts its newest member, which recomputes later.

The trace is the experiment's own (`load_trace`), time-compressed by the time scale: arrivals are
divided by it and everything else runs as fast as the device allows, so `experiment.sim.yaml`
(written next to the results: the same experiment with the checkpoints as models, one GPU with the
arena's capacity, and the trace's `rate_scale` multiplied by the time scale) simulates exactly what
was replayed. Outputs use the layout of `tangram-sim run`, so `tangram-sim plot` and `compare` work.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from tangram_sim.arena import Key, Region, State
from tangram_sim.errors import CapacityError, ConfigError
from tangram_sim.experiments.config import build_systems, dump_yaml, load_yaml
from tangram_sim.models.catalog import list_models
from tangram_sim.policies import KV, PACKING, RETENTION
from tangram_sim.policies.kv import KvPolicy
from tangram_sim.policies.lifecycle import ModelQueues, must_yield, preemption_victim
from tangram_sim.policies.retention import RetentionPolicy
from tangram_sim.real.checkpoints import SCALES, Derivation, make_checkpoint, make_derived_checkpoint
from tangram_sim.real.executor import LoadStats, RealGpu, resolve_device
from tangram_sim.real.loader import DEFAULT_CHUNK_BYTES, Checkpoint, open_checkpoint
from tangram_sim.real.memory import driver_info
from tangram_sim.sim.hardware import GPUS, GiB
from tangram_sim.sim.metrics import (
    TIMELINE_COLUMNS,
    accounting_problems,
    requests_frame,
    summarize,
    timeline_frame,
)
from tangram_sim.sim.systems import SystemSpec
from tangram_sim.traces.spec import load_trace, resolve_path

__all__ = [
    "MEMORY_COLUMNS",
    "ReplayInvariantError",
    "ReplayResult",
    "ReplaySetup",
    "load_experiment",
    "loader_options",
    "prepare_replay",
    "replay_system",
    "replay_trace",
    "run_replay",
    "torch_threads",
    "write_results",
]

ALIGNMENT = 512  # the simulator's arena alignment, so both sides take the same packing decisions
MEMORY_COLUMNS = [
    "time_s", "gpu", "device", "source", "total_bytes", "used_bytes", "free_bytes", "torch_allocated",
    "torch_reserved",
]
LOAD_COLUMNS = [
    "rid", "model", "units", "units_loaded", "loaded_bytes", "moved_bytes", "plan_s", "move_s", "read_s",
    "total_s", "engine_s", "read_gbps",
]
SPIN_S = 0.002  # sleeps shorter than this spin instead: time.sleep overshoots by ~0.1 ms


class ReplayInvariantError(AssertionError):
    """A conservation check failed at the end of a replay: a bug, never a user mistake."""


# ------------------------------------------------------------------ per-request state
class _Req:
    """One trace request and what was measured; the attribute names are `requests_frame`'s."""

    __slots__ = (
        "rid", "arrival", "model", "input_tokens", "output_tokens", "gpu", "cold", "queue_s", "load_s",
        "bytes_needed", "bytes_loaded", "bytes_reused", "bytes_moved", "bytes_evicted",
        "bytes_extra_evicted", "startup_s", "ttft_s", "e2e_s", "waited_for_kv_s", "preemptions",
        "outcome", "reason", "prompt", "seq", "done", "kv_wait_since",
    )

    def __init__(self, rid: int, arrival: float, model: str, inp: int, out: int, prompt: list[int]) -> None:
        self.rid = rid  # row in the trace
        self.arrival = arrival  # seconds after the replay started (compressed trace time)
        self.model = model  # model name
        self.input_tokens = inp  # prompt length
        self.output_tokens = out  # tokens to generate (the first comes from prefill)
        self.gpu = -1  # device index that served it
        self.cold = False  # it started its instance
        self.queue_s = 0.0  # arrival -> start of its cold start or of its prefill
        self.load_s = 0.0  # cold start: start_instance (plan, evictions, moves, loads)
        self.bytes_needed = 0  # cold start: the model's weight bytes
        self.bytes_loaded = 0  # cold start: read from the checkpoint
        self.bytes_reused = 0  # cold start: already resident
        self.bytes_moved = 0  # cold start: compaction copies
        self.bytes_evicted = 0  # cold start: retained bytes evicted (units and static KV pool)
        self.bytes_extra_evicted = 0  # of those, beyond the free-byte shortfall
        self.startup_s = 0.0  # cold start: building the engine on the arena views
        self.ttft_s = float("nan")  # arrival -> first token
        self.e2e_s = float("nan")  # arrival -> last token
        self.waited_for_kv_s = 0.0  # time it could not be admitted for lack of KV memory
        self.preemptions = 0  # times it was evicted from the batch to free KV
        self.outcome = ""  # completed | rejected
        self.reason = ""  # why rejected
        self.prompt = prompt  # token ids
        self.seq = -1  # RealGpu sequence id while it runs
        self.done = 0  # tokens generated so far
        self.kv_wait_since = -1.0  # when it first could not get KV (-1: not waiting)


class _PerRequestAccess(RetentionPolicy):
    """The retention policy, fed one access per request at arrival, as the simulator feeds it.

    `RealGpu.start_instance` records an access per instance start; the simulator's router records one
    per request, which is what the access shares of tangram's rule are meant to count.
    """

    def __init__(self, inner: RetentionPolicy) -> None:
        self.inner = inner  # the configured policy
        self.retains = inner.retains  # read by RealGpu.end_instance

    def arrive(self, model: str, keys: Sequence[Key], now: float) -> None:
        self.inner.record_access(model, keys, now)

    def record_access(self, model: str, unit_keys: Sequence[Key], now: float) -> None:
        """Ignored: accesses come from `arrive`."""

    def on_evict(self, key: Key, now: float) -> None:
        self.inner.on_evict(key, now)

    def value(self, region: Region, now: float) -> float:
        return self.inner.value(region, now)

    def eviction_order(self, candidates: Iterable[Region], now: float) -> list[Key]:
        return self.inner.eviction_order(candidates, now)


@dataclass(slots=True)
class ReplayResult:
    system: str  # system name
    requests: pd.DataFrame  # REQUEST_COLUMNS, one row per trace request
    timeline: pd.DataFrame  # TIMELINE_COLUMNS from the arena, sampled
    memory: pd.DataFrame  # MEMORY_COLUMNS: device memory readings at the same instants
    loads: pd.DataFrame  # LOAD_COLUMNS: one row per cold start (where its time went)
    summary: dict[str, Any]  # `summarize` of the requests, plus replay figures
    wall_s: float  # seconds the replay took


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


def _sleep_until(clock: Callable[[], float], t: float) -> None:
    """Sleep, then spin the last bit: arrivals are replayed to within microseconds, not ~0.1 ms."""
    while True:
        left = t - clock()
        if left <= 0:
            return
        if left > SPIN_S:
            time.sleep(left - SPIN_S / 2)


class _Replayer:
    """One device, one system, one trace (see the module docstring for the lifecycle)."""

    def __init__(
        self,
        gpu: RealGpu,
        ckpts: dict[str, Checkpoint],
        system: SystemSpec,
        requests: list[_Req],
        retention: _PerRequestAccess,
        sample_interval_s: float,
        progress: Callable[[int], Any] | None,
    ) -> None:
        self.gpu = gpu
        self.ckpts = ckpts
        self.system = system
        self.requests = requests
        self.retention = retention
        self.sample_interval_s = sample_interval_s
        self.progress = progress
        self.keys = {m: [lay.unit.key for lay in c.layouts(system.granularity, system.min_unit_bytes)]
                     for m, c in ckpts.items()}
        self.queues: ModelQueues[_Req] = ModelQueues()  # FCFS per model, the simulator's rules
        self.active: str | None = None  # model of the running instance
        self.running: list[_Req] = []  # its continuous batch, in admission order
        self.next = 0  # index of the next arrival in `requests`
        self.finished = 0  # requests with an outcome
        self.busy_s = 0.0  # cold starts + prefill + decode
        self.moved_bytes = 0  # compaction bytes
        self.timeline: list[tuple] = []
        self.memory: list[tuple] = []
        self.loads: list[tuple] = []
        self._last_sample = -float("inf")
        self._t0 = 0.0  # perf_counter at the start of the replay
        self._idle_since = 0.0  # when the active instance last ran out of work

    def now(self) -> float:
        return time.perf_counter() - self._t0

    # ------------------------------------------------------------ the loop
    def run(self) -> float:
        """Replay every request; returns the wall time. Outcomes are in the request objects."""
        self._t0 = time.perf_counter()
        self._sample(0.0, force=True)
        reqs = self.requests
        while True:
            self._poll()
            if not self.queues:
                upcoming = reqs[self.next].arrival if self.next < len(reqs) else None
                if self.active is None:
                    if upcoming is None:
                        break
                    _sleep_until(self.now, upcoming)
                    continue
                expiry = self._idle_since + self.system.keep_alive_s
                if upcoming is not None and upcoming <= expiry:
                    _sleep_until(self.now, upcoming)
                    continue  # the arrival is routed by the next _poll
                if upcoming is None and self.finished == len(reqs):
                    self._end_instance()  # nothing will come: no need to wait out the keep-alive
                    continue
                _sleep_until(self.now, expiry)
                self._poll()
                if not self.queues:
                    self._end_instance()
                continue
            head = self.queues.head()
            assert head is not None
            if self.active != head.model:
                if self.active is not None:
                    self._end_instance()
                    continue
                self._cold_start(head)
                if self.active is None:
                    continue  # it could not start (the head was rejected)
            self._serve()
            self._idle_since = self.now()
        end = self.now()
        self._sample(end, force=True)
        return end

    def _poll(self) -> None:
        """Route every request that has arrived by now (the retention policy sees the access)."""
        reqs = self.requests
        if self.next >= len(reqs):
            return
        now = self.now()
        while self.next < len(reqs) and reqs[self.next].arrival <= now:
            req = reqs[self.next]
            self.next += 1
            self.retention.arrive(req.model, self.keys[req.model], req.arrival)
            self.queues.push(req)

    # ------------------------------------------------------------ instances
    def _cold_start(self, head: _Req) -> None:
        gpu = self.gpu
        ckpt = self.ckpts[head.model]
        arena = gpu.arena
        # Free-byte shortfall before the plan, for the simulator's extra-eviction figure.
        layouts = ckpt.layouts(self.system.granularity, self.system.min_unit_bytes)
        short = sum(arena.align(lay.nbytes) for lay in layouts if arena.lookup(lay.unit.key) is None)
        short = max(0, short - arena.free_bytes)
        t0 = self.now()
        head.cold = True
        head.queue_s = t0 - head.arrival
        head.gpu = 0
        try:
            stats: LoadStats = gpu.start_instance(ckpt, now=t0)
        except CapacityError as exc:  # validated to fit, so only a policy bug gets here
            self.queues.pop(head.model)
            self._reject(head, f"load-failed: {exc}")
            return
        t1 = self.now()
        gpu.engine(head.model)
        t2 = self.now()
        self.active = head.model
        head.load_s = t1 - t0
        head.startup_s = t2 - t1
        head.bytes_needed = stats.needed_bytes
        head.bytes_loaded = stats.loaded_bytes
        head.bytes_reused = stats.reused_bytes
        head.bytes_moved = stats.moved_bytes
        head.bytes_evicted = stats.evicted_bytes
        head.bytes_extra_evicted = max(0, stats.evicted_bytes - short)
        self.moved_bytes += stats.moved_bytes
        self.busy_s += t2 - t0
        read = stats.read
        self.loads.append((
            head.rid, head.model, stats.units, stats.units_loaded, stats.loaded_bytes, stats.moved_bytes,
            stats.plan_s, stats.move_s, stats.load_s, stats.total_s, t2 - t1, read.gbps if read else 0.0,
        ))
        self._sample(t2)

    def _end_instance(self) -> None:
        assert self.active is not None and not self.running
        self.gpu.end_instance(self.active)
        self.active = None
        self._sample(self.now())

    # ------------------------------------------------------------ serving
    def _serve(self) -> None:
        """The continuous batch of the active instance, until it drains and cannot admit more."""
        gpu = self.gpu
        system = self.system
        model = self.active
        assert model is not None
        queues = self.queues
        running = self.running
        while True:
            admitted = 0
            while len(running) < system.max_batch:
                req = queues.first(model)
                if req is None:
                    break
                now = self.now()
                if must_yield(queues.head(exclude=model), req, now, system.fairness_window_s):
                    break  # an older request of another model has waited long enough
                try:
                    step = gpu.prefill(model, req.prompt, now=now)
                except CapacityError:
                    if not running and not admitted:
                        queues.pop(model)
                        self._reject(req, "kv-capacity")
                        continue
                    if req.kv_wait_since < 0:
                        req.kv_wait_since = now
                    break
                end = self.now()
                self.busy_s += end - now
                queues.pop(model)
                if req.kv_wait_since >= 0:
                    req.waited_for_kv_s += now - req.kv_wait_since
                    req.kv_wait_since = -1.0
                if not req.cold:
                    req.queue_s = now - req.arrival
                    req.gpu = 0
                if req.ttft_s != req.ttft_s:  # NaN: a preempted request keeps its first TTFT
                    req.ttft_s = end - req.arrival
                req.seq = step.rids[0]
                req.done = 1
                admitted += 1
                if req.output_tokens <= 1:
                    self._complete(req, end)
                else:
                    running.append(req)
                self._poll()
            if admitted:
                continue
            if not running:
                return
            self._decode_step(running)
            self._poll()

    def _decode_step(self, running: list[_Req]) -> None:
        gpu = self.gpu
        while True:
            now = self.now()
            try:
                gpu.decode_step([r.seq for r in running], now=now)
                break
            except CapacityError:  # the batch cannot grow: preempt as the simulator does
                victim = preemption_victim(running)
                if victim is None:  # alone and still too large
                    self._reject(running.pop(), "kv-capacity")
                    return
                self._preempt(victim)
        end = self.now()
        self.busy_s += end - now
        still = []
        for req in running:
            req.done += 1
            if req.done >= req.output_tokens:
                self._complete(req, end)
            else:
                still.append(req)
        running[:] = still

    def _preempt(self, req: _Req) -> None:
        self.running.remove(req)
        self.gpu.finish(req.seq)
        req.seq = -1
        req.done = 0
        req.preemptions += 1
        self.queues.push_front(req)

    def _complete(self, req: _Req, now: float) -> None:
        self.gpu.finish(req.seq)
        req.seq = -1
        req.e2e_s = now - req.arrival
        req.outcome = "completed"
        self._finish()
        self._sample(now)

    def _reject(self, req: _Req, reason: str) -> None:
        if req.seq >= 0:
            self.gpu.finish(req.seq)
            req.seq = -1
        req.outcome = "rejected"
        req.reason = reason
        req.gpu = 0
        self._finish()

    def _finish(self) -> None:
        self.finished += 1
        if self.progress is not None:
            self.progress(self.finished)

    # ------------------------------------------------------------ timeline
    def _sample(self, now: float, force: bool = False) -> None:
        if not force and now - self._last_sample < self.sample_interval_s:
            return
        self._last_sample = now
        arena = self.gpu.arena
        pinned = 0
        for region in arena.regions():
            if region.pin_count and region.state is State.RESIDENT:
                pinned += region.size
        resident = arena.bytes_in(State.RESIDENT)
        self.timeline.append((
            now, 0, self.active or "", pinned, resident - pinned, arena.bytes_in(State.KV),
            arena.bytes_in(State.LOADING), arena.free_bytes, arena.largest_free(), arena.fragmentation(),
        ))
        m = self.gpu.memory()
        self.memory.append((now, 0, m.device, m.source, m.total_bytes, m.used_bytes, m.free_bytes,
                            m.torch_allocated, m.torch_reserved))


# ------------------------------------------------------------------ one system
def _retention(system: SystemSpec, trace: pd.DataFrame, sensitivity: dict[str, float],
               h2d_bps: float) -> RetentionPolicy:
    """The policy with the parameters `simulate` gives it (bandwidth, sensitivities, Belady's future)."""
    params = dict(system.retention_params)
    if system.retention in ("tangram", "decayed-frequency"):
        params.setdefault("host_to_gpu_bps", h2d_bps)
        params.setdefault("sensitivity", dict(sensitivity))
    if system.retention == "belady":
        future: dict[str, list[float]] = {}
        for t, m in zip(trace["arrival_s"].tolist(), trace["model"].astype(str).tolist()):
            future.setdefault(m, []).append(float(t))
        params["future"] = future
    return RETENTION.create(system.retention, **params)


def _kv_policy(system: SystemSpec) -> KvPolicy:
    extra = {"fraction": system.kv_fraction} if system.kv == "static" else {}
    return KV.create(system.kv, block_tokens=system.kv_block_tokens, **extra)


def _prompts(trace: pd.DataFrame, vocab: dict[str, int], seed: int) -> list[list[int]]:
    """Random prompt token ids per request, from the experiment seed (made before the clock starts)."""
    rng = np.random.default_rng([seed, 0x7E41])
    models = trace["model"].astype(str).tolist()
    lengths = trace["input_tokens"].astype(int).tolist()
    return [rng.integers(0, vocab[m], size=max(1, n)).tolist() for m, n in zip(models, lengths)]


def _check(reqs: Sequence[_Req], rep: _Replayer, gpu: RealGpu) -> None:
    problems = accounting_problems(reqs, rep.finished)
    if rep.queues or rep.active is not None:
        problems.append(f"{len(rep.queues)} requests still queued, instance {rep.active!r} still active")
    gpu.check()
    arena = gpu.arena
    leaked = arena.bytes_in(State.KV) + arena.bytes_in(State.LOADING)
    pinned = sum(r.size for r in arena.regions() if r.pin_count)
    if leaked or pinned:
        problems.append(f"{leaked} KV/loading and {pinned} pinned bytes left after the replay")
    if problems:
        raise ReplayInvariantError("; ".join(problems))


def replay_trace(
    ckpts: dict[str, Checkpoint],
    trace: pd.DataFrame,
    system: SystemSpec,
    *,
    device: str | torch.device = "cpu",
    capacity: int | None = None,
    sensitivity: dict[str, float] | None = None,
    seed: int = 0,
    readers: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    staging: str = "auto",
    sample_interval_s: float = 0.01,
    h2d_bps: float = 25e9,
    warmup: bool = True,
    threads: int | None = None,
    progress: Callable[[int], Any] | None = None,
) -> ReplayResult:
    """Replay `trace` (canonical columns; `arrival_s` already compressed) under `system` on `device`.

    `ckpts` maps every model of the trace to its opened checkpoint. The arena holds `capacity` bytes
    (default: 90% of free memory on CUDA). Raises ReplayInvariantError if a request is unaccounted.
    """
    unknown = sorted(set(trace["model"].astype(str)) - set(ckpts))
    if unknown:
        raise ConfigError(f"trace uses model(s) {', '.join(unknown)} without a checkpoint")
    dev = resolve_device(device)
    vocab = {m: int(c.spec.arch.vocab_size or 0) if c.spec.arch else 0 for m, c in ckpts.items()}
    bad = [m for m, v in vocab.items() if v <= 0]
    if bad:
        raise ConfigError(f"model {bad[0]!r}: vocabulary size unknown, expected a decoder checkpoint")
    prompts = _prompts(trace, vocab, seed)
    reqs = [
        _Req(i, float(a), str(m), int(n_in), int(n_out), p)
        for i, (a, m, n_in, n_out, p) in enumerate(zip(
            trace["arrival_s"].tolist(), trace["model"].astype(str).tolist(),
            trace["input_tokens"].tolist(), trace["output_tokens"].tolist(), prompts))
    ]
    sens = {m: float((sensitivity or {}).get(m, 1.0)) for m in ckpts}
    retention = _PerRequestAccess(_retention(system, trace, sens, h2d_bps))
    loader = dict(readers=readers, chunk_bytes=chunk_bytes, staging=staging, alignment=ALIGNMENT,
                  min_unit_bytes=system.min_unit_bytes)
    with torch_threads(threads):
        if warmup:
            _warm_up(ckpts, dev, system, loader)
        gpu = RealGpu(dev, capacity, system.granularity, retention, PACKING.create(system.packing),
                      _kv_policy(system), **loader)
        try:
            rep = _Replayer(gpu, ckpts, system, reqs, retention, sample_interval_s, progress)
            gc.collect()
            gc_was = gc.isenabled()
            gc.disable()  # a collection pause inside a sub-millisecond load would be charged to that load
            try:
                wall = rep.run()
            finally:
                if gc_was:
                    gc.enable()
            _check(reqs, rep, gpu)
        finally:
            gpu.close()
    frame = requests_frame(reqs)
    summary: dict[str, Any] = {"system": system.name}
    summary.update(summarize(frame, rep.busy_s, rep.moved_bytes))
    summary["replay_end_s"] = wall
    loads = pd.DataFrame(rep.loads, columns=LOAD_COLUMNS)
    return ReplayResult(system.name, frame, timeline_frame(rep.timeline),
                        pd.DataFrame(rep.memory, columns=MEMORY_COLUMNS), loads, summary, wall)


def _warm_up(ckpts: dict[str, Checkpoint], dev: torch.device, system: SystemSpec,
             loader: dict[str, Any]) -> None:
    """Load, build, prefill and decode each model once on a scratch arena (page cache, kernels, threads),
    so the replay measures steady-state costs; the scratch arena is freed before the replay's."""
    for ckpt in ckpts.values():
        spec = ckpt.spec
        margin = spec.kv_bytes_per_token * 128 + 2**20  # KV of the warm-up tokens + unit alignment
        gpu = RealGpu(dev, spec.weight_bytes + margin, system.granularity, "none", "first-fit", "elastic",
                      **loader)
        try:
            gpu.start_instance(ckpt, now=0.0)
            step = gpu.prefill(ckpt.name, [1] * 16, now=0.0)
            gpu.decode_step(step.rids, now=0.0)
        finally:
            gpu.close()
        del gpu
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()


# ------------------------------------------------------------------ experiments
@dataclass(slots=True)
class ReplaySetup:
    """An experiment made ready to replay: checkpoints on disk, the compressed trace, the systems."""

    config: dict[str, Any]  # validated config of the (single) point
    base_dir: Path | None  # where the experiment's relative paths resolve
    out_dir: Path  # results folder
    device: torch.device  # the one device
    capacity: int  # arena bytes
    time_scale: float  # arrivals are divided by this
    ckpts: dict[str, Checkpoint]  # model name -> checkpoint
    trace: pd.DataFrame  # compressed trace (the simulator gets the same with rate_scale)
    systems: list[SystemSpec]  # systems to replay, in config order
    sim_config: dict[str, Any]  # experiment.sim.yaml
    real: dict[str, Any] = field(default_factory=dict)  # the `real:` section with defaults
    notes: list[str] = field(default_factory=list)  # what was changed to make it replayable


def _derivation(m: dict[str, Any], where: str) -> Derivation:
    d = m["derive"]
    if "share" in d:
        raise ConfigError(f"{where}.derive.share: the replay makes fine-tunes with share_first_layers only")
    return Derivation(m["name"], d["base"], float(d.get("share_first_layers", 0.5)))


def _reusable(folder: Path, provenance: dict[str, Any], dtype: str | None) -> bool:
    """A checkpoint made earlier with the same recipe (skips regenerating full-size weights)."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    if not any(folder.glob("*.safetensors")) or cfg.get("tangram_generated") != provenance:
        return False
    return dtype is None or cfg.get("torch_dtype") == dtype


def _checkpoints(config: dict[str, Any], base_dir: Path | None, ckpt_dir: Path,
                 real: dict[str, Any]) -> dict[str, Path]:
    """Model name -> checkpoint folder: given ones, a `real.checkpoints` folder, or made on the fly."""
    catalog = set(list_models())
    scale = real.get("scale", "tiny")
    if scale not in SCALES:
        raise ConfigError(f"real.scale: expected one of {', '.join(SCALES)}, got {scale!r}")
    dtype = real.get("dtype")
    folder = real.get("checkpoints")
    out: dict[str, Path] = {}
    for i, m in enumerate(config["models"]):
        where = f"models.{i}"
        name = m["name"]
        if m.get("tensor_parallel", 1) != 1:
            raise ConfigError(f"{where}.tensor_parallel: the replay runs one device, expected 1")
        if m.get("checkpoint"):
            out[name] = Path(m["checkpoint"])
        elif folder is not None:
            out[name] = Path(folder) / name
            if not out[name].is_dir():
                raise ConfigError(f"real.checkpoints: no folder {out[name]} for model {name!r}")
        elif "derive" in m:
            d = _derivation(m, where)
            prov = {"model": d.name, "scale": scale, "seed": 0, "base": d.base, "fraction": d.fraction}
            if d.base not in catalog:
                raise ConfigError(f"{where}.derive.base: {d.base!r} is not a catalog model to make")
            path = ckpt_dir / d.name
            if not _reusable(path, prov, _config_dtype(dtype)):
                make_derived_checkpoint(d, ckpt_dir, scale, dtype=dtype)
            out[name] = path
        elif name in catalog:
            prov = {"model": name, "scale": scale, "seed": 0, "base": None}
            path = ckpt_dir / name
            if not _reusable(path, prov, _config_dtype(dtype)):
                make_checkpoint(name, ckpt_dir, scale, dtype=dtype)
            out[name] = path
        else:
            p = Path(name).expanduser()
            p = p if p.is_absolute() or base_dir is None else base_dir / p
            if not p.is_dir():
                raise ConfigError(
                    f"{where}.name: {name!r} is neither a catalog model nor a checkpoint folder"
                )
            out[name] = p
    return out


def _config_dtype(dtype: str | None) -> str | None:
    if dtype is None:
        return None
    return {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}.get(dtype.lower(), dtype.lower())


def _sim_config(config: dict[str, Any], base_dir: Path | None, out_dir: Path, paths: dict[str, Path],
                capacity: int, time_scale: float, real: dict[str, Any]) -> dict[str, Any]:
    """The same experiment for `tangram-sim run`: checkpoints as models, one GPU of the arena's size,
    no host checkpoint cache (every real load reads the files), the compressed trace; the loader
    settings stay in `real:` so that `real calibrate` on this file loads the way the replay did."""
    cluster = copy.deepcopy(config["cluster"])
    cluster.update(nodes=1, gpus_per_node=1, gpu_memory_gib=capacity / GiB)
    cluster["tiers"] = {**cluster["tiers"], "host_cache_gib": 0.0, "ssd_holds_all": True}
    models = []
    for m in config["models"]:
        path = paths[m["name"]].resolve()
        try:
            rel = os.path.relpath(path, out_dir.resolve())
        except ValueError:  # another drive (Windows)
            rel = str(path)
        entry: dict[str, Any] = {"name": m["name"], "checkpoint": rel}
        if m.get("sensitivity", 1.0) != 1.0:
            entry["sensitivity"] = m["sensitivity"]
        models.append(entry)
    trace = copy.deepcopy(config["trace"])
    trace["rate_scale"] = float(trace.get("rate_scale", 1.0)) * time_scale
    for key in ("path", "token_source"):
        if trace.get(key):
            trace[key] = str(resolve_path(trace[key], base_dir, f"trace.{key}").resolve())
    description = (f"Simulation of the real replay of {config['name']} (time scale {time_scale:g}): "
                   "run with --calibration from `tangram-sim real calibrate`.")
    out = {
        "name": config["name"],
        "seed": config["seed"],
        "description": description,
        "cluster": cluster,
        "models": models,
        "trace": trace,
        "systems": copy.deepcopy(config["systems"]),
        "outputs": copy.deepcopy(config["outputs"]),
    }
    loader = {k: real[k] for k in ("readers", "chunk_mb", "staging", "threads") if real.get(k) is not None}
    if loader:
        out["real"] = loader
    return out


def prepare_replay(
    raw: dict[str, Any],
    base_dir: Path | None,
    out_dir: Path,
    *,
    devices: Sequence[str] = ("cpu",),
    time_scale: float | None = None,
    systems: Sequence[str] | None = None,
    checkpoints: str | Path | None = None,
    sets: Sequence[str] = (),
) -> ReplaySetup:
    """Validate, make (or find) the checkpoints, build the compressed trace, write experiment.sim.yaml.

    `devices` is a list so that a replay with one worker per device can come later; today it holds one.
    """
    from tangram_sim.experiments.runner import prepare

    if len(devices) != 1:
        raise ConfigError(f"--device: the replay runs on one device for now, got {len(devices)}")
    dev = resolve_device(devices[0])
    if checkpoints is not None:
        raw = {**raw, "real": {**(raw.get("real") or {}), "checkpoints": str(Path(checkpoints).resolve())}}
    if time_scale is not None:
        if not time_scale > 0:
            raise ConfigError(f"--time-scale {time_scale}: expected a positive number")
        raw = {**raw, "real": {**(raw.get("real") or {}), "time_scale": float(time_scale)}}
    _, points = prepare(raw, base_dir, sets)
    if len(points) != 1:
        raise ConfigError(
            f"sweep: the replay runs one point, got {len(points)}; pick one with --set KEY=VALUE"
        )
    config = points[0]["config"]
    real = config.get("real") or {"scale": "tiny", "time_scale": 1.0}
    c = config["cluster"]
    notes = []
    if c["nodes"] * c["gpus_per_node"] != 1:
        notes.append(f"replaying on one device: cluster.nodes x gpus_per_node = "
                     f"{c['nodes'] * c['gpus_per_node']} becomes 1 x 1 in experiment.sim.yaml")
    all_systems = build_systems(config)
    if systems:
        names = [s.name for s in all_systems]
        missing = [s for s in systems if s not in names]
        if missing:
            raise ConfigError(
                f"--system {missing[0]!r}: not in the experiment, expected one of {', '.join(names)}"
            )
        keep = [i for i, s in enumerate(all_systems) if s.name in systems]
        config = {**config, "systems": [config["systems"][i] for i in keep]}
        all_systems = [all_systems[i] for i in keep]
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = _checkpoints(config, base_dir, out_dir / "checkpoints", real)
    ckpts = {name: open_checkpoint(p) for name, p in paths.items()}
    if c.get("gpu_memory_gib") is not None:
        capacity = int(c["gpu_memory_gib"] * GiB)
    elif dev.type == "cuda":
        capacity = int(0.9 * torch.cuda.mem_get_info(dev)[0])
    else:
        raise ConfigError("cluster.gpu_memory_gib: required for a replay on the CPU (the arena's size)")
    capacity -= capacity % ALIGNMENT
    for name, ck in ckpts.items():
        need = ck.spec.weight_bytes + ck.spec.kv_bytes_per_token * max(s.kv_block_tokens for s in all_systems)
        if need > capacity:
            raise CapacityError(
                f"model {name}: needs {need} bytes (weights + one KV block) but the arena has {capacity}; "
                "raise cluster.gpu_memory_gib"
            )
    scale = float(real.get("time_scale", 1.0))
    sim = _sim_config(config, base_dir, out_dir, paths, capacity, scale, real)
    trace = load_trace(sim["trace"], [m["name"] for m in config["models"]], config["seed"], base_dir)
    (out_dir / "experiment.sim.yaml").write_text(dump_yaml(sim))
    return ReplaySetup(config, base_dir, out_dir, dev, capacity, scale, ckpts, trace, all_systems, sim, real,
                       notes)


def loader_options(real: dict[str, Any]) -> dict[str, Any]:
    """RealGpu loader keyword arguments from the `real:` section (calibration uses the same)."""
    return {
        "readers": real.get("readers"),
        "chunk_bytes": max(4096, int(real.get("chunk_mb", DEFAULT_CHUNK_BYTES / 2**20) * 2**20)),
        "staging": real.get("staging", "auto"),
    }


def replay_system(setup: ReplaySetup, system: SystemSpec, progress: bool = False) -> ReplayResult:
    """Replay the setup's trace under one of its systems."""
    from tqdm import tqdm

    real = setup.real
    interval = setup.config["outputs"]["sample_interval_s"]
    if interval == "auto":
        duration = float(setup.trace["arrival_s"].iloc[-1]) if len(setup.trace) else 0.0
        interval = max(0.002, duration / 400)
    gpu = setup.config["cluster"]
    h2d = float(gpu["gpu_overrides"].get("pcie_bps", GPUS[gpu["gpu"]].pcie_bps))
    bar = tqdm(total=len(setup.trace), desc=f"replaying {system.name}", unit="req", disable=not progress,
               leave=False, mininterval=0.5)
    try:
        return replay_trace(
            setup.ckpts, setup.trace, system, device=setup.device, capacity=setup.capacity,
            sensitivity={m["name"]: m["sensitivity"] for m in setup.config["models"]},
            seed=setup.config["seed"], **loader_options(real), sample_interval_s=float(interval), h2d_bps=h2d,
            threads=real.get("threads"),
            progress=(lambda n: bar.update(n - bar.n)) if progress else None,
        )
    finally:
        bar.close()


def run_replay(
    raw: dict[str, Any],
    base_dir: Path | None,
    out_dir: Path,
    *,
    devices: Sequence[str] = ("cpu",),
    time_scale: float | None = None,
    systems: Sequence[str] | None = None,
    checkpoints: str | Path | None = None,
    sets: Sequence[str] = (),
    progress: bool = False,
    plots: bool | None = None,
) -> pd.DataFrame:
    """Replay every (chosen) system and write the run-dir layout; returns the summary table."""
    setup = prepare_replay(raw, base_dir, out_dir, devices=devices, time_scale=time_scale, systems=systems,
                           checkpoints=checkpoints, sets=sets)
    for note in setup.notes:
        print(f"note: {note}", file=sys.stderr)
    results = [replay_system(setup, s, progress) for s in setup.systems]
    write_results(setup, results)
    if plots if plots is not None else setup.config["outputs"]["plots"]:
        from tangram_sim.experiments.runner import render

        render(out_dir)
    rows = pd.read_csv(out_dir / "summary.csv")
    return rows


def write_results(setup: ReplaySetup, results: Sequence[ReplayResult]) -> None:
    """config.yaml, summary.csv, timings.csv, requests/timeline/memory/loads parquet, replay.json."""
    out = setup.out_dir
    cfg = dict(setup.sim_config)
    cfg["description"] = f"Real replay on {setup.device} (time scale {setup.time_scale:g})."
    cfg["real"] = {**setup.real, "device": str(setup.device), "capacity_bytes": setup.capacity}
    (out / "config.yaml").write_text(dump_yaml(cfg))
    rows, timings, frames = [], [], {"requests": [], "timeline": [], "memory": [], "loads": []}
    for r in results:
        row = {"system": r.system, "point": 0}
        row.update({k: v for k, v in r.summary.items() if k != "system"})
        rows.append(row)
        timings.append({"system": r.system, "point": 0, "wall_s": round(r.wall_s, 3)})
        for key in frames:
            frame = getattr(r, key).copy()
            frame.insert(0, "point", 0)
            frame.insert(0, "system", r.system)
            frames[key].append(frame)
    pd.DataFrame(rows).to_csv(out / "summary.csv", index=False, float_format="%.6g")
    pd.DataFrame(timings).to_csv(out / "timings.csv", index=False)
    for key, parts in frames.items():
        if parts:
            pd.concat(parts, ignore_index=True).to_parquet(out / f"{key}.parquet", index=False)
    info = driver_info(setup.device)
    meta = {
        "experiment": setup.config["name"],
        "device": info,
        "host": platform.node(),
        "capacity_bytes": setup.capacity,
        "time_scale": setup.time_scale,
        "checkpoints": {m: str(c.path) for m, c in setup.ckpts.items()},
        "model_bytes": {m: c.spec.weight_bytes for m, c in setup.ckpts.items()},
        "wall_s": {r.system: r.wall_s for r in results},
        "timeline_columns": TIMELINE_COLUMNS,
    }
    (out / "replay.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")


def load_experiment(path: str | Path) -> tuple[dict[str, Any], Path]:
    """`load_yaml`, re-exported so callers need one import."""
    return load_yaml(path)

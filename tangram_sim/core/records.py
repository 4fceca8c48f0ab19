"""The request record, the tensor-parallel gang barrier and the per-model unit inventory.

One record type serves the simulator and the real replay: every field has one meaning in both, and the
request table (`core.metrics.requests_frame`) is written from it. What a real device needs to run a
request (token ids, its paged KV) stays on the device, keyed by `rid`, not here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import simpy

from tangram_sim.arena import Arena, Key
from tangram_sim.models.spec import ModelSpec
from tangram_sim.models.units import ReuseUnit, build_units

if TYPE_CHECKING:
    from tangram_sim.core.worker import GpuWorker
    from tangram_sim.specs.system import SystemSpec

EPS_TOKENS = 1e-6  # fluid decode: a request within this many tokens of a boundary has reached it


class Request:
    """One invocation and everything measured about it."""

    __slots__ = (
        "rid", "arrival", "model", "input_tokens", "output_tokens",
        "gpu", "cold", "queue_s", "load_s", "bytes_needed", "bytes_loaded", "bytes_reused",
        "bytes_moved", "bytes_evicted", "bytes_extra_evicted", "startup_s", "overlap_s", "first_layer_s",
        "ttft_s", "e2e_s",
        "waited_for_kv_s", "preemptions", "outcome", "reason",
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
        self.load_s = 0.0  # cold start: compaction copies and weight loading (0 when warm)
        self.startup_s = 0.0  # cold start: engine start (runtime init, binding the weights; 0 when warm)
        # cold start: load time hidden behind compute, i.e. the load time its first prefill computed
        # through with execute-while-load (compute inside the load's span). A serial cold start loads
        # everything before the first prefill, so it stays 0 there (and when warm); the summary's
        # mean_overlap_s reads it.
        self.overlap_s = 0.0
        self.first_layer_s = 0.0  # cold start: its begin -> the first layer resident (a serial start
        # lands its weights as a whole: startup before the weights + load; 0 when warm)
        self.bytes_needed = 0  # the model's bytes on the GPU(s), cold start or warm (0: never admitted)
        self.bytes_loaded = 0  # cold start: bytes that crossed PCIe
        self.bytes_reused = 0  # bytes already resident in the arena (warm: all of bytes_needed)
        self.bytes_moved = 0  # cold start: bytes compaction copied device-to-device
        self.bytes_evicted = 0  # cold start: retained unit bytes its packing plan evicted (not KV)
        self.bytes_extra_evicted = 0  # of those, evicted beyond the free-byte shortfall (fragmentation)
        self.ttft_s = math.nan  # arrival -> first token
        self.e2e_s = math.nan  # arrival -> last token
        self.waited_for_kv_s = 0.0  # time it could not be admitted for lack of KV memory
        self.preemptions = 0  # times it was evicted from the batch to free KV (recomputed later)
        self.outcome = ""  # "completed" or "rejected"
        self.reason = ""  # why rejected
        self.done_tokens = 0.0  # tokens generated so far (fluid in the simulator, whole on a real device)
        self.kv_limit = 0  # tokens whose KV is allocated
        self.kv_bytes = 0  # bytes of KV held
        self.kv_keys: list[tuple[Arena, Key]] = []  # arena regions of its KV (on-demand KV), all ranks
        self.kv_wait_since = -1.0  # when it first could not get KV (-1: not waiting)
        self.admitted_at = 0.0  # when it joined the batch
        self.gang: Gang | None = None  # tensor parallel: its pending instance start (`core.gang`); on a
        # placeholder, the gang it holds a follower's place in
        self.slot_of: Request | None = None  # set on a follower's placeholder for a gang's request


class LifecycleError(AssertionError):
    """A policy produced something the lifecycle cannot apply, or the lifecycle's own books disagree:
    a bug, never a user mistake."""


class Gang:
    """Barrier of a tensor-parallel instance start: every member GPU must be free first (`core.gang`)."""

    __slots__ = ("workers", "arrived", "ready", "released", "stages")

    def __init__(self, env: simpy.Environment, workers: tuple[GpuWorker, ...], stages: Stages | None = None) -> None:
        self.workers = workers  # leader first; rank = position
        self.stages = stages  # a pipelined cold start's stages, one per worker (None: tensor parallel)
        self.arrived: list[GpuWorker] = []  # members waiting at the barrier
        self.ready = env.event()  # all members are free: the cold start may begin
        self.released = env.event()  # the instance ended or the gang was cancelled: followers are free

    def arrive(self, worker: GpuWorker) -> None:
        if worker in self.arrived or worker not in self.workers or self.ready.triggered:
            raise LifecycleError(f"gpu {worker.gpu_id} cannot arrive at this gang's barrier")
        self.arrived.append(worker)
        if len(self.arrived) == len(self.workers):
            self.ready.succeed()

    def withdraw(self, worker: GpuWorker) -> None:
        """`worker` leaves the barrier before it filled (an older entry became its head)."""
        if worker not in self.arrived or self.ready.triggered:
            raise LifecycleError(f"gpu {worker.gpu_id} cannot withdraw from this gang's barrier")
        self.arrived.remove(worker)


@dataclass(slots=True, eq=False)
class Stages:
    """A pipelined instance's stages (`core.pipeline`), one per GPU of its group, leader first; a model of
    tensor-parallel degree 1 only, so a unit's key is the same on every GPU."""

    starts: tuple[int, ...]  # first layer of each stage (`policies.pipeline.split_layers`)
    rank_keys: tuple[tuple[Key, ...], ...]  # per stage: the keys of its units (what its GPU loads and pins)
    rank_units: tuple[tuple[tuple[Key, int], ...], ...]  # per stage: (key, bytes) of those units
    rank_aligned: tuple[tuple[int, ...], ...]  # per stage: their sizes in the arena (aligned)
    rank_bytes: tuple[int, ...]  # per stage: its units' bytes
    hop_s_per_token: tuple[float, ...]  # per hop (stage j -> j+1): one token's activations over its link
    kv_share: tuple[float, ...]  # per stage: its share of the layers (of a request's KV, moved at the end)
    leader_bps: tuple[float, ...]  # per stage: rate alone of its link to the leader (0.0 for the leader)
    # the leader's background load of the other stages' units: fires when they are resident there, with
    # True, or with False when the leader has no room for them (the instance then stays a pipeline)
    merged: simpy.Event
    consolidated: bool = False  # the followers were freed; the instance runs on the leader alone


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


def build_entries(models: Mapping[str, tuple[ModelSpec, float, int]], system: SystemSpec,
                  alignment: int) -> dict[str, ModelEntry]:
    """Model name -> its units at the system's granularity; `models` maps a name to (spec, retention
    sensitivity, tensor-parallel degree). Each rank holds 1/tp of every unit; shards of different ranks
    are different bytes."""
    entries: dict[str, ModelEntry] = {}
    for name, (spec, sensitivity, tp) in models.items():
        units = build_units(spec, system.granularity, system.min_unit_bytes, system.unit_divisor)
        shard = tuple(-(-u.nbytes // tp) for u in units)
        rank_keys = tuple(
            tuple(u.key if tp == 1 else f"{u.key}/tp{tp}.{rank}" for u in units) for rank in range(tp)
        )
        entries[name] = ModelEntry(
            spec=spec,
            units=units,
            tp=tp,
            rank_keys=rank_keys,
            rank_bytes=(shard,) * tp,
            rank_aligned=(tuple(-(-n // alignment) * alignment for n in shard),) * tp,
            nbytes=sum(shard) * tp,
            sensitivity=sensitivity,
        )
    return entries

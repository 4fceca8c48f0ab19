"""Placement: which GPU(s) start an instance for a request.

The driver (simulator or real executor) describes every feasible placement as a `PlacementOption`
(estimates only, no live objects) and the scheduler returns the index of the one to use. Keeping the
inputs plain data lets the same scheduler run in simulation and on hardware and makes it testable
with hand-made options. Ties are always broken by most free bytes, then lowest index, so runs repeat.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from tangram_sim.registry import Registry

__all__ = [
    "SCHEDULER",
    "AffinityScheduler",
    "LeastLoadedScheduler",
    "PlacementOption",
    "RandomScheduler",
    "RoundRobinScheduler",
    "Scheduler",
    "StorageAwareScheduler",
    "TtftAwareScheduler",
    "estimated_load_s",
    "missing_bytes",
    "pipelined_load_s",
    "reads_storage",
]


@dataclass(slots=True, frozen=True)
class PlacementOption:
    """One feasible placement of an instance, with the driver's estimates for it."""

    gpus: tuple[int, ...]  # the GPU(s) that would run the instance: N for tensor parallel
    node: int  # server that holds those GPUs
    queue_wait_s: float  # estimated seconds until these GPUs can start it
    free_bytes: int  # free arena bytes on these GPUs (summed)
    resident_bytes: int  # bytes of this model already resident on these GPUs
    model_bytes: int  # bytes the model needs on these GPUs
    in_host_cache: bool  # the node's DRAM holds the checkpoint
    host_to_gpu_bps: float  # host -> GPU bandwidth (PCIe), bytes/s
    storage_bps: float  # read bandwidth of where the checkpoint is when not in DRAM, bytes/s
    prefill_s: float  # estimated prefill time of the request on these GPUs
    load_overhead_s: float = 0.0  # fixed engine/instance start cost added to every load
    capacity_bytes: int = 0  # arena bytes of each of these GPUs (0: not given)
    layers: int = 0  # execute-while-load: the first prefill runs layer by layer as the model's layers
    # land, over this many layers (0: the load, then the prefill)
    # rate alone of the fastest whole copy of the model on another GPU that the system's source policy may
    # read (a peer over NVLink or PCIe, another node's GPU over RDMA; docs/topology.md); 0: none
    copy_bps: float = 0.0
    # seconds until the node's storage has read what earlier cold starts placed on it still read from it
    # (ServerlessLLM's loading queue q of its estimate q + n/b); without it every empty node ties and the
    # first one gets every cold start of a burst, its one SSD shared by all of them
    storage_wait_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.gpus:
            raise ValueError("a placement option needs at least one GPU")
        if not (self.host_to_gpu_bps > 0 and self.storage_bps > 0):
            raise ValueError(
                f"bandwidths must be positive, got {self.host_to_gpu_bps} and {self.storage_bps}"
            )
        if self.model_bytes < 0 or self.resident_bytes < 0 or self.free_bytes < 0 or self.capacity_bytes < 0:
            raise ValueError("byte counts of a placement option must be >= 0")
        if self.queue_wait_s < 0 or self.prefill_s < 0 or self.load_overhead_s < 0 or self.storage_wait_s < 0:
            raise ValueError("times of a placement option must be >= 0")


def missing_bytes(option: PlacementOption) -> int:
    """Bytes of the model that are not yet on these GPUs."""
    return max(0, option.model_bytes - option.resident_bytes)


def pipelined_load_s(load_s: float, prefill_s: float, layers: int) -> float:
    """The part of a load that a first token still waits for when the prefill computes each of `layers`
    equal layers as soon as it has landed: load + prefill overlapped is max(load/L + prefill, load +
    prefill/L) (the first layer's load, then all compute; or all the load, then the last layer's
    compute), less the prefill. `layers` <= 1: the whole load."""
    if layers <= 1:
        return load_s
    return max(load_s / layers + prefill_s, load_s + prefill_s / layers) - prefill_s


def estimated_load_s(option: PlacementOption, *, reuse: bool = True) -> float:
    """Seconds to bring the model onto these GPUs: overhead + bytes / bandwidth of the slowest tier.

    From host DRAM the bytes cross PCIe; otherwise they stream storage -> DRAM -> GPU pipelined, so the
    slower of the two links sets the pace. With `reuse` only the missing bytes move (Tangram); without
    it the whole model does (ServerlessLLM's model-level loading). With execute-while-load (`layers`),
    only the part of the load the prefill cannot hide counts (`pipelined_load_s`). A GPU copy faster than
    the host path (`copy_bps`) sets the rate instead.
    """
    nbytes = missing_bytes(option) if reuse else option.model_bytes
    if option.in_host_cache:
        bps = option.host_to_gpu_bps
    else:
        bps = min(option.host_to_gpu_bps, option.storage_bps)
    if option.copy_bps > bps:
        bps = option.copy_bps
    if option.layers > 1:
        return option.load_overhead_s + pipelined_load_s(nbytes / bps, option.prefill_s, option.layers)
    return option.load_overhead_s + nbytes / bps


def reads_storage(option: PlacementOption) -> bool:
    """The bytes would come from the node's storage (SSD or remote store): not in its DRAM cache, and no
    GPU copy faster than the storage path."""
    return not option.in_host_cache and option.copy_bps <= min(option.host_to_gpu_bps, option.storage_bps)


def _storage_wait(option: PlacementOption) -> float:
    """The node's storage backlog when this placement would read from it, else 0: a tie-break that sends
    equal placements to the node whose storage is free."""
    return option.storage_wait_s if option.resident_bytes < option.model_bytes and reads_storage(option) else 0.0


def _argmin(options: Sequence[PlacementOption], cost: Callable[[PlacementOption], float]) -> int:
    """Index of the lowest cost; ties: most free bytes, then lowest index."""
    return min(range(len(options)), key=lambda i: (cost(options[i]), -options[i].free_bytes, i))


class Scheduler:
    """Picks one of the feasible placements for a request of `model`."""

    needs: ClassVar[frozenset[str]] = frozenset()  # what the run passes it (`policies.needs`)

    def observe(self, model: str, gpu_bytes: int, now: float) -> None:
        """A request for `model` arrived at `now` (every request, warm or not, before any placement);
        the model needs `gpu_bytes` on each GPU that runs it. Schedulers that track popularity use it."""

    def home_of(self, model: str) -> tuple[int, ...] | None:
        """The GPUs this scheduler keeps `model` on (its homes), or None when it assigns no homes."""
        return None

    def choose(self, model: str, options: Sequence[PlacementOption], rng: random.Random) -> int:
        """Index into `options`. ValueError when there is none (the caller must queue the request)."""
        if not options:
            raise ValueError(f"no placement options for {model!r}")
        return self._choose(model, options, rng)

    def _choose(self, model: str, options: Sequence[PlacementOption], rng: random.Random) -> int:
        raise NotImplementedError


SCHEDULER = Registry[Scheduler]("scheduler")


@SCHEDULER.register("random")
class RandomScheduler(Scheduler):
    """Uniform choice; the rng is passed in so a seed reproduces the run."""

    def _choose(self, model: str, options: Sequence[PlacementOption], rng: random.Random) -> int:
        return rng.randrange(len(options))


@SCHEDULER.register("round-robin")
class RoundRobinScheduler(Scheduler):
    """Cycles through the options with one counter shared by all models."""

    def __init__(self) -> None:
        self.counter = 0  # choices made so far

    def _choose(self, model: str, options: Sequence[PlacementOption], rng: random.Random) -> int:
        i = self.counter % len(options)
        self.counter += 1
        return i


@SCHEDULER.register("least-loaded")
class LeastLoadedScheduler(Scheduler):
    """Shortest estimated queue wait."""

    def _choose(self, model: str, options: Sequence[PlacementOption], rng: random.Random) -> int:
        return _argmin(options, lambda o: o.queue_wait_s)


@SCHEDULER.register("sllm-storage-aware")
class StorageAwareScheduler(Scheduler):
    """ServerlessLLM: queue wait + whole-model load time from wherever the checkpoint is fastest."""

    def _choose(self, model: str, options: Sequence[PlacementOption], rng: random.Random) -> int:
        return _argmin(options, lambda o: o.queue_wait_s + estimated_load_s(o, reuse=False)
                       + (o.storage_wait_s if reads_storage(o) else 0.0))


@SCHEDULER.register("tangram-affinity")
class AffinityScheduler(Scheduler):
    """Tangram: among the GPUs available now, the one holding the largest share of the model's bytes.

    Available = no queued work ahead (queue_wait_s <= `idle_s`); an idle instance in keep-alive
    does not count as work, since a new request ends it. Affinity alone would pile every request of
    a model onto the one GPU that holds it while others sit idle, so when no GPU is available the
    shortest wait wins (ties: largest share, then most free bytes).
    """

    def __init__(self, idle_s: float = 0.0) -> None:
        self.idle_s = idle_s  # waits up to this count as available

    @staticmethod
    def share(option: PlacementOption) -> float:
        if option.model_bytes <= 0:
            return 1.0
        return min(1.0, option.resident_bytes / option.model_bytes)

    def _choose(self, model: str, options: Sequence[PlacementOption], rng: random.Random) -> int:
        available = [i for i, o in enumerate(options) if o.queue_wait_s <= self.idle_s]
        if available:
            return min(available, key=lambda i: (-self.share(options[i]), _storage_wait(options[i]),
                                                 -options[i].free_bytes, i))
        return _argmin(options, lambda o: (o.queue_wait_s, -self.share(o)))


@SCHEDULER.register("ttft-aware")
class TtftAwareScheduler(Scheduler):
    """Lowest estimated time to first token: queue wait + load of the missing bytes + prefill."""

    @staticmethod
    def estimated_ttft_s(option: PlacementOption) -> float:
        return option.queue_wait_s + estimated_load_s(option) + option.prefill_s

    def _choose(self, model: str, options: Sequence[PlacementOption], rng: random.Random) -> int:
        return _argmin(options, self.estimated_ttft_s)

"""Warm routing: does an arriving request join an active instance of its model, and which one?

The router (`core.router`) asks this before the scheduler: each active instance of the request's model
is described as a `WarmInstance` (plain data), in GPU order, and the policy returns the index of the
one to join, or None to have the scheduler place the request (a new instance, or the queue of a GPU).

- `least-loaded` (default): among the instances whose GPU queues nothing but this model (the request
  would otherwise wait behind a model switch) and whose tensor-parallel group has no member with work
  of its own, the one with the fewest queued + running requests (ties: lowest GPU), as long as that
  load is under the system's `max_batch`; else None.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from tangram_sim.policies.params import count
from tangram_sim.registry import Registry

__all__ = ["WARM_ROUTING", "LeastLoadedWarmRouting", "WarmInstance", "WarmRoutingPolicy"]


@dataclass(frozen=True, slots=True)
class WarmInstance:
    """An active instance of the request's model."""

    gpu: int  # its leader GPU
    queued: int  # requests queued on that GPU (every model)
    running: int  # requests in its batch
    clean: bool  # the GPU queues only this model and no gang member has work of its own


class WarmRoutingPolicy:
    """The contract of every warm routing policy (see the module docstring)."""

    needs: ClassVar[frozenset[str]] = frozenset()  # what the run passes it (`policies.needs`)

    def choose(self, model: str, instances: Sequence[WarmInstance]) -> int | None:
        """Index into `instances` (never empty) of the one to join, or None for the scheduler."""
        raise NotImplementedError


WARM_ROUTING = Registry[WarmRoutingPolicy]("warm routing policy")


@WARM_ROUTING.register("least-loaded")
class LeastLoadedWarmRouting(WarmRoutingPolicy):
    """The clean instance with the fewest queued + running requests, if under `max_batch`."""

    needs: ClassVar[frozenset[str]] = frozenset({"max_batch"})

    def __init__(self, max_batch: int = 32) -> None:
        self.max_batch = count("warm routing", "max_batch", max_batch)

    def choose(self, model: str, instances: Sequence[WarmInstance]) -> int | None:
        best = None
        best_load = 0
        for i, inst in enumerate(instances):
            if not inst.clean:
                continue
            load = inst.queued + inst.running
            if best is None or load < best_load or (load == best_load and inst.gpu < instances[best].gpu):
                best, best_load = i, load
        return best if best is not None and best_load < self.max_batch else None

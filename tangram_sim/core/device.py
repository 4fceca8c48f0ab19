"""What the lifecycle asks of a GPU: the `Device` interface, and the cold start it hands over.

The worker (`core.worker`) takes every decision on plain state - which units to evict, move and load,
which requests to admit, when KV grows and whom to preempt - and applies it to the arena's books
(memory through one entry point, `core.memory`: `acquire` plans it, `commit` books it and tells
retention). A device then does the work those decisions stand for and returns when it is done:

- `start_instance`: run the packing plan of a cold start (compaction copies, loads) and start the engine;
- `prefill`: one prefill iteration over a group of admitted requests (their first tokens);
- `decode`: advance the running batch (the modelled device by a fluid horizon, a real one by a step);
  these two, the most frequent, return the event to wait for and a function that gives the step's
  result once it has happened (no generator frame per step: the simulator runs millions of them);
- `kv_grown` / `kv_freed`: bind or drop the memory behind a request's KV bytes;
- `prefetch_source` / `prefetch_unit`: whether a unit may be prefetched, and the load of one
  prefetched unit, cancellable at any time (`core.prefetch`).

`start_instance` is a generator to be driven with `yield from` by the worker's SimPy process,
so the same process runs under the simulator's clock (`simpy.Environment`) and under the replay's wall
clock (`core.clock.WallClockEnvironment`). Two devices exist: the modelled one (`sim.device`: time model
and links) and the real one (`real.device`: torch copies and forward passes, durations measured).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import simpy

from tangram_sim.arena import Arena, Key
from tangram_sim.policies.packing import Move

if TYPE_CHECKING:
    from tangram_sim.core.records import Request
    from tangram_sim.core.storage import Node
    from tangram_sim.core.worker import GpuWorker, Instance

Work = Generator[simpy.Event, Any, Any]  # a device step, driven with `yield from`


@dataclass(slots=True)
class RankLoad:
    """One GPU's part of a cold start, decided and booked by the worker before the device runs it."""

    worker: GpuWorker  # the GPU (rank = position in the instance's group)
    missing: Sequence[tuple[Key, int]]  # (key, shard bytes) of the units to load, in plan order
    moves: list[Move]  # compaction copies, in the order the plan applied them
    moved_bytes: int  # bytes of those copies


class Device(Protocol):
    """One GPU as the lifecycle drives it (see the module docstring)."""

    gpu_id: int  # position in the cluster
    arena: Arena  # the memory books the worker plans on
    binds_memory: bool  # False: the books are all there is (the modelled device); the worker then skips
    # the calls below that only bind or read memory (kv_grown, kv_freed, pool_reserved, end_instance,
    # sampled), which are the simulator's most frequent calls

    def start_instance(self, inst: Instance, head: Request, loads: Sequence[RankLoad]) -> Work:
        """Run the cold start's copies and loads and start the engine; returns (startup_s, load_s)."""
        ...

    def prefill(self, inst: Instance, batch: Sequence[Request]) -> tuple[simpy.Event, Callable[[], float]]:
        """One prefill iteration over `batch` (its requests' KV is bound): (event, seconds it took)."""
        ...

    def decode(self, inst: Instance, running: Sequence[Request], horizon: float, kv_tokens: float,
               wake: simpy.Event | None) -> tuple[simpy.Event, Callable[[], tuple[float, float]]]:
        """Advance the batch by at most `horizon` tokens, stopping early when `wake` fires (if the device
        can stop): (event, () -> (seconds, tokens each running request advanced))."""
        ...

    def kv_grown(self, inst: Instance, req: Request, keys: Sequence[Key], nbytes: int) -> None:
        """`req`'s KV grew by `nbytes`: new arena regions `keys` (on-demand KV) or from the static pool."""
        ...

    def kv_freed(self, inst: Instance, req: Request) -> None:
        """`req` gave its KV back (completed, preempted or rejected)."""
        ...

    def pool_reserved(self, inst: Instance, keys: Sequence[Key]) -> None:
        """A static KV pool of regions `keys` was reserved for `inst` on this GPU."""
        ...

    def prefetch_source(self, node: Node, key: Key) -> bool:
        """Whether unit `key` may be prefetched onto this GPU now (from where the device reads it)."""
        ...

    def prefetch_unit(self, key: Key, nbytes: int) -> tuple[simpy.Event, Callable[[], float | None]]:
        """Load one unit booked as loading: (event when it is in place, cancel). `cancel()` stops it at
        once, the region about to be freed; it returns the bytes that crossed for nothing, or None when
        the unit had already arrived."""
        ...

    def end_instance(self, inst: Instance) -> None:
        """The instance ended; its weights stay in the arena's books as the retention policy decided."""
        ...

    def sampled(self, now: float) -> None:
        """The timeline took a sample now (a real device reads its memory counters)."""
        ...

    def close(self) -> None:
        """Release threads and buffers."""
        ...


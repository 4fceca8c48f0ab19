"""What the lifecycle asks of a GPU: the `Device` interface, and the cold start it hands over.

The worker (`core.worker`) takes every decision on plain state - which units to evict, move and load,
which requests to admit, when KV grows and whom to preempt - and applies it to the arena's books
(memory through one entry point, `core.memory`: `acquire` plans it, `commit` books it and tells
retention). A device then does the work those decisions stand for and returns when it is done:

- `start_instance`: run the packing plan of a cold start (compaction copies, loads) and start the engine,
  telling the worker as units land (`landed`: the worker books each unit resident then, not when the
  start returns); with execute-while-load (`overlaps_load`) it returns as soon as the engine may compute,
  the weights still landing, with a `LayerProgress` that says when each layer has landed;
- `prefill`: one prefill iteration over a group of admitted requests (their first tokens); the first one
  of an instance whose weights are still landing computes layer by layer (`pipeline`);
- `decode`: advance the running batch (the modelled device by a fluid horizon, a real one by a step);
  these two, the most frequent, return the event to wait for and a function that gives the step's
  result once it has happened (no generator frame per step: the simulator runs millions of them);
- `kv_grown` / `kv_freed`: bind or drop the memory behind a request's KV bytes;
- `prefetch_source` / `prefetch_unit`: whether a unit may be prefetched, and the load of one
  prefetched unit, cancellable at any time (`core.prefetch`);
- `load_units` / `consolidate`: a pipelined instance's leader loading the other stages' units, and
  serving alone once it has them (`core.pipeline`).

`start_instance` is a generator to be driven with `yield from` by the worker's SimPy process,
so the same process runs under the simulator's clock (`simpy.Environment`) and under the replay's wall
clock (`core.clock.WallClockEnvironment`). Two devices exist: the modelled one (`sim.device`: time model
and links) and the real one (`real.device`: torch copies and forward passes, durations measured).
"""

from __future__ import annotations

import math
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


Landed = Callable[[RankLoad, Sequence[tuple[Key, int]]], None]  # (a rank's part, units now resident there)


class LayerProgress:
    """One cold start's weights landing layer by layer, with execute-while-load: made by the device that
    starts the instance, which fills `ready` and calls `finish` when the last unit of every rank has
    landed; read by the instance's first prefill (`pipeline`) and by the worker's cold start
    (`core.coldstart`). Layers are the model's `models.layers.layer_blocks`, in compute order."""

    __slots__ = ("ready", "done", "finished", "load_start", "load_end", "consumed", "head", "on_loaded", "pending",
                 "waiters")

    def __init__(self, env: simpy.Environment, ready: list[float], load_start: float) -> None:
        self.ready = ready  # per layer: when it was resident on every rank (final once `finished`)
        self.done = env.event()  # fires once every unit has landed
        self.finished = False  # `done` has been triggered
        self.load_start = load_start  # when the weights began to load (compaction copies first)
        self.load_end = math.nan  # when the last unit landed
        self.consumed = False  # the first prefill has taken it: later ones find every layer resident
        self.head: Request | None = None  # the request that started the instance (gets `overlap_s`)
        self.on_loaded: Callable[[LayerProgress], None] | None = None  # the worker's hook, before `done`
        # per layer: landings still to come before it is whole (0: landed); None: not tracked (a device
        # that tracks it lets a pass compute the landed layers before the load ends, `core.handoff`)
        self.pending: list[int] | None = None
        self.waiters: dict[int, simpy.Event] = {}  # layer -> an event its landing triggers (`landed`)

    def landed(self, layer: int) -> None:
        """`layer` has landed (a device that tracks `pending` calls this): wake whoever waits for it."""
        event = self.waiters.pop(layer, None)
        if event is not None:
            event.succeed()

    def finish(self, now: float) -> None:
        """Every unit has landed at `now`: `ready` is final."""
        self.load_end = now
        self.finished = True
        if self.on_loaded is not None:
            self.on_loaded(self)
        self.done.succeed()

    def computed(self, starts: Sequence[float], finishes: Sequence[float]) -> None:
        """The first prefill computes layer i over [starts[i], finishes[i]]: the load time it hides (the
        compute inside the load's span) becomes the head's `overlap_s`."""
        lo, hi = self.load_start, self.load_end
        hidden = 0.0
        for s, f in zip(starts, finishes):
            hidden += max(0.0, min(f, hi) - max(s, lo))
        if self.head is not None:
            self.head.overlap_s = hidden


def pipeline(ready: Sequence[float], compute: Sequence[float], start: float) -> tuple[list[float], list[float]]:
    """Layer i of a prefill starts once it is resident and layer i-1 is done: s_i = max(ready_i, f_{i-1})
    (f_{-1} = `start`, when the iteration began), f_i = s_i + compute_i. This is exactly what running it
    event by event gives (a process waiting for each layer's landing, then computing it), so a device may
    evaluate it once every ready time is known; the last finish is >= the last landing, so that is never
    after the fact. Decode is never part of it: its first step needs the first token, so the last layer.
    Returns (starts, finishes)."""
    starts: list[float] = []
    finishes: list[float] = []
    f = start
    for r, c in zip(ready, compute):
        s = r if r > f else f
        f = s + c
        starts.append(s)
        finishes.append(f)
    return starts, finishes


@dataclass(slots=True)
class Started:
    """What `start_instance` returns."""

    startup_s: float  # the stages' time on the critical path (engine start; not the load)
    load_s: float  # compaction copies and loads; NaN while they are still landing (`progress` says when)
    progress: LayerProgress | None = None  # execute-while-load: the weights still landing


class Device(Protocol):
    """One GPU as the lifecycle drives it (see the module docstring)."""

    gpu_id: int  # position in the cluster
    arena: Arena  # the memory books the worker plans on
    overlaps_load: bool  # it can run an instance's first prefill while its weights land (execute_while_load)
    # it reads units from other GPUs' copies (`core.sources`) and joins multicast streams
    # (`core.multicast`); a device without these attributes reads every unit from its own node's tiers
    reads_gpu_copies: bool
    joins_multicast: bool
    runs_pipelines: bool  # a cold start may run as stages on several GPUs (`core.pipeline`)
    binds_memory: bool  # False: the books are all there is (the modelled device); the worker then skips
    # the calls below that only bind or read memory (kv_grown, kv_freed, pool_reserved, end_instance,
    # sampled), which are the simulator's most frequent calls

    def start_instance(self, inst: Instance, head: Request, loads: Sequence[RankLoad], landed: Landed) -> Work:
        """Run the cold start's stages, copies and loads; call `landed(load, units)` as units land (each
        missing unit once, in plan order per rank; a device that cannot tell lands them all at once, with
        an empty call for a rank that loads nothing). Returns `Started`: when the engine serves, with
        everything landed, or, with execute-while-load, as soon as it may compute (`progress` set)."""
        ...

    def prefill(self, inst: Instance, batch: Sequence[Request]) -> tuple[simpy.Event, Callable[[], float]]:
        """One prefill iteration over `batch` (its requests' KV is bound): (event, seconds it took). When
        `inst.loading` is a `LayerProgress` not yet consumed, this is the instance's first prefill while
        its weights land: it consumes it, computes layer by layer as `pipeline` says and reports the
        layers' spans through `LayerProgress.computed`."""
        ...

    def decode(self, inst: Instance, running: Sequence[Request], horizon: float, kv_tokens: float,
               wake: simpy.Event | None) -> tuple[simpy.Event, Callable[[], tuple[float, float]]]:
        """Advance the batch by at most `horizon` tokens, stopping early when `wake` fires (if the device
        can stop): (event, () -> (seconds, tokens each running request advanced))."""
        ...

    def load_units(self, load: RankLoad) -> simpy.Event:
        """Load units booked as loading outside a cold start (a pipelined instance's leader loading the
        other stages' units, `core.pipeline.merge`); the event fires when they are in place. Only a device
        that `runs_pipelines` is asked."""
        ...

    def consolidate(self, inst: Instance, move_s: float) -> tuple[simpy.Event, Callable[[], float]] | None:
        """A pipelined instance consolidates onto this leader, every unit resident here: what the device does
        before the instance serves from it alone, as (event, seconds it took), or None when nothing. `move_s`:
        the move of the running requests' KV of the other stages that the lifecycle charges (the modelled
        device waits that long; a real one keeps a pipeline's KV on its leader and rebuilds its engine)."""
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


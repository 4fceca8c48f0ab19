"""Execute-while-load on the real device: a cold start's weights read layer by layer on a thread of
their own while the engine computes, and how each landing reaches the lifecycle.

The backend (`real.backend`) builds the engine on the arena's views first (views are offsets: no byte
needs to be there), runs the compaction copies, then hands the reads of the missing units to a
`Landing`: one thread that reads them in plan order (the units' order, which is layer order) through a
`Loader` of its own (its reader threads and staging buffers are not the ones a prefetch read on the
device's thread uses). The reads are cut into steps at the points where a layer block
(`models.layers.layer_blocks`) has all its bytes in (the same marks as the modelled device's
`unit_parts`); after each step the block's `threading.Event` is set and a note goes out. The engine's
first prefill waits on those events before each block (`CausalLM.forward`'s `gate`), so layer i
computes once its weights are in and layer i-1 is done, and the gate stamps each block's span.

On CUDA the loader's copies run on its side stream and each step ends with that stream synchronised,
so the event is set on the host once the copies have completed, and the compute stream is issued
layer i only after that: the same ordering as a `torch.cuda.Event` per layer that the compute stream
waits on, at the cost of one host round trip per layer (microseconds, against a layer's milliseconds
of copy).

How the lifecycle learns of landings: each note carries the `time.perf_counter()` at which its step
completed (CLOCK_MONOTONIC on Linux: one clock for every process of the host, so a child process's
stamps compare with the parent's). Notes travel on a channel of their own, a queue in this process or
a pipe from the device process, not with the next command's result: the lifecycle must book units
resident and mark the load finished even when no further command comes (a head request rejected, an
instance waiting to end), and a landing must not wait for a forward pass in flight on the command
pipe. `RealDevice` reads them on a thread of its own through the wall clock's `run_on`, each as
device work begun at the previous landing and lasting until its stamp, so the clock books it at the
stamp's time on the replay's timeline and processes no later event before it.

Notes: `("mark", blocks, units, stamp)` - these layer blocks have every byte in, these missing units
(indices into the start's missing list) have landed; `("done", stamp, read_s, nbytes, gbps)` - the last
read has completed; `("error", exception)`.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from tangram_sim.models.layers import LayerBlocks
from tangram_sim.models.spec import tensor_block
from tangram_sim.real.loader import Loader, Segment, UnitLayout

__all__ = ["Landing", "Step", "landing_steps"]

Notify = Callable[[tuple], None]


@dataclass(slots=True)
class Step:
    """One read of a layered load: when it has completed, `blocks` are whole and `units` have landed."""

    segments: list[Segment]  # file reads into the arena, in unit and tensor order
    blocks: tuple[int, ...]  # layer blocks whose last missing byte is in this step
    units: tuple[int, ...]  # indices into the start's missing units that land with this step


def landing_steps(blocks: LayerBlocks, units: Sequence[UnitLayout], offsets: Sequence[int]) -> list[Step]:
    """The reads of the missing `units` (plan order, each placed at its offset), cut after each tensor
    that completes a layer block among them: a block spread over several units is whole with the last
    of its tensors to be read. Reads that complete no block join the next step (their units are
    reported landed when it completes: later than their bytes, never earlier)."""
    remaining = [0] * len(blocks)  # per block: its tensors among the missing units, not yet read
    for lay in units:
        for s in lay.slots:
            b = blocks.index.get(tensor_block(s.name))
            if b is not None:
                remaining[b] += 1
    steps: list[Step] = []
    segments: list[Segment] = []
    landed: list[int] = []
    for k, (lay, offset) in enumerate(zip(units, offsets)):
        for j, s in enumerate(lay.slots):
            segments.append(Segment(s.path, s.start, s.nbytes, offset + s.rel))
            b = blocks.index.get(tensor_block(s.name))
            whole: tuple[int, ...] = ()
            if b is not None:
                remaining[b] -= 1
                if remaining[b] == 0:
                    whole = (b,)
            if j == len(lay.slots) - 1:
                landed.append(k)
            if whole:
                steps.append(Step(segments, whole, tuple(landed)))
                segments, landed = [], []
    if segments or landed:
        steps.append(Step(segments, (), tuple(landed)))
    return steps


class Landing:
    """The reads of one execute-while-load cold start on a thread of their own (module docstring)."""

    def __init__(self, loader: Loader, buffer: torch.Tensor, steps: list[Step], n_blocks: int,
                 notify: Notify, after: Callable[[], None] | None = None) -> None:
        self.loader = loader  # the landing's own loader (not the device thread's)
        self.buffer = buffer  # the arena
        self.steps = steps
        self.ready = [threading.Event() for _ in range(n_blocks)]  # per block: its bytes are in
        for b in set(range(n_blocks)) - {b for s in steps for b in s.blocks}:
            self.ready[b].set()  # reused (or moved) blocks: in place before the reads begin
        self.all = threading.Event()  # every read has completed (or failed)
        self.stamps = [time.perf_counter()] * n_blocks  # per block: perf_counter when its bytes were in
        self.end = math.nan  # perf_counter when the last read completed
        self.error: BaseException | None = None  # what failed, raised by the next waiter
        self.notify = notify
        self.after = after  # untimed work once everything has landed (the verify mode's checksums)
        self.thread = threading.Thread(target=self._run, name="tangram-landing", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        nbytes = 0
        read_s = 0.0
        try:
            t0 = time.perf_counter()
            for step in self.steps:
                if step.segments:  # returns once its copies have completed (on CUDA: its side stream synced;
                    # not the whole device, which would wait for the compute in flight too)
                    self.loader.load(self.buffer, step.segments, after_compute=False)
                    nbytes += sum(s.nbytes for s in step.segments)
                stamp = time.perf_counter()
                for b in step.blocks:
                    self.stamps[b] = stamp
                    self.ready[b].set()
                self.notify(("mark", step.blocks, step.units, stamp))
            read_s = time.perf_counter() - t0
            end = self.end = t0 + read_s
            self.notify(("done", end, read_s, nbytes, nbytes / read_s / 1e9 if read_s > 0 else 0.0))
        except BaseException as exc:  # noqa: BLE001 - raised by the next waiter and sent to the lifecycle
            self._fail(exc)
            return
        finally:
            self.all.set()
        if self.after is not None:
            try:
                self.after()
            except BaseException as exc:  # noqa: BLE001
                self.error = exc

    def _fail(self, exc: BaseException) -> None:
        self.error = exc
        for ev in self.ready:
            ev.set()  # no waiter may hang on a read that will not come
        try:
            self.notify(("error", exc))
        except Exception:  # an exception that does not pickle: its text
            self.notify(("error", RuntimeError(f"{type(exc).__name__}: {exc}")))

    def wait(self, block: int) -> None:
        """Block until `block`'s bytes are in (raises what failed the reads)."""
        self.ready[block].wait()
        if self.error is not None:
            raise self.error

    def join(self) -> None:
        """Wait for the thread (the reads and the untimed work after them); raise what failed."""
        self.thread.join()
        if self.error is not None:
            err, self.error = self.error, None
            raise err

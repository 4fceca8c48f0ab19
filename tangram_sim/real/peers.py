"""Units copied from another arena's buffer: the real side of a GPU source (`core.sources`).

When the system's source policy reads GPU copies (`policies.source`), a cold start's missing units are
split by source on the clock's thread at the moment the start is handed to the device (`split`, through
`core.sources.split_sources`, which also counts each source's bytes for the summary): units whose host
copy the policy keeps are read from the checkpoint files as before (a replay's host tiers are its files),
and a unit taken from a GPU is copied from the holder's buffer, at the offset the holder's books give
it at that moment, into this arena's region (`copy_units`, inside the backend's `start`, timed on its
own: `copy_s` and `copied_bytes` in the loads table).

Why a hold. The lifecycle does not protect the holder's copy: the unit is resident in its books, maybe
retained by an ended instance and evictable by the holder's next cold start (the simulator reads a GPU
copy as it stands when the transfer starts, `core.sources`). And the books run ahead of the buffer: they
change when the lifecycle decides, the bytes when the holder's device thread gets to the work. So at the
split a `Hold` is queued on each holder's device thread. When that thread reaches it, everything the
holder's lifecycle decided before the split has been carried out (the bytes are where the books said)
and nothing decided after it has begun (no eviction, move, load or KV write over the unit); the thread
waits there until the reader's copies are done. The reader's start waits until each of its holders has
reached its hold. Holds and starts are queued in the clock's decision order, so the earliest pair still
pending can always proceed (each of its halves has only earlier work ahead of it): no deadlock. The
wait is charged to no request (the backends time their own work, and the held device does none
meanwhile); where it delays the holder's next work past its trace time, the replay's lag reports it.

Sharing the buffers (`share`, `export`, `attach`): backends in one process use each other's tensor as it
is. In processes of their own, a CPU arena's buffer is made shared memory when it is created (torch
storage in /dev/shm) and a CUDA buffer is shared with CUDA IPC; either is handed to the other backends
pickled by torch.multiprocessing's reductions, relayed through the lifecycle's process without being
opened there (so that process never creates a CUDA context). A copy between two CUDA devices is a peer
copy (or staged through the host where the cards cannot reach each other); both devices are
synchronised before it is timed as done.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.reduction import ForkingPickler
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from tangram_sim.arena import Key
from tangram_sim.core.device import RankLoad
from tangram_sim.core.sources import split_sources

if TYPE_CHECKING:
    from tangram_sim.real.device import RealDevice

__all__ = ["Hold", "Sourced", "attach", "connect", "copy_units", "export", "share", "split"]

T = TypeVar("T")


class Hold:
    """A holder's device thread parked at a split until the reader's copies are done."""

    __slots__ = ("reached", "released")

    def __init__(self) -> None:
        self.reached = threading.Event()  # the holder's thread got here: its bytes match its books
        self.released = threading.Event()  # the reader's copies are done (or failed)

    def park(self) -> None:
        """On the holder's device thread."""
        self.reached.set()
        self.released.wait()


@dataclass(slots=True)
class Sourced:
    """A rank's missing units by where they come from (see the module docstring)."""

    reads: list[tuple[Key, int]] = field(default_factory=list)  # from the checkpoint files, in plan order
    copied: list[tuple[Key, int]] = field(default_factory=list)  # from other arenas, in plan order per holder
    copies: list[tuple[int, Key, int]] = field(default_factory=list)  # (holder GPU, key, holder's offset)
    holds: list[Hold] = field(default_factory=list)  # one per holder, queued on its device thread

    def run(self, work: Callable[[], T]) -> T:
        """`work` (the start on the reader's device thread) once every holder is parked; releases them
        when it ends, however it ends."""
        try:
            for hold in self.holds:
                hold.reached.wait()
            return work()
        finally:
            for hold in self.holds:
                hold.released.set()


def split(device: RealDevice, load: RankLoad) -> Sourced:
    """The rank's missing units by source, on the clock's thread; holds queued on the holders' threads."""
    out = Sourced()
    workers = load.worker.cluster.workers
    for _source, holder, units in split_sources(load):
        if holder < 0:
            continue
        peer = workers[holder]
        books = peer.arena
        out.copied.extend(units)
        out.copies.extend((holder, key, books.lookup(key).offset) for key, _ in units)
        hold = Hold()
        peer.device.thread.submit(hold.park)
        out.holds.append(hold)
    # the files are read in plan order, whichever host tier each unit's copy counts as
    copied = {key for key, _ in out.copied}
    out.reads = [unit for unit in load.missing if unit[0] not in copied] if copied else list(load.missing)
    return out


def copy_units(buffer: torch.Tensor, peers: dict[int, torch.Tensor], copies: Sequence[tuple[int, int, int, int]],
               sync: Callable[[torch.device], None]) -> tuple[float, int]:
    """Copy (holder, holder offset, offset here, bytes) ranges of the holders' buffers into `buffer`;
    (seconds, bytes), the devices synchronised before the end is taken."""
    t0 = time.perf_counter()
    total = 0
    devices = {buffer.device}
    for holder, src, dst, n in copies:
        peer = peers.get(holder)
        if peer is None:
            raise AssertionError(f"gpu {holder}'s buffer was not attached: connect the devices first")
        buffer[dst : dst + n].copy_(peer[src : src + n])
        devices.add(peer.device)
        total += n
    for dev in devices:
        sync(dev)
    return time.perf_counter() - t0, total


def share(buffer: torch.Tensor) -> None:
    """Make a CPU buffer shared memory (before any view of it exists); a CUDA buffer needs nothing."""
    if buffer.device.type == "cpu":
        buffer.share_memory_()


def export(buffer: torch.Tensor, pickled: bool) -> Any:
    """The buffer as another backend attaches it: the tensor itself in this process, else its pickle
    (shared memory, or a CUDA IPC handle), opened only by the backend that attaches it."""
    return bytes(ForkingPickler.dumps(buffer)) if pickled else buffer


def attach(handle: Any) -> torch.Tensor:
    """Another backend's buffer from `export`."""
    return ForkingPickler.loads(handle) if isinstance(handle, bytes) else handle


def connect(devices: Sequence[RealDevice]) -> None:
    """Give every device's backend every other one's buffer (before the clock starts)."""
    for holder in devices:
        for reader in devices:
            if reader is not holder:
                handle = holder.link.call("export_buffer", holder.link.process)
                reader.link.call("attach_peer", holder.gpu_id, handle)

"""A prefetched unit (`core.prefetch`) on a real device: read from its files into its region by one
command on the device's thread.

A cancellation cannot stop a read that has begun: the unit's region is freed in the books at once (any
later use of those bytes is work queued behind the read on the same thread, so it sees its own bytes)
and its bytes count as wasted; a read not yet begun is skipped. So a cold start that follows a prefetch
waits for at most one unit's read: the device records the wait as a step of kind `prefetch-wait`, and
the reads as steps of kind `prefetch`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import simpy

from tangram_sim.arena import Key
from tangram_sim.core.clock import Measured

if TYPE_CHECKING:
    from tangram_sim.real.device import RealDevice

__all__ = ["prefetch_unit"]


def prefetch_unit(device: RealDevice, key: Key, nbytes: int) -> tuple[simpy.Event, Callable[[], float | None]]:
    """`Device.prefetch_unit` of `device`: (event when the unit is in place, cancel)."""
    model = device.unit_model[key]
    offset = device.arena.lookup(key).offset
    lock = threading.Lock()
    state = {"begun": False, "cancelled": False}

    def work():
        try:
            with lock:
                if state["cancelled"]:
                    return None
                state["begun"] = True
            return device.link.call("prefetch", model, key, offset)
        finally:
            device.prefetches_finished += 1

    def cancel() -> float | None:
        with lock:
            if not state["begun"]:
                state["cancelled"] = True
                return 0.0
        return float(nbytes)  # the read runs to its end, into a region already freed

    submitted = device.env.now
    device.prefetches_submitted += 1
    done = device.env.run_on(device.thread, work)

    def record(event: simpy.Event) -> None:
        if event.ok and event.value is not None:
            m: Measured = event.value
            device.steps.append((device.gpu_id, "prefetch", model, 0, 0, 0, submitted, device.env.wall_at(m.t0),
                               m.seconds))

    done.callbacks.append(record)
    return done, cancel

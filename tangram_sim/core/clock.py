"""A SimPy environment that follows the wall clock, with device work on threads, and its lag.

Why not `simpy.rt.RealtimeEnvironment`: its `step` sleeps with `time.sleep` until the next scheduled
event, so the completion of work running on another thread (a real device's copy or forward pass)
could not wake it; and a real device that blocked the clock's thread would delay every other GPU's
events by its whole duration. Here each device runs its work on its own thread (`run_on`); the clock's
thread only keeps the books, waiting on a queue of completions with a timeout until the next event.

The timeline is the trace's arrivals plus the device work as measured on the devices' threads: a
completion is stamped with its submission time plus the seconds its work took. The lifecycle's own
Python bookkeeping and the hand-over between threads are not charged to any request (no device model
includes them, and a production scheduler's are far smaller). Events are processed in that timeline's
order: an event waits while a device's pending work could still finish before it (its submission time
plus the seconds it has run so far is earlier), and, when the clock is ahead of the wall, until its
wall time. So the order of events, and with it every lifecycle decision, follows from the trace and the
measured durations alone.

Time is in trace seconds; `factor` is the wall seconds per trace second (1: real time; 0.001 runs a
modelled replay 1000x faster than real time). Every processed event records its lag: how much later
(trace seconds) than its time it ran by the wall clock. The bookkeeping makes a saturated device fall
behind the wall; a lag that grows means that device work ran later than the trace placed it, so work
of different GPUs overlaps otherwise than it would have and an idle device was not idle as long.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np
import simpy
from simpy.core import EmptySchedule, Infinity

__all__ = ["Measured", "WallClockEnvironment"]


@dataclass(slots=True)
class Measured:
    """What a piece of device work returns when it times itself (e.g. in another process): its result,
    and the `time.perf_counter()` at which it began and the seconds it took there, so that the time it
    spent reaching the device and coming back is charged to nobody."""

    value: Any  # the work's result, delivered to the waiting process
    t0: float  # perf_counter when the device began it (CLOCK_MONOTONIC: the same in every process)
    seconds: float  # device time


class WallClockEnvironment(simpy.Environment):
    """`simpy.Environment` whose events happen no earlier than their wall time (see module docstring)."""

    def __init__(self, factor: float = 1.0) -> None:
        if not factor > 0:
            raise ValueError(f"wall-clock factor {factor}: expected > 0")
        super().__init__(0.0)
        self.factor = factor  # wall seconds per trace second
        self._done: queue.SimpleQueue[tuple[simpy.Event, float, bool, Any, float]] = queue.SimpleQueue()
        self._pending: dict[int, tuple[float, list[float]]] = {}  # device work not yet delivered: id ->
        # (submission time, [wall start on its thread] once started)
        self._start = time.perf_counter()
        self.lags: list[float] = []  # per processed event: trace seconds late
        self.finished: Callable[[], bool] = lambda: False  # all work done: stop following the clock
        self.device_s = 0.0  # seconds of device work measured on the threads

    def wall(self) -> float:
        """Trace seconds since the start, by the wall clock."""
        return (time.perf_counter() - self._start) / self.factor

    def wall_at(self, perf_counter: float) -> float:
        """A `time.perf_counter()` reading as trace seconds since the start."""
        return (perf_counter - self._start) / self.factor

    def restart(self) -> None:
        """Take the present wall time as trace time 0 (call just before `run`)."""
        self._start = time.perf_counter()

    def run_on(self, executor: Executor, work: Callable[[], Any]) -> simpy.Event:
        """Run `work` on `executor`'s thread; the returned event succeeds with its result (or fails with
        its exception) at submission time + the seconds `work` took (a `Measured` result: the seconds it
        says; the event's value is then the `Measured` itself)."""
        event = self.event()
        submitted = self._now
        started: list[float] = []

        def job() -> None:
            t0 = time.perf_counter()
            started.append(t0)
            try:
                out, ok = work(), True
            except BaseException as exc:  # delivered to the waiting process, which raises it
                out, ok = exc, False
            seconds = time.perf_counter() - t0
            if isinstance(out, Measured):  # timed where it ran: its own figure, without the transit
                seconds = out.seconds
            self._done.put((event, submitted, ok, out, seconds))

        self._pending[id(event)] = (submitted, started)
        executor.submit(job)
        return event

    def _deliver(self, item: tuple[simpy.Event, float, bool, Any, float]) -> None:
        event, submitted, ok, out, seconds = item
        del self._pending[id(event)]
        self.device_s += seconds
        at = max(self._now, submitted + seconds / self.factor)
        event._ok = ok
        event._value = out
        self.schedule(event, delay=at - self._now)

    def step(self) -> None:
        while True:
            try:
                self._deliver(self._done.get_nowait())
                continue
            except queue.Empty:
                pass
            t = self.peek()
            if t is Infinity and not self._pending:
                raise EmptySchedule
            if self.finished() and not self._pending:
                break  # nothing real is left to wait for: run the bookkeeping to its end at once
            wall = self.wall()
            bound, running = self._earliest_completion()
            if t <= bound and t <= wall:
                break
            if t is Infinity:
                wait = None
            else:  # until the wall reaches t and pending work has run long enough to end after t
                wait = max(t - wall, t - bound if running else 0.0) * self.factor
                if not running and t > bound:
                    wait = 1e-3  # work not started on its thread yet: look again soon
            try:
                self._deliver(self._done.get(timeout=wait))
            except queue.Empty:
                pass
        if not self.finished():
            self.lags.append(max(0.0, self.wall() - self.peek()))
        super().step()

    def _earliest_completion(self) -> tuple[float, bool]:
        """The earliest time a pending piece of device work can still be stamped with, and whether that
        piece has started (its bound then grows with the wall clock)."""
        best, running = Infinity, False
        now_wall = time.perf_counter()
        for submitted, started in self._pending.values():
            if started:
                bound = submitted + (now_wall - started[0]) / self.factor
                run = True
            else:
                bound, run = submitted, False
            if bound < best:
                best, running = bound, run
        return best, running

    def lag_stats(self) -> dict[str, float]:
        """p50, p99 and max lag (trace seconds) over the events processed so far."""
        lags = np.asarray(self.lags, dtype=np.float64)
        if not len(lags):
            return {"lag_p50_s": 0.0, "lag_p99_s": 0.0, "lag_max_s": 0.0, "lag_events": 0}
        return {"lag_p50_s": float(np.percentile(lags, 50)), "lag_p99_s": float(np.percentile(lags, 99)),
                "lag_max_s": float(lags.max()), "lag_events": int(len(lags))}

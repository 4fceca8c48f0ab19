"""Shared links as fluid fair-share resources.

A transfer crosses one or more links (e.g. SSD then PCIe, pipelined); its rate is the smallest of its
fair shares (bandwidth / active transfers) on those links, so a transfer is bounded by the slowest
tier and concurrent transfers on one link split it. Rates are recomputed whenever a transfer starts
or ends; a single pending timeout tracks the next completion (stale ones are ignored by generation).
A transfer can be cancelled (`cancel`): it leaves its links at once, the others re-share them, and the
bytes it had moved are lost.

A transfer may carry marks: byte offsets at which a callback learns, at that simulated time, that the
stream has moved that far (a unit, or a layer inside a unit, has landed: `sim.device` with
execute-while-load). A mark is one more timer, like a completion; a transfer without marks schedules
exactly what it did before marks existed (its next event is `remaining - 0.0` bytes away).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import simpy

from tangram_sim.topology.links import Link

__all__ = ["Fabric", "Link"]


class _Flow:
    __slots__ = ("nbytes", "remaining", "links", "rate", "done", "marks", "on_mark", "next_mark", "left_after")

    def __init__(self, nbytes: float, links: Sequence[Link], done: simpy.Event,
                 marks: Sequence[float] | None = None, on_mark: Callable[[int], None] | None = None) -> None:
        self.nbytes = float(nbytes)  # bytes to move in all
        self.remaining = float(nbytes)  # bytes still to move
        self.links = links  # links crossed (pipelined)
        self.rate = 0.0  # current bytes/s
        self.done = done  # fires when the last byte arrives
        self.marks = marks  # ascending byte offsets to report (None: none)
        self.on_mark = on_mark  # called with a mark's position in `marks` when the stream passes it
        self.next_mark = 0  # the first mark not yet reported
        # bytes still to move when the next mark is reached (0.0: no mark before the end)
        self.left_after = self.nbytes - float(marks[0]) if marks else 0.0

    def pass_marks(self, tolerance: float, fired: list[tuple[Callable[[int], None], int]]) -> None:
        """Report (into `fired`) every mark the stream has reached within `tolerance` bytes."""
        marks = self.marks
        assert marks is not None and self.on_mark is not None
        while self.next_mark < len(marks) and self.remaining - self.left_after <= tolerance:
            fired.append((self.on_mark, self.next_mark))
            self.next_mark += 1
            self.left_after = self.nbytes - float(marks[self.next_mark]) if self.next_mark < len(marks) else 0.0


class Fabric:
    """All transfers of one cluster; flows on disjoint links do not affect each other."""

    def __init__(self, env: simpy.Environment) -> None:
        self.env = env
        self._flows: list[_Flow] = []
        self._last = 0.0
        self._generation = 0

    def transfer(self, nbytes: float, links: Sequence[Link], marks: Sequence[float] | None = None,
                 on_mark: Callable[[int], None] | None = None) -> simpy.Event:
        """Move `nbytes` across `links`; the event fires when the last byte arrives. `on_mark(i)` is called
        when the stream passes `marks[i]` (ascending offsets; any at or past the end pass with it, before
        the event fires)."""
        done = self.env.event()
        if nbytes <= 0:
            if marks:
                for i in range(len(marks)):
                    on_mark(i)  # type: ignore[misc]
            done.succeed()
            return done
        self._advance()
        flow = _Flow(nbytes, links, done, marks or None, on_mark)
        for link in links:
            link.active += 1
        self._flows.append(flow)
        self._reschedule()
        return done

    def cancel(self, done: simpy.Event) -> float | None:
        """Stop the transfer whose completion event is `done`, now: it leaves its links (the others
        re-share them) and `done` never fires. Returns the bytes it had moved, or None when it had
        already finished (or moved nothing at all: a transfer of no bytes)."""
        flow = next((f for f in self._flows if f.done is done), None)
        if flow is None:
            return None
        self._advance()
        self._flows.remove(flow)
        for link in flow.links:
            link.active -= 1
        self._generation += 1  # the pending timer may be this flow's completion: make it stale
        self._reschedule()
        return min(flow.nbytes, max(0.0, flow.nbytes - flow.remaining))

    def _advance(self) -> None:
        now = self.env.now
        elapsed = now - self._last
        if elapsed > 0:
            for flow in self._flows:
                moved = flow.rate * elapsed
                flow.remaining -= moved
                for link in flow.links:
                    link.bytes_moved += moved
        self._last = now

    def _reschedule(self) -> None:
        soonest = float("inf")
        for flow in self._flows:
            flow.rate = min(link.bps / link.active for link in flow.links)
            soonest = min(soonest, (flow.remaining - flow.left_after) / flow.rate)
        if self._flows:
            self._generation += 1
            generation = self._generation
            timer = self.env.timeout(max(0.0, soonest))
            timer.callbacks.append(lambda _ev: self._on_timer(generation))

    def _on_timer(self, generation: int) -> None:
        if generation != self._generation:
            return  # a later start/finish already rescheduled
        self._advance()
        fired: list[tuple[Callable[[int], None], int]] = []
        finished = []
        for f in self._flows:
            tolerance = max(1.0, f.rate * 1e-9)
            if f.marks is not None:
                f.pass_marks(tolerance, fired)
            if f.remaining <= tolerance:
                finished.append(f)
        if not finished and not fired:  # float drift: the closest event happens now
            closest = min(self._flows, key=lambda f: (f.remaining - f.left_after) / f.rate)
            if closest.left_after:
                closest.pass_marks(closest.remaining - closest.left_after, fired)
            else:
                finished = [closest]
        for flow in finished:
            if flow.marks is not None:
                flow.pass_marks(math.inf, fired)  # marks at the very end pass with it
            self._flows.remove(flow)
            for link in flow.links:
                link.active -= 1
                link.bytes_moved += max(0.0, flow.remaining)
            flow.done.succeed()
        self._reschedule()
        for on_mark, i in fired:  # once the fabric is consistent: a callback may look at anything
            on_mark(i)

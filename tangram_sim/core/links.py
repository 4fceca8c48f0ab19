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

A transfer may follow another (`follow`, `lag`): a multicast receiver that forwards blocks as they
arrive (`core.multicast`). The follower may have moved at most what its upstream has moved less `lag`
bytes (one or more blocks) until the upstream ends: ahead of that bound it runs at its own fair share,
at the bound at no more than the upstream's rate (0 while the upstream has not moved `lag` bytes yet).
Catching up with the bound is one more timer. Rates are computed in the order transfers started, so an
upstream's rate is known before its followers'.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import simpy

from tangram_sim.topology.links import Link

__all__ = ["Fabric", "Link"]


class _Flow:
    __slots__ = ("nbytes", "remaining", "links", "rate", "done", "marks", "on_mark", "next_mark", "left_after",
                 "upstream", "lag", "ended")

    def __init__(self, nbytes: float, links: Sequence[Link], done: simpy.Event,
                 marks: Sequence[float] | None = None, on_mark: Callable[[int], None] | None = None,
                 upstream: _Flow | None = None, lag: float = 0.0) -> None:
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
        self.upstream = upstream  # the transfer whose bytes this one forwards (None: free)
        self.lag = float(lag)  # bytes it stays behind its upstream (blocks not yet complete there)
        self.ended = False  # it has finished or been cancelled (followers are free then)

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
        self._bound_at = math.inf  # seconds from the last reschedule until a follower's bound changes state
        self._bound_due = False  # the pending timer is such a change, not a flow's event

    def transfer(self, nbytes: float, links: Sequence[Link], marks: Sequence[float] | None = None,
                 on_mark: Callable[[int], None] | None = None, follow: simpy.Event | None = None,
                 lag: float = 0.0) -> simpy.Event:
        """Move `nbytes` across `links`; the event fires when the last byte arrives. `on_mark(i)` is called
        when the stream passes `marks[i]` (ascending offsets; any at or past the end pass with it, before
        the event fires). `follow`: the completion event of a transfer this one forwards, staying `lag`
        bytes behind it (see the module docstring; a finished one constrains nothing)."""
        done = self.env.event()
        if nbytes <= 0:
            if marks:
                for i in range(len(marks)):
                    on_mark(i)  # type: ignore[misc]
            done.succeed()
            return done
        self._advance()
        upstream = None
        if follow is not None:
            upstream = next((f for f in self._flows if f.done is follow), None)
        flow = _Flow(nbytes, links, done, marks or None, on_mark, upstream, lag)
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
        flow.ended = True
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
        self._bound_at = math.inf
        for flow in self._flows:
            flow.rate = min(link.bps / link.active for link in flow.links)
            if flow.upstream is not None and self._follow(flow):
                continue
            soonest = min(soonest, (flow.remaining - flow.left_after) / flow.rate)
        self._bound_due = self._bound_at < soonest
        soonest = min(soonest, self._bound_at)
        if self._flows:
            self._generation += 1
            generation = self._generation
            timer = self.env.timeout(max(0.0, soonest))
            timer.callbacks.append(lambda _ev: self._on_timer(generation))

    def _follow(self, flow: _Flow) -> bool:
        """Bound a follower's rate by its upstream (module docstring); note when its state next changes
        in `_bound_at`. True when the follower does not move now (its own next event is not due)."""
        up = flow.upstream
        assert up is not None
        if up.ended:
            flow.upstream = None
            return False
        gap = (up.nbytes - up.remaining) - flow.lag - (flow.nbytes - flow.remaining)  # room ahead of it
        tolerance = max(1.0, flow.rate * 1e-9)
        if gap > tolerance:  # free, at its own share; it reaches the bound if faster than the upstream
            if flow.rate > up.rate:
                self._bound_at = min(self._bound_at, gap / (flow.rate - up.rate))
        elif gap >= -tolerance:  # at the bound: no faster than the upstream
            flow.rate = min(flow.rate, up.rate)
        else:  # behind a bound not yet reached by the upstream (its first `lag` bytes)
            flow.rate = 0.0
            if up.rate > 0:
                self._bound_at = min(self._bound_at, -gap / up.rate)
        return flow.rate <= 0

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
        if not finished and not fired and self._bound_due:
            self._reschedule()  # a follower reached its bound (or it moved): new rates, no flow event
            return
        if not finished and not fired:  # float drift: the closest event happens now
            closest = min((f for f in self._flows if f.rate > 0), key=lambda f: (f.remaining - f.left_after) / f.rate)
            if closest.left_after:
                closest.pass_marks(closest.remaining - closest.left_after, fired)
            else:
                finished = [closest]
        for flow in finished:
            if flow.marks is not None:
                flow.pass_marks(math.inf, fired)  # marks at the very end pass with it
            self._flows.remove(flow)
            flow.ended = True
            for link in flow.links:
                link.active -= 1
                link.bytes_moved += max(0.0, flow.remaining)
            flow.done.succeed()
        self._reschedule()
        for on_mark, i in fired:  # once the fabric is consistent: a callback may look at anything
            on_mark(i)

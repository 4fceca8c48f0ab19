"""Shared links as fluid fair-share resources.

A transfer crosses one or more links (e.g. SSD then PCIe, pipelined); its rate is the smallest of its
fair shares (bandwidth / active transfers) on those links, so a transfer is bounded by the slowest
tier and concurrent transfers on one link split it. Rates are recomputed whenever a transfer starts
or ends; a single pending timeout tracks the next completion (stale ones are ignored by generation).
A transfer can be cancelled (`cancel`): it leaves its links at once, the others re-share them, and the
bytes it had moved are lost.
"""

from __future__ import annotations

from collections.abc import Sequence

import simpy


class Link:
    __slots__ = ("name", "bps", "active", "bytes_moved")

    def __init__(self, name: str, bps: float) -> None:
        self.name = name  # for logs
        self.bps = bps  # bandwidth, bytes/s
        self.active = 0  # transfers currently crossing it
        self.bytes_moved = 0.0  # total carried, for utilisation metrics


class _Flow:
    __slots__ = ("nbytes", "remaining", "links", "rate", "done")

    def __init__(self, nbytes: float, links: Sequence[Link], done: simpy.Event) -> None:
        self.nbytes = float(nbytes)  # bytes to move in all
        self.remaining = float(nbytes)  # bytes still to move
        self.links = links  # links crossed (pipelined)
        self.rate = 0.0  # current bytes/s
        self.done = done  # fires when the last byte arrives


class Fabric:
    """All transfers of one cluster; flows on disjoint links do not affect each other."""

    def __init__(self, env: simpy.Environment) -> None:
        self.env = env
        self._flows: list[_Flow] = []
        self._last = 0.0
        self._generation = 0

    def transfer(self, nbytes: float, links: Sequence[Link]) -> simpy.Event:
        done = self.env.event()
        if nbytes <= 0:
            done.succeed()
            return done
        self._advance()
        flow = _Flow(nbytes, links, done)
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
            soonest = min(soonest, flow.remaining / flow.rate)
        if self._flows:
            self._generation += 1
            generation = self._generation
            timer = self.env.timeout(max(0.0, soonest))
            timer.callbacks.append(lambda _ev: self._on_timer(generation))

    def _on_timer(self, generation: int) -> None:
        if generation != self._generation:
            return  # a later start/finish already rescheduled
        self._advance()
        finished = [f for f in self._flows if f.remaining <= max(1.0, f.rate * 1e-9)]
        if not finished:  # float drift: finish the closest one
            finished = [min(self._flows, key=lambda f: f.remaining / f.rate)]
        for flow in finished:
            self._flows.remove(flow)
            for link in flow.links:
                link.active -= 1
                link.bytes_moved += max(0.0, flow.remaining)
            flow.done.succeed()
        self._reschedule()

"""A link: a bandwidth that the transfers crossing it share fairly (the fluid model of `core.links`)."""

from __future__ import annotations


class Link:
    __slots__ = ("name", "bps", "active", "bytes_moved")

    def __init__(self, name: str, bps: float) -> None:
        self.name = name  # for logs
        self.bps = bps  # bandwidth, bytes/s
        self.active = 0  # transfers currently crossing it
        self.bytes_moved = 0.0  # total carried, for utilisation metrics

"""Packing: where the missing reuse units of a model go in a fragmented arena.

Every policy answers the same question with a `PackingPlan` (evict these, move these, place those):
given the arena, the units to place and the retention policy's eviction order, find room for all
units. All policies first evict, in the given order, just enough to have the bytes, and take a
layout that needs no moves when one exists (first-fit decreasing into the holes); they differ in
what they do when the free bytes are there but scattered:

- `first-fit`: never moves; evicts further down the order until first-fit decreasing succeeds.
- `compact-all`: compacts every movable region of the arena to the low end.
- `min-move-window`: compacts only the contiguous window that holds enough free bytes with the
  fewest resident bytes to move.
- `pbp` (Partitioned-Gain Packing): recursively splits the free span at the gap whose resident bytes
  are largest (the most data a compaction would otherwise move), as long as the units still fit on
  both sides (largest first, to the side with more room), then compacts only inside the final
  partitions that receive units.

Pinned, loading and KV regions never move; they are forced split points. Policies read the arena
and never mutate it; `execute_plan` is the single way to apply a plan (simulator and real executor).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from tangram_sim.arena import Arena, Key, Region, State
from tangram_sim.registry import Registry

FREE, MOVABLE, FIXED = 0, 1, 2


@dataclass(slots=True, frozen=True)
class Move:
    key: Key  # unit being relocated
    src: int  # its offset before the move
    dst: int  # its offset after the move (ranges may overlap: memmove semantics)
    nbytes: int  # bytes copied device-to-device


@dataclass(slots=True, frozen=True)
class Placement:
    key: Key  # unit to load
    offset: int  # where it goes
    nbytes: int  # aligned bytes it occupies


@dataclass(slots=True)
class PackingPlan:
    evictions: list[Key] = field(default_factory=list)  # applied first, in order
    moves: list[Move] = field(default_factory=list)  # then these, in order
    placements: list[Placement] = field(default_factory=list)  # then the new units
    needed_bytes: int = 0  # aligned bytes of the units to place
    evicted_bytes: int = 0  # bytes of retained units dropped
    extra_evicted_bytes: int = 0  # evicted beyond the free-byte shortfall: unit overshoot + fragmentation

    @property
    def moved_bytes(self) -> int:
        return sum(m.nbytes for m in self.moves)


class _Layout:
    """A shadow of the arena after a prefix of evictions: coalesced entries in address order."""

    __slots__ = ("offs", "sizes", "kinds", "keys", "free_prefix", "mov_prefix")

    def __init__(self, base: list[tuple[int, int, int, Key]], evicted: set[Key]) -> None:
        offs: list[int] = []
        sizes: list[int] = []
        kinds: list[int] = []
        keys: list[Key] = []
        for off, size, kind, key in base:
            if kind == MOVABLE and key in evicted:
                kind, key = FREE, None
            if kind == FREE and kinds and kinds[-1] == FREE:
                sizes[-1] += size
                continue
            offs.append(off)
            sizes.append(size)
            kinds.append(kind)
            keys.append(key)
        self.offs, self.sizes, self.kinds, self.keys = offs, sizes, kinds, keys
        free_prefix = [0]
        mov_prefix = [0]
        for size, kind in zip(sizes, kinds):
            free_prefix.append(free_prefix[-1] + (size if kind == FREE else 0))
            mov_prefix.append(mov_prefix[-1] + (size if kind == MOVABLE else 0))
        self.free_prefix, self.mov_prefix = free_prefix, mov_prefix

    def free(self, i: int, j: int) -> int:
        return self.free_prefix[j] - self.free_prefix[i]

    def movable(self, i: int, j: int) -> int:
        return self.mov_prefix[j] - self.mov_prefix[i]

    def free_indices(self, i: int, j: int) -> list[int]:
        kinds = self.kinds
        return [k for k in range(i, j) if kinds[k] == FREE]

    def segments(self) -> list[tuple[int, int]]:
        """Index ranges between fixed entries, trimmed to start and end at a free entry."""
        out: list[tuple[int, int]] = []
        first = last = -1
        for k, kind in enumerate(self.kinds):
            if kind == FIXED:
                if first >= 0:
                    out.append((first, last + 1))
                first = last = -1
            elif kind == FREE:
                if first < 0:
                    first = k
                last = k
        if first >= 0:
            out.append((first, last + 1))
        return out

    def first_fit_decreasing(
        self, i: int, j: int, units: Sequence[tuple[Key, int]]
    ) -> list[Placement] | None:
        """Place units (already sorted largest first) into the holes of [i, j) without moving."""
        if not units or sum(size for _, size in units) > self.free(i, j):
            return None if units else []
        smallest = units[-1][1]
        # Holes too small for the smallest unit can never be used: drop them up front.
        holes = [[self.offs[k], self.sizes[k]] for k in self.free_indices(i, j) if self.sizes[k] >= smallest]
        return _fill_holes(holes, units)

    def compact_left(
        self, i: int, j: int, units: Sequence[tuple[Key, int]]
    ) -> tuple[list[Move], list[Placement]]:
        """Slide the movable entries of a fixed-free range [i, j) to its low end; carve one hole."""
        moves: list[Move] = []
        cursor = self.offs[i]
        for k in range(i, j):
            if self.kinds[k] == MOVABLE:
                if self.offs[k] != cursor:
                    moves.append(Move(self.keys[k], self.offs[k], cursor, self.sizes[k]))
                cursor += self.sizes[k]
        placements = []
        for key, size in units:
            placements.append(Placement(key, cursor, size))
            cursor += size
        return moves, placements


def _fill_holes(holes: list[list[int]], units: Sequence[tuple[Key, int]]) -> list[Placement] | None:
    """First fit of each unit (in the given order) into [offset, size] holes, carving from the front."""
    placements: list[Placement] = []
    for key, size in units:
        for hole in holes:
            if hole[1] >= size:
                placements.append(Placement(key, hole[0], size))
                hole[0] += size
                hole[1] -= size
                break
        else:
            return None
    return placements


def _split_units(
    units: Sequence[tuple[Key, int]], room_left: int, room_right: int
) -> tuple[list[tuple[Key, int]], list[tuple[Key, int]]] | None:
    """Largest first, each unit to the side with more room left; None if one does not fit."""
    left: list[tuple[Key, int]] = []
    right: list[tuple[Key, int]] = []
    for unit in units:
        size = unit[1]
        if room_left >= room_right:
            if size > room_left:
                return None
            left.append(unit)
            room_left -= size
        else:
            if size > room_right:
                return None
            right.append(unit)
            room_right -= size
    return left, right


class PackingPolicy:
    """Contract: `plan(arena, units, eviction_order)` -> PackingPlan, or None if nothing works.

    `units` are (key, nbytes) pairs not yet in the arena; `eviction_order` lists the keys that may
    be evicted, cheapest first (from a retention policy). Keys not listed are never evicted, but
    unpinned resident regions may still be moved.
    """

    name = ""
    #: only subclasses that move data look beyond a no-move layout
    max_split_tries = 8

    def plan(
        self, arena: Arena, units: Sequence[tuple[Key, int]], eviction_order: Sequence[Key]
    ) -> PackingPlan | None:
        aligned = sorted(
            ((key, arena.align(nbytes)) for key, nbytes in units), key=lambda u: -u[1]
        )  # stable sort: equal sizes keep the caller's order
        needed = sum(size for _, size in aligned)
        base = [
            (r.offset, r.size, FREE if r.state is State.FREE else MOVABLE if r.movable else FIXED, r.key)
            for r in arena.regions()
        ]
        size_of = {r.key: r.size for r in arena.evictable()}
        order = [key for key in eviction_order if key in size_of]
        free_before = arena.free_bytes
        # Smallest eviction prefix that gives enough free bytes at all.
        k0, free = 0, free_before
        while free < needed and k0 < len(order):
            free += size_of[order[k0]]
            k0 += 1
        if free < needed:
            return None

        def attempt(k: int) -> PackingPlan | None:
            layout = _Layout(base, set(order[:k]))
            placed = layout.first_fit_decreasing(0, len(layout.kinds), aligned)
            moves: list[Move] = []
            if placed is None:
                result = self._layout(layout, aligned)
                if result is None:
                    return None
                moves, placed = result
            evicted = order[:k]
            evicted_bytes = sum(size_of[key] for key in evicted)
            return PackingPlan(
                evictions=list(evicted),
                moves=moves,
                placements=placed,
                needed_bytes=needed,
                evicted_bytes=evicted_bytes,
                extra_evicted_bytes=evicted_bytes - max(0, needed - free_before),
            )

        return _smallest_prefix(attempt, k0, len(order))

    def _layout(
        self, layout: _Layout, units: list[tuple[Key, int]]
    ) -> tuple[list[Move], list[Placement]] | None:
        """Room for `units` (largest first) by moving data, or None. first-fit never moves."""
        return None


def _smallest_prefix(
    attempt: Callable[[int], PackingPlan | None], lo: int, hi: int
) -> PackingPlan | None:
    """Smallest eviction count k in [lo, hi] for which `attempt` succeeds.

    Probes k linearly for a few steps (the common case), then doubles the step and bisects, so a
    policy that must evict deep into a long order costs O(log n) attempts instead of O(n).
    Because every policy's attempt succeeds whenever first-fit's does, the same probe sequence
    guarantees no policy evicts more than first-fit.
    """
    for k in range(lo, min(lo + 8, hi + 1)):
        plan = attempt(k)
        if plan is not None:
            return plan
    bad = lo + 7
    if bad >= hi:
        return None
    step = 8
    good_plan = None
    good = bad
    while good < hi:
        good = min(hi, bad + step)
        good_plan = attempt(good)
        if good_plan is not None:
            break
        bad = good
        step *= 2
    if good_plan is None:
        return None
    while good - bad > 1:
        mid = (good + bad) // 2
        plan = attempt(mid)
        if plan is None:
            bad = mid
        else:
            good, good_plan = mid, plan
    return good_plan


PACKING: Registry[PackingPolicy] = Registry("packing policy")


@PACKING.register("first-fit")
class FirstFit(PackingPolicy):
    """No compaction: extra evictions are the price of fragmentation."""

    name = "first-fit"


@PACKING.register("compact-all")
class CompactAll(PackingPolicy):
    """Compact every fixed-free segment to its low end, then first-fit into the holes."""

    name = "compact-all"

    def _layout(self, layout, units):
        moves: list[Move] = []
        holes: list[list[int]] = []
        for i, j in layout.segments():
            seg_moves, _ = layout.compact_left(i, j, ())
            moves += seg_moves
            free = layout.free(i, j)
            holes.append([layout.offs[j - 1] + layout.sizes[j - 1] - free, free])
        placements = _fill_holes(holes, units)
        return None if placements is None else (moves, placements)


@PACKING.register("min-move-window")
class MinMoveWindow(PackingPolicy):
    """Compact the one window of consecutive regions that frees enough with the fewest bytes moved."""

    name = "min-move-window"

    def _layout(self, layout, units):
        needed = sum(size for _, size in units)
        best: tuple[int, int, int] | None = None  # (moved bytes, i, j)
        for i, j in layout.segments():
            frees = layout.free_indices(i, j)
            r = 0
            for left_pos, left in enumerate(frees):
                r = max(r, left_pos)
                while r < len(frees) and layout.free(left, frees[r] + 1) < needed:
                    r += 1
                if r == len(frees):
                    break
                cost = layout.movable(left, frees[r] + 1)
                if best is None or cost < best[0]:
                    best = (cost, left, frees[r] + 1)
        if best is None:
            return None
        return layout.compact_left(best[1], best[2], units)


@PACKING.register("pbp")
class PartitionedGainPacking(PackingPolicy):
    """Partitioned-Gain Packing: split where moving would cost most, compact only what must move."""

    name = "pbp"

    def __init__(self, max_split_tries: int = 8) -> None:
        # Gaps tried per partition, largest resident bytes first; bounds the cost on huge arenas.
        self.max_split_tries = max_split_tries

    def _layout(self, layout, units):
        moves: list[Move] = []
        placements: list[Placement] = []
        segments = layout.segments()
        # Fixed regions are forced splits: hand units to segments largest first, most room first.
        rooms = [(-layout.free(i, j), s) for s, (i, j) in enumerate(segments)]
        heapq.heapify(rooms)
        assigned: list[list[tuple[Key, int]]] = [[] for _ in segments]
        for unit in units:
            if not rooms or -rooms[0][0] < unit[1]:
                return None
            room, s = rooms[0]
            assigned[s].append(unit)
            heapq.heapreplace(rooms, (room + unit[1], s))
        for (i, j), seg_units in zip(segments, assigned):
            if seg_units and not self._solve(layout, i, j, seg_units, moves, placements):
                return None
        return moves, placements

    def _solve(self, layout, i, j, units, moves, placements) -> bool:
        if not units:
            return True
        if sum(size for _, size in units) > layout.free(i, j):
            return False
        placed = layout.first_fit_decreasing(i, j, units)
        if placed is not None:
            placements += placed
            return True
        frees = layout.free_indices(i, j)
        # A gap = the resident entries between two consecutive free entries; its movable bytes are
        # what compaction across it would copy, so splitting there saves the most.
        gaps = sorted(
            ((layout.movable(a + 1, b), a + 1, b) for a, b in zip(frees, frees[1:])),
            key=lambda g: (-g[0], g[1]),
        )
        for _, gap_start, gap_end in gaps[: self.max_split_tries]:
            split = _split_units(units, layout.free(i, gap_start), layout.free(gap_end, j))
            if split is None:
                continue
            mark_m, mark_p = len(moves), len(placements)
            if self._solve(layout, i, gap_start, split[0], moves, placements) and self._solve(
                layout, gap_end, j, split[1], moves, placements
            ):
                return True
            del moves[mark_m:], placements[mark_p:]
        seg_moves, seg_placements = layout.compact_left(i, j, units)
        moves += seg_moves
        placements += seg_placements
        return True


def execute_plan(
    arena: Arena,
    plan: PackingPlan,
    owners: Callable[[Key], Iterable[str]],
    on_move: Callable[[Move], None] | None = None,
) -> list[Region]:
    """Apply a plan: evict, move (calling `on_move` first so a device copy can follow), then place
    every unit as LOADING, owned by `owners(key)` (every model whose weights include that unit).
    Returns the new regions in placement order."""
    for key in plan.evictions:
        arena.evict(key)
    for move in plan.moves:
        if on_move is not None:
            on_move(move)
        arena.move(move.key, move.dst)
    return [arena.place(p.key, p.offset, p.nbytes, State.LOADING, owners(p.key)) for p in plan.placements]

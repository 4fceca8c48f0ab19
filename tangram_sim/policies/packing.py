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

import bisect
import heapq
import itertools
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from tangram_sim.arena import Arena, Key, Region, State
from tangram_sim.registry import Registry

FREE, MOVABLE, FIXED = 0, 1, 2
_size = operator.itemgetter(1)  # of a (key, nbytes) unit
_start = operator.itemgetter(0)  # of an (offset, size) span
_region_size = operator.attrgetter("size")
_region_key = operator.attrgetter("key")


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


# A placement as plans hold it: (key, offset, nbytes), the fields of a Placement. Plans place
# hundreds of units each, and a tuple costs a fraction of a record to make and to read.
Placed = tuple[Key, int, int]


@dataclass(slots=True)
class PackingPlan:
    evictions: list[Key] = field(default_factory=list)  # applied first, in order
    moves: list[Move] = field(default_factory=list)  # then these, in order
    placed: list[Placed] = field(default_factory=list)  # then the new units
    needed_bytes: int = 0  # aligned bytes of the units to place
    evicted_bytes: int = 0  # bytes of retained units dropped
    extra_evicted_bytes: int = 0  # evicted beyond the free-byte shortfall: unit overshoot + fragmentation

    @property
    def moved_bytes(self) -> int:
        return sum(m.nbytes for m in self.moves)

    @property
    def placements(self) -> list[Placement]:
        """The new units as records, in placement order (made from `placed` on each call)."""
        return [Placement(*p) for p in self.placed]


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

    def first_fit_decreasing(self, i: int, j: int, units: Sequence[tuple[Key, int]]) -> list[Placed] | None:
        """Place units (already sorted largest first) into the holes of [i, j) without moving."""
        if not units or sum(map(_size, units)) > self.free(i, j):
            return None if units else []
        smallest = units[-1][1]
        # Holes too small for the smallest unit can never be used: drop them up front.
        holes = [[self.offs[k], self.sizes[k]] for k in self.free_indices(i, j) if self.sizes[k] >= smallest]
        return _fill_holes(holes, units)

    def compact_left(
        self, i: int, j: int, units: Sequence[tuple[Key, int]]
    ) -> tuple[list[Move], list[Placed]]:
        """Slide the movable entries of a fixed-free range [i, j) to its low end; carve one hole."""
        moves: list[Move] = []
        cursor = self.offs[i]
        for k in range(i, j):
            if self.kinds[k] == MOVABLE:
                if self.offs[k] != cursor:
                    moves.append(Move(self.keys[k], self.offs[k], cursor, self.sizes[k]))
                cursor += self.sizes[k]
        placed = []
        for key, size in units:
            placed.append((key, cursor, size))
            cursor += size
        return moves, placed


def _walk(arena: Arena) -> list[tuple[int, int, int, Key]]:
    """(offset, size, kind, key) of every region in address order."""
    free, resident = State.FREE, State.RESIDENT
    return [
        (r.offset, r.size, FREE if r.state is free else MOVABLE if r.state is resident and not r.pin_count
         else FIXED, r.key)
        for r in arena.regions()
    ]


def _holes(free_spans: list[tuple[int, int]], evicted: Sequence[Region], smallest: int) -> list[list[int]]:
    """[offset, size] of the free space once `evicted` are gone, coalesced and in address order, as
    `_Layout.first_fit_decreasing` sees it (holes under `smallest` dropped): found from the free
    regions and the evicted ones only, without walking the whole arena."""
    spans = free_spans + [(r.offset, r.size) for r in evicted]
    spans.sort(key=_start)  # offsets are distinct (but for a key listed twice, equal sizes too)
    merged: list[list[int]] = []
    end = -1
    for offset, size in spans:
        if offset == end:
            merged[-1][1] += size
        elif offset < end:  # a key listed twice in the eviction order
            continue
        else:
            merged.append([offset, size])
        end = offset + size
    return [hole for hole in merged if hole[1] >= smallest]


def _fill_holes(holes: list[list[int]], units: Sequence[tuple[Key, int]]) -> list[Placed] | None:
    """First fit of each unit (in the given order) into [offset, size] holes, carving from the front."""
    placed: list[Placed] = []
    n = len(holes)
    first, last_size = 0, -1
    for key, size in units:
        # Holes only shrink, so a unit as large as the previous one cannot fit before the hole that
        # one went to: resume there (plans hand over long runs of equal sizes).
        i = first if size == last_size else 0
        while i < n and holes[i][1] < size:
            i += 1
        if i == n:
            return None
        hole = holes[i]
        placed.append((key, hole[0], size))
        hole[0] += size
        hole[1] -= size
        first, last_size = i, size
    return placed


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
        a = arena.alignment
        # Sizes as arena.align rounds them (max(a, ...) spelt out: a call per unit costs as much as
        # the rest), largest first; the sort is stable, also reversed: equal sizes keep their order.
        aligned = sorted(
            [(key, size if (size := (nbytes + a - 1) // a * a) > a else a) for key, nbytes in units],
            key=_size,
            reverse=True,
        )
        needed = sum(map(_size, aligned))
        # The evictable (resident, unpinned) regions in eviction order; other keys are skipped.
        resident = State.RESIDENT
        order = [
            r for r in arena.lookup_many(eviction_order) if r is not None and r.state is resident and not r.pin_count
        ]
        free_before = arena.free_bytes
        # evicted_upto[k]: bytes the first k evictions free. The smallest prefix that gives enough
        # free bytes at all is where the search starts.
        evicted_upto = [0, *itertools.accumulate(map(_region_size, order))]
        k0 = bisect.bisect_left(evicted_upto, needed - free_before)
        if k0 > len(order):
            return None
        free_spans = [(r.offset, r.size) for r in arena.free_regions()]
        base: list[tuple[int, int, int, Key]] = []  # the whole layout, walked only if moves are needed

        def attempt(k: int) -> PackingPlan | None:
            evicted = order[:k]
            # No-move layout first: it needs only the holes, i.e. free space plus the evicted units.
            placed = _fill_holes(_holes(free_spans, evicted, aligned[-1][1]), aligned) if aligned else []
            moves: list[Move] = []
            if placed is None:
                if not base:
                    base.extend(_walk(arena))
                result = self._layout(_Layout(base, {r.key for r in evicted}), aligned)
                if result is None:
                    return None
                moves, placed = result
            evicted_bytes = evicted_upto[k]
            return PackingPlan(
                evictions=list(map(_region_key, evicted)),
                moves=moves,
                placed=placed,
                needed_bytes=needed,
                evicted_bytes=evicted_bytes,
                extra_evicted_bytes=evicted_bytes - max(0, needed - free_before),
            )

        return _smallest_prefix(attempt, k0, len(order))

    def _layout(
        self, layout: _Layout, units: list[tuple[Key, int]]
    ) -> tuple[list[Move], list[Placed]] | None:
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
        placed = _fill_holes(holes, units)
        return None if placed is None else (moves, placed)


@PACKING.register("min-move-window")
class MinMoveWindow(PackingPolicy):
    """Compact the one window of consecutive regions that frees enough with the fewest bytes moved."""

    name = "min-move-window"

    def _layout(self, layout, units):
        needed = sum(map(_size, units))
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
        placements: list[Placed] = []
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
        if sum(map(_size, units)) > layout.free(i, j):
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
    arena.evict_many(plan.evictions)
    if plan.moves:
        if on_move is not None:
            for move in plan.moves:
                on_move(move)
        arena.move_many([(move.key, move.dst) for move in plan.moves])
    return arena.place_many(plan.placed, State.LOADING, owners)

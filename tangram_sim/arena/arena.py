"""One GPU's memory as an address-ordered arena of regions.

The arena is plain data shared by the simulator (which only tracks offsets) and the real executor
(which maps every region onto one `torch.empty(capacity, dtype=uint8)` buffer), so fragmentation
seen in simulation is the fragmentation the device really has.

Regions are a doubly linked list in address order; free regions are additionally indexed by a sorted
list of their offsets, so placing at an exact offset and first-fit search only look at free space.
Adjacent free regions are always coalesced.

A cold start evicts, moves, places, finishes and pins hundreds of units at once, so the per-unit
operations are batches (`place_many`, `evict_many`, `move_many`, `finish_load_many`, `pin_many`,
`unpin_many`, `lookup_many`) that pay for lookups, index updates and coalescing once per call rather
than once per unit; the single-unit operations are those batches with one unit, so there is one
implementation of each.
"""

from __future__ import annotations

import bisect
import operator
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass
from enum import IntEnum

Key = Hashable
NO_OWNERS: frozenset[str] = frozenset()
_offset = operator.attrgetter("offset")


class ArenaError(RuntimeError):
    """A caller broke the arena's contract (a bug in a driver or policy, not a user mistake)."""


class State(IntEnum):
    FREE = 0
    RESIDENT = 1  # weights present; evictable and movable when unpinned
    LOADING = 2  # space reserved, bytes in flight; never evicted or moved
    KV = 3  # KV cache blocks of running requests; never evicted or moved


# The members as module constants for per-unit loops: reading an attribute of an Enum class costs
# several times a global lookup.
FREE, RESIDENT, LOADING, KV = State.FREE, State.RESIDENT, State.LOADING, State.KV


@dataclass(slots=True, eq=False)
class Region:
    offset: int  # first byte, a multiple of the arena's alignment
    size: int  # bytes, a positive multiple of the alignment
    state: State  # what occupies the range
    key: Key | None = None  # unit fingerprint (weights) or KV handle; None when FREE
    # Models whose reuse units include this one. Immutable, so every unit of a model can share one
    # set (placing a unit copies nothing) and add_owner replaces it instead of mutating it.
    owners: frozenset[str] = NO_OWNERS
    pin_count: int = 0  # >0 while an active instance uses it: then never evicted or moved
    prev: Region | None = None  # address-order neighbours (the list is threaded through regions)
    next: Region | None = None

    @property
    def end(self) -> int:
        return self.offset + self.size

    @property
    def movable(self) -> bool:
        """Only unpinned resident weights may be evicted or moved by compaction."""
        return self.state is RESIDENT and self.pin_count == 0

    def __repr__(self) -> str:  # the links would make the default repr recursive
        return (
            f"Region({self.offset}+{self.size} {self.state.name} key={self.key!r} "
            f"pins={self.pin_count} owners={sorted(self.owners)})"
        )


class Arena:
    """Address-ordered regions covering [0, capacity) exactly."""

    def __init__(self, capacity: int, alignment: int = 256) -> None:
        if alignment <= 0 or alignment & (alignment - 1):
            raise ArenaError(f"alignment must be a power of two, got {alignment}")
        capacity -= capacity % alignment
        if capacity <= 0:
            raise ArenaError("arena capacity must be at least one alignment unit")
        self.capacity = capacity
        self.alignment = alignment
        self._head = Region(0, capacity, FREE)
        self._by_key: dict[Key, Region] = {}
        self._free_offsets: list[int] = [0]  # sorted offsets of the free regions
        self._free_at: dict[int, Region] = {0: self._head}
        self._bytes = [0, 0, 0, 0]  # bytes per State
        self._bytes[FREE] = capacity
        self._owner_bytes: dict[str, int] = {}  # model -> bytes of resident/loading units it owns
        self.version = 0  # bumped on every mutation, lets callers cache derived views

    # ---------------------------------------------------------------- queries
    def align(self, nbytes: int) -> int:
        """Bytes a request of `nbytes` occupies (rounded up to the alignment)."""
        a = self.alignment
        return max(a, (nbytes + a - 1) // a * a)

    def regions(self) -> Iterator[Region]:
        region: Region | None = self._head
        while region is not None:
            yield region
            region = region.next

    def free_regions(self) -> Iterator[Region]:
        """Free regions in address order."""
        free_at = self._free_at
        return (free_at[o] for o in self._free_offsets)

    def lookup(self, key: Key) -> Region | None:
        return self._by_key.get(key)

    def lookup_many(self, keys: Iterable[Key]) -> list[Region | None]:
        """`lookup` of each key, in order."""
        return list(map(self._by_key.get, keys))

    def __contains__(self, key: Key) -> bool:
        return key in self._by_key

    def bytes_in(self, state: State) -> int:
        return self._bytes[state]

    @property
    def free_bytes(self) -> int:
        return self._bytes[FREE]

    @property
    def used_bytes(self) -> int:
        return self.capacity - self._bytes[FREE]

    def largest_free(self) -> int:
        return max((r.size for r in self._free_at.values()), default=0)

    def fragmentation(self) -> float:
        """1 - largest_free / total_free (0 when free space is one block or there is none)."""
        free = self._bytes[FREE]
        return 0.0 if free == 0 else 1.0 - self.largest_free() / free

    def num_regions(self) -> int:
        return sum(1 for _ in self.regions())

    def resident_bytes_by_model(self) -> dict[str, int]:
        """Bytes of weights (resident or loading) per owner model; shared units count for each."""
        return {m: b for m, b in self._owner_bytes.items() if b}

    def model_bytes(self, model: str) -> int:
        """O(1): bytes of weights (resident or loading) owned by `model` (kept incrementally)."""
        return self._owner_bytes.get(model, 0)

    def present_bytes(self, keys: Iterable[Key]) -> int:
        """Bytes of those keys that are resident or loading."""
        by_key = self._by_key
        total = 0
        for key in keys:
            region = by_key.get(key)
            if region is not None and region.state in (RESIDENT, LOADING):
                total += region.size
        return total

    def evictable(self) -> list[Region]:
        """Resident, unpinned regions (candidates for eviction and compaction)."""
        return [r for r in self._by_key.values() if r.state is RESIDENT and not r.pin_count]

    # ---------------------------------------------------------------- placement
    def find_free(self, nbytes: int, strategy: str = "first-fit") -> int | None:
        """Offset of a free range of `nbytes` (aligned) or None. Strategies: first-fit, best-fit."""
        size = self.align(nbytes)
        if strategy == "first-fit":
            for offset in self._free_offsets:
                if self._free_at[offset].size >= size:
                    return offset
            return None
        if strategy == "best-fit":
            best: Region | None = None
            for offset in self._free_offsets:
                region = self._free_at[offset]
                if region.size >= size and (best is None or region.size < best.size):
                    best = region
            return None if best is None else best.offset
        raise ArenaError(f"unknown placement strategy {strategy!r}; expected first-fit or best-fit")

    def allocate(
        self,
        key: Key,
        nbytes: int,
        state: State = State.LOADING,
        owners: Iterable[str] = (),
        strategy: str = "first-fit",
    ) -> Region | None:
        """Place `key` wherever `strategy` finds room; None when no free range is large enough."""
        offset = self.find_free(nbytes, strategy)
        if offset is None:
            return None
        return self.place(key, offset, nbytes, state, owners)

    def place(
        self, key: Key, offset: int, nbytes: int, state: State = State.LOADING, owners: Iterable[str] = ()
    ) -> Region:
        """Carve [offset, offset + align(nbytes)) out of the free region that contains it."""
        return self.place_many(((key, offset, nbytes),), state, (lambda _key: owners) if owners else None)[0]

    def place_many(
        self,
        units: Iterable[tuple[Key, int, int]],
        state: State = State.LOADING,
        owners: Callable[[Key], Iterable[str]] | None = None,
    ) -> list[Region]:
        """`place` each (key, offset, nbytes) in order, owned by `owners(key)` (no one when None);
        returns the new regions.

        Stops at the first unit that cannot be placed, with the units before it placed, exactly as
        single places would. Plans fill a hole with a run of units, each starting where the previous
        one ended: the run carves the front of one hole and files its remainder in the free index
        once, instead of once per unit.
        """
        if state is FREE:
            raise ArenaError("cannot place a FREE region")
        by_key = self._by_key
        free_offsets, free_at = self._free_offsets, self._free_at
        a = self.alignment
        regions: list[Region] = []
        placed = 0
        # Per-model bytes are counted per stretch of units with one owner set (a model's units share
        # one), not per unit: the latest set and the bytes placed with it since it changed.
        run_owned: frozenset[str] = NO_OWNERS
        run_bytes = 0
        # The current run: the free region whose front it carves, where that region is filed in the
        # free index (offset, position), and, kept in locals until the run ends, the run's next
        # offset, the bytes left behind it and the region before it.
        hole: Region | None = None
        filed_at = hi = cursor = room = 0
        prev: Region | None = None
        try:
            for key, offset, nbytes in units:
                if key is None or key in by_key:
                    raise ArenaError(f"key {key!r} is missing or already placed")
                if offset % a:
                    raise ArenaError(f"offset {offset} is not aligned to {a}")
                size = (nbytes + a - 1) // a * a
                if size < a:
                    size = a
                owned = NO_OWNERS if owners is None else owners(key)  # before anything changes
                if type(owned) is not frozenset:
                    owned = frozenset(owned)
                if hole is None or offset != cursor:  # not where the run left off: find its hole
                    if hole is not None:
                        self._end_run(hole, prev, cursor, room, filed_at, hi)
                        hole = None
                    hi = bisect.bisect_right(free_offsets, offset) - 1
                    if hi < 0:
                        raise ArenaError(f"offset {offset} is not inside a free region")
                    found = free_at[free_offsets[hi]]
                    if offset + size > found.offset + found.size:
                        raise ArenaError(f"range {offset}+{size} does not fit the free region {found!r}")
                    if offset > found.offset:  # keep [found.offset, offset) free
                        found = self._split(found, offset - found.offset)
                        hi += 1
                    hole, filed_at, cursor, room, prev = found, offset, offset, found.size, found.prev
                elif size > room:
                    raise ArenaError(f"range {offset}+{size} does not fit the free region {hole!r}")
                region = Region(offset, size, state, key, owned, 0, prev, hole)
                if prev is None:
                    self._head = region
                else:
                    prev.next = region
                prev = region
                cursor += size
                room -= size
                by_key[key] = region
                if owned is not run_owned:
                    self._count_owned(run_owned, run_bytes)
                    run_owned, run_bytes = owned, 0
                run_bytes += size
                placed += size
                regions.append(region)
                if not room:  # the hole is full: it leaves the list and the free index
                    region.next = hole.next
                    if hole.next is not None:
                        hole.next.prev = region
                    del free_offsets[hi]
                    del free_at[filed_at]
                    hole = None
        finally:  # whatever was placed, the index and counters must agree with the regions
            if hole is not None:
                self._end_run(hole, prev, cursor, room, filed_at, hi)
            self._count_owned(run_owned, run_bytes)
            self._bytes[FREE] -= placed
            self._bytes[state] += placed
            if regions:
                self.version += 1
        return regions

    def _count_owned(self, owners: Iterable[str], nbytes: int) -> None:
        """Add `nbytes` (negative when freed) to the per-model byte counters of `owners`."""
        owner_bytes = self._owner_bytes
        for model in owners:
            owner_bytes[model] = owner_bytes.get(model, 0) + nbytes

    def _end_run(self, hole: Region, prev: Region | None, cursor: int, room: int, filed_at: int, i: int) -> None:
        """A run carved [filed_at, cursor) from the front of `hole` (position i in the free index),
        placing regions up to `prev`: the hole keeps the rest and is filed under its new offset."""
        if cursor != filed_at:
            hole.prev = prev
            hole.offset = cursor
            hole.size = room
            del self._free_at[filed_at]
            self._free_offsets[i] = cursor  # still sorted: the region only lost its front
            self._free_at[cursor] = hole

    def _split(self, region: Region, first_size: int) -> Region:
        """Split a FREE region in two; returns the second half (also free, indexed)."""
        second = Region(region.offset + first_size, region.size - first_size, FREE)
        region.size = first_size
        second.prev, second.next = region, region.next
        if region.next is not None:
            region.next.prev = second
        region.next = second
        bisect.insort(self._free_offsets, second.offset)
        self._free_at[second.offset] = second
        return second

    def _unindex_free(self, region: Region) -> None:
        i = bisect.bisect_left(self._free_offsets, region.offset)
        del self._free_offsets[i]
        del self._free_at[region.offset]

    # ---------------------------------------------------------------- state changes
    def _get(self, key: Key) -> Region:
        region = self._by_key.get(key)
        if region is None:
            raise ArenaError(f"key {key!r} is not in the arena")
        return region

    def finish_load(self, key: Key, pin: bool = False) -> Region:
        """LOADING -> RESIDENT once its bytes have arrived (and pinned at once for its instance)."""
        return self.finish_load_many((key,), pin)[0]

    def finish_load_many(self, keys: Iterable[Key], pin: bool = False) -> list[Region]:
        """`finish_load` of each key in order (stops at the first key that is not loading)."""
        by_key = self._by_key
        regions: list[Region] = []
        moved = 0
        try:
            for key in keys:
                region = by_key.get(key)
                if region is None or region.state is not LOADING:
                    raise ArenaError(f"{region!r} for key {key!r} is not loading")
                region.state = RESIDENT
                if pin:
                    region.pin_count += 1
                moved += region.size
                regions.append(region)
        finally:  # counters follow the regions changed so far, even when a key was bad
            self._bytes[LOADING] -= moved
            self._bytes[RESIDENT] += moved
            if regions:
                self.version += 1
        return regions

    def pin(self, key: Key) -> None:
        self.pin_many((key,))

    def pin_many(self, keys: Iterable[Key]) -> None:
        """Pin each key in order (stops at the first key that is absent or holds KV)."""
        by_key = self._by_key
        for key in keys:
            region = by_key.get(key)
            if region is None:
                raise ArenaError(f"key {key!r} is not in the arena")
            if region.state is KV:
                raise ArenaError("KV regions are owned by one request and are never pinned")
            region.pin_count += 1

    def unpin(self, key: Key) -> None:
        self.unpin_many((key,))

    def unpin_many(self, keys: Iterable[Key]) -> list[Key]:
        """Unpin each key in order (stops at the first that is absent or not pinned); returns the keys
        whose last pin this dropped, in order (now evictable if resident)."""
        by_key = self._by_key
        unpinned: list[Key] = []
        for key in keys:
            region = by_key.get(key)
            if region is None or region.pin_count <= 0:
                raise ArenaError(f"{region!r} (key {key!r}) is not pinned")
            region.pin_count -= 1
            if not region.pin_count:
                unpinned.append(key)
        return unpinned

    def add_owner(self, key: Key, model: str) -> None:
        region = self._get(key)
        if model not in region.owners:
            region.owners = region.owners | {model}  # a new set: the old one may be shared
            self._owner_bytes[model] = self._owner_bytes.get(model, 0) + region.size

    def release(self, key: Key) -> int:
        """Free a region (weights being evicted or discarded, a failed load, or KV); returns bytes."""
        region = self._by_key.get(key)
        if region is None:
            raise ArenaError(f"key {key!r} is not in the arena")
        if region.pin_count:
            raise ArenaError(f"cannot release pinned {region!r}")
        return self._free_regions([region], region.state)

    def evict(self, key: Key) -> int:
        """Drop retained weights; only unpinned RESIDENT regions may be evicted."""
        return self.evict_many((key,))

    def evict_many(self, keys: Iterable[Key]) -> int:
        """Evict every key (each an unpinned RESIDENT region, no key twice); returns the bytes freed.

        All or nothing: every key is checked before anything changes. The result equals evicting the
        keys one by one, in any order: coalesced free space depends only on which regions are free.
        """
        by_key = self._by_key
        regions: list[Region] = []
        for key in keys:
            region = by_key.get(key)
            if region is None or region.state is not RESIDENT or region.pin_count:
                raise ArenaError(f"cannot evict {region!r} (key {key!r})")
            regions.append(region)
        if len(regions) > 1 and len(set(map(id, regions))) < len(regions):
            raise ArenaError("cannot evict the same key twice")
        return self._free_regions(regions, RESIDENT)

    def _free_regions(self, regions: list[Region], state: State) -> int:
        """Free checked, distinct regions, all in `state`; returns their bytes.

        In address order, freed regions that are neighbours form runs; each run is unlinked and
        coalesced with the free space around it once, whatever number of units it holds.
        """
        if not regions:
            return 0
        by_key = self._by_key
        if len(regions) > 1:
            regions.sort(key=_offset)
        owned, owned_bytes = NO_OWNERS, 0  # per-model bytes, counted per stretch of one owner set
        freed = run = 0
        first = last = None  # the current run of freed neighbours
        for region in regions:
            del by_key[region.key]
            size = region.size
            if region.owners is not owned:
                self._count_owned(owned, -owned_bytes)
                owned, owned_bytes = region.owners, 0
            owned_bytes += size
            region.state = FREE
            region.key = None
            region.owners = NO_OWNERS
            freed += size
            if region.prev is last and last is not None:
                run += size
                last.next = region.prev = None  # unlinked inside the run: no cycle outlives it
            else:
                if first is not None:
                    self._free_run(first, last, run)
                first, run = region, size
            last = region
        if first is not None:
            self._free_run(first, last, run)
        self._count_owned(owned, -owned_bytes)
        self._bytes[state] -= freed
        self._bytes[FREE] += freed
        self.version += 1
        return freed

    def _free_run(self, first: Region, last: Region, size: int) -> None:
        """Make the freed neighbours first..last (`size` bytes) one free region, merged with free
        neighbours. Any free neighbour was free before the batch (freed ones would be in the run)."""
        prev, nxt = first.prev, last.next
        if prev is not None and prev.state is FREE:
            prev.size += size
            region = prev
        else:
            region = first
            region.size = size
            bisect.insort(self._free_offsets, region.offset)
            self._free_at[region.offset] = region
        region.next = nxt
        if nxt is not None:
            nxt.prev = region
            if nxt.state is FREE:
                self._unindex_free(nxt)
                region.size += nxt.size
                region.next = nxt.next
                if nxt.next is not None:
                    nxt.next.prev = region

    def move(self, key: Key, new_offset: int) -> Region:
        """Compaction: relocate an unpinned resident region; the ranges may overlap (memmove)."""
        return self.move_many(((key, new_offset),))[0]

    def move_many(self, moves: Iterable[tuple[Key, int]]) -> list[Region]:
        """Relocate unpinned resident regions, (key, new offset) each; returns them, moved.

        The result is that of the moves one by one, in order, whenever that order is valid (as a
        compaction plan's is): then no destination overlaps a region that stays or another
        destination, so all regions leave first (free space coalesced once) and are placed back in
        runs. The keys are checked first; a destination that is not free raises ArenaError with the
        arena consistent, but without the units not placed yet (as a single move loses its unit).
        """
        by_key = self._by_key
        regions: list[Region] = []
        targets: list[tuple[Key, int, int]] = []
        for key, new_offset in moves:
            region = by_key.get(key)
            if region is None or not region.movable:
                raise ArenaError(f"cannot move {region!r} (key {key!r})")
            regions.append(region)
            targets.append((key, new_offset, region.size))
        if len(regions) > 1 and len(set(map(id, regions))) < len(regions):
            raise ArenaError("cannot move the same key twice")
        owners = {r.key: r.owners for r in regions}
        self._free_regions(regions, RESIDENT)
        return self.place_many(targets, RESIDENT, owners.__getitem__)

    # ---------------------------------------------------------------- invariants
    def check_invariants(self) -> None:
        """Walks the regions once (O(n)); raises ArenaError naming the first broken invariant."""
        # (the simulator runs this at every timeline sample: the indexes are read through locals)
        a, by_key, free_at = self.alignment, self._by_key, self._free_at
        expected_offset = 0
        counts = [0, 0, 0, 0]
        keyed = 0
        free_offsets: list[int] = []
        prev: Region | None = None
        for region in self.regions():
            if region.prev is not prev:
                raise ArenaError(f"broken back link at {region!r}")
            if region.offset != expected_offset:
                raise ArenaError(f"gap or overlap at {expected_offset}: next region is {region!r}")
            if region.size <= 0 or region.size % a or region.offset % a:
                raise ArenaError(f"bad size or alignment: {region!r}")
            counts[region.state] += region.size
            if region.state is FREE:
                if region.key is not None or region.pin_count or region.owners:
                    raise ArenaError(f"free region carries state: {region!r}")
                if prev is not None and prev.state is FREE:
                    raise ArenaError(f"adjacent free regions not coalesced at {region.offset}")
                free_offsets.append(region.offset)
                if free_at.get(region.offset) is not region:
                    raise ArenaError(f"free index misses {region!r}")
            else:
                keyed += 1
                if by_key.get(region.key) is not region:
                    raise ArenaError(f"key index misses {region!r}")
                if region.pin_count < 0 or (region.state is KV and region.pin_count):
                    raise ArenaError(f"bad pin count: {region!r}")
            expected_offset = region.offset + region.size
            prev = region
        if expected_offset != self.capacity:
            raise ArenaError(f"regions cover {expected_offset} bytes, capacity is {self.capacity}")
        if free_offsets != self._free_offsets or len(self._free_at) != len(free_offsets):
            raise ArenaError("free-offset index out of sync with the regions")
        if keyed != len(self._by_key):
            raise ArenaError("key index holds regions that are not in the list")
        if counts != self._bytes:
            raise ArenaError(f"byte counters {self._bytes} disagree with regions {counts}")
        owned: dict[str, int] = {}
        for region in self._by_key.values():
            for model in region.owners:
                owned[model] = owned.get(model, 0) + region.size
        if owned != self.resident_bytes_by_model():
            raise ArenaError(f"per-model byte counters {self.resident_bytes_by_model()} disagree with {owned}")

"""One GPU's memory as an address-ordered arena of regions.

The arena is plain data shared by the simulator (which only tracks offsets) and the real executor
(which maps every region onto one `torch.empty(capacity, dtype=uint8)` buffer), so fragmentation
seen in simulation is the fragmentation the device really has.

Regions are a doubly linked list in address order; free regions are additionally indexed by a sorted
list of their offsets, so placing at an exact offset and first-fit search only look at free space.
Adjacent free regions are always coalesced.
"""

from __future__ import annotations

import bisect
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import IntEnum

Key = Hashable


class ArenaError(RuntimeError):
    """A caller broke the arena's contract (a bug in a driver or policy, not a user mistake)."""


class State(IntEnum):
    FREE = 0
    RESIDENT = 1  # weights present; evictable and movable when unpinned
    LOADING = 2  # space reserved, bytes in flight; never evicted or moved
    KV = 3  # KV cache blocks of running requests; never evicted or moved


@dataclass(slots=True, eq=False)
class Region:
    offset: int  # first byte, a multiple of the arena's alignment
    size: int  # bytes, a positive multiple of the alignment
    state: State  # what occupies the range
    key: Key | None = None  # unit fingerprint (weights) or KV handle; None when FREE
    owners: set[str] = field(default_factory=set)  # models whose reuse units include this one
    pin_count: int = 0  # >0 while an active instance uses it: then never evicted or moved
    prev: Region | None = None  # address-order neighbours (the list is threaded through regions)
    next: Region | None = None

    @property
    def end(self) -> int:
        return self.offset + self.size

    @property
    def movable(self) -> bool:
        """Only unpinned resident weights may be evicted or moved by compaction."""
        return self.state is State.RESIDENT and self.pin_count == 0

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
        self._head = Region(0, capacity, State.FREE)
        self._by_key: dict[Key, Region] = {}
        self._free_offsets: list[int] = [0]  # sorted offsets of the free regions
        self._free_at: dict[int, Region] = {0: self._head}
        self._bytes = [0, 0, 0, 0]  # bytes per State
        self._bytes[State.FREE] = capacity
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

    def __contains__(self, key: Key) -> bool:
        return key in self._by_key

    def bytes_in(self, state: State) -> int:
        return self._bytes[state]

    @property
    def free_bytes(self) -> int:
        return self._bytes[State.FREE]

    @property
    def used_bytes(self) -> int:
        return self.capacity - self._bytes[State.FREE]

    def largest_free(self) -> int:
        return max((r.size for r in self._free_at.values()), default=0)

    def fragmentation(self) -> float:
        """1 - largest_free / total_free (0 when free space is one block or there is none)."""
        free = self._bytes[State.FREE]
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
            if region is not None and region.state in (State.RESIDENT, State.LOADING):
                total += region.size
        return total

    def evictable(self) -> Iterator[Region]:
        """Resident, unpinned regions (candidates for eviction and compaction)."""
        return (r for r in self._by_key.values() if r.state is State.RESIDENT and r.pin_count == 0)

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
        if state is State.FREE:
            raise ArenaError("cannot place a FREE region")
        if key is None or key in self._by_key:
            raise ArenaError(f"key {key!r} is missing or already placed")
        size = self.align(nbytes)
        if offset % self.alignment:
            raise ArenaError(f"offset {offset} is not aligned to {self.alignment}")
        free_offsets, free_at = self._free_offsets, self._free_at
        i = bisect.bisect_right(free_offsets, offset) - 1
        if i < 0:
            raise ArenaError(f"offset {offset} is not inside a free region")
        hole = free_at[free_offsets[i]]
        if offset + size > hole.end:
            raise ArenaError(f"range {offset}+{size} does not fit the free region {hole!r}")
        if offset > hole.offset:  # keep [hole.offset, offset) free
            hole = self._split(hole, offset - hole.offset)
            i += 1
        # Carve from the front of the hole: the remainder keeps its slot in the sorted free index,
        # so consecutive placements (how plans fill a hole) cost O(1) index work each.
        del free_at[offset]
        if hole.size == size:
            del free_offsets[i]
            region = hole
            region.state = state
            region.key = key
            region.owners = set(owners)
            region.pin_count = 0
        else:
            region = Region(offset, size, state, key, set(owners), 0, hole.prev, hole)
            if hole.prev is None:
                self._head = region
            else:
                hole.prev.next = region
            hole.prev = region
            hole.offset += size
            hole.size -= size
            free_offsets[i] = hole.offset
            free_at[hole.offset] = hole
        self._by_key[key] = region
        self._bytes[State.FREE] -= size
        self._bytes[state] += size
        owner_bytes = self._owner_bytes
        for model in region.owners:
            owner_bytes[model] = owner_bytes.get(model, 0) + size
        self.version += 1
        return region

    def _split(self, region: Region, first_size: int) -> Region:
        """Split a FREE region in two; returns the second half (also free, indexed)."""
        second = Region(region.offset + first_size, region.size - first_size, State.FREE)
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
        region = self._by_key.get(key)
        if region is None or region.state is not State.LOADING:
            raise ArenaError(f"{region!r} for key {key!r} is not loading")
        self._bytes[State.LOADING] -= region.size
        self._bytes[State.RESIDENT] += region.size
        region.state = State.RESIDENT
        if pin:
            region.pin_count += 1
        self.version += 1
        return region

    def pin(self, key: Key) -> None:
        region = self._get(key)
        if region.state is State.KV:
            raise ArenaError("KV regions are owned by one request and are never pinned")
        region.pin_count += 1

    def unpin(self, key: Key) -> None:
        region = self._get(key)
        if region.pin_count <= 0:
            raise ArenaError(f"{region!r} is not pinned")
        region.pin_count -= 1

    def add_owner(self, key: Key, model: str) -> None:
        region = self._get(key)
        if model not in region.owners:
            region.owners.add(model)
            self._owner_bytes[model] = self._owner_bytes.get(model, 0) + region.size

    def release(self, key: Key) -> int:
        """Free a region (weights being evicted or discarded, a failed load, or KV); returns bytes."""
        region = self._by_key.get(key)
        if region is None:
            raise ArenaError(f"key {key!r} is not in the arena")
        if region.pin_count:
            raise ArenaError(f"cannot release pinned {region!r}")
        return self._free_region(region)

    def _free_region(self, region: Region) -> int:
        del self._by_key[region.key]
        size = region.size
        self._bytes[region.state] -= size
        self._bytes[State.FREE] += size
        for model in region.owners:
            self._owner_bytes[model] -= size
        region.state = State.FREE
        region.key = None
        region.owners = set()
        # Coalesce with free neighbours so that free space is never split needlessly.
        prev, nxt = region.prev, region.next
        if prev is not None and prev.state is State.FREE:
            prev.size += region.size
            prev.next = nxt
            if nxt is not None:
                nxt.prev = prev
            region = prev
        else:
            bisect.insort(self._free_offsets, region.offset)
            self._free_at[region.offset] = region
        if nxt is not None and nxt.state is State.FREE:
            self._unindex_free(nxt)
            region.size += nxt.size
            region.next = nxt.next
            if nxt.next is not None:
                nxt.next.prev = region
        self.version += 1
        return size

    def evict(self, key: Key) -> int:
        """Drop retained weights; only unpinned RESIDENT regions may be evicted."""
        region = self._by_key.get(key)
        if region is None or region.state is not State.RESIDENT or region.pin_count:
            raise ArenaError(f"cannot evict {region!r} (key {key!r})")
        return self._free_region(region)

    def move(self, key: Key, new_offset: int) -> Region:
        """Compaction: relocate an unpinned resident region; the ranges may overlap (memmove)."""
        region = self._get(key)
        if not region.movable:
            raise ArenaError(f"cannot move {region!r}")
        size, owners = region.size, region.owners
        self.release(key)
        return self.place(key, new_offset, size, State.RESIDENT, owners)

    # ---------------------------------------------------------------- invariants
    def check_invariants(self) -> None:
        """Walks the regions once (O(n)); raises ArenaError naming the first broken invariant."""
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
            if region.size <= 0 or region.size % self.alignment or region.offset % self.alignment:
                raise ArenaError(f"bad size or alignment: {region!r}")
            counts[region.state] += region.size
            if region.state is State.FREE:
                if region.key is not None or region.pin_count or region.owners:
                    raise ArenaError(f"free region carries state: {region!r}")
                if prev is not None and prev.state is State.FREE:
                    raise ArenaError(f"adjacent free regions not coalesced at {region.offset}")
                free_offsets.append(region.offset)
                if self._free_at.get(region.offset) is not region:
                    raise ArenaError(f"free index misses {region!r}")
            else:
                keyed += 1
                if self._by_key.get(region.key) is not region:
                    raise ArenaError(f"key index misses {region!r}")
                if region.pin_count < 0 or (region.state is State.KV and region.pin_count):
                    raise ArenaError(f"bad pin count: {region!r}")
            expected_offset = region.end
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

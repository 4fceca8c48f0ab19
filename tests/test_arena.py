"""Arena behaviour and its invariants under arbitrary operation sequences."""

from __future__ import annotations

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tangram_sim.arena import Arena, ArenaError, State
from tangram_sim.policies.packing import PACKING, execute_plan

A = 256


def test_alignment_and_coalescing() -> None:
    arena = Arena(10 * A + 17, alignment=A)
    assert arena.capacity == 10 * A
    r1 = arena.allocate("a", 1)
    assert (r1.offset, r1.size) == (0, A)
    arena.allocate("b", A + 1)
    arena.allocate("c", A)
    arena.release("b")
    assert arena.fragmentation() == pytest.approx(1 - 6 * A / (8 * A))
    arena.release("a")
    # a and b coalesce into one free block in front of c
    free = [(r.offset, r.size) for r in arena.free_regions()]
    assert free == [(0, 3 * A), (4 * A, 6 * A)]
    arena.release("c")
    assert [(r.offset, r.size, r.state) for r in arena.regions()] == [(0, 10 * A, State.FREE)]
    arena.check_invariants()


def test_first_fit_and_best_fit() -> None:
    arena = Arena(20 * A, alignment=A)
    for key, size in [("x", 3), ("hole1", 4), ("y", 1), ("hole2", 2), ("z", 1)]:
        arena.allocate(key, size * A)
    arena.release("hole1")
    arena.release("hole2")
    assert arena.find_free(2 * A, "first-fit") == 3 * A
    assert arena.find_free(2 * A, "best-fit") == 8 * A
    assert arena.find_free(20 * A) is None
    with pytest.raises(ArenaError):
        arena.find_free(A, "worst-fit")


def test_pinned_regions_cannot_be_evicted_or_moved() -> None:
    arena = Arena(8 * A, alignment=A)
    arena.allocate("w", 2 * A)
    with pytest.raises(ArenaError):
        arena.evict("w")  # still loading
    arena.finish_load("w")
    arena.pin("w")
    with pytest.raises(ArenaError):
        arena.evict("w")
    with pytest.raises(ArenaError):
        arena.move("w", 4 * A)
    arena.unpin("w")
    arena.move("w", A)  # overlapping move is fine
    assert arena.lookup("w").offset == A
    arena.check_invariants()


def test_queries_by_model_and_key() -> None:
    arena = Arena(16 * A, alignment=A)
    arena.allocate("shared", 4 * A, owners=["base"])
    arena.add_owner("shared", "tuned")
    arena.allocate("own", 2 * A, owners=["tuned"])
    arena.place(("kv", 1, 0), 10 * A, A, State.KV)
    assert arena.resident_bytes_by_model() == {"base": 4 * A, "tuned": 6 * A}
    assert arena.present_bytes(["shared", "own", "missing"]) == 6 * A
    assert arena.bytes_in(State.KV) == A
    assert arena.largest_free() == 5 * A
    with pytest.raises(ArenaError):
        arena.place("again", 10 * A, A)  # occupied
    with pytest.raises(ArenaError):
        arena.place("shared", 12 * A, A)  # key already placed


class ArenaMachine(RuleBasedStateMachine):
    """Random load / finish / pin / unpin / evict / release / move / kv / compact sequences."""

    def __init__(self) -> None:
        super().__init__()
        self.arena = Arena(64 * A, alignment=A)
        self.next_key = 0
        self.pinned_at: dict[int, tuple[int, int]] = {}  # key -> (offset, size) while pinned

    def _keys(self, state: State) -> list:
        return sorted(
            (r.key for r in self.arena.regions() if r.state is state), key=lambda k: (str(type(k)), k)
        )

    @rule(blocks=st.integers(1, 12), best=st.booleans())
    def load(self, blocks: int, best: bool) -> None:
        self.next_key += 1
        before = self.arena.free_bytes
        region = self.arena.allocate(self.next_key, blocks * A - 3, strategy="best-fit" if best else "first-fit")
        if region is None:
            assert self.arena.largest_free() < blocks * A
        else:
            assert self.arena.free_bytes == before - blocks * A

    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        keys = self._keys(State.LOADING)
        if keys:
            self.arena.finish_load(data.draw(st.sampled_from(keys)))

    @rule(data=st.data())
    def pin(self, data: st.DataObject) -> None:
        keys = self._keys(State.RESIDENT)
        if keys:
            key = data.draw(st.sampled_from(keys))
            self.arena.pin(key)
            region = self.arena.lookup(key)
            self.pinned_at[key] = (region.offset, region.size)

    @rule(data=st.data())
    def unpin(self, data: st.DataObject) -> None:
        keys = sorted(self.pinned_at, key=lambda k: (str(type(k)), k))
        if keys:
            key = data.draw(st.sampled_from(keys))
            self.arena.unpin(key)
            if self.arena.lookup(key).pin_count == 0:
                del self.pinned_at[key]

    @rule(data=st.data())
    def evict_or_release(self, data: st.DataObject) -> None:
        regions = [r for r in self.arena.regions() if r.state is not State.FREE]
        if not regions:
            return
        region = data.draw(st.sampled_from(regions))
        if region.pin_count:
            with pytest.raises(ArenaError):
                self.arena.evict(region.key)
            with pytest.raises(ArenaError):
                self.arena.release(region.key)
        elif region.state is State.RESIDENT:
            self.arena.evict(region.key)
        else:
            self.arena.release(region.key)

    @rule(data=st.data())
    def move(self, data: st.DataObject) -> None:
        movable = [r for r in self.arena.regions() if r.movable]
        if not movable:
            return
        region = data.draw(st.sampled_from(movable))
        # any free range next to or over the region itself is a legal destination
        lo = region.prev.offset if region.prev is not None and region.prev.state is State.FREE else region.offset
        hi = region.next.end if region.next is not None and region.next.state is State.FREE else region.end
        slots = (hi - lo - region.size) // A
        dst = lo + data.draw(st.integers(0, slots)) * A
        key, size = region.key, region.size
        self.arena.move(key, dst)
        assert (self.arena.lookup(key).offset, self.arena.lookup(key).size) == (dst, size)

    @rule(blocks=st.integers(1, 8))
    def kv_grow(self, blocks: int) -> None:
        self.next_key += 1
        self.arena.allocate(("kv", self.next_key), blocks * A, state=State.KV)

    @rule(data=st.data())
    def kv_free(self, data: st.DataObject) -> None:
        keys = self._keys(State.KV)
        if keys:
            self.arena.release(data.draw(st.sampled_from(keys)))

    @precondition(lambda self: self.arena.free_bytes >= 4 * A)
    @rule(policy=st.sampled_from(["pbp", "compact-all", "min-move-window", "first-fit"]), blocks=st.integers(1, 6))
    def compact_and_place(self, policy: str, blocks: int) -> None:
        order = [r.key for r in sorted(self.arena.evictable(), key=lambda r: r.offset)]
        units = [(("new", self.next_key + 1 + i), A) for i in range(blocks)]
        self.next_key += blocks + 1
        plan = PACKING.create(policy).plan(self.arena, units, order)
        if plan is not None:
            regions = execute_plan(self.arena, plan, owners=lambda k: ["m"])
            assert sum(r.size for r in regions) == plan.needed_bytes

    @invariant()
    def invariants_hold(self) -> None:
        self.arena.check_invariants()
        for key, where in self.pinned_at.items():
            region = self.arena.lookup(key)
            assert region is not None and (region.offset, region.size) == where


TestArenaMachine = ArenaMachine.TestCase

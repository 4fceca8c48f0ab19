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


def observed(arena: Arena) -> tuple:
    """Everything a caller can see of an arena: regions, indexes, counters and per-model bytes."""
    return (
        [(r.offset, r.size, r.state, r.key, r.pin_count, r.owners) for r in arena.regions()],
        [(r.offset, r.size) for r in arena.free_regions()],
        [arena.bytes_in(state) for state in State],
        arena.resident_bytes_by_model(),
        sorted(map(str, (r.key for r in arena.evictable()))),
    )


def holey_arena() -> Arena:
    """[a 2][free 4][b 1][free 3][c 2][free 20]: resident, unpinned, owned by "old"."""
    arena = Arena(32 * A, alignment=A)
    for key, offset, blocks in [("a", 0, 2), ("x", 2, 4), ("b", 6, 1), ("y", 7, 3), ("c", 10, 2)]:
        arena.place(key, offset * A, blocks * A, owners=["old"])
        arena.finish_load(key)
    arena.evict_many(["x", "y"])
    return arena


def test_place_many_equals_single_places() -> None:
    # a run that fills a hole exactly, one that starts inside a hole (split) and leaves a rest, one
    # placed before it in a lower hole, and units that jump back and forth
    units = [("r1", 2 * A, A), ("r2", 3 * A, 3 * A - 5), ("s1", 14 * A, A), ("s2", 15 * A, 2 * A),
             ("t", 8 * A, A), ("u", 12 * A, A), ("v", 9 * A, 1)]
    owners = {"r1": ["m"], "r2": ["m"], "s1": ["m", "n"], "s2": ["m", "n"], "t": [], "u": ["n"], "v": ["m"]}
    batch, single = holey_arena(), holey_arena()
    regions = batch.place_many(units, State.LOADING, owners.__getitem__)
    for key, offset, nbytes in units:
        single.place(key, offset, nbytes, State.LOADING, owners[key])
    assert observed(batch) == observed(single)
    assert regions == [batch.lookup(key) for key, _, _ in units]
    batch.check_invariants()


def test_place_many_stops_at_the_first_unit_that_does_not_fit_like_single_places() -> None:
    units = [("r1", 2 * A, A), ("r2", 3 * A, A), ("too-big", 4 * A, 3 * A), ("never", 16 * A, A)]
    batch, single = holey_arena(), holey_arena()
    with pytest.raises(ArenaError):
        batch.place_many(units)
    with pytest.raises(ArenaError):
        for key, offset, nbytes in units:
            single.place(key, offset, nbytes)
    assert observed(batch) == observed(single)
    assert batch.lookup("r2") is not None and batch.lookup("never") is None
    batch.check_invariants()
    with pytest.raises(ArenaError):
        batch.place_many([("r3", 5 * A, A), ("r3", 13 * A, A)])  # the same key twice
    batch.check_invariants()


def test_place_many_changes_nothing_for_a_unit_whose_owners_cannot_be_found() -> None:
    arena = holey_arena()

    def owners(key: str) -> list[str]:
        if key == "bad":
            raise KeyError(key)
        return ["m"]

    with pytest.raises(KeyError):  # "bad" would split the last hole: it must stay whole
        arena.place_many([("ok", 2 * A, A), ("bad", 14 * A, A)], State.LOADING, owners)
    arena.check_invariants()
    assert arena.lookup("ok") is not None and arena.lookup("bad") is None
    assert [(r.offset, r.size) for r in arena.free_regions()] == [(3 * A, 3 * A), (7 * A, 3 * A), (12 * A, 20 * A)]


def test_evict_many_equals_single_evictions_in_any_order() -> None:
    keys = ["b", "a", "c"]  # b joins the free space on both sides; a reaches the arena's start
    batch, single = holey_arena(), holey_arena()
    assert batch.evict_many(keys) == 5 * A
    for key in keys:
        single.evict(key)
    assert observed(batch) == observed(single)
    assert [(r.offset, r.size, r.state) for r in batch.regions()] == [(0, 32 * A, State.FREE)]
    batch.check_invariants()


def test_evict_many_changes_nothing_when_one_key_cannot_go() -> None:
    arena = holey_arena()
    arena.pin("c")
    before = observed(arena)
    for keys in (["a", "c"], ["a", "missing"], ["a", "b", "a"]):
        with pytest.raises(ArenaError):
            arena.evict_many(keys)
        assert observed(arena) == before


def test_finish_pin_and_unpin_many_equal_single_ops() -> None:
    batch, single = Arena(16 * A, alignment=A), Arena(16 * A, alignment=A)
    for arena in (batch, single):
        arena.place_many([(k, i * A, A) for i, k in enumerate(["p", "q", "r", "s"])], State.LOADING)
    assert batch.finish_load_many(["p", "q", "r"], pin=True) == batch.lookup_many(["p", "q", "r"])
    for key in ["p", "q", "r"]:
        single.finish_load(key, pin=True)
    batch.pin_many(["p", "q"])
    for key in ["p", "q"]:
        single.pin(key)
    assert observed(batch) == observed(single)
    assert batch.unpin_many(["p", "q", "r"]) == ["r"]  # p and q keep their second pin
    assert batch.unpin_many(["p", "q"]) == ["p", "q"]
    for key in ["p", "q", "r", "p", "q"]:
        single.unpin(key)
    assert observed(batch) == observed(single)
    with pytest.raises(ArenaError):
        batch.unpin_many(["p"])  # no pin left
    with pytest.raises(ArenaError):
        batch.finish_load_many(["s", "p"])  # s finishes, p was not loading
    assert batch.lookup("s").state is State.RESIDENT
    batch.check_invariants()


def test_move_many_equals_the_moves_in_order() -> None:
    batch, single = holey_arena(), holey_arena()
    batch.evict("a")
    single.evict("a")
    # compaction to the low end: each destination is free once the moves before it are done
    moves = [("b", 0), ("c", A)]
    regions = batch.move_many(moves)
    for key, offset in moves:
        single.move(key, offset)
    assert observed(batch) == observed(single)
    assert [(r.key, r.offset) for r in regions] == moves
    assert [(r.offset, r.size) for r in batch.free_regions()] == [(3 * A, 29 * A)]
    batch.pin("b")
    with pytest.raises(ArenaError):
        batch.move_many([("c", 5 * A), ("b", 10 * A)])  # b is pinned: nothing moves
    assert batch.lookup("c").offset == A
    batch.check_invariants()


def test_lookup_many() -> None:
    arena = holey_arena()
    assert arena.lookup_many(["c", "nope", "a"]) == [arena.lookup("c"), None, arena.lookup("a")]


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

    # ---- batch operations: the same invariants must hold after each of them
    @rule(data=st.data(), blocks=st.lists(st.integers(1, 4), min_size=1, max_size=6))
    def load_run(self, data: st.DataObject, blocks: list[int]) -> None:
        units = run_in_a_hole(self.arena, data, blocks, self.next_key)
        if units:
            self.next_key += len(units)
            regions = self.arena.place_many(units, State.LOADING, lambda _key: ["m"])
            assert [(r.offset, r.size) for r in regions] == [(o, -(-n // A) * A) for _, o, n in units]

    @rule(data=st.data(), pin=st.booleans())
    def finish_some(self, data: st.DataObject, pin: bool) -> None:
        keys = some(data, self._keys(State.LOADING))
        for region in self.arena.finish_load_many(keys, pin=pin):
            if pin:
                self.pinned_at[region.key] = (region.offset, region.size)

    @rule(data=st.data())
    def pin_some(self, data: st.DataObject) -> None:
        keys = some(data, self._keys(State.RESIDENT))
        self.arena.pin_many(keys)
        for region in self.arena.lookup_many(keys):
            self.pinned_at[region.key] = (region.offset, region.size)

    @rule(data=st.data())
    def unpin_some(self, data: st.DataObject) -> None:
        keys = some(data, sorted(self.pinned_at, key=lambda k: (str(type(k)), k)))
        for key in self.arena.unpin_many(keys):
            assert self.arena.lookup(key).pin_count == 0
            del self.pinned_at[key]

    @rule(data=st.data())
    def evict_some(self, data: st.DataObject) -> None:
        keys = some(data, [r.key for r in sorted(self.arena.evictable(), key=lambda r: r.offset)])
        freed = sum(r.size for r in self.arena.lookup_many(keys))
        assert self.arena.evict_many(data.draw(st.permutations(keys))) == freed

    @rule()
    def compact_everything(self) -> None:
        self.arena.move_many(compaction_moves(self.arena))

    @invariant()
    def invariants_hold(self) -> None:
        self.arena.check_invariants()
        for key, where in self.pinned_at.items():
            region = self.arena.lookup(key)
            assert region is not None and (region.offset, region.size) == where


TestArenaMachine = ArenaMachine.TestCase


def some(data: st.DataObject, keys: list) -> list:
    """A random subset of `keys`, in a random order."""
    return data.draw(st.lists(st.sampled_from(keys), unique=True)) if keys else []


def run_in_a_hole(arena: Arena, data: st.DataObject, blocks: list[int], last_key: int) -> list:
    """(key, offset, nbytes) units of `blocks` alignment units each (less a few bytes), back to back
    from a random offset inside a free region that holds them all; [] if none does."""
    need = sum(blocks) * A
    holes = [r for r in arena.free_regions() if r.size >= need]
    if not holes:
        return []
    hole = data.draw(st.sampled_from(holes))
    offset = hole.offset + data.draw(st.integers(0, (hole.size - need) // A)) * A
    units = []
    for i, n in enumerate(blocks):
        units.append((last_key + 1 + i, offset, n * A - i % 3))
        offset += n * A
    return units


def compaction_moves(arena: Arena) -> list[tuple]:
    """(key, offset) moves sliding every movable region as low as it goes between fixed ones, in
    address order: a valid order (each destination is free once the moves before it are done)."""
    moves = []
    cursor = 0
    for region in list(arena.regions()):
        if region.state is State.FREE:
            continue
        if not region.movable:
            cursor = region.end
        else:
            if region.offset != cursor:
                moves.append((region.key, cursor))
            cursor += region.size
    return moves


class BatchEqualsSingleMachine(RuleBasedStateMachine):
    """Every batch operation leaves an arena exactly as the single operations, one unit at a time,
    leave a twin arena (valid batches; a failing batch is checked by the tests above)."""

    def __init__(self) -> None:
        super().__init__()
        self.batch = Arena(64 * A, alignment=A)
        self.single = Arena(64 * A, alignment=A)
        self.next_key = 0

    def _keys(self, which) -> list:
        return [r.key for r in self.batch.regions() if r.state is not State.FREE and which(r)]

    @rule(data=st.data(), blocks=st.lists(st.integers(1, 4), min_size=1, max_size=6), state=st.sampled_from(
        [State.LOADING, State.RESIDENT, State.KV]), scattered=st.booleans())
    def place(self, data: st.DataObject, blocks: list[int], state: State, scattered: bool) -> None:
        units = run_in_a_hole(self.batch, data, blocks, self.next_key)
        if scattered:  # a second run elsewhere, placed first: units need not follow each other
            units = run_in_a_hole(self.batch, data, [1], self.next_key + len(units)) + units
            if len({o for _, o, _ in units}) < len(units) or any(
                o1 < o2 + n2 and o2 < o1 + n1 for i, (_, o1, n1) in enumerate(units) for _, o2, n2 in units[i + 1:]
            ):
                return  # the two runs overlap
        self.next_key += len(units)
        owners = (lambda key: {"m", "n"} if key % 2 else {"m"}) if state is not State.KV else None
        self.batch.place_many(units, state, owners)
        for key, offset, nbytes in units:
            self.single.place(key, offset, nbytes, state, owners(key) if owners else ())

    @rule(data=st.data(), pin=st.booleans())
    def finish(self, data: st.DataObject, pin: bool) -> None:
        keys = some(data, self._keys(lambda r: r.state is State.LOADING))
        self.batch.finish_load_many(keys, pin=pin)
        for key in keys:
            self.single.finish_load(key, pin=pin)

    @rule(data=st.data())
    def pin(self, data: st.DataObject) -> None:
        keys = some(data, self._keys(lambda r: r.state in (State.RESIDENT, State.LOADING)))
        self.batch.pin_many(keys)
        for key in keys:
            self.single.pin(key)

    @rule(data=st.data())
    def unpin(self, data: st.DataObject) -> None:
        keys = some(data, self._keys(lambda r: r.pin_count))
        expect = [key for key in keys if self.single.lookup(key).pin_count == 1]
        assert self.batch.unpin_many(keys) == expect
        for key in keys:
            self.single.unpin(key)

    @rule(data=st.data())
    def evict(self, data: st.DataObject) -> None:
        keys = some(data, self._keys(lambda r: r.movable))
        self.batch.evict_many(keys)
        for key in keys:
            self.single.evict(key)

    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        keys = some(data, self._keys(lambda r: r.state is not State.RESIDENT and not r.pin_count))
        for key in keys:
            self.batch.release(key)
            self.single.release(key)

    @rule()
    def compact(self) -> None:
        moves = compaction_moves(self.batch)
        self.batch.move_many(moves)
        for key, offset in moves:
            self.single.move(key, offset)

    @invariant()
    def twins(self) -> None:
        self.batch.check_invariants()
        self.single.check_invariants()
        assert observed(self.batch) == observed(self.single)


TestBatchEqualsSingleMachine = BatchEqualsSingleMachine.TestCase

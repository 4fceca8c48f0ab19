"""ElasticKV planning/execution on fragmented arenas, the static baseline and the KV pool."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tangram_sim.arena import Arena, ArenaError, State
from tangram_sim.errors import ConfigError
from tangram_sim.policies.kv import (
    KV,
    KvPlan,
    KvPool,
    execute_kv_plan,
    kv_block_bytes,
    kv_bytes_per_token,
    plan_kv,
)

A = 256


def resident(arena: Arena, key: str, nbytes: int, owner: str, pinned: bool = False) -> None:
    arena.allocate(key, nbytes, owners=[owner])
    arena.finish_load(key)
    if pinned:
        arena.pin(key)


def fragmented() -> Arena:
    """[0,4A) a0 | [4A,7A) free | [7A,9A) b0 | [9A,13A) free | [13A,17A) c0 pinned | [17A,32A) d0."""
    arena = Arena(32 * A, alignment=A)
    resident(arena, "a0", 4 * A, "a")
    arena.allocate("h1", 3 * A)
    resident(arena, "b0", 2 * A, "b")
    arena.allocate("h2", 4 * A)
    resident(arena, "c0", 4 * A, "c", pinned=True)
    resident(arena, "d0", 15 * A, "d")
    arena.release("h1")
    arena.release("h2")
    arena.check_invariants()
    assert [(r.offset, r.size) for r in arena.free_regions()] == [(4 * A, 3 * A), (9 * A, 4 * A)]
    return arena


def test_block_sizes() -> None:
    per_token = kv_bytes_per_token(layers=32, kv_heads=8, head_dim=128, dtype_bytes=2)
    assert per_token == 128 * 1024  # Llama-3-8B, as in the design brief
    assert kv_block_bytes(per_token) == 16 * 128 * 1024
    assert kv_block_bytes(per_token, block_tokens=32) == 32 * 128 * 1024
    with pytest.raises(ValueError):
        kv_block_bytes(0)
    with pytest.raises(ValueError):
        kv_bytes_per_token(0, 8, 128)


def test_single_hole_when_one_fits() -> None:
    arena = fragmented()
    plan = plan_kv(arena, 2 * A + 1, 2 * A, ["a0"])  # rounds up to 2 blocks = 4A
    assert plan == KvPlan(extents=[(9 * A, 4 * A)], evictions=[], must_wait=False)
    assert plan.nbytes == 4 * A


def test_uses_holes_in_address_order_without_evicting() -> None:
    arena = fragmented()
    version = arena.version
    plan = plan_kv(arena, 6 * A, 2 * A, ["a0", "b0"])
    assert plan.extents == [(4 * A, 2 * A), (9 * A, 4 * A)]
    assert plan.evictions == []
    assert arena.version == version  # planning never mutates


def test_evicts_in_given_order_only_as_needed() -> None:
    arena = fragmented()
    plan = plan_kv(arena, 10 * A, 2 * A, ["a0", "b0", "d0"])  # 5 blocks, only 3 fit in holes
    assert plan.evictions == ["a0"]  # a0 coalesces with the 3A hole: 7A -> 3 blocks, + 2 = 5
    assert plan.extents == [(0, 6 * A), (9 * A, 4 * A)]
    plan = plan_kv(arena, 10 * A, 2 * A, ["b0", "a0", "d0"])
    assert plan.evictions == ["b0", "a0"]  # b0 alone gives 9A = 4 blocks; a0 then makes 13A
    assert plan.extents == [(0, 10 * A)]


def test_skips_pinned_loading_and_unknown_keys() -> None:
    arena = fragmented()
    arena.allocate("loading", 1)  # lands in the 3A hole
    plan = plan_kv(arena, 12 * A, 2 * A, ["ghost", "c0", "loading", "a0", "a0", "b0", "d0"])
    assert plan.evictions == ["a0", "b0"]  # 2 + 2 blocks, then [5A,13A) holds 4
    assert plan.extents == [(0, 4 * A), (5 * A, 8 * A)]


def test_drops_evictions_the_extents_do_not_use() -> None:
    arena = Arena(8 * A, alignment=A)
    resident(arena, "x", A, "m")
    arena.allocate("gap1", 2 * A)
    resident(arena, "p", A, "m", pinned=True)
    resident(arena, "y", A, "m")
    arena.allocate("gap2", 3 * A)
    arena.release("gap1")
    arena.release("gap2")
    # block = 4A: evicting x leaves [0,3A) (no block); y then makes [4A,8A), which alone is enough.
    plan = plan_kv(arena, 4 * A, 4 * A, ["x", "y"])
    assert plan.extents == [(4 * A, 4 * A)]
    assert plan.evictions == ["y"]


def test_must_wait_when_everything_else_is_pinned() -> None:
    arena = fragmented()
    arena.pin("a0")
    arena.pin("b0")
    plan = plan_kv(arena, 8 * A, 2 * A, ["a0", "b0", "c0"])  # d0 is evictable but not offered
    assert plan == KvPlan(extents=[], evictions=[], must_wait=True)
    assert plan_kv(arena, 33 * A, 2 * A, ["d0"]).must_wait  # larger than the arena
    with pytest.raises(ArenaError):
        execute_kv_plan(arena, plan, ("r",))


def test_zero_bytes_is_an_empty_plan() -> None:
    plan = plan_kv(fragmented(), 0, 2 * A, [])
    assert plan == KvPlan() and plan.nbytes == 0


def test_execute_places_kv_and_keeps_invariants() -> None:
    arena = fragmented()
    kv_before = arena.bytes_in(State.KV)
    plan = plan_kv(arena, 10 * A, 2 * A, ["b0", "a0"])
    keys = execute_kv_plan(arena, plan, ("req", 7))
    arena.check_invariants()
    assert keys == [("req", 7, 0)]
    assert arena.bytes_in(State.KV) - kv_before == 10 * A
    assert "a0" not in arena and "b0" not in arena
    region = arena.lookup(("req", 7, 0))
    assert (region.offset, region.size, region.state) == (0, 10 * A, State.KV)
    # a second growth step of the same request keeps its keys distinct
    more = execute_kv_plan(arena, plan_kv(arena, 2 * A, 2 * A, []), ("req", 7), first_index=1)
    assert more == [("req", 7, 1)]
    for key in keys + more:
        arena.release(key)
    arena.check_invariants()


def test_execute_refuses_stale_plans_without_damage() -> None:
    arena = fragmented()
    plan = plan_kv(arena, 10 * A, 2 * A, ["a0", "b0"])
    arena.pin("a0")  # the unit came back into use after planning
    with pytest.raises(ArenaError):
        execute_kv_plan(arena, plan, ("r",))
    assert "a0" in arena and arena.bytes_in(State.KV) == 0
    arena.unpin("a0")
    plan = plan_kv(arena, 6 * A, 2 * A, [])
    arena.allocate("late", 4 * A, strategy="best-fit")  # takes the second hole
    with pytest.raises(ArenaError):
        execute_kv_plan(arena, plan, ("r",))
    arena.check_invariants()
    assert arena.bytes_in(State.KV) == 0  # the first extent was rolled back


def test_block_not_a_multiple_of_alignment() -> None:
    arena = fragmented()
    plan = plan_kv(arena, 900, 300, [])  # 3 blocks: the 3A = 768 hole holds only 2, the 4A one 3
    assert plan.extents == [(9 * A, 900)]
    execute_kv_plan(arena, plan, ("r",))
    arena.check_invariants()
    assert arena.bytes_in(State.KV) == arena.align(900)


# ---------------------------------------------------------------- property test
OPS = st.lists(
    st.tuples(
        st.integers(1, 4 * A),  # bytes
        st.sampled_from(["resident", "pinned", "loading", "kv", "hole"]),
        st.sampled_from("abc"),  # owner model
    ),
    min_size=4,
    max_size=24,
)


def build(ops: list[tuple[int, str, str]]) -> Arena:
    arena = Arena(24 * A, alignment=A)
    for i, (nbytes, kind, owner) in enumerate(ops):
        key = f"u{i}"
        if kind == "kv":
            if arena.allocate(key, nbytes, state=State.KV) is None:
                continue
        elif arena.allocate(key, nbytes, owners=[owner]) is None:
            continue
        if kind in ("resident", "pinned", "hole"):
            arena.finish_load(key)
        if kind == "pinned":
            arena.pin(key)
        if kind == "hole":
            arena.evict(key)
    return arena


@given(
    ops=OPS,
    nbytes=st.integers(0, 16 * A),
    block_units=st.integers(1, 4),
    odd_block=st.booleans(),
    order=st.permutations(range(26)),
    offered=st.integers(0, 26),
)
def test_plan_then_execute_property(
    ops: list[tuple[int, str, str]],
    nbytes: int,
    block_units: int,
    odd_block: bool,
    order: list[int],
    offered: int,
) -> None:
    block = block_units * A + (37 if odd_block else 0)
    keys = [f"u{i}" for i in order[:offered]]  # a prefix of a shuffle: some unknown, some absent
    arena = build(ops)
    free_blocks = sum(r.size // block for r in arena.free_regions())
    plan = plan_kv(arena, nbytes, block, keys)
    blocks = -(-nbytes // block)
    if plan.must_wait:
        assert plan.extents == [] and plan.evictions == []
        # even evicting every usable key offered would not make room
        for key in dict.fromkeys(keys):
            region = arena.lookup(key)
            if region is not None and region.movable:
                arena.evict(key)
        assert sum(r.size // block for r in arena.free_regions()) < blocks
        return
    assert plan.nbytes == blocks * block
    assert all(n % block == 0 and n > 0 for _, n in plan.extents)
    if free_blocks >= blocks:
        assert plan.evictions == []
    positions = [keys.index(k) for k in plan.evictions]
    assert positions == sorted(positions) and len(set(plan.evictions)) == len(plan.evictions)
    kv_before = arena.bytes_in(State.KV)
    new = execute_kv_plan(arena, plan, ("req",))
    arena.check_invariants()
    grown = arena.bytes_in(State.KV) - kv_before
    assert grown == sum(arena.align(n) for _, n in plan.extents)
    if not odd_block:
        assert grown == blocks * block  # the rounded request, exactly
    assert len(new) == len(plan.extents)
    for key in new:
        arena.release(key)
    arena.check_invariants()


# ---------------------------------------------------------------- policies and pool
def test_static_reservation() -> None:
    static = KV.create("static")
    assert not static.on_demand and static.block_tokens == 16
    assert static.reservation_bytes(100 * A, 40 * A) == 50 * A
    assert static.reservation_bytes(100 * A, 95 * A) == 0
    assert KV.create("static", fraction=0.5).reservation_bytes(1000, 100) == 400
    assert static.eviction_candidates(fragmented(), "z") == []
    with pytest.raises(ConfigError):
        KV.create("static", fraction=1.5)
    with pytest.raises(ConfigError):
        KV.create("static", block_tokens=0)
    with pytest.raises(ConfigError):
        KV.create("paged")


def test_elastic_candidates_are_other_models_retained_units() -> None:
    elastic = KV.create("elastic", block_tokens=32)
    assert elastic.on_demand and elastic.block_tokens == 32
    assert elastic.reservation_bytes(100 * A, 10 * A) == 0
    arena = fragmented()
    arena.add_owner("d0", "a")  # shared with the requesting model: keep it
    keys = sorted(r.key for r in elastic.eviction_candidates(arena, "a"))
    assert keys == ["b0"]  # a0 is a's own, c0 is pinned, d0 is shared with a


def test_kv_pool() -> None:
    pool = KvPool(capacity=10)
    assert pool.can_take(10) and not pool.can_take(11) and not pool.can_take(-1)
    pool.take(6)
    assert (pool.used, pool.free) == (6, 4)
    with pytest.raises(ArenaError):
        pool.take(5)
    with pytest.raises(ArenaError):
        pool.give_back(7)
    with pytest.raises(ArenaError):
        pool.resize(5)
    pool.resize(20)
    pool.give_back(6)
    assert pool.used == 0 and pool.free == 20
    with pytest.raises(ArenaError):
        KvPool(capacity=1, used=2)

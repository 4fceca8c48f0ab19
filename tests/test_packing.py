"""Packing policies on deterministic and random fragmented arenas."""

from __future__ import annotations

import random

import pytest

from tangram_sim.arena import Arena, State
from tangram_sim.errors import ConfigError
from tangram_sim.policies.packing import (
    PACKING,
    PackingPlan,
    Placement,
    _fill_holes,
    _holes,
    _Layout,
    _walk,
    execute_plan,
)

A = 256


def fragmented(layout: str, pin: str = "") -> Arena:
    """Build an arena from a picture: one char per block, '.' free, a letter = a resident unit."""
    arena = Arena(len(layout) * A, alignment=A)
    runs: list[tuple[str, int, int]] = []
    for i, ch in enumerate(layout):
        if runs and runs[-1][0] == ch:
            runs[-1] = (ch, runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((ch, i, 1))
    for ch, start, length in runs:
        if ch != ".":
            key = ch if ch not in arena else f"{ch}{start}"  # repeated letters get unique keys
            arena.place(key, start * A, length * A, State.LOADING, owners=["old"])
            arena.finish_load(key)
            if ch in pin:
                arena.pin(key)
    arena.check_invariants()
    return arena


def run(policy: str, arena: Arena, units, order) -> PackingPlan:
    plan = PACKING.create(policy).plan(arena, units, order)
    assert plan is not None
    execute_plan(arena, plan, owners=lambda k: ["new"])
    arena.check_invariants()
    return plan


def test_unknown_policy_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="pbp"):
        PACKING.create("tetris")


def test_pbp_moves_instead_of_evicting_where_first_fit_must_evict() -> None:
    layout = "a.bb..c.ddddd.e."  # 7 free blocks, largest hole 2
    units = [("X", 4 * A), ("Y", 2 * A)]
    order = ["a", "e", "c", "bb"[0], "d"]
    ff = run("first-fit", fragmented(layout), units, order)
    arena = fragmented(layout)
    pbp = run("pbp", arena, units, order)
    assert pbp.evictions == [] and pbp.extra_evicted_bytes == 0
    assert ff.evicted_bytes > 0 and ff.extra_evicted_bytes == ff.evicted_bytes
    assert pbp.moved_bytes > 0 and ff.moved_bytes == 0
    # PBP never splits across the big d-run: it stays put, the small units slide instead.
    assert arena.lookup("d").offset == 8 * A
    assert pbp.moved_bytes < 5 * A


def test_pbp_moves_less_than_full_compaction() -> None:
    layout = ("ab." * 10) + "cccccccc." + ("de." * 10)
    units = [("X", 12 * A), ("Y", 6 * A)]
    order = []
    full = run("compact-all", fragmented(layout), units, order)
    window = run("min-move-window", fragmented(layout), units, order)
    pbp = run("pbp", fragmented(layout), units, order)
    assert 0 < pbp.moved_bytes <= window.moved_bytes < full.moved_bytes
    assert pbp.evicted_bytes == window.evicted_bytes == full.evicted_bytes == 0


def test_pinned_regions_are_split_points_and_never_move() -> None:
    layout = "..a..P..b.."
    arena = fragmented(layout, pin="P")
    plan = run("pbp", arena, [("X", 4 * A), ("Y", 4 * A)], ["a", "b"])
    assert arena.lookup("P").offset == 5 * A
    assert all(m.key != "P" for m in plan.moves)
    assert plan.evictions == []
    # 5 free blocks on each side of P: the two units land one per side
    offsets = sorted(p.offset for p in plan.placements)
    assert offsets[0] < 5 * A < offsets[1]


def test_no_plan_when_even_evicting_everything_is_not_enough() -> None:
    arena = fragmented("aaP..", pin="P")
    assert PACKING.create("pbp").plan(arena, [("X", 3 * A)], ["a"]) is None
    assert PACKING.create("first-fit").plan(arena, [("X", 5 * A)], ["a"]) is None


def test_eviction_follows_the_given_order_and_stops_early() -> None:
    arena = fragmented("aabbccdd")
    plan = run("pbp", arena, [("X", 3 * A)], ["c", "a", "b", "d"])
    assert plan.evictions == ["c", "a"]
    assert plan.extra_evicted_bytes == A
    assert "b" in arena and "d" in arena


def random_state(rng: random.Random) -> tuple[Arena, list, list]:
    blocks = rng.randint(16, 96)
    arena = Arena(blocks * A, alignment=A)
    key = 0
    while True:
        key += 1
        if arena.allocate(f"u{key}", rng.randint(1, 6) * A, owners=["old"]) is None:
            break
        arena.finish_load(f"u{key}")
    for r in list(arena.evictable()):
        roll = rng.random()
        if roll < 0.35:
            arena.evict(r.key)
        elif roll < 0.45:
            arena.pin(r.key)
    order = [r.key for r in arena.evictable()]
    rng.shuffle(order)
    units = [(f"n{i}", rng.randint(1, 8) * A) for i in range(rng.randint(1, 5))]
    return arena, units, order


def test_pbp_never_evicts_more_than_first_fit_on_1000_random_states() -> None:
    rng = random.Random(1234)
    compared = moved_instead = 0
    for _ in range(1000):
        arena, units, order = random_state(rng)
        ff = PACKING.create("first-fit").plan(arena, units, order)
        pbp = PACKING.create("pbp").plan(arena, units, order)
        if ff is None:
            continue
        assert pbp is not None
        assert pbp.evicted_bytes <= ff.evicted_bytes
        compared += 1
        moved_instead += pbp.evicted_bytes < ff.evicted_bytes
    assert compared > 500 and moved_instead > 50


@pytest.mark.parametrize("policy", ["pbp", "first-fit", "compact-all", "min-move-window"])
def test_every_plan_executes_without_breaking_invariants(policy: str) -> None:
    rng = random.Random(99)
    for _ in range(200):
        arena, units, order = random_state(rng)
        pinned = {r.key: r.offset for r in arena.regions() if r.pin_count}
        plan = PACKING.create(policy).plan(arena, units, order)
        if plan is None:
            continue
        regions = execute_plan(arena, plan, owners=lambda k: ["new"])
        arena.check_invariants()
        assert {r.key for r in regions} == {k for k, _ in units}
        assert all(arena.lookup(k).offset == off for k, off in pinned.items())
        assert plan.needed_bytes == sum(r.size for r in regions)


def test_holes_from_free_space_and_evictions_are_those_of_a_full_layout_walk() -> None:
    """Plans try a no-move layout from the free regions and the evicted units alone: it must find
    exactly the first-fit-decreasing placement that walking the whole arena finds."""
    rng = random.Random(7)
    tried = 0
    for _ in range(500):
        arena, units, order = random_state(rng)
        units = sorted(((k, arena.align(n)) for k, n in units), key=lambda u: -u[1])
        evicted = [arena.lookup(k) for k in order[: rng.randint(0, len(order))]]
        evicted += evicted[:1]  # a key listed twice changes nothing
        free_spans = [(r.offset, r.size) for r in arena.free_regions()]
        fast = _fill_holes(_holes(free_spans, evicted, units[-1][1]), units)
        layout = _Layout(_walk(arena), {r.key for r in evicted})
        assert fast == layout.first_fit_decreasing(0, len(layout.kinds), units)
        tried += fast is not None
    assert tried > 100


def test_placements_are_records_of_what_the_plan_places() -> None:
    arena = fragmented("aa..b...")
    plan = PACKING.create("pbp").plan(arena, [("x", 2 * A), ("y", A)], ["a"])
    assert plan.placed == [("x", 2 * A, 2 * A), ("y", 5 * A, A)]
    assert plan.placements == [Placement(k, o, n) for k, o, n in plan.placed]
    assert [(r.key, r.offset) for r in execute_plan(arena, plan, owners=lambda k: ["new"])] == [
        ("x", 2 * A), ("y", 5 * A)]

"""Retention policies: hand-computed values and eviction orders on small scenarios."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tangram_sim.arena import Arena, Region, State
from tangram_sim.errors import ConfigError
from tangram_sim.policies.retention import RETENTION, RetentionPolicy

GB = 10**9


def unit(key: str, size: int, owners: set[str], offset: int = 0) -> Region:
    return Region(offset, size, State.RESIDENT, key=key, owners=set(owners))


def test_registry_names_and_unknown() -> None:
    expected = {"tangram", "lru", "lfu", "gdsf", "decayed-frequency", "next-use", "none"}
    assert expected <= set(RETENTION.names())
    with pytest.raises(ConfigError):
        RETENTION.create("fifo")
    # the former name of next-use is no alias: unknown, with a hint
    assert "belady" not in RETENTION
    with pytest.raises(ConfigError, match=r"^unknown retention policy 'belady' \(belady was renamed next-use\); "
                                          r"expected one of: .*next-use"):
        RETENTION.create("belady")
    with pytest.raises(ConfigError):
        RETENTION.create("tangram", bandwidth=1.0)
    with pytest.raises(ConfigError):
        RETENTION.create("tangram", host_to_gpu_bps=0)
    assert RETENTION.create("none").retains is False
    assert RETENTION.create("tangram").retains is True


def test_tangram_hand_computed_values() -> None:
    pol = RETENTION.create("tangram", host_to_gpu_bps=25 * GB)
    for _ in range(3):
        pol.record_access("a", ["a0", "shared"], 0.0)
    pol.record_access("b", ["b0", "shared"], 1.0)
    a0 = unit("a0", 5 * GB, {"a"})
    b0 = unit("b0", 5 * GB, {"b"})
    shared = unit("shared", 5 * GB, {"a", "b"})
    # 5 GB / 25 GB/s = 0.2 s to reload; a has 3/4 of the accesses, b 1/4, shared unit gets both.
    assert pol.value(a0, 2.0) == pytest.approx(0.2 * 0.75)
    assert pol.value(b0, 2.0) == pytest.approx(0.2 * 0.25)
    assert pol.value(shared, 2.0) == pytest.approx(0.2)
    assert pol.eviction_order([shared, a0, b0], 2.0) == ["b0", "a0", "shared"]
    # a unit of a model never requested is worth nothing
    assert pol.value(unit("c0", GB, {"c"}), 2.0) == 0.0


def test_tangram_sensitivity_doubles_value() -> None:
    plain = RETENTION.create("tangram")
    sens = RETENTION.create("tangram", sensitivity={"a": 2.0})
    for pol in (plain, sens):
        pol.record_access("a", ["a0"], 0.0)
        pol.record_access("b", ["b0"], 0.0)
    a0 = unit("a0", GB, {"a"})
    b0 = unit("b0", GB, {"b"})
    assert sens.value(a0, 1.0) == pytest.approx(2 * plain.value(a0, 1.0))
    assert sens.value(b0, 1.0) == pytest.approx(plain.value(b0, 1.0))


def test_tangram_size_matters() -> None:
    pol = RETENTION.create("tangram")
    pol.record_access("a", ["small", "big"], 0.0)
    small, big = unit("small", GB, {"a"}, 0), unit("big", 4 * GB, {"a"}, GB)
    assert pol.eviction_order([big, small], 1.0) == ["small", "big"]


def test_lru_order() -> None:
    pol = RETENTION.create("lru")
    pol.record_access("a", ["a0", "s"], 1.0)
    pol.record_access("b", ["b0", "s"], 2.0)
    pol.record_access("a", ["a0", "s"], 3.0)
    regions = [unit("s", 1, {"a", "b"}, 0), unit("a0", 1, {"a"}, 1), unit("b0", 1, {"b"}, 2)]
    regions.append(unit("never", 1, {"c"}, 3))
    assert pol.eviction_order(regions, 4.0) == ["never", "b0", "s", "a0"]  # s / a0 tie: offset


def test_lfu_order() -> None:
    pol = RETENTION.create("lfu")
    for _ in range(3):
        pol.record_access("a", ["a0"], 0.0)
    pol.record_access("b", ["b0", "s"], 1.0)
    pol.record_access("c", ["s"], 2.0)
    regions = [unit("a0", 1, {"a"}, 0), unit("b0", 1, {"b"}, 1), unit("s", 1, {"b", "c"}, 2)]
    assert pol.eviction_order(regions, 3.0) == ["b0", "s", "a0"]


def test_gdsf_prefers_small_frequent_and_inflates() -> None:
    pol = RETENTION.create("gdsf")
    pol.record_access("a", ["big"], 0.0)
    pol.record_access("b", ["small"], 0.0)
    pol.record_access("b", ["small"], 1.0)
    pol.record_access("d", ["old"], 1.0)
    big, small = unit("big", 1000, {"a"}, 0), unit("small", 10, {"b"}, 1000)
    old = unit("old", 1000, {"d"}, 3000)
    assert pol.value(big, 2.0) == pytest.approx(1 / 1000)
    assert pol.value(small, 2.0) == pytest.approx(2 / 10)
    assert pol.eviction_order([small, old, big], 2.0) == ["big", "old", "small"]  # big/old tie: offset
    pol.on_evict("big", 2.0)  # L rises to H(big) = 1/1000
    pol.record_access("c", ["fresh"], 3.0)
    fresh = unit("fresh", 1000, {"c"}, 2000)
    assert pol.value(fresh, 3.0) == pytest.approx(1 / 1000 + 1 / 1000)
    # "old" had the same size and frequency but was last used before L rose: it ages out first.
    assert pol.eviction_order([fresh, old], 3.0) == ["old", "fresh"]


def test_gdsf_forgets_frequency_on_eviction() -> None:
    pol = RETENTION.create("gdsf")
    for t in range(5):
        pol.record_access("a", ["u"], float(t))
    u = unit("u", 100, {"a"})
    assert pol.value(u, 5.0) == pytest.approx(5 / 100)
    pol.on_evict("u", 5.0)
    pol.record_access("a", ["u"], 6.0)
    assert pol.value(u, 6.0) == pytest.approx(5 / 100 + 1 / 100)


def test_decayed_frequency_prefers_recent_traffic() -> None:
    tangram = RETENTION.create("tangram")
    decayed = RETENTION.create("decayed-frequency", half_life_s=10.0)
    for pol in (tangram, decayed):
        for t in range(4):  # "a" was popular long ago
            pol.record_access("a", ["a0"], float(t))
        pol.record_access("b", ["b0"], 100.0)  # "b" is the recent one
    a0, b0 = unit("a0", GB, {"a"}, 0), unit("b0", GB, {"b"}, GB)
    assert tangram.eviction_order([a0, b0], 100.0) == ["b0", "a0"]
    assert decayed.eviction_order([a0, b0], 100.0) == ["a0", "b0"]
    # hand-computed: weights 2^-(100-t)/10 for a's accesses, 1 for b's
    wa = sum(2 ** (-(100 - t) / 10) for t in range(4))
    assert decayed.access_share("b", 100.0) == pytest.approx(1 / (1 + wa))
    assert decayed.value(b0, 100.0) == pytest.approx(GB / 25e9 / (1 + wa))
    # without traffic, the share is constant over time (both sides decay alike)
    assert decayed.value(b0, 1000.0) == pytest.approx(decayed.value(b0, 100.0))


def test_decayed_frequency_with_one_half_life_equals_hand_value() -> None:
    pol = RETENTION.create("decayed-frequency", half_life_s=5.0, host_to_gpu_bps=1.0)
    pol.record_access("a", [], 0.0)
    pol.record_access("b", [], 5.0)  # a's single access is worth 0.5 now
    assert pol.value(unit("x", 3, {"a"}), 5.0) == pytest.approx(3 * 0.5 / 1.5)


def test_next_use_evicts_farthest_next_use() -> None:
    future = {"a": [0.0, 10.0, 50.0], "b": [5.0, 20.0], "c": [1.0], "d": [30.0]}
    pol = RETENTION.create("next-use", arrivals=future)
    regions = [
        unit("a0", 1, {"a"}, 0),  # next use 10
        unit("b0", 1, {"b"}, 1),  # next use 20
        unit("c0", 1, {"c"}, 2),  # never again
        unit("d0", 1, {"d"}, 3),  # next use 30
        unit("bd", 1, {"b", "d"}, 4),  # next use 20 (earliest owner)
    ]
    assert pol.value(regions[2], 5.0) == -math.inf
    assert pol.value(regions[0], 5.0) == -10.0
    assert pol.eviction_order(regions, 5.0) == ["c0", "d0", "b0", "bd", "a0"]
    # later: a's next use is 50, b is done, d is 30
    assert pol.eviction_order(regions, 25.0) == ["b0", "c0", "a0", "d0", "bd"]
    # the cursor also handles going back in time
    assert pol.value(regions[0], 0.0) == -10.0
    assert pol.value(regions[0], -1.0) == 0.0


def test_none_values_everything_the_same() -> None:
    pol = RETENTION.create("none")
    pol.record_access("a", ["x"], 0.0)
    regions = [unit("y", 1, {"a"}, 5), unit("x", 1, {"a"}, 2)]
    assert pol.eviction_order(regions, 1.0) == ["x", "y"]  # by offset


def test_eviction_order_uses_arena_regions() -> None:
    arena = Arena(16 * 256, alignment=256)
    for key, model in [("u1", "a"), ("u2", "b"), ("u3", "a")]:
        arena.allocate(key, 256, owners=[model])
        arena.finish_load(key)
    arena.pin("u3")
    pol = RETENTION.create("lfu")
    pol.record_access("a", ["u1", "u3"], 0.0)
    assert pol.eviction_order(arena.evictable(), 1.0) == ["u2", "u1"]


def test_base_class_is_abstract() -> None:
    with pytest.raises(NotImplementedError):
        RetentionPolicy().value(unit("x", 1, set()), 0.0)


NAMES = ["tangram", "lru", "lfu", "gdsf", "decayed-frequency", "none"]


@given(
    accesses=st.lists(
        st.tuples(st.sampled_from("abc"), st.lists(st.integers(0, 5), max_size=4)), max_size=30
    ),
    name=st.sampled_from(NAMES + ["next-use"]),
)
def test_deterministic_and_complete(accesses: list[tuple[str, list[int]]], name: str) -> None:
    """Same inputs -> same order; every candidate appears exactly once; order is by value."""
    future = {"a": [3.0, 40.0], "b": [7.0], "c": []}
    params = {"arrivals": future} if name == "next-use" else {}
    regions = [unit(f"k{i}", 1 + 37 * i % 11, {"abc"[i % 3], "abc"[i * 7 % 3]}, i) for i in range(6)]
    orders = []
    for _ in range(2):
        pol = RETENTION.create(name, **params)
        for t, (model, keys) in enumerate(accesses):
            pol.record_access(model, [f"k{k}" for k in keys], float(t))
        order = pol.eviction_order(reversed(regions), float(len(accesses)))
        values = {r.key: pol.value(r, float(len(accesses))) for r in regions}
        orders.append(order)
    assert orders[0] == orders[1]
    assert sorted(orders[0]) == sorted(r.key for r in regions)
    vals = [values[k] for k in orders[0]]
    assert vals == sorted(vals)


@given(
    counts=st.dictionaries(st.sampled_from("abc"), st.integers(1, 3)),
    units=st.lists(
        st.tuples(st.integers(0, 3), st.sampled_from([1, 2, 4]), st.integers(0, 12)), max_size=24
    ),
    decayed=st.booleans(),
)
def test_tangram_fast_order_equals_the_base_class_order(
    counts: dict[str, int], units: list[tuple[int, int, int]], decayed: bool
) -> None:
    """Per-class ranking = sorting every unit by (value, offset, input position), the base class's
    rule: with shared and separate owner sets, classes of equal value, equal offsets, repeats."""
    pol = RETENTION.create("decayed-frequency" if decayed else "tangram")
    for t, (model, n) in enumerate(counts.items()):
        for _ in range(n):
            pol.record_access(model, [], float(t))
    owner_sets = [frozenset("a"), frozenset("ab"), frozenset("b"), {"c"}]  # a plain set works too
    regions = [
        Region(offset * 4, size * 4, State.RESIDENT, key=f"k{i}", owners=owner_sets[o])
        for i, (o, size, offset) in enumerate(units)
    ]
    regions += regions[:2]  # a unit listed twice stays twice
    now = float(len(counts))
    assert pol.eviction_order(regions, now) == RetentionPolicy.eviction_order(pol, regions, now)
    assert pol.eviction_order(iter(regions), now) == pol.eviction_order(regions, now)


def test_on_evict_many_calls_on_evict_only_where_a_policy_keeps_per_unit_state() -> None:
    seen = []

    class Recording(RetentionPolicy):
        def on_evict(self, key, now):
            seen.append((key, now))

    Recording().on_evict_many(["x", "y"], 3.0)
    assert seen == [("x", 3.0), ("y", 3.0)]
    gdsf = RETENTION.create("gdsf")
    gdsf.record_access("a", ["big"], 0.0)
    gdsf.value(unit("big", 10, {"a"}), 1.0)
    gdsf.on_evict_many(["big"], 1.0)
    assert gdsf.clock == pytest.approx(1 / 10)  # L rose to H(big) as on_evict("big") makes it
    RETENTION.create("tangram").on_evict_many(iter(["x"]), 0.0)  # nothing to do, and no error

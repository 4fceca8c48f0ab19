"""Model-value retention, home-GPU placement and adaptive fairness: hand-made cases and small runs."""

from __future__ import annotations

import math
import random

import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tangram_sim.arena import Region, State
from tangram_sim.errors import ConfigError
from tangram_sim.models import get_model
from tangram_sim.policies.home import HomeAffinityScheduler, partition
from tangram_sim.policies.lifecycle import must_yield_predicted
from tangram_sim.policies.retention import RETENTION
from tangram_sim.policies.scheduler import SCHEDULER, PlacementOption
from tangram_sim.sim.hardware import TierSpec, gpu_spec
from tangram_sim.sim.simulate import ClusterSpec, ModelChoice, simulate
from tangram_sim.sim.systems import SystemSpec, make_system
from tangram_sim.sim.timemodel import Roofline

GB = 10**9


def unit(key: str, size: int, owners: set[str], offset: int) -> Region:
    return Region(offset, size, State.RESIDENT, key=key, owners=frozenset(owners))


def trace(rows: list[tuple[float, str, int, int]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["arrival_s", "model", "input_tokens", "output_tokens"])


def cluster(gpus: int) -> ClusterSpec:
    return ClusterSpec(1, gpus, gpu_spec("a100-80gb", memory_gib=40), TierSpec())


def skewed_rows(names: list[str], n: int, *, mean_gap_s: float, output_tokens: int, seed: int
                ) -> list[tuple[float, str, int, int]]:
    """Poisson arrivals of 256-token prompts, the models drawn with weights 4:3:2:1 (in `names` order)."""
    rng = random.Random(seed)
    t, rows = 0.0, []
    for _ in range(n):
        t += rng.expovariate(1 / mean_gap_s)
        rows.append((t, rng.choices(names, weights=[4, 3, 2, 1])[0], 256, output_tokens))
    return rows


# ------------------------------------------------------------------ model-value retention


def accessed(name: str, counts: dict[str, int], **params: object):
    pol = RETENTION.create(name, **params)
    for model, n in counts.items():
        for t in range(n):
            pol.record_access(model, [], float(t))
    return pol


def test_model_value_takes_every_unit_of_the_least_valuable_model_first() -> None:
    # Units of a (most requested), b and c interleaved in the arena; a's first unit is small, which is
    # what makes a unit-level cost rule evict it early.
    regions = []
    offset = 0
    for i in range(4):
        for model, size in (("a", GB // 8 if i == 0 else GB), ("b", 2 * GB), ("c", GB)):
            regions.append(unit(f"{model}{i}", size, {model}, offset))
            offset += size
    counts = {"a": 6, "b": 3, "c": 1}
    order = accessed("model-value", counts).eviction_order(reversed(regions), 6.0)
    assert order == ["c0", "c1", "c2", "c3", "b0", "b1", "b2", "b3", "a0", "a1", "a2", "a3"]
    # Tangram's unit-level cost (size x share) evicts a's small unit before any of b's.
    tangram = accessed("tangram", counts).eviction_order(regions, 6.0)
    assert tangram.index("a0") < min(tangram.index(f"b{i}") for i in range(4))


def test_model_value_hand_computed_value() -> None:
    pol = accessed("model-value", {"a": 2}, host_to_gpu_bps=10.0, half_life_s=100.0)
    # accesses at t = 0 and 1, read at t = 101: weights 2^-1.01 and 2^-1; rate = count x ln2 / 100
    count = 2 ** -1.01 + 2 ** -1.0
    assert pol.rate("a", 101.0) == pytest.approx(count * math.log(2) / 100)
    assert pol.value(unit("x", 5, {"a"}, 0), 101.0) == pytest.approx(count * math.log(2) / 100 / 10.0)
    assert pol.value(unit("y", 5, {"never"}, 0), 101.0) == 0.0
    sens = accessed("model-value", {"a": 2}, host_to_gpu_bps=10.0, half_life_s=100.0, sensitivity={"a": 3})
    assert sens.value(unit("x", 5, {"a"}, 0), 101.0) == pytest.approx(3 * pol.value(unit("x", 5, {"a"}, 0), 101.0))


def test_model_value_shared_units_are_valued_by_all_owners() -> None:
    regions = [
        unit("bc", GB, {"b", "c"}, 0),
        unit("ac", GB, {"a", "c"}, GB),
        unit("a0", GB, {"a"}, 2 * GB),
        unit("b0", GB, {"b"}, 3 * GB),
        unit("c0", GB, {"c"}, 4 * GB),
    ]
    pol = accessed("model-value", {"a": 5, "b": 2, "c": 1})
    now = 5.0
    v = {r.key: pol.value(r, now) for r in regions}
    assert v["bc"] == pytest.approx(v["b0"] + v["c0"])
    assert v["ac"] == pytest.approx(v["a0"] + v["c0"])
    # b + c (3 requests) is worth less than a (5): bc goes after both its owners' own units, before a's;
    # ac is worth more than a alone and goes last.
    assert pol.eviction_order(regions, now) == ["c0", "b0", "bc", "a0", "ac"]
    # With b and c worth more together than a, their shared unit outlives a's units.
    pol = accessed("model-value", {"a": 5, "b": 3, "c": 3})
    assert pol.eviction_order(regions, now) == ["b0", "c0", "a0", "bc", "ac"]  # b0/c0 tie: offset


def test_model_value_prefers_recent_traffic() -> None:
    pol = RETENTION.create("model-value", half_life_s=10.0)
    for t in range(8):  # a was popular long ago
        pol.record_access("a", [], float(t))
    pol.record_access("b", [], 100.0)
    regions = [unit("a0", GB, {"a"}, 0), unit("b0", GB, {"b"}, GB)]
    assert pol.eviction_order(regions, 100.0) == ["a0", "b0"]


def test_model_value_ties_go_by_offset_and_groups_stay_whole() -> None:
    pol = RETENTION.create("model-value")  # nothing requested: every model is worth 0
    regions = [unit("a5", 1, {"a"}, 5), unit("b3", 1, {"b"}, 3), unit("a1", 1, {"a"}, 1),
               unit("b0", 1, {"b"}, 0)]
    expected = ["b0", "b3", "a1", "a5"]  # b's group starts lowest; each group by offset
    assert pol.eviction_order(regions, 0.0) == expected
    assert pol.eviction_order(reversed(regions), 0.0) == expected
    plain = Region(7, 1, State.RESIDENT, key="c7", owners={"c"})  # type: ignore[arg-type]  # a plain set
    assert pol.eviction_order([*regions, plain], 0.0) == [*expected, "c7"]


def regions_twice(units: list[tuple[str, int]], seed: int) -> tuple[list[Region], list[Region]]:
    """Resident units (owners, size) 10 bytes apart, in offset order and shuffled by `seed`."""
    regions = [unit(f"k{i}", size, set(owners), 10 * i) for i, (owners, size) in enumerate(units)]
    shuffled = list(regions)
    random.Random(seed).shuffle(shuffled)
    return regions, shuffled


@given(
    accesses=st.lists(st.tuples(st.sampled_from("abcd"), st.floats(0, 1000)), max_size=30),
    units=st.lists(st.tuples(st.sampled_from(["a", "b", "c", "ab", "cd"]), st.integers(1, 9)), max_size=20),
    seed=st.integers(0, 10),
)
def test_model_value_order_is_whole_groups_by_value_and_deterministic(
    accesses: list[tuple[str, float]], units: list[tuple[str, int]], seed: int
) -> None:
    regions, shuffled = regions_twice(units, seed)
    orders = []
    for candidates in (regions, shuffled):
        pol = RETENTION.create("model-value", half_life_s=100.0)
        for model, t in sorted(accesses, key=lambda a: a[1]):
            pol.record_access(model, [], t)
        orders.append(pol.eviction_order(candidates, 1000.0))
    assert orders[0] == orders[1]
    by_key = {r.key: r for r in regions}
    owners = [by_key[k].owners for k in orders[0]]
    values = [pol.value(by_key[k], 1000.0) for k in orders[0]]
    assert values == sorted(values)
    # each owner set is one contiguous run
    runs = [o for i, o in enumerate(owners) if i == 0 or owners[i - 1] != o]
    assert len(runs) == len(set(runs))


@given(
    units=st.lists(st.tuples(st.sampled_from(["a", "b", "c", "ab", "cd"]), st.integers(1, 9)), max_size=20),
    waiting=st.dictionaries(st.sampled_from("abcd"), st.floats(0, 100), max_size=4),
    seed=st.integers(0, 10),
)
def test_model_value_lookahead_order_is_a_permutation_with_waiting_models_last(
    units: list[tuple[str, int]], waiting: dict[str, float], seed: int
) -> None:
    regions, shuffled = regions_twice(units, seed)
    orders = []
    for candidates in (regions, shuffled):
        pol = RETENTION.create("model-value")
        for i, m in enumerate("abcd"):
            pol.record_access(m, [], float(i))
        pol.observe_queue(waiting, 100.0)
        orders.append(pol.eviction_order(candidates, 100.0))
    assert orders[0] == orders[1]
    assert sorted(orders[0]) == sorted(r.key for r in regions)
    by_key = {r.key: r for r in regions}
    is_waiting = [not waiting.keys().isdisjoint(by_key[k].owners) for k in orders[0]]
    assert is_waiting == sorted(is_waiting)  # every unit of a waiting model after every other unit
    firsts = [min(waiting[m] for m in by_key[k].owners if m in waiting) for k, w in zip(orders[0], is_waiting)
              if w]
    assert firsts == sorted(firsts, reverse=True)  # the model served last goes first


@pytest.mark.parametrize("params", [{"half_life_s": 0}, {"half_life_s": math.inf}, {"half_life_s": True},
                                    {"host_to_gpu_bps": -1.0}, {"sensitivity": {"a": -1}},
                                    {"sensitivity": [1]}, {"per_byte": False}])
def test_model_value_parameters_are_checked(params: dict) -> None:
    with pytest.raises(ConfigError):
        RETENTION.create("model-value", **params)
    with pytest.raises(ConfigError) as err:
        make_system("s", "tangram", {"retention": "model-value", "retention_params": params}, where="systems.2")
    message = str(err.value)
    assert message.startswith("systems.2.overrides.retention_params: ") and "\n" not in message


def test_model_value_in_a_run_keeps_more_models_whole_than_tangram() -> None:
    names = ["qwen2.5-3b", "phi-3-mini-4k", "llama-3-8b", "yi-9b"]  # 47.5 GB on one 40 GiB GPU
    models = {m: ModelChoice(get_model(m)) for m in names}
    rows = skewed_rows(names, 200, mean_gap_s=4.0, output_tokens=16, seed=5)
    summaries = {}
    for name in ("tangram", "model-value", "model-value"):
        system = make_system(name, "tangram", {"retention": name, "keep_alive_s": 1.0})
        summary = simulate(models, trace(rows), cluster(1), system).summary
        assert summaries.setdefault(name, summary) == summary  # same seed, same results
    assert summaries["model-value"]["full_hit_ratio"] > summaries["tangram"]["full_hit_ratio"] + 0.1
    assert summaries["model-value"]["bytes_loaded"] < summaries["tangram"]["bytes_loaded"]


# ------------------------------------------------------------------ home-GPU placement


def opt(gpu: int, **kw: object) -> PlacementOption:
    base: dict[str, object] = dict(
        gpus=(gpu,), node=0, queue_wait_s=0.0, free_bytes=40 * GB, resident_bytes=0, model_bytes=10 * GB,
        in_host_cache=True, host_to_gpu_bps=25e9, storage_bps=2e9, prefill_s=0.1, capacity_bytes=40 * GB,
    )
    base.update(kw)
    return PlacementOption(**base)  # type: ignore[arg-type]


def test_partition_by_hand() -> None:
    caps = {0: 40 * GB, 1: 40 * GB}
    sizes = {"a": 30 * GB, "b": 30 * GB, "c": 30 * GB}
    homes = partition({"a": 0.5, "b": 0.3, "c": 0.2}, sizes, caps)
    # a takes GPU 0, b the only GPU it still fits on, c fits nowhere: most room (a tie), then the
    # smaller assigned share (b's)
    assert homes == {"a": (0,), "b": (1,), "c": (1,)}
    flipped = partition({"a": 0.1, "b": 0.3, "c": 0.6}, sizes, caps, previous=homes)
    # c, now the hottest, keeps GPU 1 to itself; b moves to GPU 0, where a stays
    assert flipped == {"c": (1,), "b": (0,), "a": (0,)}
    # room balance: the hot model is the one that gets a second home with hot_share
    two = partition({"a": 0.8, "b": 0.2}, {"a": GB, "b": GB}, caps, hot_share=0.5)
    assert two["a"] == (0, 1) and len(two["b"]) == 1
    assert partition({"a": 1.0}, sizes, {}) == {}
    # balance by room keeps a home while the model fits there
    assert partition({"x": 0.9, "y": 0.1}, {"x": GB, "y": GB}, caps, balance="room",
                     previous={"x": (1,), "y": (1,)}) == {"x": (1,), "y": (1,)}


def home_scheduler(**params: object) -> HomeAffinityScheduler:
    sched = SCHEDULER.create("home-affinity", **params)
    assert isinstance(sched, HomeAffinityScheduler)
    return sched


def test_home_spills_only_when_the_home_is_clearly_slower() -> None:
    sched = home_scheduler()  # spill_slack_s = 3
    rng = random.Random(0)
    sched.observe("a", 10 * GB, 0.0)
    sched.observe("b", 10 * GB, 0.0)
    assert sched.choose("a", [opt(0), opt(1)], rng) == 0  # a's home: GPU 0 (a tie, lower id)
    home_of_b = sched.homes["b"][0]
    assert home_of_b == 1  # the GPU with less assigned popularity
    # b loads 0.4 s anywhere; its home has 2 s of queue: within the slack, it waits at home
    assert sched.choose("b", [opt(0), opt(1, queue_wait_s=2.0)], rng) == 1
    # 10 s of queue at home: loading on GPU 0 is far faster, so it spills
    assert sched.choose("b", [opt(0), opt(1, queue_wait_s=10.0)], rng) == 0
    assert sched.spills == 1
    # A GPU that already holds b wholly serves it sooner without a load or a new copy: taken
    assert sched.choose("b", [opt(0, resident_bytes=10 * GB), opt(1)], rng) == 0
    assert sched.spills == 2
    # ... but not when the home holds it too and is as fast
    both = [opt(0, resident_bytes=10 * GB), opt(1, resident_bytes=10 * GB)]
    assert sched.choose("b", both, rng) == 1


def test_home_repartitions_when_popularity_flips() -> None:
    sched = home_scheduler(half_life_s=10.0, check_every=5)
    rng = random.Random(0)
    options = [opt(0, model_bytes=30 * GB), opt(1, model_bytes=30 * GB)]
    for model, n in (("a", 5), ("b", 3), ("c", 2)):
        for _ in range(n):
            sched.observe(model, 30 * GB, 0.0)
    sched.choose("a", options, rng)
    assert sched.homes == {"a": (0,), "b": (1,), "c": (1,)}
    assert sched.partitions == 1
    for i in range(10):  # c becomes the hot model; a and b decay away
        sched.observe("c", 30 * GB, 100.0 + i)
    sched.observe("b", 30 * GB, 110.0)
    assert sched.choose("c", options, rng) == 1
    assert sched.partitions == 2
    assert sched.homes == {"c": (1,), "b": (0,), "a": (0,)}
    # no drift, no new partition
    for _ in range(6):
        sched.observe("c", 30 * GB, 111.0)
    sched.choose("c", options, rng)
    assert sched.partitions == 2


def test_home_places_tensor_parallel_instances_by_ttft() -> None:
    sched = home_scheduler()
    gangs = [opt(0, gpus=(0, 1), queue_wait_s=5.0), opt(2, gpus=(2, 3))]
    sched.observe("big", 10 * GB, 0.0)
    assert sched.choose("big", gangs, random.Random(0)) == 1
    assert "big" not in sched.homes


@pytest.mark.parametrize("params", [{"drift": 2.0}, {"check_every": 0}, {"check_every": 1.5},
                                    {"spill_slack_s": -1}, {"hot_share": 0}, {"half_life_s": 0},
                                    {"balance": "memory"}, {"stick_share": 1.5}, {"slack": 1}])
def test_home_parameters_are_checked(params: dict) -> None:
    with pytest.raises(ConfigError):
        SCHEDULER.create("home-affinity", **params)
    with pytest.raises(ConfigError) as err:
        make_system("s", "tangram", {"scheduler": "home-affinity", "scheduler_params": params}, where="systems.0")
    assert str(err.value).startswith("systems.0.overrides.scheduler_params: ") and "\n" not in str(err.value)


def test_scheduler_params_reach_every_scheduler() -> None:
    with pytest.raises(ConfigError, match=r"^systems.1.overrides.scheduler_params: bad parameters"):
        make_system("s", "tangram", {"scheduler": "ttft-aware", "scheduler_params": {"x": 1}}, where="systems.1")
    assert make_system("s", "tangram", {"scheduler": "tangram-affinity",
                                        "scheduler_params": {"idle_s": 0.5}}).scheduler_params == {"idle_s": 0.5}


def test_home_never_copies_a_model_while_its_home_has_room() -> None:
    """2 GPUs x 40 GiB, four models of 47.5 GB in all: every model is loaded on one GPU only (its home),
    and each model's bytes cross PCIe once; affinity alone copies every model onto both GPUs."""
    names = ["qwen2.5-3b", "phi-3-mini-4k", "llama-3-8b", "yi-9b"]
    models = {m: ModelChoice(get_model(m)) for m in names}
    rows = skewed_rows(names, 300, mean_gap_s=1.5, output_tokens=32, seed=3)
    gpus_of = {}
    loaded = {}
    for sched in ("home-affinity", "tangram-affinity"):
        system = make_system(sched, "tangram", {"scheduler": sched, "keep_alive_s": 1.0})
        requests = simulate(models, trace(rows), cluster(2), system).requests
        cold = requests[requests.cold]
        gpus_of[sched] = cold.groupby("model").gpu.agg(lambda g: sorted(set(g))).to_dict()
        loaded[sched] = int(cold.bytes_loaded.sum())
    assert all(len(g) == 1 for g in gpus_of["home-affinity"].values()), gpus_of
    assert loaded["home-affinity"] == sum(get_model(m).weight_bytes for m in names)
    assert any(len(g) == 2 for g in gpus_of["tangram-affinity"].values())


# ------------------------------------------------------------------ adaptive fairness


class Q:
    def __init__(self, rid: int, model: str, arrival: float) -> None:
        self.rid, self.model, self.arrival = rid, model, arrival


def test_must_yield_predicted() -> None:
    blocker, cand = Q(1, "b", 0.0), Q(2, "a", 1.0)
    assert not must_yield_predicted(None, cand, 10.0, 5.0, 20.0)
    assert not must_yield_predicted(blocker, cand, 10.0, 5.0, 20.0)  # 10 waited + 5 predicted < 20
    assert must_yield_predicted(blocker, cand, 15.0, 5.0, 20.0)
    assert not must_yield_predicted(Q(3, "b", 0.0), cand, 100.0, 5.0, 20.0)  # the candidate is older


def test_fairness_fields_are_checked() -> None:
    assert SystemSpec("x").fairness == "fixed"  # existing presets keep the fixed window
    with pytest.raises(ConfigError, match=r"^systems\.0\.fairness: unknown fairness policy 'sometimes'; expected "
                                          r"one of: adaptive, fixed$"):
        make_system("s", "tangram", {"fairness": "sometimes"}, where="systems.0")
    with pytest.raises(ConfigError, match=r"^systems.0.overrides.fairness_bound_s: expected a number >= 0"):
        make_system("s", "tangram", {"fairness": "adaptive", "fairness_bound_s": -1.0}, where="systems.0")


def test_adaptive_fairness_batches_an_overloaded_pair_of_models_within_its_bound() -> None:
    """One 40 GiB GPU, two models that do not fit together (qwen2.5-14b 29.5 GB + llama-3-8b 16 GB), a
    request every 0.5 s alternating between them. The fixed 5 s window switches models at almost every
    request and the queue runs away; the adaptive rule batches each model for up to its bound.

    The bound: a request R of the inactive model is the blocker (or behind an older blocker of its own
    model, with which it is admitted). The active model admits a request only while the blocker's
    waited time + predicted drain of the batch + predicted cold start of the blocker's model stays
    under `fairness_bound_s`; when admission stops, the blocker waits for the drain and its cold start
    and is then admitted with the other queued requests of its model. As long as the predictions are
    not below the real times (here the estimates use the simulator's own roofline and load rates; the
    batch shrinks as requests finish, so the predicted drain is an upper bound), R's wait until its
    prefill starts (queue + cold start) is at most `fairness_bound_s`, and its TTFT at most the bound +
    one batched prefill of up to max_batch requests."""
    a, b = "qwen2.5-14b", "llama-3-8b"
    models = {m: ModelChoice(get_model(m)) for m in (a, b)}
    rows = [(0.5 * i, (a, b)[i % 2], 256, 128) for i in range(200)]
    bound = 20.0
    runs = {}
    for name, overrides in (("fixed", {}), ("adaptive", {"fairness": "adaptive", "fairness_bound_s": bound})):
        runs[name] = simulate(models, trace(rows), cluster(1), make_system(name, "tangram", overrides))
    fixed, adaptive = runs["fixed"].requests, runs["adaptive"].requests
    assert (fixed.outcome == "completed").all() and (adaptive.outcome == "completed").all()
    assert fixed.cold.sum() > 150  # a switch for almost every request
    assert adaptive.cold.sum() * 10 < fixed.cold.sum()
    waited = adaptive.queue_s + adaptive.startup_s + adaptive.load_s
    assert waited.max() <= bound + 1e-9
    c = cluster(1)
    batch_prefill = max(Roofline(c.gpu).prefill_s(get_model(m), 32 * 256) for m in (a, b))
    assert adaptive.ttft_s.max() <= bound + batch_prefill
    assert runs["adaptive"].summary["p99_ttft_s"] < runs["fixed"].summary["p99_ttft_s"] / 5

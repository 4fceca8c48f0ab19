"""The exact offline retention optimum (`analysis.optimum`): hand cases, a brute force over every
retention choice, every retention policy replayed on the same byte-capacity model, and simulated runs
at model granularity (one unit per model and rank, few enough for the exact search)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tangram_sim.analysis.optimum import offline_optimum, unlimited_memory_loads
from tangram_sim.analysis.schedule import main, schedule_optimum
from tangram_sim.arena import Region, State
from tangram_sim.core.records import build_entries
from tangram_sim.models import get_model
from tangram_sim.policies.retention import RETENTION
from tangram_sim.sim.hardware import TierSpec, gpu_spec
from tangram_sim.sim.simulate import ClusterSpec, ModelChoice, simulate
from tangram_sim.sim.systems import make_system

POLICIES = ["tangram", "lru", "lfu", "gdsf", "decayed-frequency", "next-use", "none"]


def test_hand_cases() -> None:
    sizes = dict.fromkeys("abc", 1)
    steps = [["a"], ["b"], ["c"], ["a"], ["b"], ["c"]]
    opt = offline_optimum(steps, sizes, capacity=2)
    # a, b, c load; c keeps a (used next), then b loads keeping c (used next): 4 loads, not LRU's 6
    assert opt.loaded_bytes == 4 and opt.needed_bytes == 6 and sum(opt.loads) == 4
    assert opt.loads == (1, 1, 1, 0, 1, 0)
    assert opt.kept[2] == {"a"} and opt.kept[4] == {"c"}
    assert opt.io_reduction == pytest.approx(1 / 3)
    assert offline_optimum(steps, sizes, capacity=3).loaded_bytes == 3 == unlimited_memory_loads(steps, sizes)
    assert offline_optimum(steps, sizes, capacity=1).loaded_bytes == 6
    # a reserve (KV) takes room from retention
    assert offline_optimum(steps, sizes, capacity=3, reserve=[0, 0, 1, 0, 0, 0]).loaded_bytes == 4
    assert offline_optimum([], sizes, capacity=1).loaded_bytes == 0


def test_size_matters_where_next_use_does_not_look() -> None:
    """Keeping the unit used soonest is not optimal when sizes differ: x leaves room for one of big and
    small; next-use keeps small (used next) and reloads big, the optimum keeps big and reloads small."""
    sizes = {"big": 4, "small": 1, "x": 4}
    steps = [["big"], ["small"], ["x"], ["small"], ["big"]]
    opt = offline_optimum(steps, sizes, capacity=8)
    assert opt.kept[2] == {"big"}
    next_use = policy_loads(steps, sizes, 8, [0] * len(steps), "next-use")
    assert opt.loaded_bytes == 10 < next_use == 13


def test_limits_and_bad_input() -> None:
    sizes = {i: 1 for i in range(30)}
    with pytest.raises(ValueError, match="30 distinct units"):
        offline_optimum([list(range(30))], sizes, capacity=100)
    with pytest.raises(ValueError, match="over the capacity"):
        offline_optimum([[0, 1]], sizes, capacity=1)
    with pytest.raises(ValueError, match="reserves for"):
        offline_optimum([[0]], sizes, capacity=1, reserve=[0, 0])
    with pytest.raises(ValueError, match="states at step"):
        offline_optimum([[i] for i in range(12)] * 2, sizes, capacity=7, max_states=3)


def owners_of(models: dict[str, frozenset]) -> dict:
    out: dict = {}
    for m, units in models.items():
        for u in units:
            out[u] = out.get(u, frozenset()) | {m}
    return out


def policy_loads(steps: Sequence[Sequence], sizes: dict, capacity: int, reserve: Sequence[int], name: str,
                 models: Sequence[str] | None = None) -> int:
    """Bytes `name` loads on the optimum's model of a GPU: each step records its access, then evicts
    retained units in the policy's order until the step fits (as a cold start does), loads what is
    missing; a policy that does not retain drops the step's units when it ends."""
    models = list(models) if models is not None else ["+".join(sorted(map(str, s))) for s in steps]
    units_of = {m: frozenset(s) for m, s in zip(models, steps)}
    owners = owners_of(units_of)
    future: dict[str, list[float]] = {}
    for t, m in enumerate(models):
        future.setdefault(m, []).append(float(t))
    policy = RETENTION.create(name, **({"arrivals": future} if name == "next-use" else {}))
    held: set = set()
    loaded = 0
    for t, (model, step) in enumerate(zip(models, steps)):
        need = set(step)
        policy.record_access(model, sorted(need, key=repr), float(t))
        spare = held - need
        room = capacity - reserve[t] - sum(sizes[u] for u in need)
        if sum(sizes[u] for u in spare) > room:
            regions = [Region(i, sizes[u], State.RESIDENT, key=u, owners=owners[u])
                       for i, u in enumerate(sorted(spare, key=repr))]
            for key in policy.eviction_order(regions, float(t)):
                if sum(sizes[u] for u in spare) <= room:
                    break
                spare.discard(key)
                policy.on_evict(key, float(t))
        loaded += sum(sizes[u] for u in need - held)
        held = (need if policy.retains else set()) | spare
    return loaded


def brute_force(steps: Sequence[Sequence], sizes: dict, capacity: int, reserve: Sequence[int]) -> int:
    """Every choice: any retained units kept through a step (that fit), then any subset of what is
    resident retained after it."""
    def subsets(items: set) -> list[frozenset]:
        items = sorted(items, key=repr)
        return [frozenset(c) for r in range(len(items) + 1) for c in itertools.combinations(items, r)]

    def best(t: int, held: frozenset) -> int:
        if t == len(steps):
            return 0
        need = frozenset(steps[t])
        load = sum(sizes[u] for u in need - held)
        out = None
        for kept in subsets(held - need):
            if sum(sizes[u] for u in need | kept) + reserve[t] > capacity:
                continue
            for after in subsets(need | kept):
                cost = load + best(t + 1, after)
                out = cost if out is None else min(out, cost)
        assert out is not None  # keeping nothing always fits
        return out

    return best(0, frozenset())


@st.composite
def cases(draw, max_units: int = 6, max_steps: int = 8, max_models: int = 4):
    n = draw(st.integers(1, max_units))
    sizes = {f"u{i}": draw(st.integers(1, 6)) for i in range(n)}
    units = sorted(sizes)
    models = draw(st.lists(st.frozensets(st.sampled_from(units), min_size=1, max_size=3), min_size=1,
                           max_size=max_models))
    picks = draw(st.lists(st.integers(0, len(models) - 1), min_size=1, max_size=max_steps))
    steps = [sorted(models[i]) for i in picks]
    reserve = draw(st.lists(st.integers(0, 3), min_size=len(steps), max_size=len(steps)))
    floor = max(sum(sizes[u] for u in s) + r for s, r in zip(steps, reserve))
    capacity = floor + draw(st.integers(0, sum(sizes.values())))
    return steps, [f"m{i}" for i in picks], sizes, capacity, reserve


@settings(max_examples=300, deadline=None)
@given(cases())
def test_never_above_any_policy_and_never_below_the_unlimited_bound(case) -> None:
    steps, models, sizes, capacity, reserve = case
    opt = offline_optimum(steps, sizes, capacity, reserve)
    assert unlimited_memory_loads(steps, sizes) <= opt.loaded_bytes <= opt.needed_bytes
    for name in POLICIES:
        assert opt.loaded_bytes <= policy_loads(steps, sizes, capacity, reserve, name, models), name
    # the schedule it returns is feasible and loads what it says
    held: set = set()
    for t, (step, kept, load) in enumerate(zip(steps, opt.kept, opt.loads)):
        assert kept <= held - set(step)
        assert sum(sizes[u] for u in set(step) | kept) + reserve[t] <= capacity
        assert load == sum(sizes[u] for u in set(step) - held)
        held = set(step) | kept


@settings(max_examples=200, deadline=None)
@given(cases(max_units=4, max_steps=5, max_models=3))
def test_equals_a_brute_force_on_tiny_cases(case) -> None:
    steps, _, sizes, capacity, reserve = case
    assert offline_optimum(steps, sizes, capacity, reserve).loaded_bytes == brute_force(steps, sizes, capacity,
                                                                                         reserve)


@pytest.fixture(scope="module")
def small_run() -> tuple[dict[str, ModelChoice], pd.DataFrame, ClusterSpec]:
    names = ["qwen2.5-3b", "phi-3-mini-4k", "llama-3-8b", "yi-9b", "qwen2.5-3b", "llama-3-8b"]
    models = {n: ModelChoice(get_model(n)) for n in dict.fromkeys(names)}
    rows = [(2.0 * i, names[(i * 5) % 6], 200 + 50 * (i % 7), 5 + i % 30) for i in range(150)]
    trace = pd.DataFrame(rows, columns=["arrival_s", "model", "input_tokens", "output_tokens"])
    return models, trace, ClusterSpec(1, 2, gpu_spec("a100-80gb", memory_gib=40), TierSpec())


@pytest.mark.parametrize("retention", ["tangram", "lru", "lfu", "next-use"])
def test_simulated_model_granularity_runs_load_at_least_the_optimum(small_run, retention: str) -> None:
    """The optimum of each GPU's realised schedule (whole memory, no KV reserve) bounds what the run's
    retention policy loaded, and is at least the unlimited-memory bound."""
    models, trace, cluster = small_run
    system = make_system("model-reuse", "model-reuse", {"retention": retention, "keep_alive_s": 3.0})
    res = simulate(models, trace, cluster, system)
    entries = build_entries({n: (c.spec, c.sensitivity, c.tensor_parallel) for n, c in models.items()}, system,
                            cluster.alignment)
    row = schedule_optimum(res.requests, entries, cluster.gpu.memory_bytes)
    assert row["note"] == "" and row["cold_starts"] == res.summary["cold_starts"] > 30
    assert row["unlimited_bytes"] <= row["optimum_bytes"] <= row["bytes_loaded"] == res.summary["bytes_loaded"]
    assert row["unlimited_bytes"] < row["optimum_bytes"]  # memory is short: the bound is not reachable
    assert 1 - row["unlimited_bytes"] / row["bytes_needed"] == pytest.approx(res.summary["io_reduction_bound"])


def test_the_command_reads_a_run_directory(tmp_path, capsys) -> None:
    from tangram_sim.cli import main as cli

    exp = tmp_path / "exp.yaml"
    exp.write_text(
        "name: tiny\nseed: 1\n"
        "cluster: {nodes: 1, gpus_per_node: 1, gpu: a100-80gb, gpu_memory_gib: 30}\n"
        "models: [{name: qwen2.5-3b}, {name: phi-3-mini-4k}, {name: llama-3-8b}]\n"
        "trace: {kind: synthetic, n_requests: 60, rate: 0.5, alpha: 0.5}\n"
        "systems: [{name: reuse, preset: model-reuse}, {name: tangram, preset: tangram}]\n"
        "outputs: {plots: false}\n"
    )
    assert cli(["run", str(exp), "--out", str(tmp_path / "out"), "--quiet", "--jobs", "1"]) == 0
    capsys.readouterr()
    assert main([str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    assert "io_reduction_optimum" in text and "reuse" in text
    assert "distinct units: the exact search takes at most" in text  # tangram's units: too many
    assert main([str(tmp_path)]) == 2
    assert "no requests.parquet" in capsys.readouterr().out

"""The one memory entry point (`core.memory`): every path that takes a GPU's memory - a cold start, KV
growth, a static KV pool, a prefetch - plans through `acquire` and tells retention through it, and the
ask's filter never lets a plan evict what it protects, spares or is not allowed to displace."""

from __future__ import annotations

import random
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
from hypothesis import given
from hypothesis import strategies as st

from tangram_sim.arena import Arena
from tangram_sim.core.memory import Ask, acquire
from tangram_sim.models import get_model
from tangram_sim.policies.lifecycle import ModelQueues
from tangram_sim.policies.packing import PACKING
from tangram_sim.policies.retention import RETENTION, LruRetention
from tangram_sim.sim.hardware import TierSpec, gpu_spec
from tangram_sim.sim.simulate import ClusterSpec, ModelChoice, simulate
from tangram_sim.sim.systems import make_system

CORE = Path(__file__).resolve().parents[1] / "tangram_sim" / "core"
MEMORY = str(CORE / "memory.py")
MIB = 2**20


def test_only_the_memory_module_ranks_plans_and_tells_retention() -> None:
    for path in CORE.glob("*.py"):
        if path.name == "memory.py":
            continue
        text = path.read_text()
        for call in ("observe_queue(", "eviction_order(", "on_evict_many(", "on_evict(", "plan_kv(",
                     "packing.plan(", "execute_plan(", "execute_kv_plan("):
            assert call not in text, f"{path.name} calls {call} itself instead of going through core.memory"


def _caller(frame) -> str:  # type: ignore[no-untyped-def]
    """The first function outside core/memory.py on the stack above `frame` (which must be in it)."""
    assert frame.f_code.co_filename == MEMORY, f"retention told from {frame.f_code.co_filename}"
    while frame.f_code.co_filename == MEMORY:
        frame = frame.f_back
    return frame.f_code.co_name


class Spy(LruRetention):
    """LRU that plans with the queue and records who showed it the queue and who told it of evictions."""

    uses_queue = True
    observed: set[str] = set()
    evicted: set[str] = set()

    def observe_queue(self, oldest, now):  # type: ignore[no-untyped-def]
        Spy.observed.add(_caller(sys._getframe(1)))

    def on_evict_many(self, keys, now):  # type: ignore[no-untyped-def]
        keys = list(keys)
        if keys:
            Spy.evicted.add(_caller(sys._getframe(1)))


def _trace(rows: list[tuple[float, str, int, int]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["arrival_s", "model", "input_tokens", "output_tokens"])


def _workload(n: int, seed: int, gap_s: float, input_max: int, output_max: int) -> pd.DataFrame:
    rng = random.Random(seed)
    names = ["llama-3-8b", "yi-9b", "qwen2.5-3b", "phi-3-mini-4k"]
    t, rows = 0.0, []
    for _ in range(n):
        t += rng.expovariate(1 / gap_s)
        rows.append((t, rng.choices(names, weights=[4, 2, 1, 1])[0], rng.randint(50, input_max),
                     rng.randint(5, output_max)))
    return _trace(rows)


def test_every_path_that_takes_memory_goes_through_the_one_entry_point() -> None:
    if "test-memory-spy" not in RETENTION.names():
        RETENTION.register("test-memory-spy")(Spy)
    Spy.observed.clear()
    Spy.evicted.clear()
    models = {m: ModelChoice(get_model(m)) for m in ("llama-3-8b", "yi-9b", "qwen2.5-3b", "phi-3-mini-4k")}
    one_gpu = ClusterSpec(1, 1, gpu_spec("a100-80gb", memory_gib=30), TierSpec())
    # cold starts over retained weights, KV grown on demand over them, idle spells that prefetch
    on_demand = make_system("s", "tangram", {"retention": "test-memory-spy", "kv": "elastic", "keep_alive_s": 5.0,
                                             "prefetch": "next-model"})
    simulate(models, _workload(200, 3, 4.0, 400, 60), one_gpu, on_demand)
    # long requests in big batches: KV grows past the free memory into retained weights
    simulate(models, _workload(200, 4, 0.05, 8000, 2000), one_gpu, on_demand)
    # a static pool reserved at each instance start, over retained weights
    static = make_system("s", "tangram", {"retention": "test-memory-spy", "kv": "static", "keep_alive_s": 0.0})
    simulate(models, _workload(60, 5, 2.0, 400, 60), one_gpu, static)
    assert Spy.observed == {"plan_units", "kv_take", "reserve_static_kv", "_plan"}  # _plan: a prefetch
    assert Spy.evicted == {"cold_start", "kv_take", "reserve_static_kv", "_evict"}


# ------------------------------------------------------------------ the filter, on random arenas

OWNERS = [frozenset({"a"}), frozenset({"b"}), frozenset({"c"}), frozenset({"a", "b"})]


def _worker(arena: Arena, waiting: list[str]) -> SimpleNamespace:
    queues: ModelQueues[SimpleNamespace] = ModelQueues()
    for rid, model in enumerate(waiting):
        queues.push(SimpleNamespace(rid=rid, arrival=float(rid), model=model))
    return SimpleNamespace(arena=arena, queues=queues, retention=RETENTION.create("lru"),
                           cluster=SimpleNamespace(packing=PACKING.create("compact-all")))


@given(
    units=st.lists(st.tuples(st.integers(1, 8), st.sampled_from(OWNERS), st.booleans()), min_size=1, max_size=12),
    purpose=st.sampled_from(["weights", "prefetch", "kv", "kv-pool"]),
    want=st.integers(1, 40),
    protect=st.sets(st.integers(0, 11)),
    waiting=st.lists(st.sampled_from(["a", "b", "c"]), max_size=3),
    spare=st.booleans(),
    allowed=st.none() | st.sets(st.sampled_from(OWNERS)),
)
def test_a_plan_evicts_nothing_the_ask_filters_out(units, purpose, want, protect, waiting, spare, allowed) -> None:
    arena = Arena(64 * MIB, alignment=MIB)
    offset = 0
    for i, (size, owners, gap) in enumerate(units):
        offset += gap * MIB  # a hole before some units
        if offset + size * MIB > arena.capacity:
            break
        arena.place(("u", i), offset, size * MIB, owners=owners)
        arena.finish_load(("u", i), pin=False)
        offset += size * MIB
    worker = _worker(arena, waiting)
    protect_keys = {("u", i) for i in protect}
    ask = Ask(purpose, protect=protect_keys, spare_queued=spare, owners=allowed, nbytes=want * MIB, block=MIB,
              units=[(("new", 0), want * MIB)], aligned=want * MIB)
    free_before = arena.free_bytes
    whole_blocks = sum(r.size // MIB for r in arena.free_regions())
    plan = acquire(worker, ask, 0.0)  # type: ignore[arg-type]
    if purpose == "kv-pool":
        assert plan is not None  # a pool is always reserved, however small
    if plan is None:
        return
    for key in plan.evictions:
        region = arena.lookup(key)
        assert key not in protect_keys
        assert not (spare and region.owners & set(waiting))
        assert allowed is None or region.owners in allowed
    if purpose == "prefetch":
        assert not plan.moves  # a speculative load never moves resident data
    # nothing is evicted while free memory is enough (compact-all moves whatever a layout needs)
    if purpose == "weights" and free_before >= want * MIB:
        assert not plan.evictions
    if purpose in ("kv", "kv-pool") and whole_blocks >= want:
        assert not plan.evictions

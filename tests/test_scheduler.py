"""Schedulers pick what their rule says on hand-made placement options."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tangram_sim.errors import ConfigError
from tangram_sim.policies.scheduler import (
    SCHEDULER,
    AffinityScheduler,
    PlacementOption,
    TtftAwareScheduler,
    estimated_load_s,
    missing_bytes,
)

GB = 10**9


def opt(**kw: object) -> PlacementOption:
    base: dict[str, object] = dict(
        gpus=(0,),
        node=0,
        queue_wait_s=0.0,
        free_bytes=10 * GB,
        resident_bytes=0,
        model_bytes=16 * GB,
        in_host_cache=True,
        host_to_gpu_bps=25e9,
        storage_bps=2e9,
        prefill_s=0.1,
    )
    base.update(kw)
    return PlacementOption(**base)  # type: ignore[arg-type]


def choose(name: str, options: list[PlacementOption], seed: int = 0) -> int:
    return SCHEDULER.create(name).choose("m", options, random.Random(seed))


ALL = ["random", "round-robin", "least-loaded", "sllm-storage-aware", "tangram-affinity", "ttft-aware"]


def test_registry() -> None:
    assert set(ALL) <= set(SCHEDULER.names())
    with pytest.raises(ConfigError):
        SCHEDULER.create("best")


@pytest.mark.parametrize("name", ALL)
def test_empty_options_raise(name: str) -> None:
    with pytest.raises(ValueError):
        choose(name, [])


def test_option_validation() -> None:
    with pytest.raises(ValueError):
        opt(gpus=())
    with pytest.raises(ValueError):
        opt(storage_bps=0.0)
    with pytest.raises(ValueError):
        opt(resident_bytes=-1)


def test_estimated_load() -> None:
    cached = opt(resident_bytes=6 * GB, load_overhead_s=0.5)
    assert missing_bytes(cached) == 10 * GB
    assert estimated_load_s(cached) == pytest.approx(0.5 + 10 / 25)
    assert estimated_load_s(cached, reuse=False) == pytest.approx(0.5 + 16 / 25)
    on_disk = replace(cached, in_host_cache=False)
    assert estimated_load_s(on_disk) == pytest.approx(0.5 + 10 / 2)
    # a storage tier faster than PCIe is still limited by PCIe (the copy is pipelined)
    assert estimated_load_s(replace(on_disk, storage_bps=100e9)) == pytest.approx(0.5 + 10 / 25)
    assert missing_bytes(opt(resident_bytes=20 * GB)) == 0


def test_random_is_reproducible_and_uses_only_the_given_rng() -> None:
    options = [opt(gpus=(i,)) for i in range(7)]
    first = [choose("random", options, seed=42) for _ in range(3)]
    rng_a, rng_b = random.Random(3), random.Random(3)
    sched = SCHEDULER.create("random")
    picks_a = [sched.choose("m", options, rng_a) for _ in range(50)]
    random.seed(999)  # the global RNG must not matter
    picks_b = [sched.choose("m", options, rng_b) for _ in range(50)]
    assert picks_a == picks_b
    assert len(set(first)) == 1
    assert len(set(picks_a)) > 1 and all(0 <= i < 7 for i in picks_a)


def test_round_robin_cycles() -> None:
    sched = SCHEDULER.create("round-robin")
    options = [opt(gpus=(i,)) for i in range(3)]
    rng = random.Random(0)
    assert [sched.choose("m", options, rng) for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    assert SCHEDULER.create("round-robin").choose("m", options, rng) == 0  # state is per instance


def test_least_loaded() -> None:
    options = [
        opt(queue_wait_s=2.0),
        opt(queue_wait_s=1.0, free_bytes=GB),
        opt(queue_wait_s=1.0, free_bytes=5 * GB),
        opt(queue_wait_s=1.0, free_bytes=5 * GB),
    ]
    assert choose("least-loaded", options) == 2  # tie on wait: most free, then lowest index


def test_sllm_storage_aware() -> None:
    options = [
        opt(queue_wait_s=0.0, in_host_cache=False),  # 16 GB / 2 GB/s = 8 s
        opt(queue_wait_s=1.0, in_host_cache=True),  # 1 + 0.64 s
        opt(queue_wait_s=0.0, in_host_cache=True, resident_bytes=16 * GB, free_bytes=0),  # ignored reuse
        opt(queue_wait_s=0.5, in_host_cache=True),  # 0.5 + 0.64 s
    ]
    assert choose("sllm-storage-aware", options) == 2  # sllm is model-level: resident bytes don't count
    assert choose("sllm-storage-aware", [options[0], options[1], options[3]]) == 2
    # disk is fine when every cached copy sits behind a long queue
    slow = [opt(queue_wait_s=0.0, in_host_cache=False), opt(queue_wait_s=9.0, in_host_cache=True)]
    assert choose("sllm-storage-aware", slow) == 0


def test_tangram_affinity() -> None:
    options = [
        opt(resident_bytes=4 * GB, free_bytes=50 * GB, queue_wait_s=0.0),
        opt(resident_bytes=12 * GB, free_bytes=GB, queue_wait_s=5.0),
        opt(resident_bytes=12 * GB, free_bytes=3 * GB, queue_wait_s=5.0),
    ]
    # only GPU 0 is available now: affinity ranks the available GPUs, busy ones wait their turn
    assert choose("tangram-affinity", options) == 0
    idle = [opt(resident_bytes=4 * GB, free_bytes=50 * GB), opt(resident_bytes=12 * GB, free_bytes=GB),
            opt(resident_bytes=12 * GB, free_bytes=3 * GB)]
    assert choose("tangram-affinity", idle) == 2  # largest share; tie: most free bytes
    busy = [opt(resident_bytes=0, queue_wait_s=2.0), opt(resident_bytes=12 * GB, queue_wait_s=2.0),
            opt(resident_bytes=16 * GB, queue_wait_s=3.0)]
    assert choose("tangram-affinity", busy) == 1  # none available: shortest wait, then share
    assert AffinityScheduler.share(options[0]) == pytest.approx(0.25)
    assert AffinityScheduler.share(opt(model_bytes=0)) == 1.0
    assert choose("tangram-affinity", [opt(), opt()]) == 0  # nothing resident anywhere: index


def test_ttft_aware() -> None:
    options = [
        opt(resident_bytes=16 * GB, queue_wait_s=3.0),  # 3 + 0 + 0.1
        opt(resident_bytes=0, queue_wait_s=0.0),  # 0 + 0.64 + 0.1
        opt(resident_bytes=8 * GB, queue_wait_s=0.0, in_host_cache=False),  # 8 GB / 2 GB/s = 4 s
        opt(resident_bytes=8 * GB, queue_wait_s=0.0, prefill_s=0.5),  # 0.32 + 0.5
    ]
    assert choose("ttft-aware", options) == 1
    assert TtftAwareScheduler.estimated_ttft_s(options[3]) == pytest.approx(0.82)
    options[1] = replace(options[1], load_overhead_s=0.2)  # 0.94 now loses to 0.82
    assert choose("ttft-aware", options) == 3
    # a long queue on the warm GPU beats a cold load only when the load is slower
    assert choose("ttft-aware", [opt(resident_bytes=16 * GB, queue_wait_s=0.5), opt()]) == 0


OPTIONS = st.lists(
    st.builds(
        opt,
        queue_wait_s=st.floats(0, 10),
        free_bytes=st.integers(0, 80 * GB),
        resident_bytes=st.integers(0, 16 * GB),
        in_host_cache=st.booleans(),
        prefill_s=st.floats(0, 1),
    ),
    min_size=1,
    max_size=8,
)


@given(options=OPTIONS, name=st.sampled_from(ALL), seed=st.integers(0, 2**32))
def test_choice_is_a_valid_deterministic_index(options: list[PlacementOption], name: str, seed: int) -> None:
    picks = [choose(name, options, seed) for _ in range(2)]
    assert picks[0] == picks[1] and 0 <= picks[0] < len(options)


@given(options=OPTIONS)
def test_ttft_aware_is_optimal(options: list[PlacementOption]) -> None:
    best = min(TtftAwareScheduler.estimated_ttft_s(o) for o in options)
    assert TtftAwareScheduler.estimated_ttft_s(options[choose("ttft-aware", options)]) == best


def test_storage_aware_counts_the_nodes_storage_backlog() -> None:
    # Two empty nodes reading from their SSDs: the first one's SSD still has 8 s of earlier cold starts
    # to read, so the second is faster (ServerlessLLM's q + n/b), though it comes later.
    busy = opt(gpus=(0,), node=0, in_host_cache=False, storage_wait_s=8.0)
    idle = opt(gpus=(8,), node=1, in_host_cache=False)
    assert choose("sllm-storage-aware", [busy, idle]) == 1
    # a node whose DRAM holds the checkpoint does not wait for its storage at all
    assert choose("sllm-storage-aware", [replace(busy, in_host_cache=True), idle]) == 0
    assert choose("sllm-storage-aware", [replace(busy, in_host_cache=True, storage_wait_s=100.0), idle]) == 0


def test_affinity_breaks_ties_by_storage_backlog() -> None:
    busy = opt(gpus=(1,), node=0, in_host_cache=False, storage_wait_s=3.0)
    idle = opt(gpus=(8,), node=1, in_host_cache=False)
    assert choose("tangram-affinity", [busy, idle]) == 1
    # share still comes first: a GPU holding half the model wins whatever its storage's backlog
    assert choose("tangram-affinity", [replace(busy, resident_bytes=8 * GB), idle]) == 0

"""Pipelined cold starts as arithmetic: stage splits, the first token's chain rule, the choice of k."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tangram_sim.policies.pipeline import (
    choose_stages,
    pipelined_step_s,
    pipelined_ttft_s,
    split_layers,
    stage_sums,
)


def brute_force_best(layer_bytes: list[int], k: int) -> int:
    """The smallest possible largest stage over every contiguous split into k non-empty stages."""
    n = len(layer_bytes)
    best = None
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = [0, *cuts, n]
        worst = max(sum(layer_bytes[bounds[j]:bounds[j + 1]]) for j in range(k))
        best = worst if best is None else min(best, worst)
    assert best is not None
    return best


def test_equal_layers_split_equally() -> None:
    assert split_layers([10] * 32, 4) == (0, 8, 16, 24)
    assert split_layers([10] * 32, 1) == (0,)
    assert split_layers([10] * 3, 3) == (0, 1, 2)
    assert stage_sums([1.0] * 6, (0, 2, 3)) == [2.0, 1.0, 3.0]
    with pytest.raises(ValueError):
        split_layers([10] * 3, 4)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 100), min_size=1, max_size=9), st.integers(1, 9))
def test_the_split_is_optimal_and_contiguous(layer_bytes: list[int], k: int) -> None:
    if k > len(layer_bytes):
        return
    starts = split_layers(layer_bytes, k)
    assert len(starts) == k and starts[0] == 0 and list(starts) == sorted(set(starts))
    assert max(stage_sums(layer_bytes, starts)) == brute_force_best(layer_bytes, k)


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_chain_rule_of_equal_stages(k: int) -> None:
    """k stages load B/k bytes each at r in parallel after a startup s, compute C/k each, and pass
    activations in a per hop: TTFT = s + B/(k r) + C + (k-1) a, a decode step = sum of steps + (k-1) a."""
    s, big_b, r, big_c, a = 0.5, 16e9, 25e9, 0.2, 0.003
    ready = [s + big_b / k / r] * k
    ttft = pipelined_ttft_s(ready, [big_c / k] * k, [a] * (k - 1))
    assert ttft == pytest.approx(s + big_b / (k * r) + big_c + (k - 1) * a, rel=1e-12)
    assert pipelined_step_s([0.02 / k] * k, [a] * (k - 1)) == pytest.approx(0.02 + (k - 1) * a, rel=1e-12)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 10), st.floats(0, 10), st.floats(0, 1)), min_size=1, max_size=8))
def test_chain_rule_bounds(stages: list[tuple[float, float, float]]) -> None:
    """The first token comes no sooner than any stage's landing plus the compute and hops after it, and
    no later than the last landing plus all compute and hops."""
    ready = [r for r, _, _ in stages]
    compute = [c for _, c, _ in stages]
    hops = [h for _, _, h in stages][:-1]
    ttft = pipelined_ttft_s(ready, compute, hops)
    for j in range(len(stages)):
        after = sum(compute[j:]) + sum(hops[j:])
        assert ttft >= ready[j] + after - 1e-9
    assert ttft <= max(ready) + sum(compute) + sum(hops) + 1e-9


def test_choose_the_smallest_k_meeting_the_target() -> None:
    predicted = [(1, 2.0), (2, 1.1), (4, 0.7), (8, 0.65)]
    assert choose_stages(predicted, 1.2) == 2
    assert choose_stages(predicted, 3.0) == 1
    assert choose_stages(predicted, 0.5) == 8  # none meets it: the fastest
    assert choose_stages([(1, 1.0), (2, 1.0)], 0.5) == 1  # a tie: fewer GPUs
    with pytest.raises(ValueError):
        choose_stages([], 1.0)

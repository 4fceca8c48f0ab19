"""Pipelined cold starts, as plain arithmetic: which layers each of k stages holds, when the first token
comes out, how long a decode step takes, and the smallest k that meets a TTFT target.

A cold start split over k GPUs (HydraServe, lambdaScale's temporary pipelines) has each GPU load only its
stage's layers, in parallel, each over its own links; the instance then serves as a pipeline, every
token's activations crossing the link between consecutive stages. This module is the part of that
mechanism that needs no clock: the lifecycle's pipelined instances (stages placed on k GPUs, serving,
then consolidating onto one) build on it. Stages are contiguous runs of layers in compute order
(`models.layers.layer_blocks`).

Chain rule of the first token: stage j can compute once its own layers have landed (`ready[j]`) and
stage j-1's activations have arrived (its finish plus one hop), so
f_0 = ready_0 + c_0, f_j = max(ready_j, f_{j-1} + hop_j) + c_j, and TTFT = f_{k-1} (times from the
request's arrival at an idle group). A decode step runs every stage once and crosses every hop once:
sum(step_j) + sum(hop_j).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from tangram_sim.policies.params import count, positive
from tangram_sim.registry import Registry

__all__ = ["PIPELINE", "FixedPipeline", "NoPipeline", "PipelinePolicy", "SloPipeline", "choose_stages",
           "pipelined_step_s", "pipelined_ttft_s", "split_layers", "stage_sums"]


def split_layers(layer_bytes: Sequence[int], k: int) -> tuple[int, ...]:
    """The first layer of each of `k` contiguous stages, so that the largest stage holds as few bytes as
    possible (a stage's load time is its bytes over its own link, and the slowest one bounds the start);
    ties: earlier stages as large as allowed. ValueError unless 1 <= k <= number of layers."""
    n = len(layer_bytes)
    if not 1 <= k <= n:
        raise ValueError(f"cannot split {n} layers into {k} stages")
    if any(b < 0 for b in layer_bytes):
        raise ValueError("layer sizes must be >= 0")

    def fits(limit: int) -> tuple[int, ...] | None:
        """Stages filled greedily up to `limit` bytes, a new one opened early when the layers left are
        just enough to give each remaining stage one; None when k stages cannot hold them."""
        starts = [0]
        size = 0
        for i, b in enumerate(layer_bytes):
            must_open = n - i == k - len(starts)
            if i > starts[-1] and (size + b > limit or must_open):
                if len(starts) == k:
                    return None
                starts.append(i)
                size = 0
            size += b
        return tuple(starts) if len(starts) == k else None

    low, high = max(layer_bytes), sum(layer_bytes)
    while low < high:  # the smallest feasible limit
        mid = (low + high) // 2
        if fits(mid) is None:
            low = mid + 1
        else:
            high = mid
    found = fits(low)
    assert found is not None
    return found


def stage_sums(values: Sequence[float], starts: Sequence[int]) -> list[float]:
    """Per-layer `values` summed per stage (`starts`: each stage's first layer, as `split_layers`)."""
    bounds = [*starts, len(values)]
    return [float(sum(values[bounds[j]:bounds[j + 1]])) for j in range(len(starts))]


def pipelined_ttft_s(ready: Sequence[float], compute: Sequence[float], hops: Sequence[float]) -> float:
    """The chain rule (module docstring): `ready[j]` when stage j's layers have landed, `compute[j]` its
    share of the prefill, `hops[j]` the activations' transfer from stage j to j+1 (k-1 of them)."""
    if not ready or len(ready) != len(compute) or len(hops) != len(ready) - 1:
        raise ValueError("expected k ready times, k compute times and k-1 hops")
    f = ready[0] + compute[0]
    for j in range(1, len(ready)):
        arrive = f + hops[j - 1]
        f = (ready[j] if ready[j] > arrive else arrive) + compute[j]
    return f


def pipelined_step_s(steps: Sequence[float], hops: Sequence[float]) -> float:
    """One decode step of a k-stage pipeline: every stage computes once and every hop is crossed once."""
    if len(hops) != len(steps) - 1:
        raise ValueError("expected k stage steps and k-1 hops")
    return float(sum(steps)) + float(sum(hops))


def choose_stages(ttft_by_k: Sequence[tuple[int, float]], target_s: float) -> int:
    """The smallest k whose predicted TTFT meets `target_s` (fewer GPUs held), else the k with the lowest
    predicted TTFT (ties: the smaller k). `ttft_by_k`: (k, predicted TTFT) for each feasible k."""
    if not ttft_by_k:
        raise ValueError("no feasible number of stages")
    meeting = [k for k, t in ttft_by_k if t <= target_s]
    if meeting:
        return min(meeting)
    return min(ttft_by_k, key=lambda kt: (kt[1], kt[0]))[0]


class PipelinePolicy:
    """How many pipeline stages a cold start runs as (the `pipeline` system field). The lifecycle
    (`core.pipeline`) offers the numbers of stages it can place (1 always; k > 1 only with k-1 free GPUs
    besides the scheduler's choice) with the chain rule's TTFT predicted for each, and the policy picks."""

    needs: ClassVar[frozenset[str]] = frozenset()  # what the run passes it (`policies.needs`)
    max_k: int = 1  # the most stages it may ask for: the lifecycle predicts no larger k

    def choose(self, ttft_by_k: Sequence[tuple[int, float]]) -> int:
        """The number of stages, one of the k in `ttft_by_k` ((k, predicted TTFT), k = 1 first)."""
        raise NotImplementedError


PIPELINE = Registry[PipelinePolicy]("pipeline policy")


@PIPELINE.register("none")
class NoPipeline(PipelinePolicy):
    """Every cold start on one GPU (the cluster as it was before pipelined cold starts)."""

    def choose(self, ttft_by_k: Sequence[tuple[int, float]]) -> int:
        return 1


@PIPELINE.register("fixed")
class FixedPipeline(PipelinePolicy):
    """`k` stages whenever k GPUs can be had, else the most that can (a fixed degree, for experiments
    that isolate the mechanism from the choice)."""

    def __init__(self, k: int = 2) -> None:
        self.max_k = count("pipeline policy", "k", k)

    def choose(self, ttft_by_k: Sequence[tuple[int, float]]) -> int:
        return max(k for k, _t in ttft_by_k)


@PIPELINE.register("slo")
class SloPipeline(PipelinePolicy):
    """HydraServe's rule: the smallest k whose predicted TTFT meets `ttft_s` (fewest GPUs held), else the
    k with the lowest prediction (`choose_stages`), up to `max_k` stages. `ttft_s` defaults to the
    experiments' default TTFT SLO (`core.slo.DEFAULT_TTFT_S`, 2 s); an experiment with another `slo`
    states it here too."""

    def __init__(self, ttft_s: float = 2.0, max_k: int = 4) -> None:
        self.ttft_s = positive("pipeline policy", "ttft_s", ttft_s)  # the target the prediction must meet
        self.max_k = count("pipeline policy", "max_k", max_k)

    def choose(self, ttft_by_k: Sequence[tuple[int, float]]) -> int:
        return choose_stages(ttft_by_k, self.ttft_s)

"""Keep-alive, fairness, preemption and warm routing as registries; the hybrid histogram keep-alive of
Shahrad et al. (ATC'20) with pre-warming; policies' declared `needs`."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pandas as pd
import pytest

from tangram_sim import load_experiment
from tangram_sim.core.run import build_policies
from tangram_sim.errors import ConfigError
from tangram_sim.models import get_model
from tangram_sim.policies import (
    FAIRNESS,
    KEEP_ALIVE,
    POLICY_FIELDS,
    PREEMPTION,
    RETENTION,
    WARM_ROUTING,
    Windows,
)
from tangram_sim.policies.keep_alive import HistogramKeepAlive, IdleHistogram, KeepAlivePolicy
from tangram_sim.policies.lifecycle import must_yield, must_yield_predicted, preemption_victim
from tangram_sim.policies.retention import LruRetention
from tangram_sim.policies.warm_routing import WarmInstance
from tangram_sim.sim.hardware import TierSpec, gpu_spec
from tangram_sim.sim.simulate import ClusterSpec, ModelChoice, simulate
from tangram_sim.sim.systems import SystemSpec, make_system
from tangram_sim.tune.space import policy_registries

# ------------------------------------------------------------------ registries and their defaults


def test_each_lifecycle_decision_is_a_registry_chosen_by_a_system_field() -> None:
    assert {"fixed", "histogram"} <= set(KEEP_ALIVE.names())
    assert FAIRNESS.names() == ["adaptive", "fixed"]
    assert {"newest", "longest-context"} <= set(PREEMPTION.names())
    assert "least-loaded" in WARM_ROUTING
    spec = SystemSpec("x")
    assert (spec.keep_alive, spec.fairness, spec.preemption, spec.warm_routing) == (
        "fixed", "fixed", "newest", "least-loaded")
    fields = {kind.field for kind in POLICY_FIELDS}
    assert {"keep_alive", "fairness", "preemption", "warm_routing"} <= fields
    # the tuner finds them by their field's name, like retention (`choices: all`)
    registries = policy_registries()
    assert registries["keep_alive"] is KEEP_ALIVE and registries["warm_routing"] is WARM_ROUTING


def test_the_defaults_are_built_from_the_old_system_fields() -> None:
    system = make_system("s", "tangram", {"keep_alive_s": 7, "fairness_window_s": 2, "max_batch": 4})
    policies = build_policies(system, h2d_bps=1e9, sensitivity={}, trace=pd.DataFrame())
    assert policies.keep_alive.windows("m", 0.0) == Windows(0.0, 7.0)
    assert policies.fairness.window_s == 2.0
    assert policies.warm_routing.max_batch == 4
    adaptive = make_system("s", "tangram", {"fairness": "adaptive", "fairness_bound_s": 9})
    assert build_policies(adaptive, h2d_bps=1e9, sensitivity={}, trace=pd.DataFrame()).fairness.bound_s == 9.0


@dataclass
class Q:
    rid: int
    model: str
    arrival: float
    input_tokens: int = 10
    done_tokens: float = 0.0


def test_fixed_and_adaptive_fairness_are_the_rules_they_replace() -> None:
    rng = random.Random(0)
    fixed, adaptive = FAIRNESS.create("fixed", fairness_window_s=5.0), FAIRNESS.create("adaptive", fairness_bound_s=20.0)
    assert not fixed.predicts and adaptive.predicts
    for _ in range(500):
        blocker = None if rng.random() < 0.2 else Q(rng.randrange(10), "b", rng.uniform(0, 10))
        cand, now, predicted = Q(rng.randrange(10), "a", rng.uniform(0, 10)), rng.uniform(0, 30), rng.uniform(0, 20)
        assert fixed.must_yield(blocker, cand, now, predicted) == must_yield(blocker, cand, now, 5.0)
        assert adaptive.must_yield(blocker, cand, now, predicted) == must_yield_predicted(
            blocker, cand, now, predicted, 20.0)


def test_newest_preemption_is_the_old_rule_and_longest_context_frees_the_most_kv() -> None:
    newest, longest = PREEMPTION.create("newest"), PREEMPTION.create("longest-context")
    running = [Q(1, "a", 0, 100, 50.0), Q(2, "a", 1, 10, 5.0), Q(3, "a", 2, 10, 80.0), Q(4, "a", 3, 30, 0.0)]
    for growing in (None, *running):
        assert newest.victim(running, growing) is preemption_victim(running, growing)
    assert longest.victim(running) is running[0]  # 150 tokens of context
    assert longest.victim(running, growing=running[0]) is running[2]  # 90
    tie = [Q(1, "a", 0, 10, 0.0), Q(2, "a", 1, 10, 0.0)]
    assert longest.victim(tie) is tie[1]  # ties: the newest
    assert longest.victim(running[:1]) is None and newest.victim(running[:1]) is None


def _old_warm_choice(instances: list[WarmInstance], max_batch: int) -> int | None:
    """The router's code before warm routing was a policy."""
    best, best_load = None, 0
    for i, w in enumerate(instances):
        if not w.clean:
            continue
        load = w.queued + w.running
        if best is None or load < best_load or (load == best_load and w.gpu < instances[best].gpu):
            best, best_load = i, load
    return best if best is not None and best_load < max_batch else None


def test_least_loaded_warm_routing_is_the_old_router_code() -> None:
    rng = random.Random(1)
    policy = WARM_ROUTING.create("least-loaded", max_batch=4)
    for _ in range(500):
        gpus = rng.sample(range(8), rng.randint(1, 4))
        instances = [WarmInstance(g, rng.randrange(4), rng.randrange(4), rng.random() < 0.7) for g in gpus]
        assert policy.choose("m", instances) == _old_warm_choice(instances, 4)


# ------------------------------------------------------------------ the histogram policy (pure)


def histogram(idle_times: list[float], **params: object) -> HistogramKeepAlive:
    pol = KEEP_ALIVE.create("histogram", keep_alive_s=30.0, **params)
    for t in idle_times:
        pol.record_idle("m", t)
    return pol


def test_windows_are_the_head_and_tail_percentiles_with_their_margins() -> None:
    # 19 idle times in bin [10, 11), one in bin [50, 51): the 5th percentile is bin 10, the 99th bin 50
    pol = histogram([10.5] * 19 + [50.5])
    assert pol.pattern("m") == "histogram"
    w = pol.windows("m", 0.0)
    assert w.prewarm_s == pytest.approx(10 * 0.9)  # head bin's lower edge - 10%
    assert w.prewarm_s + w.keep_alive_s == pytest.approx(51 * 1.1)  # tail bin's upper edge + 10%
    # 2 s bins, 5% margin, 20th and 90th percentiles over idle times 0.5 (x2), 4.5 (x6), 9 (x2)
    pol = histogram([0.5, 0.5] + [4.5] * 6 + [9.0, 9.0], bin_s=2.0, head=0.2, tail=0.9, margin=0.05)
    w = pol.windows("m", 0.0)
    assert w.prewarm_s == 0.0  # the head is the first bin: keep alive from the end of use
    assert w.keep_alive_s == pytest.approx(10 * 1.05)  # 90th: 9 of 10 samples -> bin [8, 10)


def test_windows_follow_new_idle_times() -> None:
    pol = histogram([10.5] * 19 + [50.5])
    before = pol.windows("m", 0.0)
    for _ in range(20):
        pol.record_idle("m", 2.5)
    assert pol.windows("m", 1.0).prewarm_s == pytest.approx(2 * 0.9) != before.prewarm_s


def test_too_few_idle_times_fall_back_to_the_fixed_keep_alive() -> None:
    pol = histogram([10.5] * 9)
    assert pol.pattern("m") == "few"
    assert pol.windows("m", 0.0) == Windows(0.0, 30.0)
    assert pol.windows("never-seen", 0.0) == Windows(0.0, 30.0)
    pol.record_idle("m", 10.5)  # the 10th (min_samples)
    assert pol.pattern("m") == "histogram"
    assert histogram([10.5] * 3, min_samples=3).pattern("m") == "histogram"


def test_a_spread_out_histogram_is_not_representative() -> None:
    # one idle time in each of the 240 bins: every count is 1, CV 0 < 2
    pol = histogram([i + 0.5 for i in range(240)])
    assert pol.idle["m"].cv() == 0.0
    assert pol.pattern("m") == "uncertain" and pol.windows("m", 0.0) == Windows(0.0, 30.0)
    # n idle times in one bin: population CV of the counts = sqrt(bins - 1)
    assert histogram([3.2] * 12).idle["m"].cv() == pytest.approx(math.sqrt(239))
    assert histogram([3.2] * 12, cv_threshold=16.0).pattern("m") == "uncertain"


def test_idle_times_beyond_the_range_switch_to_the_forecast() -> None:
    # 6 of 10 idle times are >= range_s (240 s): out of range; the forecast is the median of the last 10
    # idle times, in range or not (the paper's ARIMA model is fitted on all of them)
    idle = [5.5, 300.0, 5.5, 400.0, 5.5, 500.0, 600.0, 5.5, 700.0, 800.0]
    pol = histogram(idle)
    assert pol.idle["m"].oob == 6 and pol.idle["m"].n_in == 4
    assert pol.pattern("m") == "out-of-range"
    forecast = (300.0 + 400.0) / 2
    w = pol.windows("m", 0.0)
    assert w.prewarm_s == pytest.approx(forecast * 0.85)
    assert w.keep_alive_s == pytest.approx(forecast * 0.30)  # loaded from 0.85 to 1.15 x the forecast
    # `history` bounds the forecast to the latest idle times; below `oob_threshold` the histogram decides
    assert histogram(idle, history=3).windows("m", 0.0).prewarm_s == pytest.approx(700.0 * 0.85)
    assert histogram(idle, oob_threshold=0.7).pattern("m") == "histogram"
    assert histogram(idle, range_s=1000.0).pattern("m") == "histogram"


def test_idle_histogram_bins_and_percentiles() -> None:
    hist = IdleHistogram(bin_s=0.5, n_bins=4, history=2)
    for t in (0.0, 0.49, 0.5, 1.9, 2.0, 7.0):
        hist.add(t)
    assert hist.counts == [2, 1, 0, 1] and hist.oob == 2 and list(hist.recent) == [2.0, 7.0]
    assert [hist.percentile_bin(q) for q in (0.01, 0.5, 0.75, 1.0)] == [0, 0, 1, 3]


@pytest.mark.parametrize(("params", "message"), [
    ({"bin_s": 0}, "keep-alive parameter bin_s must be a positive number, got 0"),
    ({"range_s": 0.4}, "keep-alive parameter range_s must be at least one bin_s (1.0), got 0.4"),
    ({"head": 0.99, "tail": 0.5}, "keep-alive parameters head and tail must have head < tail, got 0.99 and 0.5"),
    ({"margin": 1.0}, "keep-alive parameter margin must be a number in [0, 1), got 1.0"),
    ({"min_samples": 0}, "keep-alive parameter min_samples must be an integer >= 1, got 0"),
    ({"prewarm": "yes"}, "keep-alive parameter prewarm must be true or false, got 'yes'"),
    ({"binsize": 2}, "bad parameters for keep-alive policy 'histogram': "),
])
def test_histogram_parameters_are_one_line_errors_naming_the_dotted_key(params: dict, message: str) -> None:
    overrides = {"keep_alive": "histogram", "keep_alive_params": params}
    with pytest.raises(ConfigError) as err:
        make_system("s", "tangram", overrides, where="systems.1")
    text = str(err.value)
    assert text.startswith(f"systems.1.overrides.keep_alive_params: {message}") and "\n" not in text


def test_unknown_lifecycle_policy_names_are_one_line_errors() -> None:
    for field, registry in (("keep_alive", KEEP_ALIVE), ("preemption", PREEMPTION), ("warm_routing", WARM_ROUTING)):
        with pytest.raises(ConfigError, match=rf"^systems\.0\.{field}: unknown {registry.kind} 'nope'; expected one "
                                              r"of: "):
            make_system("s", "tangram", {field: "nope"}, where="systems.0")


# ------------------------------------------------------------------ needs


@RETENTION.register("test-needs-h2d")
class NeedsH2d(LruRetention):
    """A plugin-style policy that takes the run's host-to-GPU bandwidth (no default: it must be given)."""

    needs: ClassVar[frozenset[str]] = frozenset({"h2d_bps", "max_batch"})
    seen: ClassVar[list[tuple[float, int]]] = []

    def __init__(self, h2d_bps: float, max_batch: int) -> None:
        super().__init__()
        self.seen.append((h2d_bps, max_batch))


@KEEP_ALIVE.register("test-needs-unknown")
class NeedsUnknown(KeepAlivePolicy):
    needs: ClassVar[frozenset[str]] = frozenset({"gpu_temperature"})


def small_trace(rows: list[tuple[float, str, int, int]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["arrival_s", "model", "input_tokens", "output_tokens"])


def test_a_policy_gets_exactly_what_it_declares() -> None:
    NeedsH2d.seen.clear()
    system = make_system("s", "tangram", {"retention": "test-needs-h2d", "max_batch": 8})
    assert NeedsH2d.seen == [(25e9, 8)]  # validation: a placeholder bandwidth, the system's field
    models = {"qwen2.5-3b": ModelChoice(get_model("qwen2.5-3b"))}
    cluster = ClusterSpec(1, 2, gpu_spec("a100-80gb", memory_gib=40), TierSpec())
    NeedsH2d.seen.clear()
    res = simulate(models, small_trace([(0.0, "qwen2.5-3b", 32, 2), (1.0, "qwen2.5-3b", 32, 2)]), cluster, system)
    assert res.summary["completed"] == 2
    assert NeedsH2d.seen and set(NeedsH2d.seen) == {(cluster.gpu.pcie_bps, 8)}  # once per GPU and a check
    # a parameter of the system wins over a need of the same name
    NeedsH2d.seen.clear()
    make_system("s", "tangram", {"retention": "test-needs-h2d", "retention_params": {"h2d_bps": 1.0}})
    assert NeedsH2d.seen == [(1.0, 32)]


def test_an_unknown_need_is_a_config_error_naming_the_policy() -> None:
    with pytest.raises(ConfigError, match=r"^systems\.2\.keep_alive: keep-alive policy 'test-needs-unknown' needs "
                                          r"'gpu_temperature', which a run does not provide; a policy may need "
                                          r"h2d_bps, sensitivity, arrivals, trace or a system field$"):
        make_system("s", "tangram", {"keep_alive": "test-needs-unknown"}, where="systems.2")


PLUGIN = '''
from typing import ClassVar

from tangram_sim.policies import KEEP_ALIVE, Windows
from tangram_sim.policies.keep_alive import KeepAlivePolicy


@KEEP_ALIVE.register("pcie-scaled")
class PcieScaled(KeepAlivePolicy):
    """Keep instances alive for the time a 40 GB reload takes over the run's PCIe (plus keep_alive_s)."""

    needs: ClassVar[frozenset[str]] = frozenset({"h2d_bps", "keep_alive_s"})

    def __init__(self, h2d_bps: float, keep_alive_s: float) -> None:
        self.window = Windows(0.0, 40e9 / h2d_bps + keep_alive_s)

    def windows(self, model, now):
        return self.window
'''


def test_a_plugin_policy_receives_its_needs_in_an_experiment(tmp_path: Path) -> None:
    (tmp_path / "my_keep_alive.py").write_text(PLUGIN)
    (tmp_path / "exp.yaml").write_text(
        "name: plugin-needs\nplugins: [my_keep_alive.py]\n"
        "cluster: {nodes: 1, gpus_per_node: 1, gpu: a100-80gb, gpu_memory_gib: 40}\n"
        "models: [qwen2.5-3b, phi-3-mini-4k]\n"
        "trace: {kind: synthetic, n_requests: 40, rate: 0.2, alpha: 1.0}\n"
        "systems:\n- {name: fixed, preset: tangram}\n"
        "- {name: scaled, preset: tangram, overrides: {keep_alive: pcie-scaled, keep_alive_s: 1}}\n"
        "outputs: {plots: false, timeline: false}\n")
    result = load_experiment(tmp_path / "exp.yaml").run(out=tmp_path / "run", progress=False)
    summary = result.summary.set_index("system")
    assert (summary["completed"] + summary["rejected"] == 40).all()
    # its window (40 GB over the configured PCIe + 1 s: a few seconds) is shorter than the fixed 30 s
    assert summary.loc["scaled", "cold_starts"] > summary.loc["fixed", "cold_starts"]


# ------------------------------------------------------------------ the histogram in the lifecycle


def periodic(models: list[str], period: float, cycles: int, offset: float = 5.0) -> pd.DataFrame:
    rows = [(k * period + i * offset, m, 64, 4) for k in range(cycles) for i, m in enumerate(models)]
    return small_trace(sorted(rows))


def test_histogram_pre_warms_a_periodic_model_whose_units_were_displaced() -> None:
    """Two models alternate every 20 s on a GPU that holds only one: with a fixed 5 s keep-alive every cold
    start reloads its model; the histogram learns the ~20 s idle times, ends each instance at once and
    loads the model again shortly before its next request, so later cold starts load nothing."""
    names = ["qwen2.5-3b", "llama-3-8b"]
    models = {n: ModelChoice(get_model(n)) for n in names}
    cluster = ClusterSpec(1, 1, gpu_spec("a100-80gb", memory_gib=20), TierSpec())
    trace = periodic(names, 20.0, 12)
    fixed = simulate(models, trace, cluster, make_system("f", "tangram", {"keep_alive_s": 5.0, "granularity": "model"}))
    hist_system = make_system("h", "tangram", {"keep_alive_s": 5.0, "granularity": "model", "keep_alive": "histogram",
                                               "keep_alive_params": {"min_samples": 3}})
    hist = simulate(models, trace, cluster, hist_system, record_events=True)
    assert (fixed.requests["bytes_loaded"][fixed.requests["cold"]] > 0).all()
    late = hist.requests[hist.requests["arrival_s"] >= 100.0]
    assert late["cold"].all() and (late["bytes_loaded"] == 0).all()  # pre-warmed: full hits
    assert hist.summary["prefetched_bytes"] > 0 and hist.summary["prefetch_used_bytes"] > 0
    kinds = {e[2] for e in hist.events}
    assert "prewarm" in kinds and "prefetch_loaded" in kinds
    assert hist.summary["completed"] == len(trace)


def test_without_pre_warming_the_histogram_keeps_instances_for_the_whole_window() -> None:
    """ServerlessLLM frees weights, so nothing can be pre-warmed: the instance stays active over the
    pre-warm and keep-alive windows instead, and a model requested every 20 s stays warm (a fixed 5 s
    keep-alive makes every request cold)."""
    models = {"qwen2.5-3b": ModelChoice(get_model("qwen2.5-3b"))}
    cluster = ClusterSpec(1, 1, gpu_spec("a100-80gb", memory_gib=40), TierSpec())
    trace = periodic(["qwen2.5-3b"], 20.0, 10)
    fixed = simulate(models, trace, cluster, make_system("f", "serverlessllm", {"keep_alive_s": 5.0}))
    for overrides in ({}, {"retention": "tangram", "granularity": "group"}):  # retaining, but told not to pre-warm
        params = {"min_samples": 3} if not overrides else {"min_samples": 3, "prewarm": False}
        system = make_system("h", "serverlessllm", {"keep_alive_s": 5.0, "keep_alive": "histogram",
                                                     "keep_alive_params": params, **overrides})
        hist = simulate(models, trace, cluster, system, record_events=True)
        assert fixed.requests["cold"].all()
        assert not hist.requests["cold"].iloc[5:].any()  # learnt after 3 idle times (+ the first request)
        assert "prewarm" not in {e[2] for e in hist.events}
        assert "prefetched_bytes" not in hist.summary or pd.isna(hist.summary.get("prefetched_bytes"))

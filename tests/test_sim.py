"""Simulator: analytic cases, conservation, determinism, recorded event logs."""

from __future__ import annotations

import dataclasses
import itertools

import pandas as pd
import pytest

from tangram_sim.errors import CapacityError, ConfigError
from tangram_sim.models import derive_model, get_model
from tangram_sim.sim.hardware import TierSpec, gpu_spec
from tangram_sim.sim.simulate import (
    ClusterSpec,
    ModelChoice,
    SimulationInvariantError,
    simulate,
)
from tangram_sim.sim.systems import make_system
from tangram_sim.sim.timemodel import Roofline

LLAMA = get_model("llama-3-8b")
QWEN = get_model("qwen2.5-3b")
TWIN = derive_model(LLAMA, "llama-3-8b-twin", share=[])  # same size, no shared bytes


def trace(rows: list[tuple[float, str, int, int]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["arrival_s", "model", "input_tokens", "output_tokens"])


def cluster(gpus: int = 1, **tiers: object) -> ClusterSpec:
    return ClusterSpec(1, gpus, gpu_spec("a100-80gb", memory_gib=40), TierSpec(**tiers))


def test_single_request_on_an_empty_gpu_is_overhead_plus_load_plus_prefill() -> None:
    c = cluster(ssd_bps=5e9)
    system = make_system("t", "tangram")
    res = simulate({"llama-3-8b": ModelChoice(LLAMA)}, trace([(0.0, "llama-3-8b", 100, 1)]), c, system,
                   record_events=True)
    row = res.requests.iloc[0]
    prefill = Roofline(c.gpu).prefill_s(LLAMA, 100)
    load = LLAMA.weight_bytes / 5e9  # SSD (5 GB/s) is slower than PCIe (25 GB/s): it bounds the pipeline
    assert row.cold and row.bytes_loaded == LLAMA.weight_bytes and row.bytes_reused == 0
    assert row.startup_s == pytest.approx(system.engine_overhead_s, rel=1e-12)
    assert row.load_s == pytest.approx(load, rel=1e-9)
    assert row.ttft_s == pytest.approx(system.engine_overhead_s + load + prefill, rel=1e-9)
    kinds = [e[2] for e in res.events if e[3] == 0]
    assert kinds == ["routed", "cold_start", "loaded", "first_token", "completed"]


def test_repeat_after_keep_alive_reuses_everything_under_tangram_only() -> None:
    t = trace([(0.0, "llama-3-8b", 100, 8), (100.0, "llama-3-8b", 100, 8)])
    models = {"llama-3-8b": ModelChoice(LLAMA)}
    for preset, second_load in [("tangram", 0), ("serverlessllm", LLAMA.weight_bytes)]:
        res = simulate(models, t, cluster(), make_system(preset, preset, {"keep_alive_s": 10.0}),
                       record_events=True)
        second = res.requests.iloc[1]
        assert second.cold, preset  # the keep-alive ended: a new instance starts
        assert second.bytes_loaded == second_load, preset
        assert any(e[2] == "keep_alive_expired" for e in res.events)
    assert res.summary["io_reduction"] == 0.0


def test_two_loads_sharing_a_node_link_each_take_twice_as_long() -> None:
    models = {"llama-3-8b": ModelChoice(LLAMA), "llama-3-8b-twin": ModelChoice(TWIN)}
    system = make_system("s", "serverlessllm", {"scheduler": "least-loaded"})
    alone = simulate(models, trace([(0.0, "llama-3-8b", 10, 1)]), cluster(2), system)
    both = simulate(models, trace([(0.0, "llama-3-8b", 10, 1), (0.0, "llama-3-8b-twin", 10, 1)]),
                    cluster(2), system)
    assert set(both.requests.gpu) == {0, 1}  # one per GPU, each over its own PCIe but one shared SSD
    single = alone.requests.load_s.iloc[0]
    assert both.requests.load_s.tolist() == pytest.approx([2 * single, 2 * single], rel=1e-9)


def test_warm_requests_batch_onto_the_active_instance() -> None:
    rows = [(0.0, "qwen2.5-3b", 200, 50)] + [(5.0 + 0.01 * i, "qwen2.5-3b", 200, 50) for i in range(10)]
    res = simulate({"qwen2.5-3b": ModelChoice(QWEN)}, trace(rows), cluster(),
                   make_system("t", "tangram"), record_events=True)
    assert res.summary["cold_starts"] == 1 and res.summary["completed"] == 11
    warm = res.requests.iloc[1:]
    assert (warm.load_s == 0).all() and (warm.bytes_loaded == 0).all()
    # batched decode: the ten warm requests overlap in time instead of running one after another
    ends = warm.arrival_s + warm.e2e_s
    starts = warm.arrival_s + warm.queue_s
    assert (starts.max() < ends.min())


def test_prefill_batch_one_prefills_admitted_requests_one_by_one() -> None:
    """Three requests queued behind a cold start are admitted together: batched, they share one prefill
    iteration and one first-token time; with prefill_batch 1, each pays its own prefill in turn."""
    rows = [(0.0, "qwen2.5-3b", 100, 4), (0.01, "qwen2.5-3b", 100, 4), (0.02, "qwen2.5-3b", 300, 4)]
    models = {"qwen2.5-3b": ModelChoice(QWEN)}
    c = cluster()
    first_tokens = {}
    for batch in (0, 1):
        res = simulate(models, trace(rows), c, make_system("t", "tangram", {"prefill_batch": batch}))
        r = res.requests
        first_tokens[batch] = (r.arrival_s + r.ttft_s).tolist()
    roof = Roofline(c.gpu)
    assert first_tokens[0] == pytest.approx([first_tokens[0][0]] * 3, abs=1e-12)
    start = first_tokens[0][0] - roof.prefill_s(QWEN, 500)  # the cold start ends here in both runs
    expected = [start + t for t in itertools.accumulate(roof.prefill_s(QWEN, n) for n in (100, 100, 300))]
    assert first_tokens[1] == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ConfigError, match="prefill_batch"):
        make_system("t", "tangram", {"prefill_batch": -1})


def test_same_seed_same_summary_and_seeds_matter_for_random_scheduling() -> None:
    rows = [(0.3 * i, ["llama-3-8b", "qwen2.5-3b"][i % 3 == 0], 300, 20) for i in range(60)]
    models = {"llama-3-8b": ModelChoice(LLAMA), "qwen2.5-3b": ModelChoice(QWEN)}
    system = make_system("r", "tangram", {"scheduler": "random", "keep_alive_s": 0.0})
    runs = [simulate(models, trace(rows), cluster(4), system, seed=s) for s in (1, 1, 2)]
    assert runs[0].summary == runs[1].summary
    assert runs[0].requests.equals(runs[1].requests)
    assert runs[0].requests.gpu.tolist() != runs[2].requests.gpu.tolist()


def test_elastic_kv_keeps_retained_weights_that_static_kv_evicts() -> None:
    rows = [(0.0, "llama-3-8b", 500, 4), (60.0, "qwen2.5-3b", 500, 4), (120.0, "llama-3-8b", 500, 4)]
    models = {"llama-3-8b": ModelChoice(LLAMA), "qwen2.5-3b": ModelChoice(QWEN)}
    out = {}
    for kv in ("static", "elastic"):
        res = simulate(models, trace(rows), cluster(), make_system(kv, "tangram", {"kv": kv, "keep_alive_s": 1.0}))
        out[kv] = res.requests.iloc[2]
    assert out["elastic"].bytes_loaded == 0  # llama stayed resident beside qwen
    assert out["static"].bytes_loaded > 0.5 * LLAMA.weight_bytes  # the 90% reservation pushed it out


@pytest.mark.parametrize("retention", ["lru", "lfu", "gdsf", "decayed-frequency", "next-use", "tangram"])
@pytest.mark.parametrize("packing", ["pbp", "first-fit", "compact-all", "min-move-window"])
def test_every_policy_combination_conserves_requests_and_bytes(retention: str, packing: str) -> None:
    names = ["llama-3-8b", "qwen2.5-3b", "phi-3-mini-4k", "mistral-7b"]
    rows = [(2.0 * i, names[(i * 7) % 4 if i % 5 else 0], 100 + 37 * i % 900, 1 + i % 40) for i in range(80)]
    models = {n: ModelChoice(get_model(n)) for n in names}
    system = make_system("x", "tangram", {"retention": retention, "packing": packing, "keep_alive_s": 1.0})
    res = simulate(models, trace(rows), cluster(2), system, sample_interval_s=0.0)
    s = res.summary
    assert s["completed"] + s["rejected"] == 80
    r = res.requests  # every request, warm ones included (they reuse all their model's bytes)
    assert (r.bytes_loaded + r.bytes_reused == r.bytes_needed).all()
    assert (r[r.outcome == "completed"].bytes_needed > 0).all()
    assert s["bytes_reused"] > 0
    assert len(res.timeline) > 0


def test_conservation_failures_are_loud() -> None:
    res_cluster = cluster()
    models = {"qwen2.5-3b": ModelChoice(QWEN)}
    from tangram_sim.core import run as run_module
    from tangram_sim.core.run import check_run as _check_conservation

    captured = {}
    original = run_module.check_run

    def capture(requests, c):
        captured["requests"], captured["cluster"] = requests, c
        original(requests, c)

    run_module.check_run = capture
    try:
        simulate(models, trace([(0.0, "qwen2.5-3b", 10, 2)]), res_cluster, make_system("t", "tangram"))
    finally:
        run_module.check_run = original
    requests, c = captured["requests"], captured["cluster"]
    requests[0].bytes_loaded -= 1
    with pytest.raises(SimulationInvariantError, match="loaded"):
        _check_conservation(requests, c)
    requests[0].bytes_loaded += 1
    requests[0].outcome = ""
    with pytest.raises(SimulationInvariantError, match="no outcome"):
        _check_conservation(requests, c)


def test_configuration_errors_are_clear() -> None:
    neox = get_model("gpt-neox-20b")
    small = ClusterSpec(1, 1, dataclasses.replace(gpu_spec("a10-24gb")))
    with pytest.raises(CapacityError, match="gpt-neox-20b"):
        simulate({"gpt-neox-20b": ModelChoice(neox)}, trace([(0.0, "gpt-neox-20b", 10, 2)]), small,
                 make_system("t", "tangram"))
    with pytest.raises(ConfigError, match="mistral-7b"):
        simulate({"qwen2.5-3b": ModelChoice(QWEN)}, trace([(0.0, "mistral-7b", 10, 2)]), cluster(),
                 make_system("t", "tangram"))
    with pytest.raises(ConfigError, match="systems.overrides.kv_fraction"):
        make_system("t", "tangram", {"kv_fraction": "most"})
    with pytest.raises(ConfigError, match="unknown packing policy"):
        make_system("t", "tangram", {"packing": "tetris"})


def test_long_prompts_that_can_never_fit_are_rejected_with_a_reason() -> None:
    neox = get_model("gpt-neox-20b")  # 41.1 GB of weights leave ~1.8 GB of a 40 GiB GPU: ~1,700 tokens
    res = simulate({"gpt-neox-20b": ModelChoice(neox)},
                   trace([(0.0, "gpt-neox-20b", 5000, 4), (1.0, "gpt-neox-20b", 200, 4)]), cluster(),
                   make_system("t", "tangram"))
    assert res.requests.outcome.tolist() == ["rejected", "completed"]
    assert res.requests.reason.iloc[0] == "kv-capacity"


def test_tensor_parallel_ranks_load_their_shards_in_parallel_over_their_own_links() -> None:
    big = get_model("llama-2-70b")  # 138 GB: needs two 80 GB GPUs
    c = ClusterSpec(1, 2, gpu_spec("a100-80gb"), TierSpec(ssd_bps=1e13))  # PCIe-bound
    res = simulate({"llama-2-70b": ModelChoice(big, tensor_parallel=2)},
                   trace([(0.0, "llama-2-70b", 100, 3)]), c, make_system("t", "tangram"), record_events=True)
    row = res.requests.iloc[0]
    assert row.outcome == "completed" and row.bytes_loaded == row.bytes_needed >= big.weight_bytes
    assert row.load_s == pytest.approx(row.bytes_loaded / 2 / c.gpu.pcie_bps, rel=1e-6)
    assert [e[1] for e in res.events if e[2] == "gang_join"] == [1]  # GPU 1 joined GPU 0's instance
    with pytest.raises(CapacityError, match="tensor_parallel"):
        simulate({"llama-2-70b": ModelChoice(big)}, trace([(0.0, "llama-2-70b", 100, 3)]), c,
                 make_system("t", "tangram"))


@pytest.mark.parametrize("preset", ["tangram", "serverlessllm"])
def test_tensor_parallel_and_single_gpu_models_share_a_node_without_deadlock(preset: str) -> None:
    big = get_model("llama-2-70b")
    models = {"llama-2-70b": ModelChoice(big, tensor_parallel=2), "llama-3-8b": ModelChoice(LLAMA),
              "qwen2.5-3b": ModelChoice(QWEN)}
    names = ["llama-2-70b", "llama-3-8b", "qwen2.5-3b", "llama-3-8b", "qwen2.5-3b"]
    rows = [(1.5 * i, names[(i * 3) % 5], 200 + 50 * (i % 7), 5 + i % 30) for i in range(120)]
    c = ClusterSpec(1, 4, gpu_spec("a100-80gb"))
    res = simulate(models, trace(rows), c, make_system(preset, preset, {"keep_alive_s": 5.0}))
    assert res.summary["completed"] == 120
    cold = res.requests[res.requests.cold]
    assert (cold.bytes_loaded + cold.bytes_reused == cold.bytes_needed).all()
    tp_rows = res.requests[res.requests.model == "llama-2-70b"]
    assert set(tp_rows.gpu) <= {0, 2}  # leaders of the aligned pairs (0, 1) and (2, 3)
    if preset == "tangram":
        assert cold[cold.model == "llama-2-70b"].bytes_reused.sum() > 0


def test_streamed_requests_give_the_same_results_as_kept_ones(tmp_path) -> None:
    """`requests_path` writes finished requests in batches instead of keeping them: same summary, same
    rows (in the order they finished), every request checked as it finishes."""
    import numpy as np

    from tangram_sim.core.stream import RequestStream
    from tangram_sim.traces.synthetic import synthesize

    names = ["qwen2.5-3b", "llama-3-8b"]
    models = {n: ModelChoice(get_model(n)) for n in names}
    t = synthesize(names, np.random.default_rng(4), rate=4.0, n_requests=600, arrival="gamma", cv=2.0,
                   zipf_alpha=1.0, input_mean=256, output_mean=32)
    c = ClusterSpec(1, 2, gpu_spec("a100-40gb", memory_gib=20))
    for preset in ("tangram", "serverlessllm"):
        kept = simulate(models, t, c, make_system(preset, preset))
        path = tmp_path / f"{preset}.parquet"
        streamed = simulate(models, t, c, make_system(preset, preset), requests_path=path)
        assert streamed.requests is None and streamed.summary == kept.summary
        for key in ("request_resident_ratio", "request_bytes_from_gpu", "mean_load_per_request_s"):
            assert streamed.summary[key] == kept.summary[key]  # both metric families, same numbers
        assert 0 < kept.summary["request_resident_ratio"] < 1 and kept.summary["mean_load_per_request_s"] > 0
        rows = pd.read_parquet(path)
        assert rows["rid"].tolist() != sorted(rows["rid"])  # written as they finished
        warm = rows[~rows["cold"] & (rows["outcome"] == "completed")]
        assert len(warm) and (warm["bytes_needed"] > 0).all() and (warm["bytes_reused"] == warm["bytes_needed"]).all()
        pd.testing.assert_frame_equal(rows.sort_values("rid").reset_index(drop=True), kept.requests)
    # a request without an outcome is caught as it is streamed
    stream = RequestStream(tmp_path / "bad.parquet", batch=2)
    from tangram_sim.core.records import Request

    stream(Request(0, 0.0, "m", 1, 1))
    assert stream.problems and "no outcome" in stream.problems[0]
    warm = Request(1, 0.0, "m", 1, 1)
    warm.outcome = "completed"  # a warm request that did not record its model's bytes
    stream(warm)
    assert "without its model's bytes" in stream.problems[-1]
    stream.close()


def test_the_capacity_error_speaks_gib_only() -> None:
    big = {"qwen2.5-14b": ModelChoice(get_model("qwen2.5-14b"))}
    small = ClusterSpec(1, 1, gpu_spec("a100-80gb", memory_gib=24))
    with pytest.raises(CapacityError) as err:
        simulate(big, trace([(0.0, "qwen2.5-14b", 10, 2)]), small, make_system("t", "tangram"))
    msg = str(err.value)
    assert "GiB per GPU" in msg and "the a100-80gb GPU has 24.00 GiB" in msg and " GB" not in msg

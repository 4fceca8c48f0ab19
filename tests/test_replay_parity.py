"""The replay driver and the simulator run one lifecycle: over a device whose every duration is the time
model's, the wall-clock replay gives the simulator's request table (no torch needed)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tangram_sim.arena import ARENA_ALIGNMENT
from tangram_sim.core.clock import WallClockEnvironment
from tangram_sim.core.device import pipeline
from tangram_sim.core.links import Fabric
from tangram_sim.core.records import build_entries
from tangram_sim.core.run import run_on_wall_clock
from tangram_sim.models import derive_model, get_model
from tangram_sim.sim.device import ModelledDevice
from tangram_sim.sim.hardware import TierSpec, gpu_spec
from tangram_sim.sim.simulate import ClusterSpec, ModelChoice, simulate
from tangram_sim.sim.systems import PRESETS, make_system
from tangram_sim.sim.timemodel import Roofline
from tangram_sim.traces.synthetic import synthesize

LLAMA = get_model("llama-3-8b")
MODELS = {
    "llama-3-8b": ModelChoice(LLAMA),
    "qwen2.5-3b": ModelChoice(get_model("qwen2.5-3b")),
    "mistral-7b": ModelChoice(get_model("mistral-7b")),
    "llama-ft": ModelChoice(derive_model(LLAMA, "llama-ft", share=[f"model.layers.{i}.*" for i in range(16)])),
}
GPU = gpu_spec("a100-40gb", memory_gib=24.0)  # two models at most: evictions, moves, sharing
CLUSTER = ClusterSpec(nodes=1, gpus_per_node=2, gpu=GPU, tiers=TierSpec(host_cache_bytes=0))
EXACT = ["rid", "model", "gpu", "cold", "outcome", "reason", "bytes_needed", "bytes_loaded", "bytes_reused",
         "bytes_moved", "bytes_evicted", "bytes_extra_evicted", "preemptions"]
TIMES = ["queue_s", "load_s", "startup_s", "ttft_s", "e2e_s", "waited_for_kv_s", "overlap_s", "first_layer_s"]


@pytest.fixture(scope="module")
def trace() -> pd.DataFrame:
    rng = np.random.default_rng(7)
    return synthesize(list(MODELS), rng, rate=0.5, n_requests=320, arrival="gamma", cv=2.0, zipf_alpha=0.8,
                      input_mean=512, output_mean=64, max_tokens=2048)


def replay_with_modelled_devices(trace: pd.DataFrame, preset: str, overrides: dict | None = None) -> pd.DataFrame:
    """The replay driver of `tangram-sim real replay`, with the time model's device in place of torch."""
    system = make_system(preset, preset, overrides)
    time_model = Roofline(GPU, CLUSTER.compute_efficiency, CLUSTER.memory_efficiency)

    def devices(env: WallClockEnvironment) -> list[ModelledDevice]:
        fabric = Fabric(env)
        return [ModelledDevice(env, i, GPU.memory_bytes, ARENA_ALIGNMENT, GPU.pcie_bps, fabric, time_model,
                               system.engine_overhead_s, CLUSTER.tiers.unit_overhead_s, GPU.d2d_bps,
                               startup=system.startup_plan() if system.startup else None,
                               execute_while_load=system.execute_while_load)
                for i in range(2)]

    entries = build_entries({n: (c.spec, c.sensitivity, 1) for n, c in MODELS.items()}, system, ARENA_ALIGNMENT)
    run = run_on_wall_clock(devices, trace, system, entries=entries, sensitivity={n: 1.0 for n in MODELS},
                            h2d_bps=GPU.pcie_bps, time_model=time_model, seed=3, factor=1e-4)
    assert run.summary["lag_events"] > 0 and run.summary["device_s"] == 0.0  # no thread did any work
    return run.requests


STAGED = {"execute_while_load": True, "startup": {"runtime": {"s": 0.1}, "kv_init": {"mode": "overlap", "s": 0.3},
                                                  "graph_capture": {"mode": "restore", "restore_s": 0.05}}}


@pytest.mark.parametrize("preset,overrides", [(p, None) for p in PRESETS] + [("tangram", STAGED),
                                                                              ("serverlessllm", STAGED)])
def test_replay_driver_over_the_modelled_device_equals_the_simulator(trace: pd.DataFrame, preset: str,
                                                                     overrides: dict | None) -> None:
    sim = simulate(MODELS, trace, CLUSTER, make_system(preset, preset, overrides), seed=3).requests
    rep = replay_with_modelled_devices(trace, preset, overrides)
    assert len(sim) == len(rep) == 320
    pd.testing.assert_frame_equal(rep[EXACT], sim[EXACT])
    for col in TIMES:
        np.testing.assert_allclose(rep[col].to_numpy(), sim[col].to_numpy(), rtol=1e-9, atol=0, err_msg=col)
    # the case is not trivial: both GPUs serve, some cold starts reuse, some evict (a system that frees
    # weights at instance end reuses nothing)
    cold = sim[sim["cold"]]
    assert set(sim["gpu"]) == {0, 1} and len(cold) > 20
    if PRESETS[preset].get("retention") != "none":
        assert cold["bytes_reused"].sum() > 0 and cold["bytes_evicted"].sum() > 0


@pytest.mark.parametrize("overrides", [
    {"keep_alive": "histogram", "keep_alive_params": {"min_samples": 3}, "keep_alive_s": 2.0},
    {"preemption": "longest-context", "fairness": "adaptive", "max_batch": 4},
])
def test_replay_driver_equals_the_simulator_under_other_lifecycle_policies(trace: pd.DataFrame,
                                                                         overrides: dict) -> None:
    """Keep-alive windows (and pre-warm processes, which find nothing to load without a host cache),
    preemption and fairness policies decide alike on the wall clock."""
    sim = simulate(MODELS, trace, CLUSTER, make_system("tangram", "tangram", overrides), seed=3).requests
    rep = replay_with_modelled_devices(trace, "tangram", overrides)
    pd.testing.assert_frame_equal(rep[EXACT], sim[EXACT])
    for col in TIMES:
        np.testing.assert_allclose(rep[col].to_numpy(), sim[col].to_numpy(), rtol=1e-9, atol=0, err_msg=col)


REAL_STAGED = {"startup": {"context": {"mode": "serial", "s": 0.01}, "kv_init": {"mode": "overlap", "s": 0.02},
                           "graph_capture": {"mode": "restore", "restore_s": 0.005}}}


PIPELINED = {"pipeline": "fixed", "pipeline_params": {"k": 2}, "granularity": "tensor"}


@pytest.mark.parametrize("overrides", [{"execute_while_load": True}, REAL_STAGED,
                                       {"execute_while_load": True, **REAL_STAGED}, PIPELINED])
def test_the_real_device_decides_and_accounts_as_the_modelled_one(tmp_path_factory: pytest.TempPathFactory,
                                                                  overrides: dict) -> None:
    """Execute-while-load and the startup stages over the real device (torch on the CPU, two arenas):
    arrivals far enough apart that timing cannot change a decision, so the replay routes, starts, reuses,
    evicts and loads exactly as the simulator; what the real device measures per layer obeys the
    modelled recurrence (`pipeline`), and the stages it does not perform take their stated times; a
    pipelined cold start (two stages, `real.pipelined`) loads each stage's units on its own arena."""
    pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    from tangram_sim.real.checkpoints import make_checkpoints
    from tangram_sim.real.loader import open_checkpoint
    from tangram_sim.real.replay import replay_trace

    written = make_checkpoints(["llama-3-8b", "qwen2.5-3b"], tmp_path_factory.mktemp("parity"), "tiny",
                               dtype="float32")
    ckpts = {w.name: open_checkpoint(w.path) for w in written}
    rng = np.random.default_rng(5)
    names = list(ckpts)
    t = pd.DataFrame([(0.2 * i, names[int(m)], int(n), 3)
                      for i, (m, n) in enumerate(zip(rng.integers(0, 2, 16), rng.integers(8, 40, 16)))],
                     columns=["arrival_s", "model", "input_tokens", "output_tokens"])
    cap = int(1.3 * max(c.spec.weight_bytes for c in ckpts.values()))
    gpu = gpu_spec("a100-80gb", memory_gib=cap / 2**30)
    cluster = ClusterSpec(nodes=1, gpus_per_node=2, gpu=gpu, tiers=TierSpec(host_cache_bytes=0))
    for preset in ("serverlessllm", "tangram"):
        system = make_system(preset, preset, {"keep_alive_s": 0.1, "engine_overhead_s": 0.0, **overrides})
        real = replay_trace(ckpts, t, system, devices=["cpu", "cpu"], capacity=gpu.memory_bytes, threads=1,
                            h2d_bps=gpu.pcie_bps)
        sim = simulate({m: ModelChoice(c.spec) for m, c in ckpts.items()}, t, cluster, system).requests
        pd.testing.assert_frame_equal(real.requests[EXACT], sim[EXACT], obj=preset)
        r = real.requests
        cold = r[r["cold"]]
        if system.execute_while_load:
            assert set(real.layers["rid"]) == set(cold["rid"])
            for _, g in real.layers.groupby(["gpu", "rid"]):
                g = g.sort_values("block")
                s, f = pipeline(list(g["ready_s"]), list(g["finish_s"] - g["start_s"]), g["start_s"].iloc[0])
                np.testing.assert_allclose(s, g["start_s"], rtol=0, atol=1e-9)
                np.testing.assert_allclose(f, g["finish_s"], rtol=0, atol=1e-9)
            assert (cold["overlap_s"] >= 0).all() and (cold["first_layer_s"] > 0).all()
        else:
            assert real.layers.empty
        if "pipeline" in overrides:  # every cold start on both arenas, each loading its stage's units
            assert len(real.loads) == 2 * len(cold) and set(real.loads["gpu"]) == {0, 1}
            by_rid = real.loads.groupby("rid")["loaded_bytes"].sum()
            assert by_rid.to_dict() == cold.set_index("rid")["bytes_loaded"].to_dict()
            assert (real.steps["kind"] == "prefill-pipelined").sum() == len(cold)
        elif not system.execute_while_load:
            assert (r["overlap_s"] == 0).all()
        if "startup" in overrides:  # the context's 10 ms, then (the lane) 20 ms from the load's start at least
            assert (cold["startup_s"] >= 0.01 - 1e-9).all()
            assert (cold["startup_s"] + cold["load_s"].fillna(0) >= 0.03 - 1e-9).all()
            assert (real.steps["kind"] == "stage").any()

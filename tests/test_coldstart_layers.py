"""A cold start as stages and layers: closed forms of serial and execute-while-load time to first token,
the pipeline recurrence against an event-by-event run, startup stages, marked transfers, estimates."""

from __future__ import annotations

import math
import random

import numpy as np
import pandas as pd
import pytest
import simpy
from hypothesis import given, settings
from hypothesis import strategies as st

from tangram_sim.arena import ARENA_ALIGNMENT
from tangram_sim.core.device import pipeline
from tangram_sim.core.links import Fabric, Link
from tangram_sim.core.records import build_entries
from tangram_sim.core.router import Recorder
from tangram_sim.core.run import build_policies, run_lifecycle, trace_requests
from tangram_sim.core.startup import STARTUP_PRESETS, resolve_startup
from tangram_sim.errors import ConfigError
from tangram_sim.models import ArchInfo, ModelSpec, get_model
from tangram_sim.models.layers import layer_blocks, unit_parts
from tangram_sim.models.spec import make_tensor
from tangram_sim.models.units import build_units
from tangram_sim.policies.scheduler import PlacementOption, estimated_load_s, pipelined_load_s
from tangram_sim.sim.device import ModelledDevice
from tangram_sim.sim.hardware import TierSpec, gpu_spec
from tangram_sim.sim.simulate import ClusterSpec, ModelChoice, simulate
from tangram_sim.sim.systems import make_system
from tangram_sim.sim.timemodel import Calibration, ModelCoefficients, Roofline, TimeModel

BW = 1e10  # bytes/s of both the SSD and PCIe: a layer of b bytes loads in b / BW
MiB = 2**20


def stack(name: str, layer_mib: list[int]) -> ModelSpec:
    """A model of len(layer_mib) transformer layers (one tensor each), nothing else: its layers are the
    prefill's layers, layer i holding layer_mib[i] MiB."""
    tensors = tuple(make_tensor(name, f"model.layers.{i}.mlp.weight", (m * MiB // 2,), "BF16")
                    for i, m in enumerate(layer_mib))
    arch = ArchInfo("llama", hidden_size=64, num_layers=len(layer_mib), num_heads=1, num_kv_heads=1, head_dim=64)
    return ModelSpec(name, "llama", tensors, "BF16", arch, "test")


def trace(*rows: tuple[float, str, int, int]) -> pd.DataFrame:
    return pd.DataFrame(list(rows), columns=["arrival_s", "model", "input_tokens", "output_tokens"])


def cluster() -> ClusterSpec:
    gpu = gpu_spec("a100-80gb", {"pcie_bps": BW})
    return ClusterSpec(1, 1, gpu, TierSpec(ssd_bps=BW, unit_overhead_s=0.0))


def one_request(spec: ModelSpec, preset: str, ewl: bool, startup_s: float, prefill_s: float,
                layered_load_bps: float | None = None) -> pd.Series:
    """One request on an empty GPU; prefill takes `prefill_s` (split equally over equal layers)."""
    cal = Calibration(device="test", models={spec.name: ModelCoefficients(prefill_s, 0.0, 1e-3)},
                      layered_load_bps=layered_load_bps)
    system = make_system("s", preset, {"engine_overhead_s": startup_s, "execute_while_load": ewl})
    res = simulate({spec.name: ModelChoice(spec)}, trace((0.0, spec.name, 100, 1)), cluster(), system,
                   calibration=cal, record_events=True)
    kinds = [e[2] for e in res.events if e[3] == 0]
    assert kinds == ["routed", "cold_start", "loaded", "first_token", "completed"]
    return res.requests.iloc[0]


@pytest.mark.parametrize("preset", ["serverlessllm", "tangram", "tangram-8mib"])  # 1 unit, ~L units, L units
@pytest.mark.parametrize("layer_mib,prefill_s", [(64, 0.16), (64, 0.02), (16, 0.5)])  # c > l, c < l, c >> l
def test_closed_forms_of_serial_and_overlapped_ttft(preset: str, layer_mib: int, prefill_s: float) -> None:
    n = 8
    spec = stack(f"m{layer_mib}", [layer_mib] * n)
    startup = 0.3
    l_ = layer_mib * MiB / BW
    c = prefill_s / n
    serial = one_request(spec, preset, False, startup, prefill_s)
    assert serial.ttft_s == pytest.approx(startup + n * l_ + n * c, rel=1e-9)
    assert serial.load_s == pytest.approx(n * l_, rel=1e-9)
    assert serial.first_layer_s == pytest.approx(startup + n * l_, rel=1e-9)  # landed as a whole
    assert serial.overlap_s == 0.0
    over = one_request(spec, preset, True, startup, prefill_s)
    # layer i lands at startup + (i+1) l, computes after it and after layer i-1
    assert over.ttft_s == pytest.approx(startup + max(l_ + n * c, n * l_ + c), rel=1e-6)
    assert over.startup_s == pytest.approx(startup, rel=1e-12)
    assert over.load_s == pytest.approx(n * l_, rel=1e-6)
    assert over.first_layer_s == pytest.approx(startup + l_, rel=1e-6)
    assert over.overlap_s == pytest.approx((n - 1) * min(l_, c), rel=1e-6)  # what overlapping saved
    assert serial.ttft_s - over.ttft_s == pytest.approx(over.overlap_s, rel=1e-6)


@pytest.mark.parametrize("preset", ["serverlessllm", "tangram-8mib"])
@pytest.mark.parametrize("slowdown", [1.0, 1.25, 2.0])
def test_a_layered_load_rate_slows_layered_starts_only(preset: str, slowdown: float) -> None:
    """`Calibration.layered_load_bps` (reads beside compute, e.g. on a CPU device): the overlapped closed
    form with each layer landing at the layered rate; a serial start keeps the link's rate."""
    n, layer_mib, prefill_s, startup = 8, 64, 0.16, 0.3
    spec = stack("slow", [layer_mib] * n)
    rate = BW / slowdown
    l_ = layer_mib * MiB / rate
    c = prefill_s / n
    over = one_request(spec, preset, True, startup, prefill_s, layered_load_bps=rate)
    assert over.ttft_s == pytest.approx(startup + max(l_ + n * c, n * l_ + c), rel=1e-6)
    assert over.load_s == pytest.approx(n * l_, rel=1e-6)
    serial = one_request(spec, preset, False, startup, prefill_s, layered_load_bps=rate)
    assert serial.load_s == pytest.approx(n * layer_mib * MiB / BW, rel=1e-9)


def reference_ttft(startup: float, loads: list[float], compute: list[float]) -> float:
    """Event by event, in plain SimPy: one process lands the layers one after the other, another computes
    each as soon as it has landed and the previous one is done."""
    env = simpy.Environment()
    landed = [env.event() for _ in loads]
    out: list[float] = []

    def load():
        yield env.timeout(startup)
        for ev, l_ in zip(landed, loads):
            yield env.timeout(l_)
            ev.succeed()

    def compute_all():
        yield env.timeout(startup)
        for ev, c in zip(landed, compute):
            if not ev.processed:
                yield ev
            yield env.timeout(c)
        out.append(env.now)

    env.process(load())
    env.process(compute_all())
    env.run()
    return out[0]


class GivenLayers(TimeModel):
    """A time model whose prefill of `spec` takes the given per-layer times (whatever the tokens)."""

    def __init__(self, compute: list[float]) -> None:
        self.compute = compute

    def prefill_s(self, model, tokens, tp=1):
        return math.fsum(self.compute)

    def prefill_layers_s(self, model, tokens, tp=1):
        return list(self.compute)

    def decode_step_s(self, model, batch, kv_tokens, tp=1):
        return 1e-3


def run_given(spec: ModelSpec, compute: list[float], startup: float, ewl: bool, preset: str) -> pd.Series:
    """One request through the lifecycle over a modelled device with `GivenLayers`' time model."""
    system = make_system("s", preset, {"engine_overhead_s": startup, "execute_while_load": ewl})
    tm = GivenLayers(compute)
    env = simpy.Environment()
    fabric = Fabric(env)
    c = cluster()
    devices = [ModelledDevice(env, 0, c.gpu.memory_bytes, ARENA_ALIGNMENT, BW, fabric, tm, startup, 0.0,
                              c.gpu.d2d_bps, execute_while_load=ewl)]
    t = trace((0.0, spec.name, 100, 1))
    entries = build_entries({spec.name: (spec, 1.0, 1)}, system, ARENA_ALIGNMENT)
    policies = build_policies(system, h2d_bps=BW, sensitivity={spec.name: 1.0}, trace=t)
    run = run_lifecycle(env, devices, trace_requests(t), gpus_per_node=1, tiers=c.tiers, system=system,
                        entries=entries, time_model=tm, policies=policies, seed=0,
                        recorder=Recorder(False, 1.0, True), engine_overhead_s=startup, pcie_bps=BW)
    return run.frames()[0].iloc[0]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 64), st.floats(0.0, 0.05)), min_size=1, max_size=10),
       st.floats(0.0, 1.0), st.sampled_from(["serverlessllm", "tangram-8mib"]))
def test_overlapped_ttft_bounds_for_random_layers(layers: list[tuple[int, float]], startup: float,
                                                  preset: str) -> None:
    sizes = [m for m, _ in layers]
    compute = [c for _, c in layers]
    spec = stack(f"r{'-'.join(map(str, sizes))}", sizes)
    loads = [m * MiB / BW for m in sizes]
    serial = run_given(spec, compute, startup, False, preset)
    over = run_given(spec, compute, startup, True, preset)
    total_load, total_compute = math.fsum(loads), math.fsum(compute)
    eps = 1e-9 * (1.0 + startup + total_load + total_compute)
    assert serial.ttft_s == pytest.approx(startup + total_load + total_compute, abs=eps)
    assert over.ttft_s >= startup + total_load + compute[-1] - eps
    assert over.ttft_s >= startup + loads[0] + total_compute - eps
    assert over.ttft_s <= serial.ttft_s + eps
    assert over.ttft_s == pytest.approx(reference_ttft(startup, loads, compute), abs=eps)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0.0, 5.0), st.floats(0.0, 5.0)), min_size=1, max_size=12),
       st.floats(0.0, 5.0))
def test_pipeline_recurrence_is_the_event_by_event_run(layers: list[tuple[float, float]], start: float) -> None:
    loads = [a for a, _ in layers]
    compute = [c for _, c in layers]
    ready = list(np.cumsum(loads) + start)
    starts, finishes = pipeline(ready, compute, start)
    assert finishes[-1] == pytest.approx(reference_ttft(start, loads, compute), abs=1e-9)
    for i, (s, f) in enumerate(zip(starts, finishes)):
        assert s >= ready[i] and f == pytest.approx(s + compute[i]) and (i == 0 or s >= finishes[i - 1])


# ------------------------------------------------------------------ layers and units
def test_units_make_their_layers_ready_in_byte_order() -> None:
    spec = get_model("llama-3-8b")
    blocks = layer_blocks(spec)
    assert blocks.names[0] == "text.embeddings" and blocks.names[-1] == "text.head" and len(blocks) == 34
    assert sum(blocks.nbytes) == spec.weight_bytes and sum(blocks.flops_per_token) == spec.flops_per_token
    whole = build_units(spec, "model")
    (parts,) = unit_parts(spec, whole)
    assert [b for _, b in parts] == list(range(34))  # one unit: every layer, one after the other
    assert parts[-1][0] == 1.0 and all(a < b for (a, _), (b, _) in zip(parts, parts[1:]))
    fine = unit_parts(spec, build_units(spec, "tensor"))
    assert all(len(p) == 1 and p[0][0] == 1.0 for p in fine)  # a tensor unit: its layer at its end
    # a vision tower gates no layer of a text prompt
    llava = get_model("llava-1.5-7b")
    assert all(n.startswith(("text.", "language_model")) or ".layers." in n for n in layer_blocks(llava).names)
    assert sum(layer_blocks(llava).nbytes) < llava.weight_bytes


def test_per_layer_prefill_sums_to_the_prefill() -> None:
    spec = get_model("llama-3-8b")
    roof = Roofline(gpu_spec("a100-80gb"))
    for tokens in (1, 100, 4000):
        split = roof.prefill_layers_s(spec, tokens)
        assert len(split) == len(layer_blocks(spec))
        assert math.fsum(split) == pytest.approx(roof.prefill_s(spec, tokens), rel=1e-12)
        # compute-bound, the embedding lookup costs nothing; memory-bound, its bytes (as the roofline counts)
        assert (split[0] == 0.0) == (tokens == 4000)


# ------------------------------------------------------------------ stages
def test_default_startup_is_the_engine_overhead_exactly() -> None:
    plan = resolve_startup({}, 0.2)
    assert (plan.pre_s, plan.lane_s, plan.post_s, plan.fixed_s, plan.gate_s) == (0.2, 0.0, 0.0, 0.2, 0.2)
    assert make_system("t", "tangram").startup_plan(0.05).pre_s == 0.05  # a calibration's engine overhead


def test_stage_modes_place_their_time() -> None:
    plan = resolve_startup({"runtime": {"s": 2.0}, "context": {"mode": "overlap", "s": 0.5},
                            "kv_init": {"mode": "restore", "restore_s": 0.1}, "graph_capture": "serial"}, 9.0)
    assert plan.pre_s == 2.0 and plan.lane_s == pytest.approx(0.6) and plan.post_s == 0.0  # capture: 0 s
    plan = resolve_startup({"preset": "vllm-l40s-llama8b-cached", "graph_capture": "skip"}, 0.2)
    assert (plan.pre_s, plan.lane_s, plan.post_s) == (34.0, 0.0, 23.0)
    assert set(STARTUP_PRESETS) >= {"vllm-l40s-llama8b-cold", "vllm-l40s-llama8b-cached"}


@pytest.mark.parametrize("lane_s", [0.0, 0.5, 5.0])
def test_stages_in_a_simulated_cold_start(lane_s: float) -> None:
    spec = stack("s8", [64] * 8)
    load = 8 * 64 * MiB / BW
    cal = Calibration(device="test", models={spec.name: ModelCoefficients(0.1, 0.0, 1e-3)})
    startup = {"runtime": {"s": 1.0}, "context": {"mode": "restore", "restore_s": 0.25},
               "kv_init": {"mode": "overlap", "s": lane_s}, "graph_capture": {"mode": "serial", "s": 0.7}}
    res = simulate({spec.name: ModelChoice(spec)}, trace((0.0, spec.name, 100, 1)), cluster(),
                   make_system("s", "tangram", {"startup": startup}), calibration=cal).requests.iloc[0]
    assert res.load_s == pytest.approx(load, rel=1e-9)
    assert res.startup_s == pytest.approx(1.25 + max(0.0, lane_s - load) + 0.7, rel=1e-9)
    assert res.ttft_s == pytest.approx(1.25 + max(load, lane_s) + 0.7 + 0.1, rel=1e-9)


@pytest.mark.parametrize("overrides,message", [
    ({"startup": {"kv_init": {"mode": "later"}}}, "startup.kv_init.mode: expected one of serial"),
    ({"startup": {"kv_init": "restore"}}, "kv_init.restore_s: a restored stage states"),
    ({"startup": {"weights": "overlap"}}, "startup.weights: the weights stage is the load itself"),
    ({"startup": {"compile": "skip"}}, "startup.compile: unknown key"),
    ({"startup": {"preset": "sglang"}}, "startup.preset: unknown preset"),
    ({"startup": {"runtime": {"s": -1}}}, "startup.runtime.s: expected a number >= 0"),
    ({"startup": {"preset": "vllm-l40s-llama8b-cold"}, "engine_overhead_s": 1.0}, "set one of the two"),
    ({"execute_while_load": True, "startup": {"kv_init": {"mode": "serial", "s": 1.0}}},
     "startup.kv_init: serial after the weights"),
    ({"execute_while_load": 1}, "execute_while_load: expected bool"),
])
def test_bad_stages_name_their_key(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        make_system("s", "tangram", overrides, where="systems.0")


def test_execute_while_load_with_restored_stages_computes_after_the_gate() -> None:
    spec = stack("g8", [64] * 8)
    l_, c = 64 * MiB / BW, 0.01
    cal = Calibration(device="test", models={spec.name: ModelCoefficients(8 * c, 0.0, 1e-3)})
    gate = 0.03  # restored KV sizes and graphs, beside the load
    system = make_system("s", "serverlessllm", {
        "execute_while_load": True, "engine_overhead_s": 0.5,
        "startup": {"kv_init": {"mode": "restore", "restore_s": 0.01}, "graph_capture": {"mode": "restore",
                                                                                      "restore_s": 0.02}}})
    row = simulate({spec.name: ModelChoice(spec)}, trace((0.0, spec.name, 100, 1)), cluster(), system,
                   calibration=cal).requests.iloc[0]
    ready = [0.5 + (i + 1) * l_ for i in range(8)]
    assert row.startup_s == pytest.approx(0.5 + gate)
    assert row.ttft_s == pytest.approx(pipeline(ready, [c] * 8, 0.5 + gate)[1][-1], rel=1e-6)


# ------------------------------------------------------------------ whole runs
def test_execute_while_load_on_a_mixed_run_keeps_the_books() -> None:
    """Tensor parallel, a vision model, evictions and reuse: the end checks hold, and no first token comes
    later than the serial run's on the same trace for a lone cold start."""
    models = {"llama-3-8b": ModelChoice(get_model("llama-3-8b")), "qwen2.5-3b": ModelChoice(get_model("qwen2.5-3b")),
              "llava-1.5-7b": ModelChoice(get_model("llava-1.5-7b")),
              "qwen2.5-14b": ModelChoice(get_model("qwen2.5-14b"), tensor_parallel=2)}
    rng = random.Random(3)
    rows = sorted((rng.uniform(0, 120), rng.choice(list(models)), rng.randint(10, 800), rng.randint(1, 40))
                  for _ in range(150))
    c = ClusterSpec(1, 2, gpu_spec("a100-40gb"), TierSpec(host_cache_bytes=0))
    for preset in ("tangram", "serverlessllm", "tangram-plus"):
        # serial explicitly: tangram-plus computes while it loads by default
        serial = simulate(models, trace(*rows), c, make_system("s", preset, {"execute_while_load": False})).requests
        over = simulate(models, trace(*rows), c, make_system("s", preset, {"execute_while_load": True})).requests
        assert (over.outcome == "completed").all() and (serial.outcome == "completed").all()
        cold = over[over.cold]
        assert (cold.overlap_s >= 0).all() and (cold.overlap_s <= cold.load_s + 1e-12).all()
        assert (cold.first_layer_s <= cold.startup_s + cold.load_s + 1e-9).all()
        assert cold.overlap_s.sum() > 0
        assert (over[~over.cold][["overlap_s", "first_layer_s"]] == 0).all().all()
        first = rows[0]
        assert over.ttft_s.iloc[0] <= serial.ttft_s.iloc[0] + 1e-9, (preset, first)


def test_execute_while_load_estimates_use_the_overlapped_formula() -> None:
    assert pipelined_load_s(4.0, 1.0, 0) == 4.0 and pipelined_load_s(4.0, 1.0, 1) == 4.0
    assert pipelined_load_s(4.0, 1.0, 4) == pytest.approx(max(1.0 + 1.0, 4.0 + 0.25) - 1.0)
    assert pipelined_load_s(1.0, 8.0, 4) == pytest.approx(0.25)  # compute-bound: the first layer's load
    option = PlacementOption(gpus=(0,), node=0, queue_wait_s=0.0, free_bytes=0, resident_bytes=0,
                             model_bytes=4 * 10**9, in_host_cache=True, host_to_gpu_bps=1e9, storage_bps=1e9,
                             prefill_s=1.0, load_overhead_s=0.5)
    assert estimated_load_s(option) == 4.5
    piped = PlacementOption(**{**{f: getattr(option, f) for f in option.__slots__}, "layers": 4})
    assert estimated_load_s(piped) == pytest.approx(0.5 + 3.25)


def test_marked_transfers_report_their_offsets_on_time() -> None:
    env = simpy.Environment()
    fabric = Fabric(env)
    link = Link("l", 100.0)
    seen: list[tuple[int, float]] = []
    done = fabric.transfer(100, (link,), [10.0, 50.0, 100.0], lambda i: seen.append((i, env.now)))
    plain = []

    def later():
        yield env.timeout(0.2)  # a second transfer halves the first one's rate from 0.2 s on
        ev = fabric.transfer(30, (link,))
        yield ev
        plain.append(env.now)

    env.process(later())
    env.run(done)
    # 10 bytes by 0.1 s; 20 by 0.2 s, then 50 bytes/s: 50 at 0.8 s; the other's 30 bytes end at 0.8 s too,
    # then 100 bytes/s: 100 at 1.3 s
    assert [i for i, _ in seen] == [0, 1, 2]
    assert [t for _, t in seen] == pytest.approx([0.1, 0.8, 1.3])
    assert plain == pytest.approx([0.8])


def test_a_device_that_cannot_overlap_refuses_execute_while_load() -> None:
    class Serial(ModelledDevice):
        overlaps_load = False

    spec = stack("x2", [1, 1])
    system = make_system("s", "tangram", {"execute_while_load": True})
    env = simpy.Environment()
    c = cluster()
    t = trace((0.0, spec.name, 10, 1))
    with pytest.raises(ConfigError, match="needs devices that compute while the weights land"):
        run_lifecycle(env, [Serial(env, 0, c.gpu.memory_bytes, ARENA_ALIGNMENT, BW, Fabric(env), Roofline(c.gpu),
                                   0.0, 0.0, c.gpu.d2d_bps)], trace_requests(t), gpus_per_node=1, tiers=c.tiers,
                      system=system, entries=build_entries({spec.name: (spec, 1.0, 1)}, system, ARENA_ALIGNMENT),
                      time_model=Roofline(c.gpu), policies=build_policies(system, h2d_bps=BW, sensitivity={},
                                                                           trace=t),
                      seed=0, recorder=Recorder(False, 1.0, True), engine_overhead_s=0.0, pcie_bps=BW)


def test_the_real_executor_takes_execute_while_load_but_not_a_runtime_it_does_not_build() -> None:
    pytest.importorskip("torch")
    from tangram_sim.real.setup import check_replayable

    check_replayable(make_system("s", "tangram"))
    check_replayable(make_system("s", "tangram", {"execute_while_load": True}))
    check_replayable(make_system("s", "tangram", {"startup": {"preset": "vllm-l40s-llama8b-cached"}}))
    with pytest.raises(ConfigError, match=r"startup.runtime: the real executor builds its engine .* got 'skip'"):
        check_replayable(make_system("s", "tangram", {"startup": {"runtime": "skip"}}))

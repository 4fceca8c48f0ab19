"""Pipelined cold starts in whole simulations: the first token against the chain rule of
`policies.pipeline`, consolidation onto the leader, the policies' choice of k, and the accounting."""

from __future__ import annotations

import random

import pandas as pd
import pytest
import simpy

from tangram_sim.arena import ARENA_ALIGNMENT
from tangram_sim.core.links import Fabric
from tangram_sim.core.records import build_entries
from tangram_sim.core.router import Recorder
from tangram_sim.core.run import build_policies, run_lifecycle, trace_requests
from tangram_sim.errors import ConfigError
from tangram_sim.models import get_model
from tangram_sim.models.layers import layer_blocks
from tangram_sim.models.spec import ArchInfo, ModelSpec, make_tensor
from tangram_sim.policies.pipeline import PIPELINE, pipelined_ttft_s, split_layers, stage_sums
from tangram_sim.sim.device import ModelledDevice
from tangram_sim.sim.hardware import TierSpec, gpu_spec
from tangram_sim.sim.simulate import ClusterSpec, ModelChoice, simulate
from tangram_sim.sim.systems import make_system
from tangram_sim.sim.timemodel import Calibrated, Calibration, ModelCoefficients, Roofline
from tangram_sim.topology import TopologySpec

BW = 1e10  # bytes/s of every GPU's PCIe link (the SSD is far faster: each stage's own link bounds it)
MiB = 2**20
HIDDEN = 2**20  # a token's activations: 2 MiB, so that a hop of 100 tokens takes 21 ms at BW


def stack(name: str, layer_mib: list[int]) -> ModelSpec:
    """A model of transformer layers of `layer_mib` MiB each (one tensor per layer), nothing else."""
    tensors = tuple(make_tensor(name, f"model.layers.{i}.mlp.weight", (m * MiB // 2,), "BF16")
                    for i, m in enumerate(layer_mib))
    arch = ArchInfo("llama", hidden_size=HIDDEN, num_layers=len(layer_mib), num_heads=1, num_kv_heads=1,
                    head_dim=64)
    return ModelSpec(name, "llama", tensors, "BF16", arch, "test")


def trace(*rows: tuple[float, str, int, int]) -> pd.DataFrame:
    return pd.DataFrame(list(rows), columns=["arrival_s", "model", "input_tokens", "output_tokens"])


def cluster(gpus: int = 4, nodes: int = 1) -> ClusterSpec:
    return ClusterSpec(nodes, gpus, gpu_spec("a100-80gb", {"pcie_bps": BW}),
                       TierSpec(ssd_bps=1e14, unit_overhead_s=0.0), topology=TopologySpec())


def calibration(spec: ModelSpec, prefill_s: float, step_s: float = 1e-3) -> Calibration:
    return Calibration(device="test", models={spec.name: ModelCoefficients(prefill_s, 0.0, step_s)})


def run(spec: ModelSpec, t: pd.DataFrame, overrides: dict, prefill_s: float = 0.2, c: ClusterSpec | None = None,
        step_s: float = 1e-3):
    system = make_system("s", "tangram-8mib", {"engine_overhead_s": 0.3, **overrides})
    return simulate({spec.name: ModelChoice(spec)}, t, c or cluster(), system,
                    calibration=calibration(spec, prefill_s, step_s), record_events=True)


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("layer_mib", [[64] * 8, [32, 64, 96, 128, 32, 64, 160, 16]])
def test_first_token_follows_the_chain_rule(k: int, layer_mib: list[int]) -> None:
    """One request on idle GPUs, k stages on equal links: stage j is ready at startup + its bytes / BW,
    computes its layers' share of the prefill, and each hop carries the prompt's activations at BW."""
    spec = stack(f"m{k}", layer_mib)
    tokens = 100
    res = run(spec, trace((0.0, spec.name, tokens, 1)), {"pipeline": "fixed", "pipeline_params": {"k": k}})
    row = res.requests.iloc[0]
    blocks = layer_blocks(spec)
    starts = split_layers(blocks.nbytes, k)
    ready = [0.3 + b / BW for b in stage_sums(blocks.nbytes, starts)]
    gpu = gpu_spec("a100-80gb", {"pcie_bps": BW})
    compute = stage_sums(Calibrated(calibration(spec, 0.2), Roofline(gpu)).prefill_layers_s(spec, tokens, 1), starts)
    hops = [tokens * HIDDEN * 2 / BW] * (k - 1)  # peers over PCIe: both GPUs' links at BW
    assert row.ttft_s == pytest.approx(pipelined_ttft_s(ready, compute, hops), rel=1e-9)
    assert row.load_s == pytest.approx(max(ready) - 0.3, rel=1e-9)
    assert row.bytes_loaded == spec.weight_bytes and row.bytes_reused == 0
    kinds = [e[2] for e in res.events]
    assert kinds.count("gang_join") == k - 1 and f"k={k}" in [e[4] for e in res.events if e[2] == "pipelined"]


def test_consolidation_frees_the_followers_and_the_instance_keeps_serving() -> None:
    """A long request keeps the pipeline busy: once the leader has loaded the other stages' units, the
    KV is moved, the followers are released (billed until then) and the request completes on the leader;
    a later request of the model is warm there."""
    spec = stack("long", [64] * 8)
    t = trace((0.0, spec.name, 100, 4000), (10.0, spec.name, 100, 10))
    res = run(spec, t, {"pipeline": "fixed", "pipeline_params": {"k": 2}}, step_s=2e-3)
    events = res.events
    cons = [e for e in events if e[2] == "consolidated"]
    assert len(cons) == 1
    t_cons = cons[0][0]
    # the leader loads the second stage's 256 MiB after the stages have landed (0.3 + 256 MiB / BW)
    merged = next(e for e in events if e[2] == "merged")
    assert merged[0] == pytest.approx(0.3 + 2 * 256 * MiB / BW, rel=1e-9)
    assert t_cons > merged[0]  # the next iteration boundary, then the KV move
    done = {e[3]: e[0] for e in events if e[2] == "completed"}
    assert done[0] > t_cons
    rows = res.requests
    assert list(rows.outcome) == ["completed", "completed"]
    assert list(rows.gpu) == [0, 0] and list(rows.cold) == [True, False]
    end = next(e[0] for e in events if e[2] == "instance_end")
    assert res.summary["gpu_held_s"] == pytest.approx(end + t_cons, rel=1e-9)
    # KV moved: the first request's second-stage half of its KV crossed the peer link before serving went on
    kv_moved = float(cons[0][4].split()[1].split("=")[1])
    assert kv_moved > 0


def test_decode_steps_pay_the_hops_until_consolidation() -> None:
    """The pipeline's decode steps carry the batch's activations over every hop; once consolidated, not."""
    spec = stack("hops", [64] * 8)
    t = trace((0.0, spec.name, 100, 200))
    piped = run(spec, t, {"pipeline": "fixed", "pipeline_params": {"k": 4}}, step_s=1e-3)
    row = piped.requests.iloc[0]
    decode = row.e2e_s - row.ttft_s
    hop = HIDDEN * 2 / BW  # one token over one hop
    plain = 199 * 1e-3
    assert plain < decode < 199 * (1e-3 + 3 * hop) + 1e-9


def test_slo_policy_takes_the_fewest_stages_that_meet_the_target() -> None:
    """The router predicts each k's TTFT by the chain rule from the configuration's time model (never a
    calibration: a simulation and a replay route alike) and the policy picks from those predictions."""
    spec = stack("slo", [64] * 8)
    tokens = 100
    t = trace((0.0, spec.name, tokens, 1))
    blocks = layer_blocks(spec)
    roofline = Roofline(gpu_spec("a100-80gb", {"pcie_bps": BW}))
    compute = roofline.prefill_layers_s(spec, tokens, 1)
    predicted = []
    for k in range(1, 5):
        starts = split_layers(blocks.nbytes, k)
        ready = [0.3 + b / BW for b in stage_sums(blocks.nbytes, starts)]
        predicted.append((k, pipelined_ttft_s(ready, stage_sums(compute, starts), [tokens * HIDDEN * 2 / BW] * (k - 1))))
    best = min(predicted, key=lambda kt: kt[1])
    assert best[0] == 2  # the hops of 21 ms outweigh a third stage's shorter load

    def chosen(params: dict) -> list[str]:
        res = run(spec, t, {"pipeline": "slo", "pipeline_params": params})
        return [e[4] for e in res.events if e[2] == "pipelined"]

    assert chosen({"ttft_s": predicted[0][1]}) == []  # one GPU meets it
    assert chosen({"ttft_s": (predicted[0][1] + best[1]) / 2, "max_k": 4}) == ["k=2"]
    assert chosen({"ttft_s": 0.01, "max_k": 4}) == ["k=2"]  # none meets it: the lowest prediction
    assert chosen({"ttft_s": 0.01, "max_k": 1}) == []


def test_the_policies_choose_from_what_is_offered() -> None:
    options = [(1, 3.0), (2, 1.6), (3, 1.2)]
    assert PIPELINE.create("none").choose(options) == 1
    assert PIPELINE.create("fixed", k=4).choose(options) == 3
    assert PIPELINE.create("slo", ttft_s=2.0).choose(options) == 2
    assert PIPELINE.create("slo", ttft_s=1.0).choose(options) == 3
    with pytest.raises(ConfigError, match="k must be an integer >= 1"):
        PIPELINE.create("fixed", k=0)
    with pytest.raises(ConfigError, match=r"^systems\.overrides\.pipeline_params: .*ttft_s must be a positive"):
        make_system("s", "tangram", {"pipeline": "slo", "pipeline_params": {"ttft_s": -1}})
    with pytest.raises(ConfigError, match=r"^systems\.pipeline: "):
        make_system("s", "tangram", {"pipeline": "zigzag"})


@pytest.mark.parametrize("preset", ["serverlessllm", "tangram"])
@pytest.mark.parametrize("policy,params", [("fixed", {"k": 2}), ("fixed", {"k": 4}), ("slo", {"ttft_s": 0.05})])
def test_accounting_holds_in_a_busy_mixed_run(preset: str, policy: str, params: dict) -> None:
    """Several models, bursts that overlap cold starts, gangs and consolidations on two nodes: every
    request has an outcome, every cold start's bytes add up (the run checks its invariants and the arenas
    at every sample), and the same seed gives the same results."""
    rng = random.Random(7)
    models = {"a": stack("a", [64] * 8), "b": stack("b", [32] * 12), "c": stack("c", [128] * 4)}
    rows = []
    t = 0.0
    for _ in range(120):
        t += rng.expovariate(4.0)
        rows.append((t, rng.choice("abc"), rng.randint(10, 400), rng.randint(1, 200)))
    tr = trace(*rows)
    c = ClusterSpec(2, 4, gpu_spec("a100-80gb", {"pcie_bps": BW}, 4),
                    TierSpec(ssd_bps=5e10, unit_overhead_s=0.0, host_cache_bytes=0), topology=TopologySpec())
    system = make_system("s", preset, {"pipeline": policy, "pipeline_params": params, "keep_alive_s": 2.0,
                                       "granularity": "tensor"})
    choices = {n: ModelChoice(s) for n, s in models.items()}
    res = simulate(choices, tr, c, system, record_events=True)
    out = res.requests
    assert set(out.outcome) <= {"completed", "rejected"} and (out.outcome != "").all()
    assert (out[out.outcome == "rejected"].reason != "").all()
    assert ((out.bytes_loaded + out.bytes_reused) == out.bytes_needed).all()
    cold = out[out.cold]
    assert (cold.bytes_needed == [models[m].weight_bytes for m in cold.model]).all()
    kinds = [e[2] for e in res.events]
    assert "pipelined" in kinds and "consolidated" in kinds
    again = simulate(choices, tr, c, system)
    pd.testing.assert_frame_equal(res.requests, again.requests)


def test_a_real_device_refuses_pipelines() -> None:
    class OneDevice(ModelledDevice):
        runs_pipelines = False

    gpu = gpu_spec("a100-80gb", memory_gib=40)
    system = make_system("s", "tangram", {"pipeline": "fixed"})
    env = simpy.Environment()
    t = trace((0.0, "q", 10, 1))
    device = OneDevice(env, 0, gpu.memory_bytes, ARENA_ALIGNMENT, gpu.pcie_bps, Fabric(env), Roofline(gpu), 0.0, 0.0,
                       gpu.d2d_bps)
    qwen = get_model("qwen2.5-3b")
    with pytest.raises(ConfigError, match="pipeline fixed runs a cold start as stages on several GPUs; not yet"):
        run_lifecycle(env, [device], trace_requests(t), gpus_per_node=1, tiers=TierSpec(), system=system,
                      entries=build_entries({"q": (qwen, 1.0, 1)}, system, ARENA_ALIGNMENT), time_model=Roofline(gpu),
                      policies=build_policies(system, h2d_bps=gpu.pcie_bps, sensitivity={}, trace=t), seed=0,
                      recorder=Recorder(False, 1.0, True), engine_overhead_s=0.0, pcie_bps=gpu.pcie_bps)


def test_the_real_executor_refuses_pipelines_it_cannot_run() -> None:
    """A real stage loads, then computes (not layer by layer), and its engine needs whole layers."""
    pytest.importorskip("torch")
    from tangram_sim.real.pipelined import check_stage_units
    from tangram_sim.real.setup import check_replayable

    check_replayable(make_system("s", "tangram", {"pipeline": "slo"}))
    with pytest.raises(ConfigError, match=r"systems \(s\): the real executor runs a pipelined cold start's stages"):
        check_replayable(make_system("s", "tangram", {"pipeline": "slo", "execute_while_load": True}))
    qwen = get_model("qwen2.5-3b")
    # group granularity without a divisor groups within a block (hydraserve's); the Tangram store's merge
    # (a divisor) joins blocks
    for granularity, divisor, ok in (("tensor", 0, True), ("group", 0, True), ("group", 4, False)):
        system = make_system("s", "tangram", {"pipeline": "slo", "granularity": granularity,
                                              "min_unit_bytes": 2**30, "unit_divisor": divisor})
        entry = build_entries({"q": (qwen, 1.0, 1)}, system, ARENA_ALIGNMENT)["q"]
        if ok:
            check_stage_units("q", entry, "s")
        else:
            with pytest.raises(ConfigError, match=r"needs reuse units within one layer, but unit 0 of model q holds"):
                check_stage_units("q", entry, "s")


def test_stages_spread_over_nodes_when_the_network_bounds_the_load() -> None:
    """Checkpoints in the remote store behind a 1 GB/s NIC per node: two stages on one node share its NIC
    (no gain), on two nodes each has its own, so the second stage goes to the other node and the load
    takes half the time; the hop then crosses the NICs."""
    spec = stack("net", [64] * 8)
    c = ClusterSpec(2, 2, gpu_spec("a100-80gb", {"pcie_bps": BW}),
                    TierSpec(host_cache_bytes=0, network_bps=1e9, ssd_holds_all=False, unit_overhead_s=0.0),
                    topology=TopologySpec())
    res = run(spec, trace((0.0, spec.name, 100, 1)), {"pipeline": "fixed", "pipeline_params": {"k": 2}}, c=c)
    assert [e[1] for e in res.events if e[2] == "gang_join"] == [2]
    row = res.requests.iloc[0]
    assert row.load_s == pytest.approx(4 * 64 * MiB / 1e9, rel=1e-9)
    gpu = gpu_spec("a100-80gb", {"pcie_bps": BW})
    compute = stage_sums(Calibrated(calibration(spec, 0.2), Roofline(gpu)).prefill_layers_s(spec, 100, 1), (0, 4))
    ready = [0.3 + 4 * 64 * MiB / 1e9] * 2
    assert row.ttft_s == pytest.approx(pipelined_ttft_s(ready, compute, [100 * HIDDEN * 2 / 1e9]), rel=1e-9)


def tied(name: str, layers: int, table_mib: int, layer_mib: int) -> ModelSpec:
    """A model with tied embeddings: a token table (no lm_head tensor), `layers` layers and a final norm."""
    tensors = (make_tensor(name, "model.embed_tokens.weight", (table_mib * MiB // 2,), "BF16"),
               *(make_tensor(name, f"model.layers.{i}.mlp.weight", (layer_mib * MiB // 2,), "BF16")
                 for i in range(layers)),
               make_tensor(name, "model.norm.weight", (1024,), "BF16"))
    arch = ArchInfo("qwen2", hidden_size=HIDDEN, num_layers=layers, num_heads=1, num_kv_heads=1, head_dim=64)
    return ModelSpec(name, "qwen2", tensors, "BF16", arch, "test")


@pytest.mark.parametrize("k", [2, 3])
def test_a_tied_models_last_stage_loads_the_token_table_too(k: int) -> None:
    """The head multiplies by the token table: the last stage loads it beside its layers, the request's
    bytes count it twice (loaded + reused = needed), and the leader, which holds it, does not load it
    again when it consolidates; the instance then ends with every pin dropped."""
    spec = tied(f"t{k}", 8, 128, 64)
    table = 128 * MiB
    t = trace((0.0, spec.name, 100, 4000), (10.0, spec.name, 100, 10))
    res = run(spec, t, {"pipeline": "fixed", "pipeline_params": {"k": k}, "granularity": "tensor"}, step_s=2e-3)
    first = res.requests.iloc[0]
    assert first.bytes_needed == spec.weight_bytes + table
    assert first.bytes_loaded == spec.weight_bytes + table and first.bytes_reused == 0
    merged = next(e for e in res.events if e[2] == "merged")
    # the leader (stage 0: the table and its layers) loads the other stages' layers and norm, not the table
    assert int(merged[4].split("=")[1]) == spec.weight_bytes - table - sum(
        64 * MiB for _ in range(split_layers(layer_blocks(spec).nbytes, k)[1] - 1))
    assert list(res.requests.outcome) == ["completed", "completed"]
    assert list(res.requests.cold) == [True, False] and res.requests.iloc[1].bytes_needed == spec.weight_bytes

"""Live layer handoff (`core.handoff`: `eager` as BlitzScale and the preset `blitzscale-live`, and
`costed`): closed forms of the time to first token of a cold start that a running instance serves while
its layers land, what the source pays, and the cases without a source."""

from __future__ import annotations

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tangram_sim.errors import ConfigError
from tangram_sim.models import ArchInfo, ModelSpec
from tangram_sim.models.spec import make_tensor
from tangram_sim.sim.hardware import TierSpec, gpu_spec
from tangram_sim.sim.simulate import ClusterSpec, ModelChoice, simulate
from tangram_sim.sim.systems import make_system
from tangram_sim.sim.timemodel import Calibration, ModelCoefficients
from tangram_sim.topology import TopologySpec

BW = 1e10  # bytes/s of PCIe, the SSD and the GPU-to-GPU path alike
MiB = 2**20
HIDDEN = 4096  # a token's activations: 8 KiB
TOKENS = 100
STARTUP = 0.3
STEP = 1e-3


def stack(layer_mib: list[int]) -> ModelSpec:
    """A model of transformer layers of `layer_mib` MiB each (one tensor per layer), nothing else."""
    tensors = tuple(make_tensor("m", f"model.layers.{i}.mlp.weight", (m * MiB // 2,), "BF16")
                    for i, m in enumerate(layer_mib))
    arch = ArchInfo("llama", hidden_size=HIDDEN, num_layers=len(layer_mib), num_heads=1, num_kv_heads=1,
                    head_dim=64)
    return ModelSpec("m", "llama", tensors, "BF16", arch, "test")


def run(spec: ModelSpec, rows: list[tuple[float, int]], preset: str, prefill_s: float, gpus: int = 2,
        overrides: dict | None = None, tp: int = 1, tiers: TierSpec | None = None) -> pd.DataFrame:
    """Requests (arrival, output tokens) of `spec` on `gpus` GPUs of one node; one request per instance
    (max_batch 1), so a request that comes while the model runs starts a second instance, from that one."""
    cal = Calibration(device="test", models={"m": ModelCoefficients(prefill_s, 0.0, STEP)})
    t = pd.DataFrame([(a, "m", TOKENS, o) for a, o in rows],
                     columns=["arrival_s", "model", "input_tokens", "output_tokens"])
    cluster = ClusterSpec(1, gpus, gpu_spec("a100-80gb", {"pcie_bps": BW}),
                          tiers or TierSpec(ssd_bps=BW, unit_overhead_s=0.0), topology=TopologySpec())
    system = make_system("s", preset, {"engine_overhead_s": STARTUP, "max_batch": 1, "keep_alive_s": 30.0,
                                       **(overrides or {})})
    return simulate({"m": ModelChoice(spec, tensor_parallel=tp)}, t, cluster, system, calibration=cal).requests


EWL = {"execute_while_load": True}  # blitzscale with execute-while-load alone: the baseline of the handoff
COSTED = {"handoff": "costed"}


def expected_ttft(n: int, l_: float, c: float) -> tuple[float, bool]:
    """The second instance's TTFT by the closed forms, and whether it hands off at once: its first prefill
    begins before any layer has landed; the source (running one request, none queued) computes all of
    them (startup + one hop of the prompt + L c) when the waiting that saves the request exceeds what it
    adds to the source's, L c; else it waits for the first layer (execute-while-load's startup +
    max(l + L c, L l + c) if it never hands off)."""
    waited = STARTUP + max(l_ + n * c, n * l_ + c)
    handed = STARTUP + TOKENS * HIDDEN * 2 / BW + n * c
    hands = waited - handed > n * c
    return (handed if hands else waited), hands


@pytest.mark.parametrize("layer_mib,prefill_s,hands", [(512, 0.02, True), (2048, 0.05, True), (256, 0.16, False),
                                                      (64, 0.4, False)])
def test_a_cold_start_with_a_source_hands_off_when_it_is_worth_it(layer_mib: int, prefill_s: float,
                                                                   hands: bool) -> None:
    """The closed forms of `expected_ttft`, and what the source pays: its decode ends later by the layers
    it computed (the prefill's L c when handed off), plus at most the new instance's decode steps before
    its last layer landed."""
    n = 8
    spec = stack([layer_mib] * n)
    rows = [(0.0, 8000), (3.0, 50)]  # the first decodes from < 3 s to 8 s when the second comes
    live = run(spec, rows, "blitzscale-live", prefill_s, overrides=COSTED)
    ewl = run(spec, rows, "blitzscale", prefill_s, overrides=EWL)
    l_, c = layer_mib * MiB / BW, prefill_s / n
    ttft, handed = expected_ttft(n, l_, c)
    assert handed == hands
    assert live.loc[1, "gpu"] == 1 and live.loc[1, "cold"]
    assert live.loc[1, "load_s"] == pytest.approx(n * l_, rel=1e-9)  # the load itself is unchanged
    if hands:
        assert live.loc[1, "ttft_s"] == pytest.approx(ttft, rel=1e-9)
    else:  # it waits for the first layer; at a later one the rest may be worth handing off
        assert ttft - (n - 1) * c <= live.loc[1, "ttft_s"] <= ttft + 1e-9
    assert ewl.loc[1, "ttft_s"] == pytest.approx(STARTUP + max(l_ + n * c, n * l_ + c), rel=1e-9)
    # the first request had no source (nothing ran): its cold start is execute-while-load's
    assert live.loc[0, "ttft_s"] == pytest.approx(ewl.loc[0, "ttft_s"], rel=1e-12)
    delay = live.loc[0, "e2e_s"] - ewl.loc[0, "e2e_s"]
    landed = 3.0 + STARTUP + n * l_  # the second instance's last layer
    paid = n * c if hands else 0.0
    assert paid - 1e-9 <= delay <= n * c + max(0.0, landed - (3.0 + live.loc[1, "ttft_s"])) + 1e-9
    assert live.loc[1, "e2e_s"] >= live.loc[1, "ttft_s"] + 49 * STEP - 1e-9  # every token came


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 512), min_size=1, max_size=12), st.floats(0.001, 1.0))
def test_the_first_prefill_with_a_source_follows_its_closed_form(layer_mib: list[int], prefill_s: float) -> None:
    """Any layer sizes: nothing has landed when the first prefill begins; `costed` hands it off whole when
    that saves more than the prefill costs the source (one request there) and never ends it later than the
    chain rule over the load would; `eager` always hands it off whole."""
    spec = stack(layer_mib)
    rows = [(0.0, 8000), (3.0, 5)]  # the first decodes from < 2 s
    costed = run(spec, rows, "blitzscale-live", prefill_s, overrides=COSTED)
    eager = run(spec, rows, "blitzscale-live", prefill_s)
    ewl = run(spec, rows, "blitzscale", prefill_s, overrides=EWL)
    assert costed.loc[1, "gpu"] == eager.loc[1, "gpu"] == 1 and costed.loc[1, "cold"]
    handed = STARTUP + TOKENS * HIDDEN * 2 / BW + prefill_s
    waited = ewl.loc[1, "ttft_s"]
    if waited - handed > prefill_s:
        assert costed.loc[1, "ttft_s"] == pytest.approx(handed, rel=1e-9)
    assert costed.loc[1, "ttft_s"] <= waited + 1e-9
    # eager (BlitzScale's rule) hands the whole first prefill off, whatever waiting would have cost
    assert eager.loc[1, "ttft_s"] == pytest.approx(handed, rel=1e-9)


def test_costed_expects_the_rest_of_a_slow_load_at_the_rate_it_has_kept() -> None:
    """A load from an SSD 4x slower than PCIe and no host cache: at the first layer nothing has landed, and
    the rest is expected at PCIe's rate, at which waiting pays (c = 50 ms a layer: saving 8 l + c - 8 c
    does not exceed the 8 c it costs the source); once layer 0 has landed at a quarter of that rate, the
    other seven are expected at that rate too, and handing them off pays (7 l' + c - 7 c > 7 c): the
    source ends the pass, one hop after layer 0's compute, and pays 7 c."""
    n, c = 8, 0.05
    spec = stack([512] * n)
    slow = TierSpec(host_cache_bytes=0, ssd_bps=BW / 4, unit_overhead_s=0.0)
    rows = [(0.0, 8000), (3.0, 50)]
    kw = {"tiers": slow, "prefill_s": n * c}
    costed = run(spec, rows, "blitzscale-live", overrides={"source": "tiers", **COSTED}, **kw)
    ewl = run(spec, rows, "blitzscale", overrides={"source": "tiers", **EWL}, **kw)
    l_slow = 512 * MiB / (BW / 4)
    assert costed.loc[1, "load_s"] == pytest.approx(n * l_slow, rel=1e-9)  # the load is the same
    assert ewl.loc[1, "ttft_s"] == pytest.approx(STARTUP + n * l_slow + c, rel=1e-9)
    # the handoff: layer 0 lands, is computed here, the hop, the source's seven layers
    handed = ewl.loc[1, "ttft_s"] - (n - 1) * l_slow - c + c + TOKENS * HIDDEN * 2 / BW + (n - 1) * c
    assert costed.loc[1, "ttft_s"] == pytest.approx(handed, rel=1e-6)
    assert costed.loc[1, "ttft_s"] < ewl.loc[1, "ttft_s"] - 1.0
    assert costed.loc[0, "e2e_s"] - ewl.loc[0, "e2e_s"] >= (n - 1) * c - 1e-9  # the source paid


def test_handoffs_of_a_burst_spread_over_equally_busy_sources() -> None:
    """Two running instances, each with one request (as busy as each other); two cold starts come 50 ms
    apart. The first hands its prefill to the lowest GPU; the second, to the other source, since the first
    still has that prefill ahead of it: each source's request ends later by about one prefill (with the
    lowest GPU as the tie-break alone, GPU 0 paid both and GPU 1 nothing)."""
    n, prefill_s = 8, 0.4
    spec = stack([512] * n)
    rows = [(0.0, 8000), (0.01, 8000), (3.0, 50), (3.05, 50)]
    live = run(spec, rows, "blitzscale-live", prefill_s, gpus=4)
    ewl = run(spec, rows, "blitzscale", prefill_s, gpus=4, overrides=EWL)
    assert live["gpu"].tolist() == [0, 1, 2, 3] and live["cold"].all()
    # the first two had no source: each was the other's only candidate, still in its startup stages
    assert live.loc[[0, 1], "ttft_s"].tolist() == pytest.approx(ewl.loc[[0, 1], "ttft_s"].tolist(), rel=1e-12)
    delay = live["e2e_s"] - ewl["e2e_s"]
    for src in (0, 1):  # each paid one whole prefill (plus what the new instances' decode steps borrowed)
        assert prefill_s - 1e-9 <= delay[src] < 1.5 * prefill_s, delay.tolist()


def test_a_tensor_parallel_instance_hands_off_to_a_group_of_its_degree() -> None:
    """Two GPUs an instance: the second group's first prefill is computed by the first group (the hop
    between the leaders), so it comes before its layers could have landed; the first group pays."""
    spec = stack([512] * 8)
    rows = [(0.0, 4000), (1.0, 50)]
    live = run(spec, rows, "blitzscale-live", 0.02, gpus=4, tp=2)
    ewl = run(spec, rows, "blitzscale", 0.02, gpus=4, overrides=EWL, tp=2)
    assert live.loc[1, "gpu"] == ewl.loc[1, "gpu"] == 2 and live.loc[1, "cold"]
    half_load = 8 * 512 * MiB / 2 / BW  # each GPU of the group loads its half of every layer
    assert ewl.loc[1, "ttft_s"] > STARTUP + half_load  # waits for the last layer
    # the whole prefill on the first group (the calibration's 0.02 s at any degree), after one hop
    assert live.loc[1, "ttft_s"] == pytest.approx(STARTUP + TOKENS * HIDDEN * 2 / BW + 0.02, rel=1e-9)
    assert live.loc[1, "ttft_s"] < ewl.loc[1, "ttft_s"]
    assert live.loc[0, "e2e_s"] > ewl.loc[0, "e2e_s"]


def test_without_a_running_instance_there_is_no_handoff() -> None:
    """One GPU at a time: each instance ends before the next request (keep-alive 0), so no instance of
    the model runs when a cold start begins and live handoff changes nothing."""
    spec = stack([256] * 8)
    rows = [(0.0, 20), (5.0, 20), (10.0, 20)]
    live = run(spec, rows, "blitzscale-live", 0.16, gpus=1, overrides={"keep_alive_s": 0.0})
    ewl = run(spec, rows, "blitzscale", 0.16, gpus=1, overrides={**EWL, "keep_alive_s": 0.0})
    pd.testing.assert_frame_equal(live, ewl)


def test_live_handoff_needs_execute_while_load_and_no_pipeline() -> None:
    with pytest.raises(ConfigError, match=r"systems.overrides.handoff: a live handoff .* needs execute_while_load"):
        make_system("s", "blitzscale", {"handoff": "costed"})
    with pytest.raises(ConfigError, match=r"needs execute_while_load true and pipeline none"):
        make_system("s", "blitzscale-live", {"pipeline": "fixed"})
    with pytest.raises(ConfigError, match=r"systems.handoff: expected one of none, eager, costed, got 'zigzag'"):
        make_system("s", "blitzscale-live", {"handoff": "zigzag"})


def test_the_real_executor_refuses_live_handoff() -> None:
    pytest.importorskip("torch")
    from tangram_sim.real.setup import check_replayable

    with pytest.raises(ConfigError, match=r"systems \(s\): handoff eager is not supported by the real executor"):
        check_replayable(make_system("s", "blitzscale-live", {"multicast": "none"}))

"""Live layer handoff (`core.handoff`, `blitzscale-live`): closed forms of the time to first token of a
cold start that a running instance serves while its layers land, what the source pays, and the cases
without a source."""

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
        overrides: dict | None = None) -> pd.DataFrame:
    """Requests (arrival, output tokens) of `spec` on `gpus` GPUs of one node; one request per instance
    (max_batch 1), so a request that comes while the model runs starts a second instance, from that one."""
    cal = Calibration(device="test", models={"m": ModelCoefficients(prefill_s, 0.0, STEP)})
    t = pd.DataFrame([(a, "m", TOKENS, o) for a, o in rows],
                     columns=["arrival_s", "model", "input_tokens", "output_tokens"])
    cluster = ClusterSpec(1, gpus, gpu_spec("a100-80gb", {"pcie_bps": BW}), TierSpec(ssd_bps=BW, unit_overhead_s=0.0),
                          topology=TopologySpec())
    system = make_system("s", preset, {"engine_overhead_s": STARTUP, "max_batch": 1, "keep_alive_s": 30.0,
                                       **(overrides or {})})
    return simulate({"m": ModelChoice(spec)}, t, cluster, system, calibration=cal).requests


EWL = {"execute_while_load": True}  # blitzscale with execute-while-load alone: the baseline of the handoff


@pytest.mark.parametrize("layer_mib,prefill_s", [(256, 0.16), (64, 0.4), (512, 0.02)])
def test_a_cold_start_with_a_source_serves_at_once(layer_mib: int, prefill_s: float) -> None:
    """The second instance's first prefill begins before any of its layers has landed, so the source
    computes all of them: TTFT = startup + one hop of the prompt + L c, where execute-while-load alone
    gives startup + max(l + L c, L l + c) (l: a layer's load from the source GPU, c: a layer's compute)."""
    n = 8
    spec = stack([layer_mib] * n)
    rows = [(0.0, 4000), (1.0, 50)]  # the first still decodes (4 s) when the second comes
    live = run(spec, rows, "blitzscale-live", prefill_s)
    ewl = run(spec, rows, "blitzscale", prefill_s, overrides=EWL)
    l_, c = layer_mib * MiB / BW, prefill_s / n
    hop = TOKENS * HIDDEN * 2 / BW
    assert live.loc[1, "gpu"] == 1 and live.loc[1, "cold"]
    assert live.loc[1, "load_s"] == pytest.approx(n * l_, rel=1e-9)  # the load itself is unchanged
    assert live.loc[1, "ttft_s"] == pytest.approx(STARTUP + hop + n * c, rel=1e-9)
    assert ewl.loc[1, "ttft_s"] == pytest.approx(STARTUP + max(l_ + n * c, n * l_ + c), rel=1e-9)
    # the first request had no source (nothing ran): its cold start is execute-while-load's
    assert live.loc[0, "ttft_s"] == pytest.approx(ewl.loc[0, "ttft_s"], rel=1e-12)
    # the source pays: its decode ends later by the layers it computed, the prefill's L c at least, plus
    # at most the new instance's decode steps before its last layer landed
    delay = live.loc[0, "e2e_s"] - ewl.loc[0, "e2e_s"]
    landed = 1.0 + STARTUP + n * l_  # the second instance's last layer
    assert n * c - 1e-9 <= delay <= n * c + max(0.0, landed - (1.0 + live.loc[1, "ttft_s"])) + 1e-9
    # every token of the new instance came: the decode steps before its load ended handed part of each
    # step to the source (one hop each), the later ones ran on its own GPU
    assert live.loc[1, "e2e_s"] >= live.loc[1, "ttft_s"] + 49 * STEP - 1e-9


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 512), min_size=1, max_size=12), st.floats(0.001, 1.0))
def test_the_first_prefill_with_a_source_follows_its_closed_form(layer_mib: list[int], prefill_s: float) -> None:
    """Any layer sizes: nothing has landed when the first prefill begins, so TTFT = startup + hop + the
    whole prefill (its layers' computes sum to it), whatever the load."""
    spec = stack(layer_mib)
    live = run(spec, [(0.0, 8000), (3.0, 5)], "blitzscale-live", prefill_s)  # the first decodes from < 2 s
    assert live.loc[1, "gpu"] == 1 and live.loc[1, "cold"]
    assert live.loc[1, "ttft_s"] == pytest.approx(STARTUP + TOKENS * HIDDEN * 2 / BW + prefill_s, rel=1e-9)


def test_without_a_running_instance_there_is_no_handoff() -> None:
    """One GPU at a time: each instance ends before the next request (keep-alive 0), so no instance of
    the model runs when a cold start begins and live handoff changes nothing."""
    spec = stack([256] * 8)
    rows = [(0.0, 20), (5.0, 20), (10.0, 20)]
    live = run(spec, rows, "blitzscale-live", 0.16, gpus=1, overrides={"keep_alive_s": 0.0})
    ewl = run(spec, rows, "blitzscale", 0.16, gpus=1, overrides={**EWL, "keep_alive_s": 0.0})
    pd.testing.assert_frame_equal(live, ewl)


def test_live_handoff_needs_execute_while_load_and_no_pipeline() -> None:
    with pytest.raises(ConfigError, match=r"systems.overrides.handoff: live handoff .* needs execute_while_load"):
        make_system("s", "blitzscale", {"handoff": "live"})
    with pytest.raises(ConfigError, match=r"needs execute_while_load true and pipeline none"):
        make_system("s", "blitzscale-live", {"pipeline": "fixed"})
    with pytest.raises(ConfigError, match=r"systems.handoff: expected one of none, live, got 'zigzag'"):
        make_system("s", "blitzscale-live", {"handoff": "zigzag"})


def test_the_real_executor_refuses_live_handoff() -> None:
    pytest.importorskip("torch")
    from tangram_sim.real.setup import check_replayable

    with pytest.raises(ConfigError, match=r"systems \(s\): handoff live is not supported by the real executor"):
        check_replayable(make_system("s", "blitzscale-live", {"multicast": "none"}))

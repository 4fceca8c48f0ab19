"""`cluster.decode_admission`: an arrival joins a decoding batch at once (fluid, the default) or when the
decode step under way ends (step: iteration-level scheduling, what the real replay's engine does)."""

from __future__ import annotations

import pandas as pd
import pytest

from tangram_sim.errors import ConfigError
from tangram_sim.experiments.config import build_cluster, validate
from tangram_sim.models import get_model
from tangram_sim.sim.hardware import TierSpec, gpu_spec
from tangram_sim.sim.simulate import ClusterSpec, ModelChoice, simulate
from tangram_sim.sim.systems import make_system
from tangram_sim.sim.timemodel import Calibration, ModelCoefficients

MODEL = "llama-3-8b"
STEP = 1.0  # seconds per decode step
PREFILL = 0.25  # seconds per prefill iteration


def _run(admission: str, second_at: float) -> pd.DataFrame:
    cal = Calibration(device="test", models={MODEL: ModelCoefficients(PREFILL, 0.0, STEP)},
                      engine_overhead_s=0.0, unit_overhead_s=0.0)
    cluster = ClusterSpec(1, 1, gpu_spec("a100-80gb"), TierSpec(), decode_admission=admission)
    trace = pd.DataFrame([(0.0, MODEL, 10, 6), (second_at, MODEL, 10, 2)],
                         columns=["arrival_s", "model", "input_tokens", "output_tokens"])
    system = make_system("tangram", "tangram", {"keep_alive_s": 100.0})
    return simulate({MODEL: ModelChoice(get_model(MODEL))}, trace, cluster, system, calibration=cal).requests


@pytest.mark.parametrize("into_step", [0.1, 0.5, 0.9])
def test_an_arrival_waits_for_the_decode_step_under_way(into_step: float) -> None:
    fluid = _run("fluid", 0.0)
    first_token = fluid.loc[0, "ttft_s"]  # the first request's prefill ends: its decode begins
    at = first_token + 2 * STEP + into_step * STEP  # arrives during its third decode step
    fluid, step = _run("fluid", at), _run("step", at)
    assert fluid.loc[1, "ttft_s"] == pytest.approx(PREFILL)  # admitted at once, prefilled alone
    # step: admitted when the third step ends, (1 - into_step) steps later
    assert step.loc[1, "ttft_s"] == pytest.approx((1 - into_step) * STEP + PREFILL)
    assert step.loc[1, "queue_s"] == pytest.approx((1 - into_step) * STEP)
    assert (step["outcome"] == "completed").all()


def test_fluid_is_the_default_and_the_key_is_checked() -> None:
    base = {"name": "x", "models": [{"name": MODEL}], "trace": {"kind": "synthetic", "n_requests": 5},
            "systems": [{"name": "t", "preset": "tangram"}]}
    assert "decode_admission" not in validate(base, None)["cluster"]  # defaults leave resolved configs as they were
    assert build_cluster(validate(base, None)).decode_admission == "fluid"
    cfg = validate({**base, "cluster": {"decode_admission": "step"}}, None)
    assert build_cluster(cfg).decode_admission == "step"
    with pytest.raises(ConfigError, match="cluster.decode_admission"):
        validate({**base, "cluster": {"decode_admission": "sometimes"}}, None)

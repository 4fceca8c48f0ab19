"""The presets of published systems (serverless-vllm, medusa, serverlessllm-ewl), the Medusa-shaped
experiment and the tune space's execute-while-load and histogram keep-alive dimensions."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from tangram_sim import load_experiment
from tangram_sim.core.startup import STARTUP_PRESETS
from tangram_sim.errors import ConfigError
from tangram_sim.experiments.config import build_systems
from tangram_sim.models import get_model
from tangram_sim.sim.hardware import TierSpec, gpu_spec
from tangram_sim.sim.simulate import ClusterSpec, ModelChoice, simulate
from tangram_sim.sim.systems import PRESETS, make_system
from tangram_sim.tune.space_file import load_space, parse_space

ROOT = Path(__file__).resolve().parents[1]
MEDUSA_EXP = ROOT / "experiments/medusa-sharegpt.yaml"
SPACE = ROOT / "experiments/tune-space.yaml"


def test_medusa_restores_the_stages_after_the_weights_and_keeps_vllms_others() -> None:
    vllm = make_system("v", "serverless-vllm").startup_plan()
    medusa = make_system("m", "medusa").startup_plan()
    v, m = dict(vllm.stages), dict(medusa.stages)
    assert all(st.mode == "serial" for st in v.values())
    assert m["kv_init"].mode == m["graph_capture"].mode == "restore"
    assert m["runtime"] == v["runtime"] and m["context"] == v["context"]
    # the artifact's figures: KV profiling 0.590 s and graph capture 1.000 s serial in vLLM; restored in
    # 0.016 s and 0.277 + 0.280 s (graphs and their warm-up) beside the load in Medusa
    assert (v["kv_init"].s, v["graph_capture"].s) == (0.590, 1.000)
    assert (m["kv_init"].restore_s, m["graph_capture"].restore_s) == (0.016, 0.557)
    assert vllm.pre_s == medusa.pre_s == 1.748
    assert vllm.post_s == pytest.approx(1.590) and medusa.post_s == 0.0
    assert medusa.lane_s == pytest.approx(0.573)
    assert vllm.fixed_s - medusa.fixed_s == pytest.approx(1.590)


def one_request(system_preset: str, model: str) -> pd.Series:
    models = {model: ModelChoice(get_model(model))}
    cluster = ClusterSpec(1, 1, gpu_spec("a100-40gb"), TierSpec(ssd_bps=19.4e9))
    trace = pd.DataFrame([(0.0, model, 128, 4)], columns=["arrival_s", "model", "input_tokens", "output_tokens"])
    return simulate(models, trace, cluster, make_system(system_preset, system_preset)).requests.iloc[0]


@pytest.mark.parametrize("model", ["qwen2.5-0.5b", "qwen2.5-7b"])
def test_a_medusa_cold_start_is_shorter_by_the_serial_stages_less_what_the_load_does_not_hide(model: str) -> None:
    """The restored stages run beside the load: Medusa's startup after the weights is what of their 0.573 s
    outlasts the load (a 1 GB model's 51 ms load hides little; a 15 GB model's 0.79 s load hides all)."""
    vllm, medusa = one_request("serverless-vllm", model), one_request("medusa", model)
    assert vllm["load_s"] == medusa["load_s"] > 0
    assert vllm["startup_s"] == pytest.approx(1.748 + 1.590)
    assert medusa["startup_s"] == pytest.approx(1.748 + max(0.0, 0.573 - medusa["load_s"]))
    assert vllm["ttft_s"] - medusa["ttft_s"] == pytest.approx(vllm["startup_s"] - medusa["startup_s"])


def test_serverlessllm_ewl_is_serverlessllm_executing_while_loading() -> None:
    plain, ewl = make_system("a", "serverlessllm"), make_system("b", "serverlessllm-ewl")
    assert ewl.execute_while_load and not plain.execute_while_load
    assert {k: v for k, v in ewl.to_dict().items() if k not in ("name", "execute_while_load")} == \
        {k: v for k, v in plain.to_dict().items() if k not in ("name", "execute_while_load")}
    a, b = one_request("serverlessllm", "llama-3-8b"), one_request("serverlessllm-ewl", "llama-3-8b")
    assert b["overlap_s"] > 0 and a["overlap_s"] == 0
    assert b["ttft_s"] < a["ttft_s"] and b["load_s"] == pytest.approx(a["load_s"], rel=1e-12)


@pytest.mark.parametrize("name", ["plus-azure-code", "plus-azure-conv", "plus-servegen", "plus-synthetic-skew"])
def test_tangram_plus_is_its_breakdowns_last_stage_executing_while_loading(name: str) -> None:
    """The plus-* breakdown ends in +prefetch; the preset adds execute-while-load to it and nothing else, and
    its single engine stage leaves nothing serial after the weights for the overlap to wait on."""
    config = load_experiment(ROOT / "experiments" / f"{name}.yaml").config()
    systems = {s.name: s for s in build_systems(config)}
    plus, stage = systems["tangram-plus"], systems["+prefetch"]
    assert plus.execute_while_load and not stage.execute_while_load
    assert {k: v for k, v in plus.to_dict().items() if k not in ("name", "execute_while_load")} == \
        {k: v for k, v in stage.to_dict().items() if k not in ("name", "execute_while_load")}
    assert plus.startup_plan().post_s == 0.0
    a, b = one_request("tangram-plus", "llama-3-8b"), one_request("serverlessllm", "llama-3-8b")
    assert a["overlap_s"] > 0 and a["ttft_s"] < b["ttft_s"]


def test_the_medusa_startup_preset_is_the_artifacts_stage_means() -> None:
    preset = STARTUP_PRESETS["vllm-medusa-a100"]
    assert preset["runtime"]["s"] == pytest.approx(0.652 + 0.271 + 0.825)
    assert "medusa" in PRESETS and "serverless-vllm" in PRESETS and "serverlessllm-ewl" in PRESETS


def test_the_medusa_experiment_loads_with_its_evaluations_shape() -> None:
    exp = load_experiment(MEDUSA_EXP)
    config = exp.config()
    assert config["trace"]["arrival"] == "poisson" and sorted(config["sweep"]["trace.rate"]) == [2, 10]
    assert config["cluster"]["nodes"] * config["cluster"]["gpus_per_node"] == 4
    names = [entry[0]["name"] for entry in config["sweep"]["models"]]
    assert len(set(names)) == 10
    params = sorted(get_model(n).num_params / 1e9 for n in names)
    assert 0.4 < params[0] < 0.6 and 13 < params[-1] < 15  # 0.5-14B
    presets = {s["preset"] for s in config["systems"]}
    assert {"serverless-vllm", "medusa", "serverlessllm", "tangram", "tangram-plus"} <= presets


def test_the_catalogs_qwen25_additions_have_their_published_sizes() -> None:
    # the model cards: 0.49B, 1.54B and 7.61B parameters
    for name, billions in (("qwen2.5-0.5b", 0.49), ("qwen2.5-1.5b", 1.54), ("qwen2.5-7b", 7.61)):
        assert get_model(name).num_params / 1e9 == pytest.approx(billions, rel=0.01)


# ------------------------------------------------------------------ the tune space


def test_the_tune_space_searches_execute_while_load_and_the_histogram_keep_alive() -> None:
    space = load_space(SPACE, load_experiment(ROOT / "experiments/overall-servegen.yaml"))
    params = {p.key: p for p in space.params}
    assert set(params["execute_while_load"].choices) == {False, True}
    assert "histogram" in params["keep_alive"].choices and "fixed" in params["keep_alive"].choices
    histogram = {k for k, p in params.items() if k.startswith("keep_alive_params.")}
    assert {"keep_alive_params.range_s", "keep_alive_params.prewarm"} <= histogram
    assert all(params[k].when == "histogram" for k in histogram)
    # a histogram trial gets its parameters; a fixed one does not (the fixed policy takes none)
    values = dict(space.base_values(load_experiment(ROOT / "experiments/overall-servegen.yaml").config()))
    values.update({"keep_alive": "histogram", "execute_while_load": True, "keep_alive_params.range_s": 480.0})
    entry = space.system_entry(values)
    assert entry["name"] == "tuned" and entry["overrides"]["keep_alive_params"]["range_s"] == 480.0
    spec = make_system(entry["name"], entry["preset"], entry["overrides"])
    assert spec.keep_alive == "histogram" and spec.execute_while_load
    values["keep_alive"] = "fixed"
    entry = space.system_entry(values)
    assert "keep_alive_params" not in entry["overrides"]
    make_system(entry["name"], entry["preset"], entry["overrides"])


@pytest.mark.parametrize("spec, message", [
    ({"low": 60, "high": 900, "when": "nope"}, "params.keep_alive_params.range_s.when: expected a keep_alive policy"),
    ({"low": 60, "high": 900, "when": "histogram"}, None),
])
def test_when_names_a_policy_of_the_parameters_field(spec: dict, message: str | None) -> None:
    exp = load_experiment(ROOT / "experiments/quickstart.yaml")
    data = {"base": "tangram", "params": {"keep_alive": {"choices": ["fixed", "histogram"]},
                                          "keep_alive_params.range_s": spec}}
    if message is None:
        assert parse_space(data, exp).params[1].when == "histogram"
        return
    with pytest.raises(ConfigError) as err:
        parse_space(data, exp)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_when_is_only_for_a_policys_parameters() -> None:
    exp = load_experiment(ROOT / "experiments/quickstart.yaml")
    with pytest.raises(ConfigError, match=r"params.keep_alive_s.when: a policy name only for a policy's parameter"):
        parse_space({"params": {"keep_alive_s": {"low": 1, "high": 9, "when": "fixed"}}}, exp)

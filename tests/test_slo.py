"""SLO attainment, goodput and the cost side (`core.slo`): exact numbers on hand-built request tables, a
closed-form simulation of the GPU time held, and the `slo` section's validation."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from tangram_sim.cli import main
from tangram_sim.core.metrics import REQUEST_COLUMNS, summarize
from tangram_sim.core.slo import DEFAULT_TPOT_S, DEFAULT_TTFT_S, SLO_COLUMNS, Slo, slo_metrics
from tangram_sim.errors import ConfigError
from tangram_sim.experiments.config import set_dotted, validate
from tangram_sim.models import get_model
from tangram_sim.sim.hardware import TierSpec, gpu_spec
from tangram_sim.sim.simulate import ClusterSpec, ModelChoice, simulate
from tangram_sim.sim.systems import make_system

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "experiments/quickstart.yaml"
NAN = math.nan

# (model, arrival_s, outcome, output_tokens, ttft_s, e2e_s, cold, overlap_s); times are exact in binary.
# Against TTFT <= 2 s and TPOT <= 0.5 s:
ROWS = [
    ("a", 0.0, "completed", 5, 1.0, 3.0, True, 0.5),  # TPOT (3 - 1) / 4 = 0.5: meets both (limits inclusive)
    ("b", 1.0, "completed", 3, 3.0, 4.0, True, 0.0),  # TTFT 3 misses; TPOT 0.5 meets
    ("a", 2.0, "completed", 1, 0.5, 0.5, False, 0.0),  # one output token: TPOT met trivially; both met
    ("a", 3.0, "completed", 9, 0.25, 8.25, False, 0.0),  # TPOT 8 / 8 = 1 misses; TTFT meets
    ("b", 4.0, "rejected", 4, NAN, NAN, True, 0.25),  # rejected before its first token: misses both
    ("a", 5.0, "rejected", 4, 0.5, NAN, False, 0.0),  # a first token, then rejected: still misses both
]
SLO = Slo(ttft_s=2.0, tpot_s=0.5)


def table(rows: list[tuple[Any, ...]]) -> pd.DataFrame:
    frame = pd.DataFrame({c: [0] * len(rows) for c in REQUEST_COLUMNS})
    names = ("model", "arrival_s", "outcome", "output_tokens", "ttft_s", "e2e_s", "cold", "overlap_s")
    for col, values in zip(names, zip(*rows)):
        frame[col] = list(values)
    frame["rid"] = range(len(rows))
    frame["reason"] = ["kv-capacity" if o == "rejected" else "" for o in frame["outcome"]]
    return frame


def test_each_metric_of_a_hand_built_table() -> None:
    m = slo_metrics(table(ROWS), SLO, gpu_held_s=30.0)
    assert list(m) == list(SLO_COLUMNS)
    assert m["ttft_slo_attainment"] == 3 / 6  # rows 0, 2, 3 of all 6 (the rejected ones count, as misses)
    assert m["tpot_slo_attainment"] == 3 / 6  # rows 0, 1, 2
    # rows 0 and 2 meet both; first arrival 0 to last completion 3 + 8.25
    assert m["goodput_rps"] == 2 / 11.25
    assert m["gpu_held_s"] == 30.0
    assert m["gpu_seconds_per_request"] == 30.0 / 4  # per completed request
    assert m["mean_overlap_s"] == (0.5 + 0.0 + 0.25) / 3  # over the 3 cold starts, the rejected one included


def test_per_model_targets_override_the_global_ones() -> None:
    m = slo_metrics(table(ROWS), Slo(2.0, 0.5, {"b": (4.0, 0.25)}))
    assert m["ttft_slo_attainment"] == 4 / 6  # row 1 (model b, TTFT 3) now meets its 4 s
    assert m["tpot_slo_attainment"] == 2 / 6  # row 1's TPOT 0.5 now misses b's 0.25
    assert m["goodput_rps"] == 2 / 11.25  # rows 0 and 2 still; row 1 trades one miss for another


def test_summarize_appends_the_columns_after_the_existing_ones() -> None:
    s = summarize(table(ROWS), 0.0, 0, slo=SLO, gpu_held_s=30.0)
    assert list(s)[-len(SLO_COLUMNS):] == list(SLO_COLUMNS)
    assert s["goodput_rps"] == 2 / 11.25
    default = summarize(table(ROWS), 0.0, 0)  # no slo: the default targets
    assert default["tpot_slo_attainment"] == slo_metrics(table(ROWS), Slo(DEFAULT_TTFT_S, DEFAULT_TPOT_S))[
        "tpot_slo_attainment"]


@pytest.mark.parametrize("rows", [[], [r for r in ROWS if r[2] == "rejected"]], ids=["empty", "all-rejected"])
def test_runs_without_completions_give_zeros_never_nan(rows: list[tuple[Any, ...]]) -> None:
    frame = table(rows) if rows else pd.DataFrame(columns=REQUEST_COLUMNS)  # object columns, as tune reads
    m = slo_metrics(frame, SLO, gpu_held_s=12.5)
    assert m == {**dict.fromkeys(SLO_COLUMNS, 0.0), "gpu_held_s": 12.5,
                 "mean_overlap_s": 0.25 if rows else 0.0}  # the one cold start among them hid 0.25 s
    s = summarize(frame, 0.0, 0)
    assert all(isinstance(s[c], float) and math.isfinite(s[c]) for c in SLO_COLUMNS)


def test_a_table_without_overlap_column_reads_zero() -> None:
    """A request table written before `overlap_s` existed (e.g. an older requests.parquet)."""
    assert slo_metrics(table(ROWS).drop(columns="overlap_s"), SLO)["mean_overlap_s"] == 0.0


# ------------------------------------------------------------------ GPU time held, simulated
def one_gpu() -> ClusterSpec:
    return ClusterSpec(nodes=1, gpus_per_node=1, gpu=gpu_spec("a100-80gb", memory_gib=40), tiers=TierSpec())


def test_gpu_held_is_each_instance_from_its_cold_start_to_its_end() -> None:
    """Two requests of two models far apart on one GPU: each instance holds the GPU from its arrival (the
    cold start begins at once) to its completion plus the keep-alive, idle time included."""
    models = {m: ModelChoice(get_model(m)) for m in ("qwen2.5-3b", "llama-3-8b")}
    trace = pd.DataFrame({"arrival_s": [0.0, 1000.0], "model": ["qwen2.5-3b", "llama-3-8b"],
                          "input_tokens": [64, 64], "output_tokens": [8, 1]})
    system = make_system("tangram", "tangram", {"keep_alive_s": 30.0})
    res = simulate(models, trace, one_gpu(), system, slo=Slo(ttft_s=100.0, tpot_s=100.0))
    req = res.requests.sort_values("rid")
    assert req["cold"].all() and (req["queue_s"] == 0).all()
    held = float((req["e2e_s"] + system.keep_alive_s).sum())  # neither instance was ended early
    s = res.summary
    assert s["gpu_held_s"] == pytest.approx(held, rel=1e-12)
    assert s["gpu_seconds_per_request"] == pytest.approx(held / 2, rel=1e-12)
    assert s["gpu_busy_s"] < s["gpu_held_s"]  # the keep-alive is billed but idle
    assert s["ttft_slo_attainment"] == s["tpot_slo_attainment"] == 1.0
    assert s["goodput_rps"] == pytest.approx(2 / (1000.0 + float(req["e2e_s"].iloc[1])), rel=1e-12)
    assert s["mean_overlap_s"] == 0.0  # today's cold starts load everything before they compute


def test_streamed_and_in_memory_runs_agree_on_the_new_columns(tmp_path: Path) -> None:
    models = {m: ModelChoice(get_model(m)) for m in ("qwen2.5-3b", "phi-3-mini-4k")}
    trace = pd.DataFrame({"arrival_s": [0.0, 0.5, 1.0, 40.0, 41.0],
                          "model": ["qwen2.5-3b", "phi-3-mini-4k", "qwen2.5-3b", "phi-3-mini-4k", "qwen2.5-3b"],
                          "input_tokens": [64, 128, 32, 64, 16], "output_tokens": [16, 1, 40, 8, 2]})
    system = make_system("tangram", "tangram")
    slo = Slo(0.5, 0.05, {"phi-3-mini-4k": (1.0, 0.05)})
    kept = simulate(models, trace, one_gpu(), system, slo=slo).summary
    streamed = simulate(models, trace, one_gpu(), system, slo=slo, requests_path=tmp_path / "r.parquet").summary
    assert {c: kept[c] for c in SLO_COLUMNS} == {c: streamed[c] for c in SLO_COLUMNS}


# ------------------------------------------------------------------ the `slo` section
def quickstart(**sets: Any) -> dict[str, Any]:
    raw = yaml.safe_load(QUICKSTART.read_text())
    for key, value in sets.items():
        set_dotted(raw, key, value)
    return raw


def test_defaults_are_filled_in_and_per_model_targets_inherit() -> None:
    assert validate(quickstart(), ROOT / "experiments")["slo"] == {"ttft_s": 2.0, "tpot_s": 0.2}
    out = validate(quickstart(**{"slo.tpot_s": 0.1, "slo.models": {"yi-9b": {"ttft_s": 5}}}),
                   ROOT / "experiments")["slo"]
    assert out == {"ttft_s": 2.0, "tpot_s": 0.1, "models": {"yi-9b": {"ttft_s": 5.0, "tpot_s": 0.1}}}
    assert Slo.from_config(out) == Slo(2.0, 0.1, {"yi-9b": (5.0, 0.1)})
    assert Slo.from_config(None) == Slo(DEFAULT_TTFT_S, DEFAULT_TPOT_S)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("slo.ttft_s", -1, "slo.ttft_s: expected a positive value, got -1"),
        ("slo.ttft_s", 0, "slo.ttft_s: expected a positive value, got 0"),
        ("slo.tpot_s", math.nan, "slo.tpot_s: expected a positive value, got nan"),
        ("slo.tpot_s", math.inf, "slo.tpot_s: expected a positive value, got inf"),
        ("slo.ttft_s", "2", "slo.ttft_s: expected a number > 0, got '2' (a quoted string; write the number "
                            "without quotes)"),
        ("slo.ttft_s", True, "slo.ttft_s: expected a number > 0, got True"),
        ("slo", 5, "slo: expected a mapping, got int"),
        ("slo.ttft", 2, "slo.ttft: unknown key; expected one of: ttft_s, tpot_s, models"),
        ("slo.models", [1], "slo.models: expected a mapping of model names to {ttft_s, tpot_s}, got [1]"),
        ("slo.models", {"gpt-5": {"ttft_s": 1}}, "slo.models.gpt-5: not a model of this experiment; expected "
                                                 "one of: qwen2.5-3b, phi-3-mini-4k, llama-3-8b, yi-9b"),
        ("slo.models", {"yi-9b": {"ttft_s": -2}}, "slo.models.yi-9b.ttft_s: expected a positive value, got -2"),
        ("slo.models", {"yi-9b": {"e2e_s": 9}}, "slo.models.yi-9b.e2e_s: unknown key; expected one of: "
                                                "ttft_s, tpot_s"),
        ("slo.models", {"yi-9b": 3}, "slo.models.yi-9b: expected a mapping, got int"),
    ],
)
def test_bad_slo_values_name_the_dotted_key(key: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate(quickstart(**{key: value}), ROOT / "experiments")
    assert str(err.value) == message


def test_a_bad_slo_from_the_command_line_is_one_error_line(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["run", str(QUICKSTART), "--out", str(tmp_path / "out"), "--quiet", "--no-plots", "--jobs", "1",
            "--set", "trace.max_requests=5", "--set", "slo.tpot_s=-0.2"]
    assert main(argv) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["error: slo.tpot_s: expected a positive value, got -0.2"]


def test_the_resolved_config_states_the_slo_and_a_sweep_may_vary_it(tmp_path: Path) -> None:
    argv = ["run", str(QUICKSTART), "--out", str(tmp_path / "out"), "--quiet", "--no-plots", "--jobs", "1",
            "--set", "trace.max_requests=40", "--set", "systems=[{name: tangram, preset: tangram}]",
            "--set", "sweep={slo.ttft_s: [0.25, 100]}"]
    assert main(argv) == 0
    config = yaml.safe_load((tmp_path / "out/config.yaml").read_text())
    assert config["slo"] == {"ttft_s": 0.25, "tpot_s": 0.2}  # point 0's values, beside the sweep
    summary = pd.read_csv(tmp_path / "out/summary.csv").sort_values("point")
    loose, tight = summary["ttft_slo_attainment"].iloc[1], summary["ttft_slo_attainment"].iloc[0]
    assert loose == summary["completed"].iloc[1] / 40 and tight < loose
    assert summary[list(SLO_COLUMNS)].notna().all().all()

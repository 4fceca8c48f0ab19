"""Inputs that cannot lie: calibration files read with the experiment loader's rules, YAML limits
(aliases, duplicate keys, sweep size, file size, huge values), compare's pairing checks, and the
first hour's messages and tables."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
import tracemalloc
from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_rundir import fast, one_line_error, write_exp

from tangram_sim.cli import main
from tangram_sim.errors import ConfigError, TangramError
from tangram_sim.experiments.config import load_yaml, parse_set
from tangram_sim.experiments.runner import prepare, run_experiment
from tangram_sim.sim.timemodel import Calibration, ModelCoefficients

ROOT = Path(__file__).resolve().parents[1]
COEFFS = {"prefill_base_s": 0.04, "prefill_per_token_s": 1e-4, "decode_base_s": 0.03, "decode_per_seq_s": 0.007,
          "decode_per_kv_token_s": 1e-6}


def calibration(**top: object) -> dict:
    cal = {"device": "cuda:0 (test)", "h2d_bps": 2.5e10, "d2d_bps": 5e11, "read_bps": 2e10, "unit_overhead_s": 4e-5,
           "engine_overhead_s": 0.05, "models": {m: dict(COEFFS) for m in ("qwen2.5-3b", "qwen2.5-14b")},
           "measurements": {"date": "today", "anything": [1, {"free": "form"}]}}
    cal.update(top)
    return cal


def run_with(tmp_path: Path, cal_text: str | bytes, *extra: str) -> int:
    path = tmp_path / "cal.yaml"
    path.write_bytes(cal_text if isinstance(cal_text, bytes) else cal_text.encode())
    return main(["run", str(write_exp(tmp_path, fast())), "--out", str(tmp_path / "out"), "--quiet",
                 "--calibration", str(path), *extra])


# ------------------------------------------------------------------ 3. calibration files
def test_a_whole_calibration_runs_and_its_measurements_are_ignored(tmp_path: Path) -> None:
    assert run_with(tmp_path, yaml.safe_dump(calibration())) == 0
    summary = pd.read_csv(tmp_path / "out" / "summary.csv")
    assert summary["mean_load_s"].map(math.isfinite).all()


@pytest.mark.parametrize("edit, expected", [
    ({"models": {"qwen2.5-3b": {**COEFFS, "decode_base_s": math.nan}, "qwen2.5-14b": COEFFS}},
     "models.qwen2.5-3b.decode_base_s: expected a positive value, got nan"),
    ({"models": {"qwen2.5-3b": {**COEFFS, "prefill_per_token_s": -1e-4}, "qwen2.5-14b": COEFFS}},
     "models.qwen2.5-3b.prefill_per_token_s: expected a number >= 0, got -0.0001"),
    ({"read_bps": math.nan}, "read_bps: expected a positive value, got nan"),
    ({"h2d_bps": 0}, "h2d_bps: expected a positive value, got 0"),
    ({"unit_overhead_s": "fast"}, "unit_overhead_s: expected a number >= 0, got 'fast'"),
    ({"colour": 1}, "colour: unknown key; expected one of: device,"),
    ({"models": {"qwen2.5-3b": {**COEFFS, "decode_per_token_s": 1}, "qwen2.5-14b": COEFFS}},
     "models.qwen2.5-3b.decode_per_token_s: unknown key"),
    ({"models": {"qwen2.5-3b": {"prefill_base_s": 0.1}, "qwen2.5-14b": COEFFS}},
     "models.qwen2.5-3b.prefill_per_token_s: required"),
    ({"models": [1, 2]}, "models: expected a mapping of model name to coefficients"),
])
def test_a_bad_calibration_value_is_one_line_naming_the_dotted_key(tmp_path: Path, capsys, edit: dict,
                                                                  expected: str) -> None:
    assert run_with(tmp_path, yaml.safe_dump(calibration(**edit))) == 2
    err = one_line_error(capsys)
    assert f"cal.yaml: {expected}" in err, err
    assert not (tmp_path / "out").exists()  # found before any folder


def test_nan_written_as_yaml_and_1e300_written_plainly(tmp_path: Path, capsys) -> None:
    text = yaml.safe_dump(calibration()).replace("read_bps: 20000000000.0", "read_bps: .nan")
    assert run_with(tmp_path, text) == 2
    assert "read_bps: expected a positive value, got nan" in one_line_error(capsys)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(calibration()).replace("d2d_bps: 500000000000.0",
                                                                            "d2d_bps: 1e300"))
    assert Calibration.load(tmp_path / "c.yaml").d2d_bps == 1e300  # a number, as in experiment files


def test_binary_truncated_and_empty_calibration_files_are_one_line(tmp_path: Path, capsys) -> None:
    text = yaml.safe_dump(calibration())
    cases = [
        (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", "not a UTF-8 text file"),
        (text[: text.index("decode_base_s") + 6].encode(), "cal.yaml"),
        (b"", "expected a mapping of calibration keys"),
        (b"- a\n- b\n", "expected a mapping of calibration keys"),
        (b"h2d_bps: 1\nh2d_bps: 2\n", "duplicate key 'h2d_bps'"),
    ]
    for data, expected in cases:
        assert run_with(tmp_path, data) == 2, data
        err = one_line_error(capsys)
        assert expected in err and "NoneType" not in err and "Traceback" not in err, err


def test_a_model_the_calibration_does_not_cover_needs_calibration_partial(tmp_path: Path, capsys) -> None:
    partial = calibration(models={"qwen2.5-3b": COEFFS})
    assert run_with(tmp_path, yaml.safe_dump(partial)) == 2
    err = one_line_error(capsys)
    assert "no coefficients for model(s) qwen2.5-14b (it has: qwen2.5-3b)" in err and "--calibration-partial" in err
    assert not (tmp_path / "out").exists()
    assert run_with(tmp_path, yaml.safe_dump(partial), "--calibration-partial") == 0
    # cluster.time_model covers every model the calibration lacks
    assert run_with(tmp_path, yaml.safe_dump(partial), "--set", "cluster.time_model={decode_base_s: 0.02}",
                    "--force") == 0


def test_calibration_keys_follow_the_dataclass_fields(tmp_path: Path, monkeypatch) -> None:
    """A field added to Calibration is read without a hand-written list to update."""
    from tangram_sim.sim import timemodel

    @dataclasses.dataclass(slots=True)
    class Wider(timemodel.Calibration):
        nvlink_bps: float | None = None

    monkeypatch.setattr(timemodel, "Calibration", Wider)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(calibration(nvlink_bps=9e11)))
    assert Calibration.load(path).nvlink_bps == 9e11
    path.write_text(yaml.safe_dump(calibration(nvlink_bps=-1)))
    with pytest.raises(ConfigError, match="nvlink_bps: expected a positive value"):
        Calibration.load(path)
    assert dataclasses.fields(ModelCoefficients)  # the per-model keys come from there


# ------------------------------------------------------------------ 4. YAML that explodes
def alias_bomb(levels: int = 9, width: int = 10) -> str:
    lines = ["name: bomb", "a0: &a0 [" + ", ".join(["x"] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_before_it_expands(tmp_path: Path, capsys) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb())  # 10**9 values once expanded
    tracemalloc.start()
    t0 = time.perf_counter()
    assert main(["run", str(path), "--out", str(tmp_path / "o")]) == 2
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert time.perf_counter() - t0 < 10 and peak < 50 * 2**20
    assert "with its aliases (*name) expanded the document holds more than 1,000,000 values" in one_line_error(capsys)
    path.write_text("name: loop\nsweep: &s {seed: [*s]}\n")
    assert main(["run", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "inside its own anchor" in one_line_error(capsys)
    with pytest.raises(ConfigError, match="aliases"):  # from Python too
        bomb = ["x"] * 10
        for _ in range(8):
            bomb = [bomb] * 10
        prepare({**fast(), "description": bomb}, None)


def test_duplicate_keys_are_refused_with_their_lines(tmp_path: Path, capsys) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(yaml.safe_dump(fast()) + "seed: 8\n")
    assert main(["run", str(path), "--out", str(tmp_path / "o")]) == 2
    err = one_line_error(capsys)
    assert "malformed YAML: duplicate key 'seed' (first at line" in err and f"{path}:" in err
    with pytest.raises(ConfigError, match="duplicate key 'a'"):
        parse_set("systems.0.overrides={a: 1, a: 2}")
    base = "b: &b {x: 1, y: 2}\nc: {<<: *b, x: 3}\n"  # a merge key's values may be overridden
    (tmp_path / "m.yaml").write_text(base)
    assert load_yaml(tmp_path / "m.yaml")[0]["c"] == {"x": 3, "y": 2}


def test_a_sweep_larger_than_the_bound_says_how_many_jobs(tmp_path: Path, capsys) -> None:
    exp = write_exp(tmp_path, fast(sweep={"seed": list(range(20_000))}))
    t0 = time.perf_counter()
    assert main(["run", str(exp), "--out", str(tmp_path / "o")]) == 2
    err = one_line_error(capsys)
    assert "sweep: 20,000 point(s) x 2 system(s) = 40,000 jobs, more than 10,000" in err and "--max-jobs 40000" in err
    assert time.perf_counter() - t0 < 20 and not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match="= 4 jobs, more than 3"):
        prepare(fast(sweep={"seed": [1, 2]}), None, max_jobs=3)
    assert len(prepare(fast(sweep={"seed": [1, 2]}), None, max_jobs=4)[1]) == 2
    assert main(["run", str(exp), "--out", str(tmp_path / "o"), "--max-jobs", "0"]) == 2
    assert "--max-jobs: expected an integer >= 1" in one_line_error(capsys)


def test_an_experiment_file_of_megabytes_is_refused_unparsed(tmp_path: Path, capsys) -> None:
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(fast()) + "description: " + "x" * (9 << 20) + "\n")
    t0 = time.perf_counter()
    assert main(["run", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "an experiment file holds at most 8 MiB" in one_line_error(capsys)
    assert time.perf_counter() - t0 < 5


@pytest.mark.parametrize("key", ["models.0.name", "systems.0.preset", "cluster.gpu", "seed", "trace.kind",
                                 "cluster.tiers.ssd_gbps", "systems.0.overrides.retention", "colour"])
def test_a_huge_value_is_quoted_in_at_most_a_few_hundred_characters(tmp_path: Path, capsys, key: str) -> None:
    from tangram_sim.experiments.config import set_dotted

    raw = fast()
    set_dotted(raw, key, "q" * (20 << 20))  # 20 MB: the limit of the file is for files, not for Python
    tracemalloc.start()
    with pytest.raises(TangramError) as info:
        run_experiment(raw, None, tmp_path / "o", progress=False)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(str(info.value)) < 2200 and peak < 120 * 2**20, (len(str(info.value)), peak)
    assert "q" * 300 not in str(info.value)


def test_a_huge_description_is_not_copied_whole_into_the_report(tmp_path: Path) -> None:
    from tangram_sim.plots import write_report

    out = tmp_path / "o"
    run_experiment(fast(description="d" * 1_000_000), None, out, progress=False)
    report = write_report(out).read_text()
    assert len(report) < 50_000 and "1,000,000 characters in all; see config.yaml" in report


# ------------------------------------------------------------------ 5. compare
def _replay_like(sim: Path, folder: Path, experiment: Path) -> Path:
    """A folder that reads as the replay `sim` simulates: same requests, kind replay, experiment.sim.yaml."""
    shutil.copytree(sim, folder)
    record = json.loads((folder / "run.json").read_text())
    record["kind"] = "replay"
    (folder / "run.json").write_text(json.dumps(record))
    shutil.copy(experiment, folder / "experiment.sim.yaml")
    return folder


def test_compare_pairs_a_simulation_with_its_replay_only(tmp_path: Path, capsys) -> None:
    exp = write_exp(tmp_path, fast())
    sim, other = tmp_path / "sim", tmp_path / "other"
    assert main(["run", str(exp), "--out", str(sim), "--quiet"]) == 0
    assert main(["run", str(exp), "--out", str(other), "--quiet", "--set", "cluster.gpu_memory_gib=50"]) == 0
    replay = _replay_like(sim, tmp_path / "replay", exp)
    before = sorted(p.name for p in replay.iterdir())
    capsys.readouterr()
    assert main(["compare", str(replay), str(sim), "--no-plot"]) == 2  # swapped
    err = one_line_error(capsys)
    assert "the arguments are swapped" in err and f"tangram-sim compare {sim} {replay}" in err
    assert main(["compare", str(sim), str(other), "--no-plot"]) == 2  # two simulations
    assert "is a simulation (run.json kind run)" in one_line_error(capsys)
    assert main(["compare", str(sim), str(replay), "--no-plot", "--out", str(other)]) == 2  # into a run
    assert "holds a finished run (run.json)" in one_line_error(capsys)
    assert main(["compare", str(sim), str(replay), "--no-plot"]) == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err
    assert (tmp_path / "compare" / "sim-vs-replay" / "fidelity.csv").is_file()
    assert sorted(p.name for p in replay.iterdir()) == before and not (sim / "fidelity.csv").exists()
    assert main(["compare", str(other), str(replay), "--no-plot"]) == 0  # another cluster: said loudly
    err = capsys.readouterr().err
    assert err.startswith(f"warning: {other} was not simulated from {replay / 'experiment.sim.yaml'}")
    assert "differs in cluster.gpu_memory_gib" in err


# ------------------------------------------------------------------ a first hour without surprises
def test_pytest_says_why_tests_skip_and_readme_says_where_cpu_torch_comes_from() -> None:
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "-rs" in config["tool"]["pytest"]["ini_options"]["addopts"].split()
    assert "--index-url https://download.pytorch.org/whl/cpu" in (ROOT / "README.md").read_text()


def test_the_run_table_shows_swept_values_and_significant_digits(tmp_path: Path, capsys) -> None:
    exp = write_exp(tmp_path, fast(sweep={"trace.rate": [0.5, 1.0]},
                                   cluster={"gpus_per_node": 1, "gpu_memory_gib": 60, "gpu": "h200-141gb"},
                                   models=["qwen2.5-3b"]))
    assert main(["run", str(exp), "--out", str(tmp_path / "o"), "--jobs", "1"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header[:3] == ["system", "point", "trace.rate"] and "slo_ttft_0.5s" not in header
    summary = pd.read_csv(tmp_path / "o" / "summary.csv")
    for value in summary["mean_load_s"]:  # 4 significant digits, whatever the scale
        assert f" {value:.4g} " in out
    from tangram_sim.cli.run_cmd import _print_table

    _print_table(summary.assign(mean_load_s=summary["mean_load_s"] * 1e-5))  # a CPU replay's microseconds
    tiny = capsys.readouterr().out
    assert " 0.000 " not in tiny and f"{summary['mean_load_s'][0] * 1e-5:.4g}" in tiny


def test_the_tune_table_leaves_blank_what_a_trial_does_not_use(capsys) -> None:
    from types import SimpleNamespace

    from tangram_sim.cli.tune_cmd import _print_front

    front = pd.DataFrame({"trial": [3, 7], "fairness": ["fixed", "adaptive"], "fairness_window_s": [5.123456, 9.0],
                          "fairness_bound_s": [60.0, 82.54321], "p50_ttft_s": [0.2093541, 0.21], "ties": [None, None]})
    record = {"params": ["fairness", "fairness_window_s", "fairness_bound_s"], "settings": {"objectives": ["p50_ttft_s"]}}
    _print_front(SimpleNamespace(front=front, record=record))
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert rows == [["3", "fixed", "5.123", "0.2094"], ["7", "adaptive", "82.54", "0.21"]]

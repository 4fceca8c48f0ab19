"""The Python API: the same run as the CLI, overrides checked like --set, results read back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tangram_sim import Experiment, Result, load_experiment
from tangram_sim.cli import main
from tangram_sim.errors import ConfigError

FAST = {  # two systems, two sweep points: a few seconds
    "name": "api-test",
    "seed": 3,
    "cluster": {"gpus_per_node": 1, "gpu_memory_gib": 60},
    "models": [{"name": "qwen2.5-3b"}, {"name": "llama-3-8b"}],
    "trace": {"kind": "synthetic", "n_requests": 40, "rate": 0.5},
    "systems": [{"name": "sllm", "preset": "serverlessllm"}, {"name": "tangram", "preset": "tangram"}],
    "sweep": {"trace.rate": [0.5, 1.0]},
    "outputs": {"plots": False},
}


def write_exp(tmp_path: Path, raw: dict | None = None) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw or FAST))
    return path


def test_api_run_equals_cli_run(tmp_path: Path) -> None:
    exp_path = write_exp(tmp_path)
    assert main(["run", str(exp_path), "--out", str(tmp_path / "cli"), "--quiet", "--jobs", "1",
                 "--set", "systems.1.overrides.keep_alive_s=60"]) == 0
    exp = load_experiment(exp_path).with_overrides({"systems.1.overrides.keep_alive_s": 60})
    result = exp.run(out=tmp_path / "api", progress=False)
    assert (tmp_path / "api/summary.csv").read_bytes() == (tmp_path / "cli/summary.csv").read_bytes()
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "api/requests.parquet"),
                                  pd.read_parquet(tmp_path / "cli/requests.parquet"))
    cli = pd.read_csv(tmp_path / "cli/summary.csv")
    pd.testing.assert_frame_equal(result.summary[cli.columns].reset_index(drop=True), cli, check_exact=False,
                                  check_dtype=False, rtol=1e-5)  # the CSV keeps 6 significant digits
    assert result.out_dir == tmp_path / "api" and result.record.complete
    config = yaml.safe_load((tmp_path / "api/config.yaml").read_text())
    assert config == yaml.safe_load((tmp_path / "cli/config.yaml").read_text())
    assert config["systems"][1]["overrides"] == {"keep_alive_s": 60}


def test_results_carry_system_point_and_sweep_columns(tmp_path: Path) -> None:
    result = load_experiment(write_exp(tmp_path)).run(out=tmp_path / "o", jobs=2, progress=False)
    requests = result.requests
    assert list(requests.columns[:3]) == ["system", "point", "trace.rate"]
    assert set(zip(requests["point"], requests["trace.rate"])) == {(0, 0.5), (1, 1.0)}
    assert len(requests) == 4 * 40 and set(requests["system"]) == {"sllm", "tangram"}
    assert list(result.summary["trace.rate"]) == [0.5, 0.5, 1.0, 1.0]
    assert set(result.timeline["system"]) == {"sllm", "tangram"}
    again = Result.load(tmp_path / "o")  # a finished run folder, read back
    pd.testing.assert_frame_equal(again.requests, requests)
    assert again.sweep_keys == ["trace.rate"]


def test_overrides_are_validated_like_set(tmp_path: Path) -> None:
    exp = load_experiment(write_exp(tmp_path))
    cases = {
        "cluster.gpu_memory_gib": (-1, "cluster.gpu_memory_gib: expected a positive value, got -1"),
        "systems.1.overrides.keep_alive_s": ("soon", "systems.1.overrides.keep_alive_s: expected float"),
        "cluster.gpu_memroy_gib": (48, "cluster.gpu_memroy_gib: unknown key"),
        "systems.5.preset": ("tangram", "systems.5.preset: systems.5 is not an existing list item"),
        "systems.0.overrides.retention": ("lruu", "systems.0.retention: unknown retention policy 'lruu'"),
    }
    for key, (value, message) in cases.items():
        with pytest.raises(ConfigError) as info:
            exp.with_overrides({key: value})
        assert str(info.value).startswith(message) and "\n" not in str(info.value)
    # text overrides are --set's; the experiment itself is never changed
    text = exp.with_overrides(["cluster.gpu_memory_gib=48", "systems.1.overrides={keep_alive_s: 5e1}"])
    pairs = exp.with_overrides({"cluster.gpu_memory_gib": 48, "systems.1.overrides": {"keep_alive_s": 50.0}})
    assert text.config() == pairs.config()
    assert pairs.config()["cluster"]["gpu_memory_gib"] == 48 and exp.config()["cluster"]["gpu_memory_gib"] == 60
    assert exp.overrides == () and exp.raw["cluster"]["gpu_memory_gib"] == 60
    assert exp.points() == [{"trace.rate": 0.5}, {"trace.rate": 1.0}] and exp.name == "api-test"
    unchecked = exp.with_overrides({"cluster.gpu_memory_gib": -1}, validate=False)  # checked when it runs
    with pytest.raises(ConfigError, match="cluster.gpu_memory_gib"):
        unchecked.run(out=tmp_path / "bad", progress=False)
    with pytest.raises(ConfigError, match="jobs"):
        exp.run(out=tmp_path / "bad", jobs=0)


def test_experiment_from_a_dict_and_a_temporary_folder(tmp_path: Path) -> None:
    raw = json.loads(json.dumps(FAST))
    raw.pop("sweep")
    raw["systems"] = raw["systems"][1:]
    result = Experiment.from_dict(raw).run(progress=False)  # out=None: a new temporary folder
    try:
        assert (result.out_dir / "run.json").is_file() and list(result.summary["system"]) == ["tangram"]
        assert list(result.requests.columns[:2]) == ["system", "point"]
    finally:
        import shutil

        shutil.rmtree(result.out_dir)


def test_importing_the_package_stays_light() -> None:
    code = ("import sys, tangram_sim; heavy = [m for m in ('pandas', 'simpy', 'optuna', 'ray', 'tangram_sim.api') "
            "if m in sys.modules]; print(heavy); assert not heavy; "
            "from tangram_sim import load_experiment; assert 'tangram_sim.api' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


@pytest.mark.parametrize(
    ("plugins", "message"),
    [
        ("my_policy.py", "plugins: expected a list"),
        (["missing.py"], "plugins.0: path not found: 'missing.py'"),
        (["not a module"], "plugins.0: 'not a module' is neither a .py file nor a dotted module name"),
        (["no_such_module_xyz"], "plugins.0: cannot import 'no_such_module_xyz': ModuleNotFoundError"),
        (["broken.py"], "plugins.0: cannot import"),
    ],
)
def test_plugin_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], plugins: object,
                                    message: str) -> None:
    (tmp_path / "broken.py").write_text("raise RuntimeError('half\\nwritten')\n")
    raw = {**FAST, "plugins": plugins}
    assert main(["run", str(write_exp(tmp_path, raw)), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err

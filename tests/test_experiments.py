"""Experiment YAML validation, sweeps, the runner's outputs, and local vs Ray backends."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tangram_sim.cli import main
from tangram_sim.errors import ConfigError
from tangram_sim.experiments.config import apply_point, load_yaml, set_dotted, sweep_points, validate
from tangram_sim.experiments.runner import run_experiment

ROOT = Path(__file__).resolve().parents[1]
CODE_TRACE = ROOT / "traces/azure_llm_2023/AzureLLMInferenceTrace_code.csv"

ISSUE_EXAMPLE = """\
name: azure-code-2gpu
seed: 7
cluster: {nodes: 1, gpus_per_node: 2, gpu: a100-80gb, gpu_memory_gib: 40}
models:
  - name: qwen2.5-3b
  - name: llama-3-8b
    sensitivity: 2
trace:
  kind: azure-llm            # azure-llm | azure-functions | servegen | table | synthetic
  path: traces/azure_llm_2023/AzureLLMInferenceTrace_code.csv
  mapping: {kind: zipf, alpha: 1.0}
  max_requests: 1500
systems:
  - {name: sllm, preset: serverlessllm}
  - {name: tangram, preset: tangram}
  - {name: tangram-lru, preset: tangram, overrides: {retention: lru}}
sweep:
  cluster.gpus_per_node: [1, 2, 4]
"""


def small(**changes: object) -> dict:
    raw = {
        "name": "t",
        "seed": 3,
        "cluster": {"gpus_per_node": 2, "gpu_memory_gib": 40},
        "models": [{"name": "qwen2.5-3b"}, {"name": "llama-3-8b"}],
        "trace": {"kind": "azure-llm", "path": str(CODE_TRACE), "mapping": {"kind": "zipf", "alpha": 1.0},
                  "max_requests": 200, "rate_scale": 0.2},
        "systems": [{"name": "sllm", "preset": "serverlessllm"}, {"name": "tangram", "preset": "tangram"}],
        "outputs": {"plots": False},
    }
    for key, value in changes.items():
        set_dotted(raw, key, value)
    return raw


def test_the_issue_example_runs_as_is_from_the_repository_root(tmp_path: Path, monkeypatch) -> None:
    exp = tmp_path / "exp.yaml"
    exp.write_text(ISSUE_EXAMPLE)
    monkeypatch.chdir(ROOT)  # the trace path resolves against the YAML's folder first, then here
    assert main(["run", str(exp), "--out", str(tmp_path / "out"), "--no-plots", "--quiet", "--jobs", "1"]) == 0
    summary = pd.read_csv(tmp_path / "out/summary.csv")
    assert len(summary) == 9  # 3 systems x 3 sweep points
    assert list(summary["cluster.gpus_per_node"].unique()) == [1, 2, 4]
    for column in ["system", "requests", "completed", "mean_ttft_s", "p50_ttft_s", "p99_ttft_s", "mean_load_s",
                   "bytes_loaded", "io_reduction", "full_hit_ratio", "request_resident_ratio",
                   "request_bytes_from_gpu", "mean_load_per_request_s"]:
        assert column in summary.columns
    assert (summary.requests == 1500).all()
    resolved = yaml.safe_load((tmp_path / "out/config.yaml").read_text())
    assert resolved["sweep"] == {"cluster.gpus_per_node": [1, 2, 4]}
    assert resolved["models"][1]["sensitivity"] == 2.0
    requests = pd.read_parquet(tmp_path / "out/requests.parquet")
    assert len(requests) == 9 * 1500 and set(requests.outcome) <= {"completed", "rejected"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: x\nseed: [1\n", r"exp.yaml:\d+:\d+: malformed YAML"),
        ("- just a list\n", "expected a mapping"),
        ("name: x\ncluster: {gpus: 2}\n", "cluster.gpus: unknown key"),
    ],
)
def test_malformed_yaml_and_unknown_keys(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        raw, base = load_yaml(path)
        validate(raw, base)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("cluster.gpus_per_node", "two", r"cluster.gpus_per_node: expected an integer"),
        ("cluster.gpu", "tpu-v5", r"cluster.gpu: unknown GPU 'tpu-v5'"),
        ("cluster.tiers.ssd_gbps", -1, r"cluster.tiers.ssd_gbps: expected a positive value"),
        ("models.1.sensitivity", "high", r"models.1.sensitivity: expected a number"),
        ("models.0.colour", "red", r"models.0.colour: unknown key"),
        ("systems.1.preset", "magic", r"systems.1.preset: unknown preset 'magic'"),
        ("systems.1.overrides", {"retention": "fifo"}, r"systems.1.retention: unknown retention policy 'fifo'"),
        ("systems.0.overrides", {"keep_alive_secs": 3}, r"systems.0.overrides.keep_alive_secs: unknown system field"),
        ("systems.0.overrides", {"keep_alive": 3}, r"systems.0.overrides.keep_alive: expected str, got 3"),
        ("outputs.sample_interval_s", "often", r"outputs.sample_interval_s"),
        ("name", "", r"name: expected a non-empty string"),
    ],
)
def test_wrong_types_name_the_dotted_path(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(small(**{key: value}), None)


def test_sweep_expansion_is_a_grid_in_order() -> None:
    raw = small()
    raw["sweep"] = {"cluster.gpus_per_node": [1, 2], "trace.mapping.alpha": [0, 4, 8]}
    points = sweep_points(raw)
    assert len(points) == 6
    assert points[0] == {"cluster.gpus_per_node": 1, "trace.mapping.alpha": 0}
    assert points[-1] == {"cluster.gpus_per_node": 2, "trace.mapping.alpha": 8}
    config = apply_point(raw, points[4])
    assert config["cluster"]["gpus_per_node"] == 2 and config["trace"]["mapping"]["alpha"] == 4
    assert "sweep" not in config and raw["trace"]["mapping"]["alpha"] == 1.0  # the original is untouched
    with pytest.raises(ConfigError, match="sweep.cluster.gpus_per_node"):
        sweep_points({**raw, "sweep": {"cluster.gpus_per_node": 3}})


def test_runs_are_reproducible_and_cli_set_overrides(tmp_path: Path) -> None:
    a = run_experiment(small(), None, tmp_path / "a", progress=False)
    b = run_experiment(small(), None, tmp_path / "b", progress=False, n_jobs=2)
    assert (tmp_path / "a/summary.csv").read_bytes() == (tmp_path / "b/summary.csv").read_bytes()
    c = run_experiment(small(), None, tmp_path / "c", progress=False, sets=["seed=4"])
    assert not a.equals(c)
    assert b.loc[b.system == "tangram", "bytes_loaded"].item() < b.loc[b.system == "sllm", "bytes_loaded"].item()


def test_ray_backend_gives_the_same_summary_as_local(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    raw = small()
    raw["sweep"] = {"trace.mapping.alpha": [0.5, 2.0]}
    run_experiment(raw, None, tmp_path / "local", progress=False, n_jobs=2)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        run_experiment(raw, None, tmp_path / "ray", progress=False, backend="ray", n_jobs=2)
    finally:
        ray.shutdown()
    assert (tmp_path / "local/summary.csv").read_bytes() == (tmp_path / "ray/summary.csv").read_bytes()
    local = pd.read_parquet(tmp_path / "local/requests.parquet")
    remote = pd.read_parquet(tmp_path / "ray/requests.parquet")
    pd.testing.assert_frame_equal(local, remote)


def test_cli_reports_user_errors_in_one_line(tmp_path: Path, capsys) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(textwrap.dedent(ISSUE_EXAMPLE).replace("preset: tangram}", "preset: tangarm}"))
    assert main(["run", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: systems.1.preset: unknown preset 'tangarm'") and "\n" not in err
    assert main(["run", str(tmp_path / "missing.yaml"), "--quiet"]) == 2
    assert "experiment file not found" in capsys.readouterr().err


def test_bad_trace_rows_stop_the_run_or_are_skipped_and_counted(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "t.csv"
    bad.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.9799600,4808,10\n"
                   "2023-11-16 18:17:04.0319600,abc,8\n2023-11-16 18:17:04.0781490,110,27\n")
    exp = tmp_path / "e.yaml"
    exp.write_text(yaml.safe_dump({"name": "bad", "models": ["qwen2.5-3b"],
                                   "trace": {"kind": "azure-llm", "path": "t.csv", "mapping": {"kind": "round-robin"}},
                                   "systems": [{"name": "t", "preset": "tangram"}]}))
    assert main(["run", str(exp), "--out", str(tmp_path / "o"), "--quiet", "--no-plots"]) == 2
    assert "t.csv:3: column 'ContextTokens': expected integer" in capsys.readouterr().err
    assert main(["run", str(exp), "--out", str(tmp_path / "o"), "--quiet", "--no-plots", "--skip-bad-rows"]) == 0
    assert "skipped 1 malformed trace row" in capsys.readouterr().out
    assert pd.read_csv(tmp_path / "o/summary.csv").requests.item() == 2

"""`tangram-sim tune`: seeded searches, the Pareto front, --resume, one-line errors, and Ray Tune."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

pytest.importorskip("optuna")

from tangram_sim import load_experiment  # noqa: E402
from tangram_sim.cli import main  # noqa: E402
from tangram_sim.errors import ConfigError  # noqa: E402
from tangram_sim.tune.space_file import parse_space  # noqa: E402
from tangram_sim.tune.trial import TrialRunner  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = {  # 4 models on one 40 GiB GPU: policies matter; ~0.3 s a trial
    "name": "tune-test",
    "seed": 3,
    "cluster": {"gpus_per_node": 1, "gpu_memory_gib": 40},
    "models": [{"name": "qwen2.5-3b"}, {"name": "llama-3-8b"}, {"name": "phi-3-mini-4k"}, {"name": "yi-9b"}],
    "trace": {"kind": "synthetic", "n_requests": 80, "rate": 0.3},
    "systems": [{"name": "tangram", "preset": "tangram"}],
}
SPACE = {
    "base": "tangram",
    "params": {
        "retention": {"choices": ["tangram", "lru", "lfu", "gdsf"]},
        "scheduler": {"choices": ["tangram-affinity", "ttft-aware"]},
        "keep_alive_s": {"low": 5, "high": 120, "log": True},
        "unit_divisor": {"choices": [0, 20, 40, 80]},
    },
}
TWO = ["--objective", "p50_ttft_s", "--objective", "mean_load_per_request_s"]


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    exp, space = tmp_path / "exp.yaml", tmp_path / "space.yaml"
    exp.write_text(yaml.safe_dump(TINY))
    space.write_text(yaml.safe_dump(SPACE, sort_keys=False))
    return exp, space


def tune(files: tuple[Path, Path], out: Path, *extra: str, trials: int = 8, objectives: list[str] = TWO) -> int:
    exp, space = files
    return main(["tune", str(exp), "--space", str(space), *objectives, "--trials", str(trials), "--out", str(out),
                 "--quiet", *extra])


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err.strip()


def read(out: Path, name: str) -> bytes:
    return (out / name).read_bytes()


def dominates(a: list[float], b: list[float]) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


# ------------------------------------------------------------------ seeded, multi-objective
def test_same_seed_same_trials_and_front(files: tuple[Path, Path], tmp_path: Path) -> None:
    assert tune(files, tmp_path / "a", "--seed", "5") == 0
    assert tune(files, tmp_path / "b", "--seed", "5") == 0
    for name in ("trials.csv", "front.csv", "best-systems.yaml"):
        assert read(tmp_path / "a", name) == read(tmp_path / "b", name), name
    assert tune(files, tmp_path / "c", "--seed", "6") == 0
    assert read(tmp_path / "a", "trials.csv") != read(tmp_path / "c", "trials.csv")
    trials = pd.read_csv(tmp_path / "a/trials.csv")
    assert list(trials["trial"]) == list(range(8)) and set(trials["state"]) == {"complete"}
    assert list(trials.columns) == ["trial", "state", "front", "retention", "scheduler", "keep_alive_s",
                                    "unit_divisor", "p50_ttft_s", "mean_load_per_request_s", "error"]
    # trial 0 is the base system (the tangram preset), a reference point
    assert trials.loc[0, ["retention", "scheduler", "keep_alive_s", "unit_divisor"]].tolist() == [
        "tangram", "tangram-affinity", 30.0, 40]
    record = json.loads(read(tmp_path / "a", "tune.json"))
    assert record["status"] == "complete" and record["trials"]["done"] == 8 and record["base_trial"] == 0
    for name in ("config.yaml", "space.yaml", "study.db", "front.png", "timings.csv"):
        assert (tmp_path / "a" / name).is_file() and name in record["files"]


def test_multi_objective_front_is_non_dominated(files: tuple[Path, Path], tmp_path: Path) -> None:
    objectives = ["--objective", "p50_ttft_s", "--objective", "p99_ttft_s", "--objective",
                  "max:request_bytes_from_gpu"]
    assert tune(files, tmp_path / "o", trials=10, objectives=objectives) == 0
    trials = pd.read_csv(tmp_path / "o/trials.csv")
    signs = {"p50_ttft_s": 1, "p99_ttft_s": 1, "request_bytes_from_gpu": -1}  # max: compared negated
    points = {int(r.trial): [signs[c] * r[c] for c in signs] for _, r in trials.iterrows()}
    front = set(trials.loc[trials["front"], "trial"])
    assert front
    for i in points:  # on the front exactly when no trial dominates it (as trials.csv writes the values)
        assert (i in front) == (not any(dominates(points[j], points[i]) for j in points))
    shown = pd.read_csv(tmp_path / "o/front.csv", dtype={"ties": str})
    ties = {int(t) for text in shown["ties"].dropna() for t in text.split()}
    assert set(shown["trial"]) | ties == front and not set(shown["trial"]) & ties  # each tie listed once
    assert "mean_load_per_request_s" in shown.columns  # the front's other figures too
    assert len({tuple(points[i]) for i in shown["trial"]}) == len(shown)


def test_single_objective_best_system_pastes_into_an_experiment(files: tuple[Path, Path], tmp_path: Path) -> None:
    assert tune(files, tmp_path / "o", trials=6, objectives=["--objective", "p99_ttft_s"]) == 0
    trials = pd.read_csv(tmp_path / "o/trials.csv")
    best = trials.loc[trials["front"]]
    assert (best["p99_ttft_s"] == trials["p99_ttft_s"].min()).all()
    shown = pd.read_csv(tmp_path / "o/front.csv", dtype={"ties": str})
    assert len(shown) == 1 and shown["trial"].item() == best["trial"].min()  # the first of the ties
    assert sorted(int(t) for t in str(shown["ties"].fillna("").item()).split()) == sorted(best["trial"])[1:]
    systems = yaml.safe_load(read(tmp_path / "o", "best-systems.yaml"))
    assert [s["name"] for s in systems] == [f"tuned-{shown['trial'].item()}"]
    exp = load_experiment(files[0]).with_overrides({"systems": systems})  # valid as pasted
    assert exp.config()["systems"][0]["preset"] == "tangram"


# ------------------------------------------------------------------ resume and interruption
def test_resume_completes_to_n_as_an_uninterrupted_tune(files: tuple[Path, Path], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    assert tune(files, tmp_path / "ref") == 0
    assert tune(files, tmp_path / "part", trials=4) == 0
    assert len(pd.read_csv(tmp_path / "part/trials.csv")) == 4
    assert tune(files, tmp_path / "part", "--resume") == 0
    assert read(tmp_path / "part", "trials.csv") == read(tmp_path / "ref", "trials.csv")

    calls = []
    real = TrialRunner.__call__

    def interrupt_third(self: TrialRunner, sampled: dict) -> dict:
        calls.append(sampled)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, sampled)

    monkeypatch.setattr(TrialRunner, "__call__", interrupt_third)
    assert tune(files, tmp_path / "cut") == 130
    record = json.loads(read(tmp_path / "cut", "tune.json"))
    assert record["status"] == "interrupted" and record["trials"]["done"] == 2
    monkeypatch.setattr(TrialRunner, "__call__", real)
    assert tune(files, tmp_path / "cut", "--resume") == 0
    assert read(tmp_path / "cut", "trials.csv") == read(tmp_path / "ref", "trials.csv")
    assert read(tmp_path / "cut", "front.csv") == read(tmp_path / "ref", "front.csv")
    record = json.loads(read(tmp_path / "cut", "tune.json"))
    assert record["status"] == "complete" and record["trials"]["cut_short"] == [2]


def test_resume_with_another_configuration_is_refused(files: tuple[Path, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert tune(files, tmp_path / "o", trials=2) == 0
    capsys.readouterr()
    assert tune(files, tmp_path / "o", "--resume", "--seed", "9", trials=3) == 2
    assert "--resume: " in one_line_error(capsys)
    (tmp_path / "run").mkdir()
    (tmp_path / "run/summary.csv").write_text("x\n")
    assert tune(files, tmp_path / "run", trials=2) == 2
    assert "not a tune of 'tune-test'" in one_line_error(capsys)


def test_finished_trials_are_never_replaced_without_force(files: tuple[Path, Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "o"
    assert tune(files, out, trials=2) == 0
    first = read(out, "trials.csv")
    assert tune(files, out, trials=2) == 0  # the same configuration again, in place: the same trials
    assert read(out, "trials.csv") == first
    capsys.readouterr()
    assert tune(files, out, "--seed", "9", trials=2) == 2  # another configuration: refused, nothing touched
    err = one_line_error(capsys)
    assert f"{out} holds a complete tune of tune-test (complete, 2 trial(s), config sha256:" in err
    assert "--force to replace it" in err and read(out, "trials.csv") == first
    assert tune(files, out, "--seed", "9", "--resume", "--force", trials=2) == 2
    assert "--resume and --force together" in one_line_error(capsys)
    (out / "stray.txt").write_text("left by hand\n")
    assert tune(files, out, "--seed", "9", "--force", trials=2) == 0
    assert not (out / "stray.txt").exists()
    assert json.loads(read(out, "tune.json"))["settings"]["seed"] == 9

    real = TrialRunner.__call__
    calls = []

    def interrupt_second(self: TrialRunner, sampled: dict) -> dict:
        calls.append(sampled)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, sampled)

    monkeypatch.setattr(TrialRunner, "__call__", interrupt_second)
    assert tune(files, tmp_path / "cut", trials=4) == 130
    monkeypatch.setattr(TrialRunner, "__call__", real)
    capsys.readouterr()
    assert tune(files, tmp_path / "cut", trials=4) == 2  # an unfinished tune: --resume or --force
    err = one_line_error(capsys)
    assert "holds an unfinished tune of tune-test (interrupted, 1 trial(s)" in err and "--resume to continue" in err
    assert tune(files, tmp_path / "cut", "--seed", "9", trials=4) == 2
    assert "--resume cannot continue it" in one_line_error(capsys)


def test_failed_trials_are_recorded_and_counted(files: tuple[Path, Path], tmp_path: Path) -> None:
    space = {"base": "tangram", "params": {"cluster.gpu_memory_gib": {"choices": [8, 40]},
                                           "retention": {"choices": ["lru", "gdsf"]}}}
    files[1].write_text(yaml.safe_dump(space))
    assert tune(files, tmp_path / "o", trials=6, objectives=["--objective", "p50_ttft_s"]) == 0
    trials = pd.read_csv(tmp_path / "o/trials.csv")
    assert len(trials) == 6
    assert json.loads(read(tmp_path / "o", "tune.json"))["base_trial"] is None  # tangram retention is no choice
    failed = trials[trials["state"] == "failed"]
    assert set(failed["cluster.gpu_memory_gib"]) <= {8} and failed["error"].str.contains("needs").all()
    assert (trials.loc[trials["front"], "cluster.gpu_memory_gib"] == 40).all()
    assert "# found with the cluster keys cluster.gpu_memory_gib=40" in (tmp_path / "o/best-systems.yaml").read_text()


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"retentoin": {"choices": ["lru"]}}, "params.retentoin: not a system field"),
        ({"retention": {"choices": ["lruu"]}}, "params.retention.choices: unknown retention policy 'lruu'"),
        ({"keep_alive_s": {"low": 10, "high": 5}}, "params.keep_alive_s: expected low < high"),
        ({"keep_alive_s": {"low": 0, "high": 5, "log": True}}, "params.keep_alive_s.low: a log range needs low > 0"),
        ({"keep_alive_s": {"low": -5, "high": 5}}, "params.keep_alive_s.low: expected a number >= 0, got -5.0"),
        ({"retention": {"low": 1, "high": 2}}, "params.retention: retention is not a number field"),
        ({"keep_alive_s": {"choice": [1]}}, "params.keep_alive_s.choice: unknown key"),
        ({"cluster.gpu_memroy_gib": {"choices": [24]}}, "params.cluster.gpu_memroy_gib.choices: 24: "
                                                        "cluster.gpu_memroy_gib: unknown key"),
        ({"keep_alive_s": {"choices": "all"}}, "params.keep_alive_s.choices: 'all' needs a policy field"),
        ({"multicast": {"choices": ["tree"]}}, "params.multicast.choices: expected one of none, chain, binomial, "
                                               "got 'tree'"),
        ({"source": {"choices": ["nearest"]}}, "params.source.choices: unknown source policy 'nearest'"),
        ({"pipeline_params.k": {"low": 2, "high": 4, "when": "pipelined"}},
         "params.pipeline_params.k.when: expected a pipeline policy: fixed, none, slo; got 'pipelined'"),
        ({"handoff": {"choices": ["eager"], "when": {"execute_while_lod": True}}},
         "params.handoff.when.execute_while_lod: not a system field; expected one of: "),
        ({"handoff": {"choices": ["eager"], "when": {"pipeline": "pipelined"}}},
         "params.handoff.when.pipeline: unknown pipeline policy 'pipelined'"),
        ({"handoff": {"choices": ["eager"], "when": {"handoff": "eager"}}},
         "params.handoff.when.handoff: a key cannot be conditioned on itself"),
        ({"handoff": {"choices": ["eager"], "when": {"execute_while_load": []}}},
         "params.handoff.when.execute_while_load: expected a value or a non-empty list of values"),
        ({"handoff": {"choices": ["eager"]}}, "params.handoff.choices: a live handoff serves a cold start"),
        ({"handoff": {"choices": ["eager"], "when": {"execute_while_load": True}},
          "execute_while_load": {"choices": [True, False], "when": {"handoff": "none"}}},
         "params.execute_while_load.when: the conditions form a cycle (execute_while_load -> handoff -> "
         "execute_while_load)"),
        ({"cluster.gpu_memory_gib": {"choices": [40, 80], "when": {"handoff": "none"}}},
         "params.cluster.gpu_memory_gib.when: not for a cluster key"),
        ({}, "params: expected a mapping of at least one"),
    ],
)
def test_a_bad_space_is_one_line_naming_the_key(files: tuple[Path, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str], params: dict,
                                                message: str) -> None:
    files[1].write_text(yaml.safe_dump({"base": "tangram", "params": params}))
    assert tune(files, tmp_path / "o", trials=2) == 2
    err = one_line_error(capsys)
    assert err.startswith(f"error: {files[1]}: {message}"), err
    assert not (tmp_path / "o").exists()  # refused before anything is written


def test_bad_objectives_and_base(files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert tune(files, tmp_path / "o", objectives=["--objective", "p50_ttft"]) == 2
    assert one_line_error(capsys).startswith("error: --objective 'p50_ttft': not a summary column")
    assert tune(files, tmp_path / "o", objectives=["--objective", "best:p50_ttft_s"]) == 2
    assert "expected COLUMN, min:COLUMN or max:COLUMN" in one_line_error(capsys)
    files[1].write_text(yaml.safe_dump({**SPACE, "base": "tangarm"}))
    assert tune(files, tmp_path / "o") == 2
    assert "base: 'tangarm' is neither a preset" in one_line_error(capsys)


def test_missing_optuna_names_the_extra(files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna -> ImportError
    assert tune(files, tmp_path / "o") == 2
    assert one_line_error(capsys) == ("error: tangram-sim tune needs the 'tune' extra (Optuna): "
                                      "pip install -e '.[tune]'")


def test_choices_all_reads_the_registries_with_the_experiments_plugins(tmp_path: Path) -> None:
    raw = {**TINY, "plugins": [str(ROOT / "examples/my_policy.py")]}
    exp = load_experiment(_write(tmp_path / "exp.yaml", raw))
    space = parse_space({"params": {"retention": {"choices": "all", "exclude": ["belady", "none"]},
                                    "packing": {"choices": "all"}}}, exp)
    retention, packing = space.params
    assert "largest-first" in retention.choices and "belady" not in retention.choices
    assert {"pbp", "first-fit", "compact-if-fragmented"} <= set(packing.choices)
    # a name no longer registered (renamed, removed) is ignored: the space still runs
    space = parse_space({"params": {"retention": {"choices": "all", "exclude": ["lru", "no-such-policy"]}}}, exp)
    assert "lru" not in space.params[0].choices and "lfu" in space.params[0].choices
    with pytest.raises(ConfigError, match="params.retention.exclude: expected a list of names"):
        parse_space({"params": {"retention": {"choices": "all", "exclude": "lru"}}}, exp)
    # a policy's parameter, searched with that policy fixed
    space = parse_space({"overrides": {"retention": "decayed-frequency"},
                         "params": {"retention_params.half_life_s": {"low": 60, "high": 3600, "log": True}}}, exp)
    entry = space.system_entry({"retention_params.half_life_s": 120.0})
    assert entry["overrides"] == {"retention": "decayed-frequency", "retention_params": {"half_life_s": 120.0}}


SCALEOUT = {  # 2 nodes x 2 GPUs, one model, a burst that needs several instances at once: ~0.5 s a trial
    "name": "tune-scaleout-test",
    "seed": 5,
    "cluster": {"nodes": 2, "gpus_per_node": 2, "gpu": "a100-80gb", "topology": {"nvlink_gbps": 300, "rdma": True},
                "tiers": {"host_cache_gib": 64, "ssd_gbps": 6, "network_gbps": 12.5}},
    "models": [{"name": "llama-3-8b"}],
    "trace": {"kind": "synthetic", "n_requests": 60, "rate": 4.0},
    "systems": [{"name": "tangram-plus", "preset": "tangram-plus"}],
}


def test_the_scaleout_space_searches_sources_multicast_and_pipelines(tmp_path: Path) -> None:
    from tangram_sim.policies.pipeline import PIPELINE
    from tangram_sim.policies.source import SOURCE
    from tangram_sim.sim.systems import make_system
    from tangram_sim.tune.space_file import load_space

    exp = load_experiment(_write(tmp_path / "exp.yaml", SCALEOUT))
    space = load_space(ROOT / "experiments/tune-space-scaleout.yaml", exp)
    params = {p.key: p for p in space.params}
    # choices: all reads the registries (and multicast's fixed names, which are no registry)
    assert set(params["source"].choices) == set(SOURCE.names()) >= {"tiers", "fastest", "gpu-first"}
    assert set(params["pipeline"].choices) == set(PIPELINE.names()) >= {"none", "fixed", "slo"}
    assert params["multicast"].choices == ("none", "chain", "binomial")
    assert (params["pipeline_params.k"].when, params["pipeline_params.ttft_s"].when) == ("fixed", "slo")
    assert space.preset == "tangram-plus"
    # the base system lies inside the space: tangram-plus is tiers, no multicast, no pipeline
    base = space.base_values(exp.config())
    assert base is not None and (base["source"], base["multicast"], base["pipeline"]) == ("tiers", "none", "none")
    # each pipeline policy gets its own parameters only, and makes a valid system
    values = {**base, "source": "fastest", "multicast": "binomial", "pipeline_params.k": 3,
              "pipeline_params.ttft_s": 1.5, "pipeline_params.max_k": 6}
    for pipeline, expected in (("fixed", {"k": 3}), ("slo", {"ttft_s": 1.5, "max_k": 6}), ("none", None)):
        entry = space.system_entry({**values, "pipeline": pipeline})
        assert entry["overrides"].get("pipeline_params") == expected
        spec = make_system(entry["name"], entry["preset"], entry["overrides"])
        assert (spec.source, spec.multicast, spec.pipeline) == ("fastest", "binomial", pipeline)
    space = parse_space({"base": "serverlessllm", "params": {"multicast": {"choices": "all", "exclude": ["none"]}}},
                        exp)
    assert space.params[0].choices == ("chain", "binomial")


def test_handoff_is_searched_only_where_execute_while_load_is_on_and_no_pipeline(tmp_path: Path) -> None:
    """A cross-field `when`: trials that draw a handoff simulate it only beside execute-while-load and no
    pipeline (the combination the system accepts); elsewhere they keep the base's `none`."""
    from tangram_sim.core.handoff import HANDOFF
    from tangram_sim.sim.systems import make_system
    from tangram_sim.tune.space_file import load_space

    exp = load_experiment(_write(tmp_path / "exp.yaml", SCALEOUT))
    space = load_space(ROOT / "experiments/tune-space-scaleout.yaml", exp)
    handoff = next(p for p in space.params if p.key == "handoff")
    assert set(handoff.choices) == set(HANDOFF) and handoff.conditions() == {
        "execute_while_load": (True,), "pipeline": ("none",)}
    base = space.base_values(exp.config())
    assert base is not None and base["handoff"] == "none"
    simulated = {}
    for ewl in (False, True):
        for pipeline in ("none", "fixed", "slo"):
            values = {**base, "execute_while_load": ewl, "pipeline": pipeline, "handoff": "eager"}
            entry = space.system_entry(values)
            spec = make_system(entry["name"], entry["preset"], entry["overrides"])  # always a valid system
            simulated[ewl, pipeline] = spec.handoff
    assert simulated == {(True, "none"): "eager", **{k: "none" for k in simulated if k != (True, "none")}}
    # a condition on a field the space does not search reads the base system: tangram-plus computes while
    # it loads, so the handoff alone is simulated in every trial
    lone = parse_space({"base": "tangram-plus", "params": {"handoff": {"choices": "all", "when": {
        "execute_while_load": True}}}}, exp)
    assert lone.applies(lone.params[0], {"handoff": "costed"})
    assert lone.system_entry({"handoff": "costed"})["overrides"] == {"handoff": "costed"}
    lone = parse_space({"base": "tangram", "params": {"handoff": {"choices": ["none"], "when": {
        "execute_while_load": [True]}}}}, exp)
    assert not lone.applies(lone.params[0], {"handoff": "none"})  # tangram does not compute while loading
    # the written space keeps the condition (trials.csv's space.yaml beside the results)
    assert handoff.to_dict()["when"] == {"execute_while_load": [True], "pipeline": ["none"]}
    # a tune: trials.csv shows the handoff only where it was simulated; best-systems.yaml's entries are valid
    space_file = _write(tmp_path / "space.yaml", {"base": "tangram-plus", "params": {
        "execute_while_load": {"choices": [False, True]},
        "handoff": {"choices": ["eager", "costed"], "when": {"execute_while_load": True}}}})
    out = tmp_path / "o"
    assert main(["tune", str(tmp_path / "exp.yaml"), "--space", str(space_file), "--objective", "p99_ttft_s",
                 "--objective", "gpu_seconds_per_request", "--trials", "6", "--seed", "1", "--out", str(out),
                 "--quiet"]) == 0
    trials = pd.read_csv(out / "trials.csv", keep_default_na=False)
    assert len(trials) == 6 and set(trials["execute_while_load"].astype(str)) == {"False", "True"}
    for _, row in trials.iterrows():
        assert (row["handoff"] in ("eager", "costed")) if str(row["execute_while_load"]) == "True" \
            else row["handoff"] == "", row.to_dict()
    for system in yaml.safe_load((out / "best-systems.yaml").read_text()):
        make_system(system["name"], system["preset"], system["overrides"])
        assert ("handoff" in system["overrides"]) == system["overrides"]["execute_while_load"]


def test_a_tune_over_sources_and_multicast_simulates_what_it_samples(tmp_path: Path) -> None:
    """Trials whose source reads peer GPUs take bytes from them; tiers-only trials take none (the bytes per
    source are objectives too)."""
    exp = _write(tmp_path / "exp.yaml", SCALEOUT)
    space = _write(tmp_path / "space.yaml", {"base": "tangram-plus", "params": {
        "source": {"choices": ["tiers", "gpu-first"]}, "multicast": {"choices": "all"}}})
    out = tmp_path / "o"
    assert main(["tune", str(exp), "--space", str(space), "--objective", "p99_ttft_s", "--objective",
                 "bytes_from_peer_gpu", "--objective", "bytes_from_ssd", "--trials", "6", "--seed", "3", "--out",
                 str(out), "--quiet"]) == 0
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 6 and set(trials["source"]) == {"tiers", "gpu-first"}
    assert set(trials["multicast"]) <= {"none", "chain", "binomial"}
    for _, row in trials.iterrows():
        peers = row["bytes_from_peer_gpu"]
        assert (peers > 0) if row["source"] == "gpu-first" else (peers == 0), (row["trial"], row["source"], peers)


def test_every_point_of_the_scaleout_space_is_a_valid_system(tmp_path: Path) -> None:
    """Whatever a sampler draws inside the scale-out space (every choice, both ends of every range), the
    trial system is one `make_system` accepts: the `when` conditions keep the handoff beside
    execute-while-load and no pipeline, and a pipeline's parameters with their own policy."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from tangram_sim.sim.systems import make_system
    from tangram_sim.tune.space_file import load_space

    exp = load_experiment(_write(tmp_path / "exp.yaml", SCALEOUT))
    space = load_space(ROOT / "experiments/tune-space-scaleout.yaml", exp)

    def draw(p):  # noqa: ANN001, ANN202
        if p.kind == "categorical":
            return st.sampled_from(p.choices)
        if p.kind == "int":
            return st.integers(int(p.low), int(p.high))
        return st.floats(p.low, p.high)

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.fixed_dictionaries({p.key: draw(p) for p in space.params}))
    def check(sampled: dict) -> None:
        values = space.values(sampled)
        entry = space.system_entry(values)
        spec = make_system(entry["name"], entry["preset"], entry["overrides"])
        assert (spec.handoff != "none") == (values["handoff"] != "none" and values["execute_while_load"]
                                            and values["pipeline"] == "none")

    check()


def _write(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


# ------------------------------------------------------------------ Ray Tune
def test_ray_backend_gives_the_same_front_twice_and_as_local(files: tuple[Path, Path], tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.tune.search.optuna")
    assert tune(files, tmp_path / "local", trials=6) == 0
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert tune(files, tmp_path / "ray1", "--backend", "ray", trials=6) == 0
        assert tune(files, tmp_path / "ray2", "--backend", "ray", trials=6) == 0
    finally:
        ray.shutdown()
    for name in ("trials.csv", "front.csv", "best-systems.yaml"):
        assert read(tmp_path / "ray1", name) == read(tmp_path / "ray2", name), name
        assert read(tmp_path / "ray1", name) == read(tmp_path / "local", name), name
    assert json.loads(read(tmp_path / "ray1", "tune.json"))["backend"] == "ray"

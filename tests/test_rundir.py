"""Run directories: output checks up front, per-job results, failing points, --resume, --force, Ctrl-C,
and plot/compare refusing incomplete runs."""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tangram_sim.cli import main
from tangram_sim.errors import CapacityError, TangramError
from tangram_sim.experiments import runner
from tangram_sim.experiments.runner import run_experiment
from tangram_sim.rundir import (
    JobKey,
    RunDirError,
    RunFailed,
    RunWriter,
    check_out_dir,
    concat_parquet,
    read_record,
    require_complete,
)

FAST = {  # two systems, one model too big for a 24 GiB GPU: a few seconds per run
    "name": "rundir-test",
    "seed": 3,
    "cluster": {"gpus_per_node": 1, "gpu_memory_gib": 60},
    "models": [{"name": "qwen2.5-3b"}, {"name": "qwen2.5-14b"}],
    "trace": {"kind": "synthetic", "n_requests": 40, "rate": 0.5},
    "systems": [{"name": "sllm", "preset": "serverlessllm"}, {"name": "tangram", "preset": "tangram"}],
    "outputs": {"plots": False},
}


def fast(**top: object) -> dict:
    raw = json.loads(json.dumps(FAST))
    raw.update(top)
    return raw


def write_exp(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / f"{raw['name']}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def count_jobs(monkeypatch: pytest.MonkeyPatch, interrupt_at: int | None = None) -> list[tuple[int, int]]:
    """Count the jobs the runner executes (serially, in this process); optionally Ctrl-C at job N."""
    executed: list[tuple[int, int]] = []
    real = runner.run_job

    def counting(job: runner.Job) -> runner.JobResult:
        if interrupt_at is not None and len(executed) == interrupt_at:
            raise KeyboardInterrupt
        executed.append((job.point, job.system))
        return real(job)

    monkeypatch.setattr(runner, "run_job", counting)
    return executed


# ------------------------------------------------------------------ the output location, up front
def test_out_that_is_a_file_is_refused_before_any_job(tmp_path: Path, capsys, monkeypatch) -> None:
    executed = count_jobs(monkeypatch)
    exp = write_exp(tmp_path, fast())
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["run", str(exp), "--out", str(afile)]) == 2
    assert "exists and is a file" in one_line_error(capsys)
    assert main(["run", str(exp), "--out", str(afile / "sub")]) == 2  # no folder can be made under a file
    assert "is a file, so no folder can be made" in one_line_error(capsys)
    assert executed == [] and afile.read_text() == "x"


def test_out_name_too_long_is_refused(tmp_path: Path, capsys) -> None:
    exp = write_exp(tmp_path, fast())
    assert main(["run", str(exp), "--out", str(tmp_path / ("x" * 300))]) == 2
    err = one_line_error(capsys)
    assert "is 300 bytes" in err and len(err) < 200


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only-mode folders; covered by the file case")
def test_out_in_an_unwritable_folder_is_refused(tmp_path: Path, capsys) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        exp = write_exp(tmp_path, fast())
        assert main(["run", str(exp), "--out", str(locked / "out")]) == 2
        assert "not writable" in one_line_error(capsys)
    finally:
        locked.chmod(0o700)


def test_check_out_dir_accepts_new_and_existing_folders(tmp_path: Path) -> None:
    check_out_dir(tmp_path)
    check_out_dir(tmp_path / "a" / "b")
    assert not (tmp_path / "a").exists()  # a check creates nothing


# ------------------------------------------------------------------ a failing point keeps the others
_RUN_JOB = runner.run_job


def _fail_point_two(job: runner.Job) -> runner.JobResult:
    """A job that fails only where the simulation finds it out (a config check would catch it first)."""
    if job.point == 2:
        raise CapacityError("model qwen2.5-14b ran out of memory at this point")
    return _RUN_JOB(job)


def test_a_failing_sweep_point_is_named_and_the_others_are_kept(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(runner, "run_job", _fail_point_two)  # forked workers inherit it
    exp = write_exp(tmp_path, fast(sweep={"cluster.gpu_memory_gib": [60, 50, 40]}))
    out = tmp_path / "out"
    assert main(["run", str(exp), "--out", str(out), "--jobs", "2"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: 2 of 6 job(s) failed: point 2 (cluster.gpu_memory_gib=40): model qwen2.5-14b "
                          "ran out") and "\n" not in err
    assert "results in" in captured.out and "run.json" in captured.out  # what was written is listed
    summary = pd.read_csv(out / "summary.csv")
    assert sorted(set(summary["point"])) == [0, 1] and len(summary) == 4
    assert set(pd.read_parquet(out / "requests.parquet")["point"]) == {0, 1}
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "failed" and record["complete"] is False
    assert record["points"] == {"total": 3, "done": [0, 1], "failed": [2]}
    assert {f["system"] for f in record["jobs"]["failed"]} == {"sllm", "tangram"}
    # plot and compare refuse it, in one line, with what to do
    assert main(["plot", str(out)]) == 2
    err = one_line_error(capsys)
    assert "incomplete run (failed, 4 of 6 job(s) done" in err and "--resume" in err


def test_run_experiment_raises_run_failed_with_the_record(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(runner, "run_job", _fail_point_two)
    raw = fast(sweep={"cluster.gpu_memory_gib": [60, 50, 40]})
    with pytest.raises(RunFailed) as info:
        run_experiment(raw, None, tmp_path / "o", progress=False)
    assert info.value.record.failures[0].label == "point 2 (cluster.gpu_memory_gib=40)"
    assert list(info.value.summary["point"]) == [0, 0, 1, 1]


def test_a_model_larger_than_the_gpu_is_one_line_before_any_folder(tmp_path: Path, capsys) -> None:
    exp = write_exp(tmp_path, fast(sweep={"cluster.gpu_memory_gib": [60, 24]}))
    out = tmp_path / "out"
    assert main(["run", str(exp), "--out", str(out)]) == 2
    err = one_line_error(capsys)
    assert err.startswith("error: point 1 (cluster.gpu_memory_gib=24): model qwen2.5-14b needs") and "--resume" not in err
    assert not out.exists()
    tp = write_exp(tmp_path, fast(models=[{"name": "qwen2.5-3b", "tensor_parallel": 2}]))
    assert main(["run", str(tp), "--out", str(out)]) == 2
    assert "tensor_parallel: 2 GPUs per instance, but a node has only 1" in one_line_error(capsys)
    assert not out.exists()


# ------------------------------------------------------------------ interruption and --resume
def test_resume_after_an_interruption_runs_only_the_missing_jobs(tmp_path: Path, capsys, monkeypatch) -> None:
    raw = fast(sweep={"trace.rate": [0.5, 1.0]})
    ref = tmp_path / "ref"
    run_experiment(raw, None, ref, progress=False)

    out = tmp_path / "out"
    executed = count_jobs(monkeypatch, interrupt_at=3)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(raw, None, out, progress=False)
    assert executed == [(0, 0), (0, 1), (1, 0)]
    record = read_record(out)
    assert record is not None and record.status == "interrupted" and len(record.jobs_done) == 3
    assert not (out / "summary.csv").exists()  # nothing that looks complete
    assert sorted(p.name for p in (out / "jobs").iterdir()) == ["p0000-s000", "p0000-s001", "p0001-s000"]
    with pytest.raises(RunDirError, match="interrupted"):
        require_complete(out)
    assert main(["plot", str(out)]) == 2
    assert "incomplete run (interrupted, 3 of 4 job(s) done)" in one_line_error(capsys)

    executed.clear()
    monkeypatch.setattr(runner, "run_job", runner.run_job)  # keep counting, no interruption
    executed = count_jobs(monkeypatch)
    run_experiment(raw, None, out, progress=False, resume=True)
    assert executed == [(1, 1)]
    assert (out / "summary.csv").read_bytes() == (ref / "summary.csv").read_bytes()
    pd.testing.assert_frame_equal(pd.read_parquet(out / "requests.parquet"), pd.read_parquet(ref / "requests.parquet"))
    record = require_complete(out)
    assert record.jobs_resumed == 3 and not (out / "jobs").exists()

    executed.clear()  # a complete run: nothing to resume
    run_experiment(raw, None, out, progress=False, resume=True)
    assert executed == []


def test_resume_with_another_configuration_is_refused(tmp_path: Path, capsys, monkeypatch) -> None:
    exp = write_exp(tmp_path, fast())
    out = tmp_path / "out"
    count_jobs(monkeypatch, interrupt_at=1)
    assert main(["run", str(exp), "--out", str(out), "--quiet", "--jobs", "1"]) == 130  # Ctrl-C
    capsys.readouterr()
    assert main(["run", str(exp), "--out", str(out), "--quiet", "--resume", "--set", "seed=4"]) == 2
    assert "--resume: " in one_line_error(capsys) and read_record(out).status == "interrupted"


def test_resume_refuses_a_run_whose_presets_now_mean_something_else(tmp_path: Path, capsys, monkeypatch) -> None:
    from tangram_sim.sim import systems

    exp = write_exp(tmp_path, fast())
    out = tmp_path / "out"
    count_jobs(monkeypatch, interrupt_at=1)
    assert main(["run", str(exp), "--out", str(out), "--quiet", "--jobs", "1"]) == 130
    capsys.readouterr()
    changed = {name: dict(values, keep_alive_s=1.0) for name, values in systems.PRESETS.items()}
    monkeypatch.setattr(systems, "PRESETS", changed)  # same YAML, other expansion of its presets
    assert main(["run", str(exp), "--out", str(out), "--quiet", "--resume"]) == 2
    assert "another configuration" in one_line_error(capsys)


def test_ctrl_c_stops_the_worker_processes(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(runner, "run_job", _interrupt_first_job_sleep_others)
    raw = fast(sweep={"trace.rate": [0.5, 1.0]})
    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        run_experiment(raw, None, tmp_path / "o", progress=False, n_jobs=2)
    assert time.perf_counter() - t0 < 20  # the sleeping jobs were not waited for
    assert multiprocessing.active_children() == []
    assert read_record(tmp_path / "o").status == "interrupted"


def _interrupt_first_job_sleep_others(job: runner.Job) -> runner.JobResult:
    if (job.point, job.system) == (0, 0):
        raise KeyboardInterrupt
    time.sleep(120)
    raise AssertionError("not stopped")


# ------------------------------------------------------------------ non-empty --out, --force
def test_a_foreign_non_empty_out_needs_force(tmp_path: Path, capsys) -> None:
    exp = write_exp(tmp_path, fast())
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["run", str(exp), "--out", str(out), "--quiet"]) == 2
    assert "not a run of 'rundir-test'" in one_line_error(capsys) and (out / "notes.txt").exists()
    assert main(["run", str(exp), "--out", str(out), "--quiet", "--force"]) == 0
    assert not (out / "notes.txt").exists() and require_complete(out).complete
    # a run of another experiment is refused too; the same experiment may be run again into it
    assert main(["run", str(write_exp(tmp_path, fast(name="other"))), "--out", str(out), "--quiet"]) == 2
    assert "holds the run of 'rundir-test'" in one_line_error(capsys)
    assert main(["run", str(exp), "--out", str(out), "--quiet"]) == 0  # the same configuration again
    assert main(["run", str(exp), "--out", str(out), "--quiet", "--set", "seed=5"]) == 2  # finished work
    assert "holds a complete run of rundir-test" in one_line_error(capsys)


def test_a_run_folder_of_an_older_version_is_rerun_in_place(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_experiment(fast(), None, out, progress=False)
    before = (out / "summary.csv").read_bytes()
    (out / "run.json").unlink()  # as written before run.json existed
    (out / "plots").mkdir()
    (out / "plots" / "sweep.png").write_bytes(b"stale")
    run_experiment(fast(), None, out, progress=False)
    assert (out / "summary.csv").read_bytes() == before
    assert not (out / "plots" / "sweep.png").exists() and require_complete(out).complete


# ------------------------------------------------------------------ progress and messages
def test_no_progress_bar_when_stderr_is_not_a_terminal(tmp_path: Path, capsys) -> None:
    exp = write_exp(tmp_path, fast(sweep={"trace.rate": [0.5, 1.0]}))
    assert main(["run", str(exp), "--out", str(tmp_path / "o"), "--jobs", "1"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    # the closing line lists only what was written: no plots or report with outputs.plots false
    last = captured.out.strip().splitlines()[-1]
    assert last.startswith("results in") and "summary.csv" in last and "plots" not in last
    assert "report.md" not in last


def test_no_bar_before_a_trace_error(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)  # as in a terminal
    (tmp_path / "t.csv").write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.9,abc,8\n")
    raw = {"name": "bad", "models": ["qwen2.5-3b"], "systems": [{"name": "t", "preset": "tangram"}],
           "trace": {"kind": "azure-llm", "path": "t.csv", "mapping": {"kind": "round-robin"}}}
    assert main(["run", str(write_exp(tmp_path, raw)), "--out", str(tmp_path / "o")]) == 2
    assert "expected integer" in one_line_error(capsys)
    assert not (tmp_path / "o").exists()  # nothing written either


# ------------------------------------------------------------------ the writer, as the replay uses it
def test_writer_stores_jobs_atomically_and_combines_named_frames(tmp_path: Path) -> None:
    out = tmp_path / "replay"
    writer = RunWriter(out, {"name": "r", "seed": 1}, kind="replay")
    keys = [JobKey(0, 0), JobKey(0, 1)]
    assert writer.check(keys) == set()
    writer.open()
    assert read_record(out).status == "running" and (out / "config.yaml").is_file()
    for key, system in zip(keys, ("sllm", "tangram")):
        frames = {"requests": pd.DataFrame({"rid": [0, 1]}), "memory": pd.DataFrame({"t": [0.0]}),
                  "loads": None}
        writer.write_job(key, {"system": system, "point": 0, "mean_load_s": 0.5}, frames,
                         timing={"system": system, "point": 0, "wall_s": 1.0})
    assert not [p for p in (out / "jobs").iterdir() if p.name.startswith(".")]  # no temporaries left
    summary = writer.combine()
    writer.write_text("replay.json", "{}\n")
    record = writer.close(meta={"device": "cpu"})
    assert list(summary["system"]) == ["sllm", "tangram"]
    assert record.complete and record.kind == "replay" and record.meta == {"device": "cpu"}
    assert record.files == ["config.yaml", "summary.csv", "timings.csv", "requests.parquet", "memory.parquet",
                            "replay.json"]
    memory = pd.read_parquet(out / "memory.parquet")
    assert list(memory.columns) == ["system", "point", "t"] and list(memory["system"]) == ["sllm", "tangram"]
    assert not (out / "loads.parquet").exists() and not (out / "jobs").exists()


def test_concat_parquet_equals_pandas_concat_one_job_at_a_time(tmp_path: Path) -> None:
    # job 1 has no rejections (its "reason" is all null) and no "preemptions" column; job 2 is empty
    frames = [
        pd.DataFrame({"system": ["a", "a"], "rid": [0, 1], "ttft_s": [0.5, 1.5], "reason": [None, None],
                      "cold": [True, False]}),
        pd.DataFrame({"system": ["b"] * 3, "rid": [0, 1, 2], "ttft_s": [0.1, 0.2, 0.3],
                      "reason": ["", "kv-capacity", ""], "cold": [False, False, True], "preemptions": [0, 2, 1]}),
        pd.DataFrame({"system": pd.Series([], dtype=str), "rid": pd.Series([], dtype="int64")}),
    ]
    paths = []
    for i, frame in enumerate(frames):
        paths.append(tmp_path / f"p{i}.parquet")
        frame.to_parquet(paths[-1], index=False)
    concat_parquet(paths, tmp_path / "out.parquet")
    got = pd.read_parquet(tmp_path / "out.parquet")
    expected = pd.concat(frames, ignore_index=True)
    assert list(got.columns) == ["system", "rid", "ttft_s", "reason", "cold", "preemptions"]
    assert len(got) == 5 and list(got["system"]) == ["a", "a", "b", "b", "b"]
    assert got["reason"].tolist()[2:] == ["", "kv-capacity", ""] and got["reason"][:2].isna().all()
    assert got["preemptions"][:2].isna().all() and got["preemptions"][2:].tolist() == [0, 2, 1]
    pd.testing.assert_frame_equal(got[["system", "rid", "ttft_s"]], expected[["system", "rid", "ttft_s"]],
                                  check_dtype=False)


def test_resume_ignores_half_written_and_foreign_jobs(tmp_path: Path) -> None:
    out = tmp_path / "o"
    keys = [JobKey(0, 0), JobKey(1, 0)]
    first = RunWriter(out, {"name": "x"})
    first.check(keys)
    first.open()
    first.write_job(keys[0], {"system": "a", "point": 0})
    first.write_job(keys[1], {"system": "a", "point": 1})
    (out / "jobs" / "p0001-s000" / "job.json").unlink()  # as if cut short without the rename
    (out / "jobs" / ".p0002-s000.tmp-1").mkdir()
    first.close(status="interrupted")
    second = RunWriter(out, {"name": "x"}, resume=True)
    assert second.check(keys) == {keys[0]}
    second.open()
    assert sorted(p.name for p in (out / "jobs").iterdir()) == ["p0000-s000"]


def test_require_complete_messages(tmp_path: Path) -> None:
    with pytest.raises(TangramError, match="not a directory"):
        require_complete(tmp_path / "missing")
    with pytest.raises(TangramError, match="no run.json"):
        require_complete(tmp_path)
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(TangramError, match="not a run record"):
        require_complete(tmp_path)

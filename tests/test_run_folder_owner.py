"""A run folder has one writer and keeps its finished work: the lock, the refusals to replace a run,
damaged stored jobs, and the messages that say what to do next (Ctrl-C, --resume, replay, plot)."""

from __future__ import annotations

import json
import multiprocessing
import os
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
from test_rundir import count_jobs, fast, one_line_error, write_exp

from tangram_sim.cli import main
from tangram_sim.experiments import runner
from tangram_sim.experiments.runner import run_experiment
from tangram_sim.rundir import JobKey, RunDirError, RunWriter, read_record, require_complete
from tangram_sim.rundir.lock import LOCK_NAME

ROOT = Path(__file__).resolve().parents[1]
SWEEP = {"trace.rate": [0.5, 1.0]}  # 2 points x 2 systems = 4 jobs
_RUN_JOB = runner.run_job  # before any test counts the jobs


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------ 1. one writer at a time
def _slow_run(raw: dict, out: str) -> None:
    """A run whose jobs take a minute (in a forked process)."""
    real = runner.run_job

    def slow(job: runner.Job) -> runner.JobResult:
        time.sleep(60)
        return real(job)

    runner.run_job = slow
    run_experiment(raw, None, Path(out), progress=False)


def test_a_second_writer_is_refused_while_the_first_runs(tmp_path: Path, capsys) -> None:
    exp = write_exp(tmp_path, fast())
    out = tmp_path / "out"
    first = multiprocessing.get_context("fork").Process(target=_slow_run, args=(fast(), str(out)))
    first.start()
    try:
        for _ in range(200):
            if (out / LOCK_NAME).exists() and (out / "run.json").exists():
                break
            time.sleep(0.05)
        lock = json.loads((out / LOCK_NAME).read_text())
        assert lock["pid"] == first.pid and lock["host"] == socket.gethostname()
        config_before = (out / "config.yaml").read_bytes()
        assert main(["run", str(exp), "--out", str(out), "--quiet", "--set", "seed=8"]) == 2
        err = one_line_error(capsys)
        assert f"being written by another process (pid {first.pid} on {socket.gethostname()}" in err
        assert main(["run", str(exp), "--out", str(out), "--quiet", "--force"]) == 2  # --force does not help
        assert "being written by another process" in one_line_error(capsys)
        assert (out / "config.yaml").read_bytes() == config_before  # the second writer wrote nothing
    finally:
        os.kill(first.pid, signal.SIGKILL)  # as kill -9: the lock stays behind, stale
        first.join()
    assert (out / LOCK_NAME).exists() and read_record(out).status == "running"
    # a stale lock (its process is gone) is taken over; no job was stored, so nothing is lost
    assert main(["run", str(exp), "--out", str(out), "--quiet", "--set", "seed=8"]) == 0
    assert require_complete(out).complete and not (out / LOCK_NAME).exists()


def test_a_writer_in_this_process_holds_the_folder_until_it_closes(tmp_path: Path, capsys) -> None:
    exp = write_exp(tmp_path, fast())
    out = tmp_path / "out"
    writer = RunWriter(out, {"name": "rundir-test"})
    writer.check([JobKey(0, 0)])
    writer.open()
    assert main(["run", str(exp), "--out", str(out), "--quiet"]) == 2
    assert "being written by another process" in one_line_error(capsys)
    writer.close(status="interrupted")
    assert not (out / LOCK_NAME).exists()
    assert main(["run", str(exp), "--out", str(out), "--quiet"]) == 0  # nothing was stored: nothing to lose


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(),
                                             "started": "earlier", "command": "tangram-sim run"}))
    run_experiment(fast(), None, out, progress=False)
    assert require_complete(out).complete and not (out / LOCK_NAME).exists()


def test_a_lock_of_another_host_is_not_guessed_about(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "x", "command": "c"}))
    assert main(["run", str(write_exp(tmp_path, fast())), "--out", str(out), "--quiet"]) == 2
    err = one_line_error(capsys)
    assert "pid 1 on elsewhere" in err and f"delete {out / LOCK_NAME}" in err


# ------------------------------------------------------------------ 2. finished work is not replaced silently
def test_a_complete_run_is_not_replaced_by_another_configuration(tmp_path: Path, capsys) -> None:
    exp = write_exp(tmp_path, fast())
    out = tmp_path / "out"
    assert main(["run", str(exp), "--out", str(out), "--quiet"]) == 0
    summary = (out / "summary.csv").read_bytes()
    record = read_record(out)
    assert main(["run", str(exp), "--out", str(out), "--quiet", "--set", "seed=8"]) == 2
    err = one_line_error(capsys)
    assert err.startswith(f"error: {out} holds a complete run of rundir-test (config {record.config_hash}, 2 "
                          f"job(s), finished {record.finished})")
    assert err.endswith("--force to replace it, or another --out")
    assert (out / "summary.csv").read_bytes() == summary
    assert main(["run", str(exp), "--out", str(out), "--quiet", "--set", "seed=8", "--force"]) == 0
    assert read_record(out).config_hash != record.config_hash


def test_a_killed_run_is_not_started_over_without_resume(tmp_path: Path, capsys, monkeypatch) -> None:
    exp = write_exp(tmp_path, fast(sweep=SWEEP))
    out = tmp_path / "out"
    count_jobs(monkeypatch, interrupt_at=3)
    assert main(["run", str(exp), "--out", str(out), "--quiet", "--jobs", "1"]) == 130
    capsys.readouterr()
    stored = sorted(p.name for p in (out / "jobs").iterdir())
    assert len(stored) == 3
    monkeypatch.setattr(runner, "run_job", _RUN_JOB)
    assert main(["run", str(exp), "--out", str(out), "--quiet"]) == 2
    err = one_line_error(capsys)
    assert "holds an unfinished run of rundir-test (interrupted; config" in err and "3 of 4 job(s) stored" in err
    assert "--resume to continue it, --force to start over" in err
    assert sorted(p.name for p in (out / "jobs").iterdir()) == stored  # kept
    assert main(["run", str(exp), "--out", str(out), "--quiet", "--set", "seed=9"]) == 2
    assert "--resume cannot continue it" in one_line_error(capsys)


def test_run_into_a_tune_folder_is_refused(tmp_path: Path, capsys) -> None:
    out = tmp_path / "tune"
    out.mkdir()
    tune = {"format": 1, "kind": "tune", "experiment": "rundir-test", "status": "complete",
            "config_hash": "sha256:0123456789abcdef", "trials": {"done": 12}}
    (out / "tune.json").write_text(json.dumps(tune))
    (out / "config.yaml").write_text("name: rundir-test\n")
    (out / "trials.csv").write_text("trial,state\n0,complete\n")
    (out / "timings.csv").write_text("trial,wall_s\n0,1.0\n")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["run", str(write_exp(tmp_path, fast())), "--out", str(out), "--quiet"]) == 2
    err = one_line_error(capsys)
    assert "holds a tune of rundir-test (complete, 12 trial(s), config sha256:0123456789abcdef)" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_the_readme_quick_start_writes_a_fresh_folder_and_ci_runs_it_as_written() -> None:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line for line in block.strip().splitlines() if line.strip()]
    assert "--out results/" not in block and "--out runs/quickstart" in block
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for command in commands:
        assert command in ci, command


# ------------------------------------------------------------------ 6. no tracebacks
def test_a_non_utf8_byte_in_out_is_one_line(tmp_path: Path, capsys) -> None:
    exp = write_exp(tmp_path, fast())
    out = os.fsdecode(bytes(tmp_path) + b"/r\xffn")
    assert main(["run", str(exp), "--out", out, "--quiet"]) == 2
    assert "not UTF-8" in one_line_error(capsys)
    assert list(tmp_path.iterdir()) == [exp]


def test_a_damaged_stored_job_is_run_again_on_resume(tmp_path: Path, capsys, monkeypatch) -> None:
    raw = fast(sweep=SWEEP)
    ref = tmp_path / "ref"
    run_experiment(raw, None, ref, progress=False)
    exp = write_exp(tmp_path, raw)
    out = tmp_path / "out"
    executed = count_jobs(monkeypatch, interrupt_at=3)
    assert main(["run", str(exp), "--out", str(out), "--quiet", "--jobs", "1"]) == 130
    capsys.readouterr()
    damaged = out / "jobs" / "p0000-s001" / "requests.parquet"
    data = damaged.read_bytes()
    damaged.write_bytes(data[: len(data) // 2])  # a disk that lost the end of the file
    executed.clear()
    assert main(["run", str(exp), "--out", str(out), "--quiet", "--jobs", "1", "--resume"]) == 0
    err = capsys.readouterr().err
    assert "note: stored job p0000-s001: requests.parquet changed since it was written; ran it again" in err
    assert "resumed: reused 2 of 4 job(s)" in err and "ran 2" in err
    assert executed == [(0, 1), (1, 1)]
    assert (out / "summary.csv").read_bytes() == (ref / "summary.csv").read_bytes()
    pd.testing.assert_frame_equal(pd.read_parquet(out / "requests.parquet"), pd.read_parquet(ref / "requests.parquet"))


def test_a_trace_line_of_megabytes_is_one_line(tmp_path: Path, capsys) -> None:
    trace = tmp_path / "t.csv"
    with open(trace, "w") as f:
        f.write("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.9,10,8\n")
        f.write("2023-11-16 18:17:04.9," + "9" * (3 << 20) + ",8\n")
    raw = {"name": "bad", "models": ["qwen2.5-3b"], "systems": [{"name": "t", "preset": "tangram"}],
           "trace": {"kind": "azure-llm", "path": str(trace), "mapping": {"kind": "round-robin"}}}
    for extra in ([], ["--skip-bad-rows"]):
        assert main(["run", str(write_exp(tmp_path, raw)), "--out", str(tmp_path / "o"), *extra]) == 2
        err = one_line_error(capsys)
        assert f"{trace}:3: a line of" in err and len(err) < 300
    assert main(["trace", "inspect", str(trace)]) == 2
    one_line_error(capsys)


# ------------------------------------------------------------------ 7. hints that work
def test_ctrl_c_says_what_is_kept_and_the_exact_resume_command(tmp_path: Path, capsys, monkeypatch) -> None:
    exp = write_exp(tmp_path, fast(sweep=SWEEP))
    out = tmp_path / "my out"
    count_jobs(monkeypatch, interrupt_at=2)
    args = ["run", str(exp), "--out", str(out), "--jobs", "1", "--no-plots", "--set", "trace.n_requests=30"]
    assert main(args) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"interrupted: kept 2 of 4 job(s) in {out}/; continue with: tangram-sim run")
    command = shlex.split(err.split("continue with: ", 1)[1])
    assert command[:2] == ["tangram-sim", "run"] and command[-1] == "--resume"
    assert "trace.n_requests=30" in command and str(out) in command
    monkeypatch.setattr(runner, "run_job", _RUN_JOB)
    assert main(command[1:]) == 0  # the printed command works as printed
    err = capsys.readouterr().err
    assert "resumed: reused 2 of 4 job(s) stored in" in err and "ran 2" in err


def test_an_interrupted_replay_names_a_command_that_exists(tmp_path: Path) -> None:
    out = tmp_path / "replay"
    writer = RunWriter(out, {"name": "r"}, kind="replay")
    writer.check([JobKey(0, 0), JobKey(0, 1)])
    writer.open()
    writer.write_job(JobKey(0, 0), {"system": "a", "point": 0})
    writer.close(status="interrupted")
    with pytest.raises(RunDirError) as info:
        require_complete(out)
    message = str(info.value)
    assert "tangram-sim real replay EXP.yaml --out" in message and "--force" in message
    assert "--resume" not in message  # `real replay` has no --resume
    again = RunWriter(out, {"name": "r"}, kind="replay")
    with pytest.raises(RunDirError, match="--force to start over") as info:
        again.check([JobKey(0, 0), JobKey(0, 1)])
    assert "--resume" not in str(info.value)


def test_plot_on_a_folder_of_traces_does_not_suggest_running_into_it(tmp_path: Path, capsys) -> None:
    (tmp_path / "a.csv").write_text("arrival_s,model\n")
    assert main(["plot", str(tmp_path)]) == 2
    err = one_line_error(capsys)
    assert "not a run directory" in err and "tangram-sim run" in err and "--out" not in err


WORKERS = textwrap.dedent("""
    import sys, time
    from concurrent.futures import ProcessPoolExecutor
    from tangram_sim.experiments import runner
    pool = ProcessPoolExecutor(max_workers=2, initializer=runner._ignore_sigint)
    futures = [pool.submit(time.sleep, 120) for _ in range(2)]
    time.sleep(1.0)
    print(" ".join(str(p) for p in pool._processes), flush=True)
    time.sleep(120)
""")


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in state


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_pool_workers_exit_when_their_parent_is_killed() -> None:
    parent = subprocess.Popen([sys.executable, "-c", WORKERS], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    workers = [int(p) for p in parent.stdout.readline().split()]
    assert len(workers) == 2 and all(_running(p) for p in workers)
    parent.kill()  # kill -9: the parent stops nothing itself
    parent.wait()
    deadline = time.monotonic() + 10
    while any(_running(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_running(p) for p in workers)

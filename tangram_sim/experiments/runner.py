"""Run an experiment: expand the sweep, simulate every (point, system) job, write the results.

Jobs are independent and deterministic (seeded), so the local process pool and Ray give identical
results; outputs are always assembled in (point, system) order, whatever order jobs finish in.
Each job's results are stored in the run directory as soon as it finishes (`tangram_sim.rundir`), so a
failing point, a crash or Ctrl-C loses only the jobs still running, and `--resume` runs only those.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from tangram_sim.errors import ConfigError, TangramError
from tangram_sim.experiments.config import (
    apply_point,
    build_calibration,
    build_cluster,
    build_models,
    build_systems,
    parse_set,
    set_dotted,
    sweep_points,
    validate,
)
from tangram_sim.experiments.plugins import load_plugins
from tangram_sim.experiments.preflight import check_points
from tangram_sim.experiments.yamlio import check_expansion
from tangram_sim.rundir import JobKey, RunFailed, RunWriter, check_out_dir


@dataclass(slots=True)
class Job:
    point: int  # index of the sweep point
    system: int  # index of the system in the point's config
    config: dict[str, Any]  # validated config of the point
    base_dir: str | None  # folder relative paths resolve against
    skip_bad_rows: bool = False  # drop (and count) malformed trace rows instead of failing


@dataclass(slots=True)
class JobResult:
    point: int
    system: int
    summary: dict[str, Any]
    requests: pd.DataFrame | None
    timeline: pd.DataFrame | None
    wall_s: float  # seconds the simulation took
    skipped_rows: int = 0  # malformed trace rows dropped (with skip_bad_rows)


Override = str | tuple[str, Any]  # `--set` text "key=value", or a (dotted key, value) pair


MAX_JOBS = 10_000  # (sweep points x systems) a run accepts unless told more (--max-jobs)


def prepare(raw: dict[str, Any], base_dir: Path | None, sets: Sequence[Override] = (),
            max_jobs: int = MAX_JOBS) -> tuple[dict, list[dict]]:
    """Apply `--set` overrides (text or (key, value) pairs, in order), expand the sweep and validate
    every point (fail before running). A sweep of more than `max_jobs` jobs is refused before it is
    expanded."""
    check_expansion(raw, "experiment")  # aliases: before the copy below expands them
    try:
        raw = json.loads(json.dumps(raw))  # a private deep copy of plain data
    except (TypeError, ValueError) as exc:  # from Python: a value YAML cannot hold
        raise ConfigError(f"experiment: expected plain YAML values ({str(exc).splitlines()[0][:120]})") from None
    for assignment in sets:
        key, value = parse_set(assignment) if isinstance(assignment, str) else assignment
        set_dotted(raw, key, copy.deepcopy(value))
    check_sweep_size(raw, max_jobs)
    points = sweep_points(raw)
    configs = [validate(apply_point(raw, p), base_dir) for p in points]
    resolved = dict(configs[0])
    if raw.get("sweep"):
        resolved["sweep"] = raw["sweep"]
    return resolved, [dict(config=c, point=p) for c, p in zip(configs, points)]


def check_sweep_size(raw: dict[str, Any], max_jobs: int = MAX_JOBS) -> int:
    """The number of jobs (sweep points x systems) of `raw`, counted without expanding the sweep;
    ConfigError above `max_jobs`."""
    sweep = raw.get("sweep") or {}
    points = 1
    if isinstance(sweep, dict):
        for values in sweep.values():
            if isinstance(values, list) and values:
                points *= len(values)
    systems = raw.get("systems")
    n_systems = len(systems) if isinstance(systems, list) and systems else 1
    jobs = points * n_systems
    if jobs > max_jobs:
        raise ConfigError(f"sweep: {points:,} point(s) x {n_systems} system(s) = {jobs:,} jobs, more than "
                          f"{max_jobs:,} (each job is one simulation); --max-jobs {jobs} to run them all, or "
                          "sweep fewer values")
    return jobs


@functools.lru_cache(maxsize=8)
def _cached_trace(trace_json: str, models: tuple[str, ...], seed: int, base_dir: str | None,
                  skip_bad_rows: bool) -> pd.DataFrame:
    from tangram_sim.traces.spec import load_trace

    return load_trace(json.loads(trace_json), list(models), seed, Path(base_dir) if base_dir else None,
                      skip_bad_rows=skip_bad_rows)


def load_point_trace(config: dict[str, Any], base_dir: str | None, skip_bad_rows: bool = False) -> pd.DataFrame:
    models = tuple(m["name"] for m in config["models"])
    return _cached_trace(json.dumps(config["trace"], sort_keys=True), models, config["seed"], base_dir,
                         skip_bad_rows)


def run_job(job: Job) -> JobResult:
    """Simulate one system at one sweep point (runs in a worker process or a Ray task)."""
    from tangram_sim.core.slo import Slo
    from tangram_sim.sim.simulate import simulate

    t0 = time.perf_counter()
    config = job.config
    base_dir = Path(job.base_dir) if job.base_dir else None
    if config.get("plugins"):  # a fresh worker process (Ray, spawn) has not imported them yet
        load_plugins(config["plugins"], base_dir)
    models = build_models(config, base_dir)
    trace = load_point_trace(config, job.base_dir, job.skip_bad_rows)
    cluster = build_cluster(config)
    system = build_systems(config)[job.system]
    calibration = build_calibration(config)
    interval = config["outputs"]["sample_interval_s"]
    if interval == "auto":
        duration = float(trace["arrival_s"].iloc[-1]) if len(trace) else 0.0
        interval = max(0.5, duration / 400)
    result = simulate(models, trace, cluster, system, seed=config["seed"], calibration=calibration,
                      sample_interval_s=float(interval), slo=Slo.from_config(config.get("slo")))
    outputs = config["outputs"]
    return JobResult(
        job.point,
        job.system,
        result.summary,
        result.requests if outputs["requests"] else None,
        result.timeline if outputs["timeline"] else None,
        time.perf_counter() - t0,
        int(trace.attrs.get("skipped_rows", 0) or 0),
    )


OnResult = Callable[[Job, "JobResult | BaseException"], None]


def _ignore_sigint() -> None:
    # Ctrl-C in a terminal reaches every process of the group: the workers ignore it (no traceback per
    # worker) and the parent, which gets it too, stops them itself (_stop_pool).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    exit_with_parent()


def exit_with_parent(interval_s: float = 0.5) -> None:
    """End this (worker) process when its parent dies: a parent killed with -9 stops nothing itself, and
    its workers would simulate on, orphaned. A daemon thread watches the parent's pid (a process whose
    parent died is re-parented, so os.getppid() changes)."""
    import threading

    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _run_caught(job: Job) -> JobResult | Exception:
    try:
        return run_job(job)
    except Exception as exc:  # one job's failure must not lose the others
        return exc


def _execute(jobs: list[Job], backend: str, n_jobs: int, progress: bool, on_result: OnResult) -> None:
    """Run the jobs; hand each result, or the exception the job raised, to on_result as it finishes."""
    if not jobs:
        return
    # A bar redraws itself with carriage returns: in a log file (stderr not a terminal) that is noise.
    bar = tqdm(total=len(jobs), desc="jobs", unit="job", disable=not (progress and sys.stderr.isatty()))

    def done(job: Job, result: JobResult | BaseException) -> None:
        if isinstance(result, BaseException) and not isinstance(result, Exception):
            raise result  # KeyboardInterrupt or SystemExit inside a job: stop the run, not just the job
        on_result(job, result)
        bar.update()

    try:
        if backend == "ray":
            _execute_ray(jobs, n_jobs, done)
        elif n_jobs <= 1 or len(jobs) == 1:
            for job in jobs:
                done(job, _run_caught(job))
        else:
            _execute_pool(jobs, n_jobs, done)
    finally:
        bar.close()


def _execute_pool(jobs: list[Job], n_jobs: int, done: OnResult) -> None:
    pool = ProcessPoolExecutor(max_workers=min(n_jobs, len(jobs)), initializer=_ignore_sigint)
    try:
        futures: dict[Future[JobResult], Job] = {pool.submit(run_job, job): job for job in jobs}
        for future in as_completed(futures):
            exc = future.exception()
            done(futures[future], exc if exc is not None else future.result())
    except BaseException:  # Ctrl-C, or storing a result failed: stop everything still queued or running
        _stop_pool(pool)
        raise
    pool.shutdown(wait=True)


def _stop_pool(pool: ProcessPoolExecutor) -> None:
    # cancel_futures drops the queued jobs, but a running simulation can take minutes and the executor
    # has no public way to stop it: its worker processes are terminated.
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=5)


def _execute_ray(jobs: list[Job], n_jobs: int, done: OnResult) -> None:
    try:
        import ray
    except ImportError:
        raise ConfigError("--backend ray needs the 'ray' extra: pip install -e '.[ray]'") from None
    started_here = False
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=max(1, n_jobs), include_dashboard=False, log_to_driver=False)
        started_here = True
    pending: dict[Any, Job] = {}
    try:
        remote = ray.remote(run_job)
        pending = {remote.remote(job): job for job in jobs}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(ready[0])
            try:
                result: JobResult | BaseException = ray.get(ready[0])
            except Exception as exc:  # RayTaskError: the job's own exception is its cause
                result = getattr(exc, "cause", None) or exc
            done(job, result)
    except BaseException:
        for ref in pending:
            try:
                ray.cancel(ref, force=True)
            except Exception:  # already finished or gone: nothing to stop
                pass
        raise
    finally:
        if started_here:
            ray.shutdown()


def _check_traces(jobs: Iterable[Job]) -> list[str]:
    """Load every distinct trace of the jobs before anything starts, so that a bad trace is one error up
    front (no progress bar, nothing written). Loads are cached: serial jobs and forked workers reuse them.
    Returns the traces' notes (what a reader filled in or changed, e.g. missing ServeGen files), once each."""
    seen = set()
    notes: list[str] = []
    for job in jobs:
        key = (json.dumps(job.config["trace"], sort_keys=True), job.config["seed"],
               tuple(m["name"] for m in job.config["models"]))
        if key not in seen:
            seen.add(key)
            trace = load_point_trace(job.config, job.base_dir, job.skip_bad_rows)
            notes.extend(n for n in trace.attrs.get("notes", ()) if n not in notes)
    return notes


def point_label(point: int, values: dict[str, Any]) -> str:
    """How a failure names its point: `point 2 (cluster.gpu_memory_gib=24)`."""
    if not values:
        return f"point {point}"
    shown = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
    return f"point {point} ({shown})"


def _error_line(exc: BaseException) -> str:
    if isinstance(exc, TangramError):
        return str(exc)
    return f"{exc.__class__.__name__}: {exc}"


def _key(job: Job) -> JobKey:
    return JobKey(job.point, job.system)


def _run_jobs(writer: RunWriter, points: list[dict], jobs: list[Job], backend: str, n_jobs: int,
              progress: bool) -> BaseException | None:
    """Run the jobs, storing each as it finishes; returns the first failure that is not a user error
    (a bug: re-raised once the others are written, so its traceback is not lost)."""
    bugs: list[BaseException] = []

    def store(job: Job, result: JobResult | BaseException) -> None:
        system = job.config["systems"][job.system]["name"]
        values = points[job.point]["point"]
        if isinstance(result, BaseException):
            writer.fail_job(_key(job), system, point_label(job.point, values), _error_line(result))
            if not isinstance(result, TangramError):
                bugs.append(result)
            return
        row = {"system": system, "point": job.point, **values}
        row.update({k: v for k, v in result.summary.items() if k != "system"})
        timing = {"system": system, "point": job.point, **values, "wall_s": round(result.wall_s, 3)}
        writer.write_job(_key(job), row, {"requests": result.requests, "timeline": result.timeline},
                         timing=timing, info={"skipped_rows": result.skipped_rows})

    _execute(jobs, backend, n_jobs, progress, store)
    return bugs[0] if bugs else None


def run_experiment(
    raw: dict[str, Any],
    base_dir: Path | None,
    out_dir: Path,
    *,
    sets: Sequence[Override] = (),
    backend: str = "local",
    n_jobs: int = 1,
    progress: bool = True,
    plots: bool | None = None,
    skip_bad_rows: bool = False,
    resume: bool = False,
    force: bool = False,
    calibration_partial: bool = False,
    max_jobs: int = MAX_JOBS,
) -> pd.DataFrame:
    """Run every (point, system) job and write the run directory (layout: `tangram_sim.rundir`).

    Each job is stored as it finishes; at the end config.yaml, summary.csv, timings.csv,
    requests/timeline parquet, plots and report.md, and run.json last. resume: run only the jobs not
    stored by an earlier run of the same configuration; force: empty a folder that holds something else
    (or replace a finished run); calibration_partial: models the calibration file has no coefficients
    for are timed by the roofline instead of refused; max_jobs: the largest sweep accepted.
    Returns the summary table, with attrs "record" (the RunRecord), "skipped_rows" and, when resume found
    the run complete already, "already_complete". When jobs fail, the others are written and RunFailed
    is raised; on Ctrl-C the workers are stopped and run.json says "interrupted".
    """
    if backend not in ("local", "ray"):
        raise ConfigError(f"--backend: expected local or ray, got {backend!r}")
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    resolved, points = prepare(raw, base_dir, sets, max_jobs)
    check_points(points, base_dir, calibration_partial=calibration_partial)  # before any folder exists
    jobs = [
        Job(i, s, p["config"], str(base_dir) if base_dir else None, skip_bad_rows)
        for i, p in enumerate(points)
        for s in range(len(p["config"]["systems"]))
    ]
    # Presets are names in the config; what they expand to (and so the results) can change between
    # versions, so --resume compares the expanded systems of every point too.
    expanded = [[spec.to_dict() for spec in build_systems(p["config"])] for p in points]
    writer = RunWriter(out_dir, resolved, kind="run", resume=resume, force=force,
                       hash_extra={"systems": expanded})
    done = writer.check([_key(j) for j in jobs])
    if writer.already_complete:
        return _stored_summary(writer)
    pending = [j for j in jobs if _key(j) not in done]
    notes = _check_traces(pending)
    writer.open()
    try:
        bug = _run_jobs(writer, points, pending, backend, n_jobs, progress)
        summary = writer.combine()
        if not writer.failures and (plots if plots is not None else resolved["outputs"]["plots"]):
            writer.add_files(render(out_dir))
        skipped = max((int(p.info.get("skipped_rows", 0)) for p in writer.parts()), default=0)
        record = writer.close(meta={"sweep_keys": list(points[0]["point"]), "skipped_rows": skipped,
                                    "backend": backend, "trace_notes": notes})
    except BaseException as exc:  # the record must not say "running" (or "complete") after this
        _close_quietly(writer, "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed")
        raise
    summary.attrs.update(record=record, skipped_rows=skipped, trace_notes=notes, damaged_jobs=writer.damaged)
    if bug is not None:
        raise bug
    if record.failures:
        raise RunFailed(out_dir, record, summary)
    return summary


def _close_quietly(writer: RunWriter, status: str) -> None:
    try:
        writer.close(status=status)
    except Exception:  # keep the error (or Ctrl-C) that stopped the run, not a second one
        pass


def _stored_summary(writer: RunWriter) -> pd.DataFrame:
    """--resume of a run that is already complete: its summary, nothing run or written."""
    record = writer.close()
    path = writer.out_dir / "summary.csv"
    if not path.is_file():
        raise ConfigError(f"{writer.out_dir}: run.json says complete but summary.csv is missing; "
                          "drop --resume to run it again")
    summary = pd.read_csv(path)
    summary.attrs.update(record=record, skipped_rows=int(record.meta.get("skipped_rows", 0) or 0),
                         already_complete=True)
    return summary


def render(out_dir: Path) -> list[Path]:
    """Draw the plots and write report.md of a run being written (before its run.json is complete)."""
    from tangram_sim.plots import render_all, write_report

    pngs = render_all(out_dir, require_complete=False)
    return [*pngs, write_report(out_dir, require_complete=False)]

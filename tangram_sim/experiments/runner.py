"""Run an experiment: expand the sweep, simulate every (point, system) job, write the results.

Jobs are independent and deterministic (seeded), so the local process pool and Ray give identical
results; outputs are always assembled in (point, system) order, whatever order jobs finish in.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from tangram_sim.errors import ConfigError
from tangram_sim.experiments.config import (
    apply_point,
    build_cluster,
    build_models,
    build_systems,
    dump_yaml,
    parse_set,
    set_dotted,
    sweep_points,
    validate,
)


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


def prepare(raw: dict[str, Any], base_dir: Path | None, sets: Sequence[str] = ()) -> tuple[dict, list[dict]]:
    """Apply `--set` overrides, expand the sweep and validate every point (fail before running)."""
    raw = json.loads(json.dumps(raw))  # a private deep copy of plain data
    for assignment in sets:
        key, value = parse_set(assignment)
        set_dotted(raw, key, value)
    points = sweep_points(raw)
    configs = [validate(apply_point(raw, p), base_dir) for p in points]
    resolved = dict(configs[0])
    if raw.get("sweep"):
        resolved["sweep"] = raw["sweep"]
    return resolved, [dict(config=c, point=p) for c, p in zip(configs, points)]


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
    from tangram_sim.sim.simulate import simulate
    from tangram_sim.sim.timemodel import Calibration

    t0 = time.perf_counter()
    config = job.config
    base_dir = Path(job.base_dir) if job.base_dir else None
    models = build_models(config, base_dir)
    trace = load_point_trace(config, job.base_dir, job.skip_bad_rows)
    cluster = build_cluster(config)
    system = build_systems(config)[job.system]
    calibration = Calibration.load(config["calibration"]) if config.get("calibration") else None
    interval = config["outputs"]["sample_interval_s"]
    if interval == "auto":
        duration = float(trace["arrival_s"].iloc[-1]) if len(trace) else 0.0
        interval = max(0.5, duration / 400)
    result = simulate(models, trace, cluster, system, seed=config["seed"], calibration=calibration,
                      sample_interval_s=float(interval))
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


def _execute(jobs: list[Job], backend: str, n_jobs: int, progress: bool) -> list[JobResult]:
    bar = tqdm(total=len(jobs), desc="jobs", unit="job", disable=not progress)
    results: list[JobResult] = []
    try:
        if backend == "ray":
            results = _execute_ray(jobs, n_jobs, bar.update)
        elif n_jobs <= 1 or len(jobs) == 1:
            for job in jobs:
                results.append(run_job(job))
                bar.update()
        else:
            with ProcessPoolExecutor(max_workers=min(n_jobs, len(jobs))) as pool:
                futures = [pool.submit(run_job, job) for job in jobs]
                for future in as_completed(futures):
                    results.append(future.result())
                    bar.update()
    finally:
        bar.close()
    return sorted(results, key=lambda r: (r.point, r.system))


def _execute_ray(jobs: list[Job], n_jobs: int, tick: Callable[[], Any]) -> list[JobResult]:
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
    try:
        remote = ray.remote(run_job)
        pending = [remote.remote(job) for job in jobs]
        results = []
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            results.extend(ray.get(done))
            tick()
        return results
    finally:
        if started_here:
            ray.shutdown()


def run_experiment(
    raw: dict[str, Any],
    base_dir: Path | None,
    out_dir: Path,
    *,
    sets: Sequence[str] = (),
    backend: str = "local",
    n_jobs: int = 1,
    progress: bool = True,
    plots: bool | None = None,
    skip_bad_rows: bool = False,
) -> pd.DataFrame:
    """Run everything and write config.yaml, summary.csv, requests/timeline parquet, plots, report."""
    if backend not in ("local", "ray"):
        raise ConfigError(f"--backend: expected local or ray, got {backend!r}")
    resolved, points = prepare(raw, base_dir, sets)
    jobs = [
        Job(i, s, p["config"], str(base_dir) if base_dir else None, skip_bad_rows)
        for i, p in enumerate(points)
        for s in range(len(p["config"]["systems"]))
    ]
    results = _execute(jobs, backend, n_jobs, progress)

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(dump_yaml(resolved))
    sweep_keys = list(points[0]["point"])
    rows = []
    requests, timelines = [], []
    for r in results:
        point = points[r.point]["point"]
        system = points[r.point]["config"]["systems"][r.system]["name"]
        row = {"system": system, "point": r.point, **point}
        row.update({k: v for k, v in r.summary.items() if k != "system"})
        row["wall_s"] = round(r.wall_s, 3)
        rows.append(row)
        for frame, sink in ((r.requests, requests), (r.timeline, timelines)):
            if frame is not None:
                frame = frame.copy()
                frame.insert(0, "point", r.point)
                frame.insert(0, "system", system)
                sink.append(frame)
    summary = pd.DataFrame(rows)
    summary.attrs["skipped_rows"] = max((r.skipped_rows for r in results), default=0)
    summary.drop(columns=["wall_s"]).to_csv(out_dir / "summary.csv", index=False, float_format="%.6g")
    pd.DataFrame(rows)[["system", "point", *sweep_keys, "wall_s"]].to_csv(out_dir / "timings.csv", index=False)
    if requests:
        pd.concat(requests, ignore_index=True).to_parquet(out_dir / "requests.parquet", index=False)
    if timelines:
        pd.concat(timelines, ignore_index=True).to_parquet(out_dir / "timeline.parquet", index=False)
    if plots if plots is not None else resolved["outputs"]["plots"]:
        render(out_dir)
    return summary


def render(out_dir: Path) -> None:
    from tangram_sim.plots import render_all, write_report

    render_all(out_dir)
    write_report(out_dir)

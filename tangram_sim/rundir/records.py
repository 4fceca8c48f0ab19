"""What a run folder records: run.json (`RunRecord`), its jobs (`JobKey`, `JobPart`, `JobFailure`), and
reading it back (`read_record`, `require_complete`, `adopt_legacy`)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tangram_sim import __version__
from tangram_sim.errors import TangramError
from tangram_sim.rundir.files import _write_text

FORMAT = 1  # layout version of run.json and job.json
RECORD = "run.json"
JOBS_DIR = "jobs"
JOB_RECORD = "job.json"
STATUSES = ("running", "complete", "failed", "interrupted")
# What an older tangram-sim wrote into a run folder (no run.json): removed before a fresh run into it.
LEGACY_OUTPUTS = ("summary.csv", "timings.csv", "requests.parquet", "timeline.parquet", "memory.parquet",
                  "loads.parquet", "report.md", "replay.json")
# Room kept under a path's limit for the files a run writes inside its folder.
PATH_SLACK = 64


class RunDirError(TangramError):
    """A run directory cannot be written, or is not a complete run; the message is one line."""


# ------------------------------------------------------------------ records
@dataclass(slots=True, frozen=True, order=True)
class JobKey:
    """One (sweep point, system) job, by indices: point in the sweep, system in the point's config."""

    point: int
    system: int

    @property
    def folder(self) -> str:
        return f"p{self.point:04d}-s{self.system:03d}"


@dataclass(slots=True)
class JobFailure:
    key: JobKey
    system: str  # the system's name
    label: str  # the point as a reader knows it, e.g. "point 2 (cluster.gpu_memory_gib=24)"
    error: str  # one line

    def to_dict(self) -> dict[str, Any]:
        return {"point": self.key.point, "system_index": self.key.system, "system": self.system,
                "label": self.label, "error": self.error}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> JobFailure:
        return cls(JobKey(int(d["point"]), int(d["system_index"])), str(d["system"]), str(d["label"]),
                   str(d["error"]))


@dataclass(slots=True)
class JobPart:
    """A finished job as stored under jobs/: its summary row, timing and result frames."""

    key: JobKey
    path: Path  # the job's folder
    row: dict[str, Any]  # one row of summary.csv
    timing: dict[str, Any]  # one row of timings.csv
    frames: tuple[str, ...]  # names of the stored frames (<name>.parquet)
    info: dict[str, Any]  # anything else the caller stored (e.g. skipped trace rows)

    def frame(self, name: str) -> pd.DataFrame | None:
        return pd.read_parquet(self.path / f"{name}.parquet") if name in self.frames else None


@dataclass(slots=True)
class RunRecord:
    """The content of run.json."""

    kind: str  # "run" or "replay": which command writes (and resumes) this folder
    experiment: str  # the experiment's name
    status: str  # one of STATUSES
    config_hash: str
    version: str  # tangram_sim.__version__ of the writer
    started: str  # ISO time (UTC) the writing run started
    finished: str | None  # ISO time the record was last closed
    wall_s: float  # seconds of the writing run
    jobs_total: int
    jobs_per_point: dict[int, int]  # how many jobs (systems) each point has
    jobs_done: list[JobKey] = field(default_factory=list)
    jobs_resumed: int = 0  # of jobs_done: stored by an earlier run, not run again
    failures: list[JobFailure] = field(default_factory=list)
    files: list[str] = field(default_factory=list)  # relative to the folder, in write order
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    @property
    def points_total(self) -> int:
        return len(self.jobs_per_point)

    def points_done(self) -> list[int]:
        """Points all of whose jobs are done."""
        done: dict[int, int] = {}
        for key in self.jobs_done:
            done[key.point] = done.get(key.point, 0) + 1
        return sorted(p for p, n in done.items() if n >= self.jobs_per_point.get(p, 1))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "kind": self.kind, "experiment": self.experiment, "status": self.status,
            "complete": self.complete, "config_hash": self.config_hash, "version": self.version,
            "started": self.started, "finished": self.finished, "wall_s": round(self.wall_s, 3),
            "points": {"total": self.points_total, "done": self.points_done(),
                       "failed": sorted({f.key.point for f in self.failures})},
            "jobs": {"total": self.jobs_total, "done": [[k.point, k.system] for k in self.jobs_done],
                     "resumed": self.jobs_resumed, "failed": [f.to_dict() for f in self.failures],
                     "per_point": {str(p): n for p, n in sorted(self.jobs_per_point.items())}},
            "files": self.files, "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunRecord:
        jobs = d.get("jobs") or {}
        return cls(
            kind=str(d.get("kind", "run")), experiment=str(d.get("experiment", "")),
            status=str(d.get("status", "running")), config_hash=str(d.get("config_hash", "")),
            version=str(d.get("version", "")), started=str(d.get("started", "")), finished=d.get("finished"),
            wall_s=float(d.get("wall_s") or 0.0), jobs_total=int(jobs.get("total", 0)),
            jobs_per_point={int(p): int(n) for p, n in (jobs.get("per_point") or {}).items()},
            jobs_done=[JobKey(int(p), int(s)) for p, s in jobs.get("done") or []],
            jobs_resumed=int(jobs.get("resumed", 0)),
            failures=[JobFailure.from_dict(f) for f in jobs.get("failed") or []],
            files=[str(f) for f in d.get("files") or []], meta=dict(d.get("meta") or {}),
        )

    def failure_text(self, limit: int = 3) -> str:
        """The failures in one line, a point's systems together when they failed alike."""
        groups: dict[tuple[str, str], list[str]] = {}
        for f in self.failures:
            groups.setdefault((f.label, f.error), []).append(f.system)
        parts = []
        for (label, error), systems in groups.items():
            point = next(f.key.point for f in self.failures if f.label == label)
            if len(systems) >= self.jobs_per_point.get(point, len(systems) + 1):
                parts.append(f"{label}: {error}")
            else:
                parts.append(f"{label}, system {', '.join(systems)}: {error}")
        more = len(parts) - limit
        return "; ".join(parts[:limit]) + (f"; and {more} more (see run.json)" if more > 0 else "")


class RunFailed(TangramError):
    """Some jobs of a run failed; the others were written. Carries the record and the summary."""

    def __init__(self, run_dir: Path, record: RunRecord, summary: pd.DataFrame | None = None) -> None:
        self.run_dir, self.record, self.summary = run_dir, record, summary
        failed = len(record.failures)
        kept = len(record.jobs_done)
        super().__init__(
            f"{failed} of {record.jobs_total} job(s) failed: {record.failure_text()}; "
            f"kept the {kept} that succeeded in {run_dir}/ (run.json lists the failures; with the same "
            "configuration, --resume reruns only the jobs that are missing)"
        )


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _plain(value: Any) -> Any:
    """JSON for numpy scalars and paths (summary rows hold numpy values)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (Path, tuple, set)):
        return str(value) if isinstance(value, Path) else list(value)
    return str(value)


def _dumps(data: Any) -> str:
    # allow_nan: summary rows may hold NaN (no completed request); Python's json reads it back exactly
    return json.dumps(data, indent=2, default=_plain) + "\n"


def config_hash(config: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> str:
    """A short stable hash of the resolved configuration (and anything else that decides the results)."""
    payload = {"config": config, "extra": dict(extra or {})}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=_plain)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]

def read_record(run_dir: Path | str) -> RunRecord | None:
    """run.json of a folder, or None if it has none; RunDirError if it is not a run record."""
    path = Path(run_dir) / RECORD
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("status") not in STATUSES:
            raise ValueError("no valid 'status'")
        return RunRecord.from_dict(data)
    except (ValueError, TypeError, KeyError, UnicodeDecodeError) as exc:
        raise RunDirError(f"{path}: not a run record ({str(exc).splitlines()[0]})") from None


def _resume_hint(run_dir: Path, kind: str) -> str:
    if kind == "replay":  # a replay is not resumed (its devices' state is gone): it starts over
        return f"tangram-sim real replay EXP.yaml --out {run_dir} --force (a replay starts over)"
    return f"tangram-sim run EXP.yaml --out {run_dir} --resume"


def require_complete(run_dir: Path | str) -> RunRecord:
    """The record of a finished run; RunDirError (one line, with what to do) for anything else."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: not a directory; expected a run directory from `tangram-sim run`")
    record = read_record(run_dir)
    if record is None:
        if not any((run_dir / name).exists() for name in ("config.yaml", "summary.csv", JOBS_DIR)):
            raise RunDirError(f"{run_dir}: not a run directory (no {RECORD}, config.yaml or summary.csv); expected "
                              "a folder written by tangram-sim run or tangram-sim real replay")
        raise RunDirError(
            f"{run_dir}: no {RECORD}, so not a finished run (interrupted, still running, or written by an "
            f"older tangram-sim); run it again: tangram-sim run EXP.yaml --out {run_dir} --force"
        )
    if not record.complete:
        what = f"{len(record.jobs_done)} of {record.jobs_total} job(s) done"
        if record.failures:
            what += f"; failed: {record.failure_text(limit=1)}"
        raise RunDirError(f"{run_dir}: incomplete run ({record.status}, {what}); finish it with "
                          f"{_resume_hint(run_dir, record.kind)}")
    return record


def adopt_legacy(run_dir: Path | str, *, kind: str = "run") -> RunRecord:
    """Write a "complete" run.json for a folder that an older tangram-sim (before run.json) wrote in
    full, e.g. committed reference results, so that plot and compare accept it again.

    Only the caller can know the folder is whole; this checks that it holds summary.csv or
    requests.parquet and counts the jobs from their (point, system) pairs.
    """
    import yaml

    run_dir = Path(run_dir)
    if read_record(run_dir) is not None:
        raise RunDirError(f"{run_dir}: already has a {RECORD}")
    table = next((f for f in ("summary.csv", "requests.parquet") if (run_dir / f).is_file()), None)
    if table is None:
        raise RunDirError(f"{run_dir}: no summary.csv or requests.parquet; not a run directory")
    frame = pd.read_csv(run_dir / table) if table.endswith(".csv") else pd.read_parquet(run_dir / table)
    if "point" not in frame.columns:
        frame["point"] = 0
    pairs = frame[["point", "system"]].drop_duplicates() if "system" in frame.columns else frame[["point"]]
    config: dict[str, Any] = {}
    if (run_dir / "config.yaml").is_file():
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    keys, per_point = [], {}
    for point, group in pairs.groupby("point", sort=True):
        per_point[int(point)] = len(group)
        keys += [JobKey(int(point), i) for i in range(len(group))]
    files = sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*")
                   if p.is_file() and p.name != RECORD and not p.name.startswith("."))
    record = RunRecord(kind=kind, experiment=str(config.get("name") or run_dir.name), status="complete",
                       config_hash=config_hash(config), version=__version__, started=_now(), finished=_now(),
                       wall_s=0.0, jobs_total=len(keys), jobs_per_point=per_point, jobs_done=keys, files=files,
                       meta={"adopted": "written before run.json existed; recorded afterwards"})
    _write_text(run_dir / RECORD, _dumps(record.to_dict()))
    return record



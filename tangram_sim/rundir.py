"""Run directories: the folder `tangram-sim run` (and the real replay) write, made crash-safe.

Layout of DIR:

- `config.yaml`: the resolved experiment, written when the run starts;
- `run.json`: the run record. Written as "running" before anything else changes in DIR and rewritten
  last as "complete", "failed" or "interrupted", so a folder whose record is not "complete" is never
  mistaken for a finished run (`require_complete`, used by `plot`, `compare` and the report);
- `jobs/p0002-s001/`: one finished (point, system) job: `job.json` (summary row, timing, config hash)
  and one `<frame>.parquet` per result frame. A job folder is written under a temporary name and
  renamed, so it is either whole or absent; `--resume` keeps the ones whose config hash matches.
  The folder goes away when the run completes (the combined files hold everything);
- `summary.csv`, `timings.csv`, `<frame>.parquet` (requests, timeline, memory, loads, ...): combined
  from the job folders in (point, system) order at the end, each written atomically.

Usage (the runner; the real replay does the same with its own frames):

    writer = RunWriter(out_dir, resolved_config, kind="run", resume=..., force=...)
    done = writer.check(keys)          # read-only: may this folder be used? which jobs are stored?
    writer.open()                      # clear what must go, write config.yaml and run.json("running")
    writer.write_job(key, row, {"requests": df, ...}, timing={...})   # as each job finishes
    writer.fail_job(key, "tangram", "point 2 (x=24)", "model ... needs ...")
    summary = writer.combine()         # summary.csv, timings.csv, <frame>.parquet
    writer.add_files(render(out_dir))  # anything else the caller wrote
    record = writer.close(meta={...})  # run.json, last
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tangram_sim import __version__
from tangram_sim.errors import TangramError
from tangram_sim.rundir_claim import refuse_replacing, refuse_tune, tune_record
from tangram_sim.runlock import LOCK_NAME, RunLock

__all__ = [
    "FORMAT", "JOBS_DIR", "RECORD", "JobFailure", "JobKey", "JobPart", "RunDirError", "RunFailed", "RunRecord",
    "RunWriter", "adopt_legacy", "atomic_write", "check_out_dir", "config_hash", "read_record", "require_complete",
]

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


# ------------------------------------------------------------------ helpers
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


def atomic_write(path: Path, write: Callable[[Path], Any]) -> Path:
    """Call write(tmp) on a temporary name beside `path`, then rename it into place.

    An interrupted write leaves only a dot-named temporary, never a truncated file under the real name.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def concat_parquet(paths: Sequence[Path], out: Path) -> None:
    """The Parquet files `paths` one after the other in `out`, one row group in memory at a time.

    A run's jobs each store their requests and timeline; concatenating them as DataFrames held every
    job's rows at once plus the copy `concat` makes (2 M requests in 8 jobs: 762 MiB above the imports,
    against 238 MiB here, on the development VM).
    Schemas are unified as `pd.concat` would: a column that is all null in one job takes its type from
    the others, a column one job lacks is null there; the first file's pandas metadata is kept.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    schemas = [pq.read_schema(p) for p in paths]
    schema = pa.unify_schemas([s.remove_metadata() for s in schemas], promote_options="permissive")
    schema = schema.with_metadata(schemas[0].metadata)
    with pq.ParquetWriter(out, schema) as writer:
        for path in paths:
            source = pq.ParquetFile(path)
            for i in range(source.num_row_groups):
                table = source.read_row_group(i)
                columns = [table.column(f.name).cast(f.type) if f.name in table.column_names
                           else pa.nulls(table.num_rows, f.type) for f in schema]
                writer.write_table(pa.Table.from_arrays(columns, schema=schema))


def _write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _os_error(path: Path, exc: OSError) -> RunDirError:
    return RunDirError(f"{path}: cannot write ({exc.strerror or exc.__class__.__name__})")


# ------------------------------------------------------------------ checks
def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):  # False (not an error) for names that are too long
            return candidate
    return Path(path.anchor or ".")


def check_out_dir(path: Path | str, option: str = "--out") -> None:
    """Refuse, in one line and before any work, an output folder that cannot be made or written."""
    path = Path(path)
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError as exc:  # a byte the shell passed that is not UTF-8 (pyarrow needs UTF-8 names)
        bad = os.fsencode(str(path)[exc.start:exc.end])
        raise RunDirError(f"{option}: the folder name holds a byte that is not UTF-8 text (0x{bad[0]:02x} at "
                          f"character {exc.start}); choose a UTF-8 name") from None
    absolute = Path(os.path.abspath(path))
    existing = _nearest_existing(absolute)
    if existing == absolute:
        if not absolute.is_dir():
            raise RunDirError(f"{option} {path}: exists and is a file; expected a folder")
        if not os.access(absolute, os.W_OK | os.X_OK):
            raise RunDirError(f"{option} {path}: folder is not writable")
        return
    if not existing.is_dir():
        raise RunDirError(f"{option} {path}: {existing} is a file, so no folder can be made under it")
    try:
        name_max = os.pathconf(existing, "PC_NAME_MAX")
        path_max = os.pathconf(existing, "PC_PATH_MAX")
    except (OSError, ValueError):  # not reported by this file system: the usual Linux limits
        name_max, path_max = 255, 4096
    for part in absolute.parts[len(existing.parts):]:
        size = len(os.fsencode(part))
        if size > name_max:
            shown = part if len(part) <= 40 else part[:37] + "..."
            raise RunDirError(f"{option}: folder name '{shown}' is {size} bytes; the file system allows "
                              f"{name_max}")
    if len(os.fsencode(str(absolute))) + PATH_SLACK > path_max:
        raise RunDirError(f"{option} {path}: path is too long for the files of a run ({path_max} bytes at most)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunDirError(f"{option} {path}: cannot create it, {existing} is not writable")


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


def _contents(folder: Path) -> list[Path]:
    """What a folder holds, leaving out a lock file (a stale lock alone is an empty folder)."""
    return [p for p in folder.iterdir() if p.name != LOCK_NAME]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _damage(part: JobPart) -> str | None:
    """Why a stored job's frames do not read back (None when they do): checksums written with the job,
    else the Parquet footer."""
    digests = part.info.get("_sha256") or {}
    for name in part.frames:
        path = part.path / f"{name}.parquet"
        try:
            if name in digests:
                if _sha256(path) != digests[name]:
                    return f"{name}.parquet changed since it was written"
            else:
                import pyarrow.parquet as pq

                pq.read_metadata(path)
        except Exception as exc:  # OSError, ArrowInvalid: damaged either way
            return f"{name}.parquet does not read back ({exc.__class__.__name__})"
    return None


def _guard_force(run_dir: Path) -> None:
    """--force empties the folder: never the current folder, one holding it, home, or a root."""
    target = run_dir.resolve()
    cwd = Path.cwd().resolve()
    reason = ("is the current folder" if target == cwd else "holds the current folder" if target in cwd.parents
              else "is the home folder" if target == Path.home().resolve()
              else "is a root folder" if target.parent == target else None)
    if reason:
        raise RunDirError(f"--force would empty {run_dir}, which {reason}; choose a dedicated --out")


# ------------------------------------------------------------------ writer
class RunWriter:
    """Writes one run directory: claims it, stores each job as it finishes, combines, records."""

    def __init__(self, out_dir: Path | str, config: Mapping[str, Any], *, kind: str = "run",
                 hash_extra: Mapping[str, Any] | None = None, resume: bool = False, force: bool = False,
                 config_text: str | None = None, command: str | None = None) -> None:
        """config: the resolved experiment (hashed; written as config.yaml, or config_text if given);
        command: what the lock file says is writing the folder."""
        self.out_dir = Path(out_dir)
        self.config = config
        self.kind = kind
        self.experiment = str(config.get("name") or self.out_dir.name)
        self.config_hash = config_hash(config, hash_extra)
        self.resume, self.force = resume, force
        self._config_text = config_text
        self._keys: list[JobKey] = []
        self._done: dict[JobKey, JobPart] = {}
        self._resumed = 0
        self._failures: dict[JobKey, JobFailure] = {}
        self._files: list[str] = []
        self._previous: RunRecord | None = None
        self._complete_already = False
        self._checked = False
        self._damaged: list[str] = []
        self._lock = RunLock(self.out_dir, command or f"tangram-sim {kind} of {self.experiment}")
        self._t0 = time.perf_counter()
        self._started = _now()

    # -- claiming the folder
    @property
    def jobs_dir(self) -> Path:
        return self.out_dir / JOBS_DIR

    @property
    def already_complete(self) -> bool:
        """--resume found a complete run of the same configuration: nothing to run or write."""
        return self._complete_already

    @property
    def failures(self) -> list[JobFailure]:
        return [self._failures[k] for k in sorted(self._failures)]

    def check(self, keys: Sequence[JobKey]) -> set[JobKey]:
        """Decide, without writing, whether the folder may be used; return the jobs already stored.

        Allowed: a missing or empty folder; a folder of the same experiment (its run.json, or for an
        older run without one, its config.yaml, names it); anything with --force. --resume also needs
        the same config hash, and keeps the stored jobs that match it.
        """
        if self.resume and self.force:
            raise RunDirError("--resume and --force together: --force starts over, --resume continues; pick one")
        check_out_dir(self.out_dir)
        self._keys = sorted(set(keys))
        self._checked = True
        d = self.out_dir
        if not d.is_dir() or not _contents(d):
            return set()
        self._lock.check()  # another live process writes here: refused, whatever --force says
        if self.force:
            _guard_force(d)
            return set()
        try:
            record = read_record(d)
        except RunDirError as exc:
            raise RunDirError(f"{exc}; not writing into {d}: pick another --out or add --force to empty it") from None
        if record is None:
            tune = tune_record(d)
            if tune is not None:
                refuse_tune(d, tune, RunDirError)
            if self._legacy_name(d) != self.experiment:
                raise RunDirError(f"{d}: not empty and not a run of '{self.experiment}' (no {RECORD}); pick "
                                  "another --out or add --force to empty it")
            return set()
        if record.experiment != self.experiment or record.kind != self.kind:
            raise RunDirError(f"{d}: holds the {record.kind} of '{record.experiment}', not of "
                              f"'{self.experiment}'; pick another --out or add --force to empty it")
        self._previous = record
        if not self.resume:
            stored = len(self._stored_parts(verify=False)) if not record.complete else 0
            refuse_replacing(d, record, self.config_hash, self.kind, stored, RunDirError)
            return set()
        if record.config_hash != self.config_hash:
            raise RunDirError(f"--resume: {d} was run with another configuration ({record.config_hash}, now "
                              f"{self.config_hash}); drop --resume to start over, or use another --out")
        if record.complete and set(record.jobs_done) >= set(self._keys):
            self._complete_already = True
            return set(self._keys)
        self._done = {p.key: p for p in self._stored_parts() if p.key in set(self._keys)}
        self._resumed = len(self._done)
        return set(self._done)

    @property
    def resumed(self) -> int:
        """Stored jobs of an earlier run that this one keeps (--resume)."""
        return self._resumed

    @property
    def damaged(self) -> list[str]:
        """Stored jobs that did not read back (--resume runs them again): `p0001-s000: requests.parquet ...`."""
        return list(self._damaged)

    @staticmethod
    def _legacy_name(d: Path) -> str | None:
        """The experiment name in config.yaml of a folder written before run.json existed."""
        import yaml

        try:
            data = yaml.safe_load((d / "config.yaml").read_text())
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            return None
        return str(data.get("name")) if isinstance(data, dict) and data.get("name") else None

    def _stored_parts(self, verify: bool = True) -> list[JobPart]:
        parts = []
        if not self.jobs_dir.is_dir():
            return parts
        for folder in sorted(self.jobs_dir.iterdir()):
            part = self._read_part(folder, any_config=not verify)
            if part is not None and verify:
                problem = _damage(part)
                if problem:
                    self._damaged.append(f"{folder.name}: {problem}")
                    continue
            if part is not None:
                parts.append(part)
        return parts

    def _read_part(self, folder: Path, any_config: bool = False) -> JobPart | None:
        """A stored job if it is whole and of this configuration (any_config: of any), else None."""
        if folder.name.startswith(".") or not folder.is_dir():
            return None
        try:
            data = json.loads((folder / JOB_RECORD).read_text())
            key = JobKey(int(data["point"]), int(data["system"]))
            frames = tuple(str(f) for f in data.get("frames") or [])
        except (OSError, ValueError, TypeError, KeyError):
            return None
        if ((data.get("config_hash") != self.config_hash and not any_config) or folder.name != key.folder
                or not all((folder / f"{f}.parquet").is_file() for f in frames)):
            return None
        info = dict(data.get("info") or {})
        if isinstance(data.get("sha256"), dict):
            info["_sha256"] = data["sha256"]
        return JobPart(key, folder, dict(data.get("row") or {}), dict(data.get("timing") or {}), frames, info)

    def open(self) -> None:
        """Claim the folder: empty it (--force), clear the previous run's outputs (unless resuming),
        write config.yaml and run.json ("running")."""
        if not self._checked:
            raise RuntimeError("RunWriter.check() must come before open()")
        if self._complete_already:
            return
        d = self.out_dir
        try:
            d.mkdir(parents=True, exist_ok=True)
            self._lock.acquire()
            self._recheck()
            if self.force:
                for child in list(d.iterdir()):
                    if child.name != LOCK_NAME:
                        _remove(child)
            elif not self.resume:
                self._clear_previous()
            self._clear_stale_parts()
            self.write_text("config.yaml", self._config_text if self._config_text is not None
                            else _dump_yaml(self.config))
            self._write_record("running")
        except OSError as exc:
            self._lock.release()
            raise _os_error(d, exc) from None
        except BaseException:
            self._lock.release()
            raise

    def _recheck(self) -> None:
        """With the lock held: the folder is still as check() saw it (no run finished into it since)."""
        try:
            now = read_record(self.out_dir)
        except RunDirError:
            now = None
        before = self._previous
        same = (now is None and before is None) or (
            now is not None and before is not None and (now.status, now.started, now.config_hash)
            == (before.status, before.started, before.config_hash))
        if not same and not self.force:
            raise RunDirError(f"{self.out_dir}: another run wrote into it while this one was starting; "
                              "run again to see what it holds now")

    def _clear_previous(self) -> None:
        """Remove what an earlier run of this experiment wrote, so no stale file outlives this run."""
        d = self.out_dir
        names = self._previous.files if self._previous is not None else [*LEGACY_OUTPUTS, "plots"]
        root = d.resolve()
        for name in names:
            path = d / name
            if root in path.resolve().parents:  # never outside the folder, whatever run.json says
                if name == "plots" and path.is_dir():  # older runs: only the figures
                    for png in path.glob("*.png"):
                        png.unlink()
                elif os.path.lexists(path):
                    _remove(path)
        if self.jobs_dir.exists():
            shutil.rmtree(self.jobs_dir)

    def _clear_stale_parts(self) -> None:
        """Drop temporaries of an interrupted write and stored jobs that are not being kept."""
        if not self.jobs_dir.is_dir():
            return
        keep = {p.path.name for p in self._done.values()}
        for child in list(self.jobs_dir.iterdir()):
            if child.name not in keep:
                _remove(child)

    # -- jobs
    def write_job(self, key: JobKey, row: Mapping[str, Any], frames: Mapping[str, pd.DataFrame | None] | None = None,
                  *, timing: Mapping[str, Any] | None = None, info: Mapping[str, Any] | None = None) -> JobPart:
        """Store one finished job atomically: a folder under a temporary name, renamed when whole.

        row: its summary.csv row (starts with "system" and "point"); frames: result tables by name
        (None = not produced); "system" and "point" columns are put in front of each frame here, as the
        combined parquet files have them. timing: its timings.csv row; info: anything else kept.
        """
        system = str(row.get("system", ""))
        stored = []
        final = self.jobs_dir / key.folder
        tmp = self.jobs_dir / f".{key.folder}.tmp-{os.getpid()}"
        try:
            self.jobs_dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            for name, frame in (frames or {}).items():
                if frame is None:
                    continue
                frame = frame.copy()
                for col, value in (("point", key.point), ("system", system)):
                    if col in frame.columns:
                        frame = frame.drop(columns=[col])
                    frame.insert(0, col, value)
                frame.to_parquet(tmp / f"{name}.parquet", index=False)
                stored.append(name)
            digests = {name: _sha256(tmp / f"{name}.parquet") for name in stored}
            data = {"format": FORMAT, "config_hash": self.config_hash, "point": key.point, "system": key.system,
                    "row": dict(row), "timing": dict(timing or {}), "frames": stored, "info": dict(info or {}),
                    "sha256": digests}
            (tmp / JOB_RECORD).write_text(_dumps(data))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise _os_error(final, exc) from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._failures.pop(key, None)
        part = self._read_part(final)
        if part is None:  # just written: only a concurrent writer could make it unreadable
            raise RunDirError(f"{final}: stored job cannot be read back")
        self._done[key] = part
        return part

    def fail_job(self, key: JobKey, system: str, label: str, error: str) -> JobFailure:
        """Record a job that raised; it is listed in run.json and the run ends "failed"."""
        failure = JobFailure(key, system, label, " ".join(str(error).split()))
        self._failures[key] = failure
        return failure

    def parts(self) -> list[JobPart]:
        """The stored jobs of this run (resumed and new), in (point, system) order."""
        return [self._done[k] for k in sorted(self._done)]

    # -- the end
    def combine(self, *, summary_float_format: str = "%.6g") -> pd.DataFrame:
        """Write summary.csv, timings.csv and one <frame>.parquet per frame name from the stored jobs.

        Returns the summary table (empty when no job succeeded; nothing is written then).
        """
        parts = self.parts()
        if not parts:
            return pd.DataFrame()
        summary = pd.DataFrame([p.row for p in parts])
        try:
            self._write_frame("summary.csv", lambda tmp: summary.to_csv(tmp, index=False,
                                                                         float_format=summary_float_format))
            timings = [p.timing for p in parts if p.timing]
            if timings:
                self._write_frame("timings.csv", lambda tmp: pd.DataFrame(timings).to_csv(tmp, index=False))
            names = list(dict.fromkeys(name for p in parts for name in p.frames))
            for name in names:
                paths = [p.path / f"{name}.parquet" for p in parts if name in p.frames]
                self._write_frame(f"{name}.parquet", lambda tmp, ps=paths: concat_parquet(ps, tmp))
        except OSError as exc:
            raise _os_error(self.out_dir, exc) from None
        return summary

    def _write_frame(self, name: str, write: Callable[[Path], Any]) -> None:
        atomic_write(self.out_dir / name, write)
        self._note(name)

    def _note(self, name: str) -> None:
        if name not in self._files:
            self._files.append(name)

    def write_text(self, name: str, text: str) -> Path:
        """Write a file of the run atomically (relative to the folder) and list it in run.json."""
        path = self.out_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_text(path, text)
        self._note(name)
        return path

    def add_files(self, paths: Iterable[Path | str]) -> None:
        """List files the caller wrote into the folder itself (plots, report) in run.json."""
        root = self.out_dir.resolve()
        for p in paths:
            p = Path(p)
            full = p if p.is_absolute() else (Path.cwd() / p)
            try:
                self._note(full.resolve().relative_to(root).as_posix())
            except ValueError:  # outside the folder: not part of the run
                continue

    def close(self, *, status: str | None = None, meta: Mapping[str, Any] | None = None) -> RunRecord:
        """Write run.json (atomically, last). status: default "complete" when every job is stored,
        else "failed"; pass "interrupted" on Ctrl-C. A complete run's jobs/ folder is removed."""
        if self._complete_already and self._previous is not None:
            return self._previous
        if status is None:
            status = "complete" if set(self._done) >= set(self._keys) and not self._failures else "failed"
        if status not in STATUSES:
            raise ValueError(f"status {status!r}: expected one of {', '.join(STATUSES)}")
        try:
            record = self._write_record(status, meta)
            if record.complete and self.jobs_dir.exists():
                shutil.rmtree(self.jobs_dir)  # the combined files hold everything now
        except OSError as exc:
            raise _os_error(self.out_dir, exc) from None
        finally:
            self._lock.release()
        return record

    def current_record(self, status: str = "running", meta: Mapping[str, Any] | None = None) -> RunRecord:
        """The record as it stands (what close() would write with this status)."""
        per_point: dict[int, int] = {}
        for key in self._keys:
            per_point[key.point] = per_point.get(key.point, 0) + 1
        return RunRecord(
            kind=self.kind, experiment=self.experiment, status=status, config_hash=self.config_hash,
            version=__version__, started=self._started, finished=None if status == "running" else _now(),
            wall_s=time.perf_counter() - self._t0, jobs_total=len(self._keys), jobs_per_point=per_point,
            jobs_done=sorted(self._done), jobs_resumed=self._resumed, failures=self.failures,
            files=list(self._files), meta=dict(meta or {}),
        )

    def _write_record(self, status: str, meta: Mapping[str, Any] | None = None) -> RunRecord:
        record = self.current_record(status, meta)
        _write_text(self.out_dir / RECORD, _dumps(record.to_dict()))
        return record


def _dump_yaml(config: Mapping[str, Any]) -> str:
    from tangram_sim.experiments.config import dump_yaml

    return dump_yaml(dict(config))


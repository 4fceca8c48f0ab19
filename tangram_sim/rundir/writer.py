"""`RunWriter`: claims a run folder, stores each job as it finishes, combines the jobs, records the run."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from tangram_sim import __version__
from tangram_sim.rundir.checks import _contents, _damage, _guard_force, _os_error, check_out_dir
from tangram_sim.rundir.claim import refuse_replacing, refuse_tune, tune_record
from tangram_sim.rundir.files import _remove, _sha256, _write_text, atomic_write, concat_parquet
from tangram_sim.rundir.lock import LOCK_NAME, RunLock
from tangram_sim.rundir.records import (
    FORMAT,
    JOB_RECORD,
    JOBS_DIR,
    LEGACY_OUTPUTS,
    RECORD,
    STATUSES,
    JobFailure,
    JobKey,
    JobPart,
    RunDirError,
    RunRecord,
    _dumps,
    _now,
    config_hash,
    read_record,
)


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


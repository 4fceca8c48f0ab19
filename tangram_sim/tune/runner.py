"""`tune_experiment`: search the trial system of a space, write the tune folder, crash-safe.

Layout of DIR:

- `tune.json`: the record, written as "running" before anything else changes in DIR and rewritten last
  as "complete", "failed" or "interrupted" (as run.json is for `tangram-sim run`);
- `config.yaml` (the resolved experiment), `space.yaml` (the space as searched: choices expanded, base
  system, objectives, seed, sampler);
- `study.db`: the Optuna study (SQLite). Every finished trial is in it, so `--resume` continues to N
  trials in total after a crash or Ctrl-C, running again first the trial that was cut short;
- `trials.csv`, `front.csv`, `front.png`, `best-systems.yaml` (`tangram_sim.tune.outputs`), each
  written atomically, `timings.csv` (seconds per trial).

Trial 0 simulates the base system itself when the space can express it (each of its values is a choice
or in range), as a reference point: tune.json says so (`base_trial`) and front.png marks it.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from tangram_sim import __version__
from tangram_sim.api import Experiment
from tangram_sim.errors import ConfigError
from tangram_sim.rundir import RunDirError, atomic_write, check_out_dir, config_hash
from tangram_sim.rundir.checks import _guard_force
from tangram_sim.rundir.files import _remove
from tangram_sim.rundir.lock import LOCK_NAME, RunLock

RECORD = "tune.json"
TUNE_EXTRA = "tangram-sim tune needs the 'tune' extra (Optuna): pip install -e '.[tune]'"
BACKENDS = ("local", "ray")


@dataclass
class TuneResult:
    out_dir: Path
    trials: pd.DataFrame  # trials.csv
    front: pd.DataFrame  # front.csv
    record: dict[str, Any]  # tune.json
    files: list[str] = field(default_factory=list)


def require_optuna() -> None:
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise ConfigError(TUNE_EXTRA) from None


def tune_experiment(experiment: Experiment, space: Any, objectives: Sequence[str], n_trials: int,
                    out_dir: str | Path, *, seed: int = 0, sampler: str = "tpe", backend: str = "local",
                    resume: bool = False, force: bool = False, progress: bool = True) -> TuneResult:
    """Search `space` (a SPACE.yaml path or a `Space`) for `n_trials` trials in total, minimising or
    maximising the summary columns `objectives` ("p50_ttft_s", "max:request_bytes_from_gpu")."""
    require_optuna()
    from tangram_sim.tune.space import Space
    from tangram_sim.tune.space_file import load_space
    from tangram_sim.tune.study import TrialSeededSampler, parse_objectives

    if backend not in BACKENDS:
        raise ConfigError(f"--backend: expected local or ray, got {backend!r}")
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise ConfigError(f"--trials: expected an integer >= 1, got {n_trials!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"--seed: expected an integer >= 0, got {seed!r}")
    if resume and force:
        raise ConfigError("--resume and --force together: --force starts over, --resume continues; pick one")
    goals = parse_objectives(objectives)
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    config = experiment.config()
    if not isinstance(space, Space):
        space = load_space(space, experiment)
    seeded = TrialSeededSampler(sampler, seed)
    settings = {"objectives": [o.label for o in goals], "seed": seed, "sampler": sampler}
    from tangram_sim.sim.systems import make_system

    base = make_system(space.system, space.preset, space.base_overrides).to_dict()
    digest = config_hash(config, {"space": space.to_dict(), "base_system": base, **settings})
    lock = RunLock(out_dir, f"tangram-sim tune of {config['name']}")
    if out_dir.is_dir():
        lock.check()  # another live process tunes (or runs) into it: refused before anything is read
    record = _claim(out_dir, str(config["name"]), digest, resume, force)
    lock.acquire()
    try:
        return _tune(experiment, space, goals, n_trials, out_dir, config, record, settings, seeded, backend,
                     progress)
    finally:
        lock.release()


def _tune(experiment: Experiment, space: Any, goals: Any, n_trials: int, out_dir: Path, config: dict[str, Any],
          record: dict[str, Any], settings: dict[str, Any], seeded: Any, backend: str, progress: bool) -> TuneResult:
    """The study itself, with the folder claimed and locked."""
    from tangram_sim.tune import outputs
    from tangram_sim.tune.study import open_study, requeue_unfinished
    from tangram_sim.tune.trial import TrialRunner

    record.update(settings=settings, params=[p.key for p in space.params], trials={"requested": n_trials},
                  backend=backend)
    from tangram_sim.experiments.config import dump_yaml

    _write(out_dir, record, "config.yaml", lambda p: p.write_text(dump_yaml(config)))
    _write(out_dir, record, "space.yaml", lambda p: p.write_text(dump_yaml({**space.to_dict(), **settings})))
    _save(out_dir, record)
    study = open_study(out_dir, goals, seeded)
    _note(record, "study.db")
    base_values = space.base_values(config)
    record["base_trial"] = 0 if base_values is not None else None
    if base_values is not None and not study.get_trials(deepcopy=False):  # a reference point: trial 0
        study.enqueue_trial(base_values, user_attrs={"index": 0})
    runner = TrialRunner(experiment, space)
    t0 = time.perf_counter()
    from tqdm import tqdm

    from tangram_sim.tune.study import counted

    bar = tqdm(total=n_trials, initial=min(counted(study), n_trials), unit="trial", desc="trials", file=sys.stdout,
               disable=not (progress and sys.stdout.isatty()))
    status = "failed"
    try:
        record["requeued"] = requeue_unfinished(study)  # what a crash left running
        if backend == "ray":
            from tangram_sim.tune.ray_backend import run_ray

            run_ray(out_dir, space.distributions(), runner, goals, seeded, n_trials, lambda: bar.update())
            if counted(study) < n_trials:  # Ray stops its trials on Ctrl-C and returns
                requeue_unfinished(study)
                raise KeyboardInterrupt
        else:
            from tangram_sim.tune.study import run_local

            run_local(study, space.distributions(), runner, goals, n_trials, lambda: bar.update())
        status = "complete"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        bar.close()
        _finish(out_dir, record, study, space, goals, status, time.perf_counter() - t0, outputs)
    trials = pd.read_csv(out_dir / "trials.csv", keep_default_na=False, na_values=[""])
    front = pd.read_csv(out_dir / "front.csv", keep_default_na=False, na_values=[""], dtype={"ties": str})
    return TuneResult(out_dir, trials, front, record, list(record["files"]))


def _finish(out_dir: Path, record: dict[str, Any], study: Any, space: Any, goals: Sequence[Any], status: str,
            wall_s: float, outputs: Any) -> None:
    """Write the tables of what is done (also after Ctrl-C), then the record, last."""
    from optuna.trial import TrialState

    from tangram_sim.tune.study import _counts

    try:
        base = space.base if record.get("base_trial") == 0 else None
        trials, front = outputs.write_outputs(out_dir, study, space, goals, record["experiment"],
                                              lambda name, fn: _write(out_dir, record, name, fn), base)
        timings = [{"trial": int(t.user_attrs.get("index", t.number)), "wall_s": t.user_attrs.get("wall_s")}
                   for t in study.get_trials(deepcopy=False) if _counts(t)]
        frame = pd.DataFrame(timings, columns=["trial", "wall_s"]).sort_values("trial")
        _write(out_dir, record, "timings.csv", lambda p: frame.to_csv(p, index=False))
        cut = [t.number for t in study.get_trials(deepcopy=False)
               if t.state == TrialState.FAIL and not _counts(t)]
        record["trials"].update(done=len(trials), complete=int((trials["state"] == "complete").sum()),
                                failed=int((trials["state"] == "failed").sum()), cut_short=cut)
        record["front"] = [int(t) for t in front["trial"]]
    except Exception:  # keep the error that stopped the tune; the record still gets its status
        if status == "complete":
            status = "failed"
            raise
    finally:
        record.update(status=status, complete=status == "complete", finished=_now(),
                      wall_s=round(record.get("wall_s_before", 0.0) + wall_s, 3))
        _save(out_dir, record)


# ------------------------------------------------------------------ the folder and its record
def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def read_tune_record(out_dir: Path) -> dict[str, Any] | None:
    path = Path(out_dir) / RECORD
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("kind") != "tune":
            raise ValueError("not a tune record")
        return data
    except (ValueError, UnicodeDecodeError) as exc:
        raise RunDirError(f"{path}: not a tune record ({exc}); pick another --out") from None


def _claim(out_dir: Path, experiment: str, digest: str, resume: bool, force: bool) -> dict[str, Any]:
    """Decide whether DIR may be used; clear a previous tune of it unless resuming. Returns the new
    record (not written yet).

    Finished trials are never thrown away without a word: a folder holding a tune with trials done is
    refused unless `--resume` (same configuration) or `--force`, and the message says what is there. A
    complete tune of the very same configuration may be run again in place (it comes out the same)."""
    record: dict[str, Any] = {"format": 1, "kind": "tune", "experiment": experiment, "status": "running",
                              "complete": False, "config_hash": digest, "version": __version__,
                              "started": _now(), "finished": None, "files": []}
    if not out_dir.is_dir() or not [p for p in out_dir.iterdir() if p.name != LOCK_NAME]:
        out_dir.mkdir(parents=True, exist_ok=True)
        return record
    if force:
        _guard_force(out_dir)
        for child in list(out_dir.iterdir()):
            if child.name != LOCK_NAME:
                _remove(child)
        return record
    previous = read_tune_record(out_dir)
    if previous is None or previous.get("experiment") != experiment:
        what = f"the tune of '{previous.get('experiment')}'" if previous else "something other than a tune"
        raise RunDirError(f"{out_dir}: holds {what}, not a tune of '{experiment}'; pick another --out, or "
                          "--force to empty it")
    same = previous.get("config_hash") == digest
    if resume:
        if not same:
            raise RunDirError(f"--resume: {out_dir} was tuned with another configuration "
                              f"({previous.get('config_hash')}, now {digest}): experiment, space, objectives, "
                              "seed or sampler; drop --resume to start over, or use another --out")
        record["files"] = [f for f in previous.get("files", []) if f != RECORD]
        record["wall_s_before"] = float(previous.get("wall_s", 0.0) or 0.0)
        return record
    trials = previous.get("trials") if isinstance(previous.get("trials"), dict) else {}
    done = int(trials.get("done") or 0)
    complete = previous.get("status") == "complete"
    # a tune killed before it wrote its tables has trials in study.db only: count it as work to keep
    work = done > 0 or (not complete and (out_dir / "study.db").is_file())
    if work and not (complete and same):
        status = previous.get("status", "?")
        status = "killed or still running" if status == "running" else status
        if complete:
            how = "--force to replace it, or another --out"
        elif same:
            how = "--resume to continue it, --force to start over, or another --out"
        else:
            how = ("--force to start over (it was configured otherwise, so --resume cannot continue it), or "
                   "another --out")
        raise RunDirError(f"{out_dir} holds {'a complete' if complete else 'an unfinished'} tune of {experiment} "
                          f"({status}, {done} trial(s), config {previous.get('config_hash')}); {how}")
    root = out_dir.resolve()
    for name in [*previous.get("files", []), "study.db"]:
        path = out_dir / name
        if root in path.resolve().parents and path.is_file():  # never outside the folder
            path.unlink()
    return record


def _note(record: dict[str, Any], name: str) -> None:
    if name not in record["files"]:
        record["files"].append(name)


def _write(out_dir: Path, record: dict[str, Any], name: str, write: Callable[[Path], Any]) -> None:
    atomic_write(out_dir / name, write)
    _note(record, name)


def _save(out_dir: Path, record: dict[str, Any]) -> None:
    shown = {k: v for k, v in record.items() if k != "wall_s_before"}
    atomic_write(out_dir / RECORD, lambda p: p.write_text(json.dumps(shown, indent=2, default=str) + "\n"))

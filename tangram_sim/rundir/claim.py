"""What a run folder holds, said before it is written over: the refusals of `RunWriter.check`.

Finished work is never replaced without a word. Writing into a folder that holds

- a complete run of the same experiment with another configuration (another `--set`, another
  calibration), or
- an interrupted, failed or killed run with stored jobs (without `--resume`), or
- a tune (`tune.json`)

is refused unless `--force` (or `--resume` where it applies), and the message says what is there:
"X holds a complete run of E (config sha256:..., 26 jobs, finished ...); --force to replace it, or
another --out". A complete run of the very same configuration may be run again in place (its results
come out the same); an incomplete one with no stored job holds nothing to lose.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tangram_sim.errors import TangramError

__all__ = ["refuse_replacing", "refuse_tune", "tune_record"]


def tune_record(folder: Path) -> dict[str, Any] | None:
    """tune.json of a folder written by `tangram-sim tune`, if any."""
    path = folder / "tune.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return {"experiment": "?", "status": "unreadable"}
    return data if isinstance(data, dict) else {"experiment": "?", "status": "unreadable"}


def _when(record: Any) -> str:
    return f", finished {record.finished}" if record.finished else f", started {record.started}"


def refuse_replacing(folder: Path, record: Any, config_hash: str, kind: str, stored_jobs: int,
                     error: type[TangramError]) -> None:
    """Raise `error` (one line) when writing this run (not resuming, not forcing) into `folder`, whose
    run.json is `record` of the same experiment and kind, would throw away finished work."""
    name = record.experiment
    if record.complete:
        if record.config_hash == config_hash:
            return  # the same configuration again: the same results
        raise error(f"{folder} holds a complete {_what(kind)} of {name} (config {record.config_hash}, "
                    f"{record.jobs_total} job(s){_when(record)}), and this one is configured otherwise "
                    f"({config_hash}); --force to replace it, or another --out")
    if stored_jobs <= 0:
        return  # nothing finished to lose
    status = "killed or still running" if record.status == "running" else record.status
    same = record.config_hash == config_hash
    if kind == "replay":
        how = "--force to start over, or another --out"
    elif same:
        how = "--resume to continue it, --force to start over, or another --out"
    else:
        how = ("--force to start over (it was configured otherwise, so --resume cannot continue it), or "
               "another --out")
    raise error(f"{folder} holds an unfinished {_what(kind)} of {name} ({status}; config {record.config_hash}, "
                f"{stored_jobs} of {record.jobs_total} job(s) stored{_when(record)}); {how}")


def refuse_tune(folder: Path, tune: dict[str, Any], error: type[TangramError]) -> None:
    """A run never writes into a tune's folder without --force."""
    status = tune.get("status", "?")
    trials = (tune.get("trials") or {}).get("done") if isinstance(tune.get("trials"), dict) else None
    done = f", {trials} trial(s)" if trials is not None else ""
    raise error(f"{folder} holds a tune of {tune.get('experiment', '?')} ({status}{done}, config "
                f"{tune.get('config_hash', '?')}); --force to replace it, or another --out")


def _what(kind: str) -> str:
    return "replay" if kind == "replay" else "run"

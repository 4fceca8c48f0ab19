"""Python API for notebooks and scripts: load an experiment, change dotted keys, run it, read the results.

    from tangram_sim import load_experiment

    exp = load_experiment("experiments/quickstart.yaml")
    exp = exp.with_overrides({"cluster.gpu_memory_gib": 48, "systems.1.overrides.keep_alive_s": 60})
    result = exp.run(out="results/quickstart-48", jobs=2)
    result.summary[["system", "p50_ttft_s", "mean_load_per_request_s"]]
    result.requests.groupby("system")["ttft_s"].median()

Overrides are the dotted keys of `tangram-sim run --set` (`tangram_sim.experiments.config`), applied in
order and validated the same way, with the same one-line `ConfigError`s. A run writes the same run
directory as `tangram-sim run` (which is built on this module, as is `tangram-sim tune`): `summary.csv`,
`requests.parquet`, ..., `run.json` last; `Result` reads it back.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from tangram_sim.errors import ConfigError

__all__ = ["Experiment", "Result", "load_experiment"]

Override = str | tuple[str, Any]  # "dotted.key=value" (YAML value, as --set) or (dotted key, value)


def load_experiment(path: str | Path) -> Experiment:
    """Read an experiment YAML; relative paths in it resolve against its folder (as `tangram-sim run`)."""
    from tangram_sim import experiments  # looked up at call time: tests stand in for load_yaml

    raw, base_dir = experiments.load_yaml(path)
    return Experiment(raw=raw, base_dir=base_dir, path=Path(path))


@dataclass(frozen=True, eq=False)
class Experiment:
    """An experiment as read, plus the overrides to apply before it runs (the file is never changed)."""

    raw: dict[str, Any]  # the YAML as read, without the overrides
    base_dir: Path | None = None  # folder relative paths in it resolve against first
    path: Path | None = None  # the file it came from, if any
    overrides: tuple[Override, ...] = field(default=())  # applied in order by `config` and `run`

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], base_dir: str | Path | None = None) -> Experiment:
        """An experiment built in code (the same keys as the YAML)."""
        if not isinstance(raw, Mapping):
            raise ConfigError("experiment: expected a mapping of experiment keys")
        return cls(raw=copy.deepcopy(dict(raw)), base_dir=Path(base_dir).resolve() if base_dir else None)

    @property
    def name(self) -> str:
        """The experiment's name, after the overrides."""
        return str(self.config()["name"])

    def with_overrides(self, overrides: Mapping[str, Any] | Iterable[Override], *,
                       validate: bool = True) -> Experiment:
        """A copy with dotted keys set, e.g. {"cluster.gpu_memory_gib": 48, "systems.0.preset": "tangram"}
        or ["trace.max_requests=100"]. validate: check every sweep point now (ConfigError naming the key),
        rather than when it runs."""
        if isinstance(overrides, Mapping):
            items: list[Override] = [(str(k), copy.deepcopy(v)) for k, v in overrides.items()]
        elif isinstance(overrides, str):
            items = [overrides]
        else:
            items = []
            for item in overrides:
                if isinstance(item, str):
                    items.append(item)
                elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
                    items.append((item[0], copy.deepcopy(item[1])))
                else:
                    raise ConfigError(f"overrides: expected 'key=value' or (key, value), got {item!r}")
        new = replace(self, overrides=(*self.overrides, *items))
        if validate:
            new.config()
        return new

    def config(self) -> dict[str, Any]:
        """The validated configuration (first sweep point, defaults filled in, the sweep kept)."""
        from tangram_sim.experiments.runner import prepare

        resolved, _ = prepare(self.raw, self.base_dir, self.overrides)
        return resolved

    def points(self) -> list[dict[str, Any]]:
        """The sweep points, each {dotted key: value} (one empty point without a sweep)."""
        from tangram_sim.experiments.runner import prepare

        _, points = prepare(self.raw, self.base_dir, self.overrides)
        return [dict(p["point"]) for p in points]

    def run(self, out: str | Path | None = None, jobs: int = 1, backend: str = "local", *,
            progress: bool = True, plots: bool | None = None, skip_bad_rows: bool = False,
            resume: bool = False, force: bool = False, calibration_partial: bool = False,
            max_jobs: int | None = None) -> Result:
        """Simulate every system at every sweep point and write the run directory `out` (a new
        temporary folder when None). jobs: parallel simulations; backend: "local" (process pool) or
        "ray"; progress: a bar when stderr is a terminal; plots: None = the experiment's `outputs.plots`;
        resume/force/calibration_partial/max_jobs: as `tangram-sim run --resume/--force/--calibration-partial/
        --max-jobs` (max_jobs None: the default bound, `runner.MAX_JOBS`). Raises RunFailed (a TangramError carrying
        `.summary` and `.record`) when some jobs fail, after writing the others."""
        from tangram_sim.experiments import runner

        if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
            raise ConfigError(f"jobs: expected an integer >= 1, got {jobs!r}")
        if out is None:
            out = tempfile.mkdtemp(prefix=f"tangram-sim-{_safe(self.raw.get('name'))}-")
        out_dir = Path(out)
        summary = runner.run_experiment(
            self.raw, self.base_dir, out_dir, sets=self.overrides, backend=backend, n_jobs=jobs,
            progress=progress, plots=plots, skip_bad_rows=skip_bad_rows, resume=resume, force=force,
            calibration_partial=calibration_partial, max_jobs=runner.MAX_JOBS if max_jobs is None else max_jobs,
        )
        return Result(out_dir, summary)


class Result:
    """A finished run: its summary (one row per system and sweep point) and its run directory."""

    def __init__(self, out_dir: str | Path, summary: pd.DataFrame | None = None) -> None:
        self.out_dir = Path(out_dir)
        if summary is None:  # a run directory written earlier
            from tangram_sim.rundir import require_complete

            record = require_complete(self.out_dir)
            summary = pd.read_csv(self.out_dir / "summary.csv")
            summary.attrs.update(record=record, skipped_rows=int(record.meta.get("skipped_rows", 0) or 0),
                                 trace_notes=list(record.meta.get("trace_notes") or []))
        self.summary = summary
        self._frames: dict[str, pd.DataFrame] = {}

    @classmethod
    def load(cls, out_dir: str | Path) -> Result:
        """The result of a complete run directory (`tangram-sim run` or `Experiment.run`)."""
        return cls(out_dir)

    @property
    def record(self) -> Any:
        """The run's `RunRecord` (run.json)."""
        return self.summary.attrs.get("record")

    @property
    def already_complete(self) -> bool:
        """`resume=True` found the run complete: nothing was run."""
        return bool(self.summary.attrs.get("already_complete", False))

    @property
    def notes(self) -> list[str]:
        """What the trace reader filled in or changed (e.g. ServeGen clients without dataset files)."""
        return list(self.summary.attrs.get("trace_notes", ()))

    @property
    def skipped_rows(self) -> int:
        return int(self.summary.attrs.get("skipped_rows", 0) or 0)

    @property
    def sweep_keys(self) -> list[str]:
        record = self.record
        keys = record.meta.get("sweep_keys") if record is not None else None
        if keys is None:
            keys = [c for c in self.summary.columns if "." in c]
        return [str(k) for k in keys]

    @property
    def requests(self) -> pd.DataFrame:
        """Every request of every job: `system`, `point`, the sweep keys' values, then the request columns."""
        return self._frame("requests")

    @property
    def timeline(self) -> pd.DataFrame:
        """The memory timeline of every job, with the same leading columns as `requests`."""
        return self._frame("timeline")

    def _frame(self, name: str) -> pd.DataFrame:
        if name not in self._frames:
            path = self.out_dir / f"{name}.parquet"
            if not path.is_file():
                raise ConfigError(f"{path}: not written (outputs.{name}: false, or no job succeeded)")
            frame = pd.read_parquet(path)
            keys = [k for k in self.sweep_keys if k in self.summary.columns and k not in frame.columns]
            if keys:
                per_point = self.summary.drop_duplicates("point").set_index("point")
                at = list(frame.columns).index("point") + 1 if "point" in frame.columns else 0
                for i, key in enumerate(keys):
                    frame.insert(at + i, key, frame["point"].map(per_point[key]))
            self._frames[name] = frame
        return self._frames[name]

    def __repr__(self) -> str:
        return f"Result({str(self.out_dir)!r}, {len(self.summary)} summary row(s))"


def _safe(name: Any) -> str:
    text = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in str(name or "run"))
    return text[:40] or "run"

"""One trial: the experiment with the trial's system (and cluster keys), simulated through the Python API.

`TrialRunner` is plain data (the experiment as read, its overrides, the space) and picklable, so a Ray
worker runs the very same code as the local loop. Each trial writes its run directory into a temporary
folder (summary only: no request table, timeline or plots) and removes it once the summary is read.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tangram_sim.api import Experiment
from tangram_sim.errors import TangramError
from tangram_sim.tune.space import Space

QUIET_OUTPUTS = {"outputs.requests": False, "outputs.timeline": False, "outputs.plots": False}


@dataclass(frozen=True)
class TrialRunner:
    experiment: Experiment  # the experiment to tune, with its --set overrides
    space: Space

    def trial_experiment(self, sampled: Mapping[str, Any]) -> Experiment:
        """The experiment one trial simulates: the trial's system only, the trial's cluster keys."""
        values = self.space.values(sampled)
        return self.experiment.with_overrides({**self.space.experiment_overrides(values), **QUIET_OUTPUTS},
                                              validate=False)

    def __call__(self, sampled: Mapping[str, Any]) -> dict[str, Any]:
        """{"metrics": summary means over the sweep points, "wall_s"}, or {"error": one line, "wall_s"}."""
        t0 = time.perf_counter()
        out = tempfile.mkdtemp(prefix="tangram-sim-trial-")
        try:
            result = self.trial_experiment(sampled).run(out=out, jobs=1, progress=False, plots=False)
        except TangramError as exc:  # this trial's configuration cannot run: a failed trial, not a stop
            return {"error": " ".join(str(exc).split()), "wall_s": time.perf_counter() - t0}
        finally:
            shutil.rmtree(out, ignore_errors=True)
        summary = result.summary
        skip = {"point", *result.sweep_keys}
        metrics: dict[str, float] = {}
        for column in summary.columns:
            if column in skip or column == "system":
                continue
            try:
                value = float(summary[column].astype(float).mean())
            except (TypeError, ValueError):
                continue
            metrics[column] = value if math.isfinite(value) else float("nan")
        return {"metrics": metrics, "wall_s": time.perf_counter() - t0}

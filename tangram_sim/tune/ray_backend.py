"""`tangram-sim tune --backend ray`: the trials run as Ray Tune trials, searched by Optuna through
`ray.tune.search.optuna.OptunaSearch` on the same study (DIR/study.db) and the same per-trial seeded
sampler as the local loop.

Trials run one at a time (`max_concurrent_trials=1`): each suggestion depends on every result before it,
which is what makes a seed reproduce its front, on Ray as locally. Ray is started with
`ray.init(num_cpus=2)` unless RAY_ADDRESS names a cluster (or Ray is running already in this process).
Tune's own files go to a temporary folder that is removed at the end; the study keeps everything.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optuna

from tangram_sim.errors import ConfigError
from tangram_sim.tune.study import STUDY_NAME, Objective, TrialSeededSampler, counted, storage_url, tell
from tangram_sim.tune.trial import TrialRunner

RAY_EXTRA = "--backend ray needs the 'ray' extra (Ray Tune): pip install -e '.[ray]'"


def _ray_trial(config: dict[str, Any], runner: TrialRunner, columns: Sequence[str]) -> None:
    """A Ray Tune function trainable: one simulation, reported once."""
    from ray import tune

    outcome = runner(config)
    metrics = outcome.get("metrics") or {}
    values = {c: float(metrics.get(c, math.nan)) for c in columns}
    tune.report({**values, "outcome": json.dumps(outcome)})


def run_ray(out_dir: Any, space_distributions: Mapping[str, Any], runner: TrialRunner,
            objectives: Sequence[Objective], sampler: TrialSeededSampler, n_trials: int,
            on_done: Callable[[], None]) -> None:
    """Run trials on Ray Tune until `n_trials` count in the study of `out_dir`."""
    try:
        import ray
        from ray import tune
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        raise ConfigError(RAY_EXTRA) from None

    storage = optuna.storages.RDBStorage(storage_url(out_dir))
    study = optuna.load_study(study_name=STUDY_NAME, storage=storage, sampler=sampler)
    remaining = n_trials - counted(study)
    if remaining <= 0:
        return
    columns = [o.column for o in objectives]
    modes = ["max" if o.direction == "maximize" else "min" for o in objectives]

    class StudySearch(OptunaSearch):
        """OptunaSearch that records each trial's index, and its outcome (errors included) as the local
        loop does."""

        def suggest(self, trial_id: str) -> dict | None:
            params = super().suggest(trial_id)
            trial = self._ot_trials.get(trial_id)
            if trial is not None and "index" not in trial.user_attrs:
                trial.set_user_attr("index", sampler.last_index)
            return params

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            pass  # one result per trial: nothing to prune

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            if trial_id in self._completed_trials or trial_id not in self._ot_trials:
                return
            if result and "outcome" in result:
                outcome = json.loads(result["outcome"])
            elif error:  # the trainable raised: a bug, reported after the run (see `errors` below)
                return
            else:  # stopped before it reported (Ctrl-C): left running, queued again afterwards
                return
            tell(self._ot_study, self._ot_trials[trial_id], outcome, objectives)
            self._completed_trials.add(trial_id)
            on_done()

    searcher = StudySearch(
        space=dict(space_distributions), metric=columns if len(columns) > 1 else columns[0],
        mode=modes if len(modes) > 1 else modes[0], sampler=sampler, study_name=STUDY_NAME, storage=storage,
    )
    # Tune's console tables and its default loggers (TensorBoard, CSV, JSON per trial): the study and
    # tangram-sim's own bar say the same
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    started_here = False
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.ERROR}
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=2, include_dashboard=False, **kwargs)
        started_here = True
    scratch = tempfile.mkdtemp(prefix="tangram-sim-ray-tune-")
    try:
        trainable = tune.with_parameters(_ray_trial, runner=runner, columns=columns)
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": 1}),
            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=remaining, max_concurrent_trials=1,
                                        reuse_actors=True),
            run_config=tune.RunConfig(name="tangram-sim-tune", storage_path=scratch, verbose=0,
                                      log_to_file=False),
        )
        grid = tuner.fit()
        errors = list(grid.errors)
        if errors:  # not a configuration error (those are failed trials): a bug, with its traceback
            raise errors[0]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if started_here:
            ray.shutdown()

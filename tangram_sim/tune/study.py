"""The Optuna study of a tune: objectives, trials seeded by their index, the local loop, outcomes.

Reproducibility. Trials run one after another, and before each one the sampler is made afresh from
(seed, trial index), where the index counts the trials finished before it. What a trial samples then
depends only on the seed and the results before it, not on the sampler's history in this process: the
local loop and Ray Tune (which asks the same study through `OptunaSearch`) sample the same parameters,
and a study resumed after a crash continues as the uninterrupted one would have. A trial cut short
(Ctrl-C, a crash) is marked failed without a result, does not count, and its parameters are queued
again with its index, so the next run simulates them first.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from tangram_sim.errors import ConfigError

STUDY_NAME = "tangram-sim-tune"
STUDY_FILE = "study.db"
SAMPLERS = ("tpe", "nsga2", "random")


# ------------------------------------------------------------------ objectives
@dataclass(frozen=True)
class Objective:
    column: str  # a summary.csv column
    direction: str  # minimize | maximize

    @property
    def label(self) -> str:
        return f"max:{self.column}" if self.direction == "maximize" else self.column


def summary_columns() -> list[str]:
    """The numeric columns of summary.csv, as this version computes them (the bytes cold starts took from
    each source among them: `bytes_from_remote`, `bytes_from_peer_gpu`, ...)."""
    import pandas as pd

    from tangram_sim.core.metrics import REQUEST_COLUMNS, summarize
    from tangram_sim.core.sources import SOURCE_COLUMNS

    return [*summarize(pd.DataFrame(columns=REQUEST_COLUMNS), 0.0, 0), "sim_end_s", *SOURCE_COLUMNS]


def parse_objectives(texts: Sequence[str]) -> tuple[Objective, ...]:
    """`p50_ttft_s` (minimised), `min:COLUMN` or `max:COLUMN`; one-line errors naming the option."""
    if not texts:
        raise ConfigError("--objective: give at least one summary column, e.g. --objective p50_ttft_s")
    known = summary_columns()
    out: list[Objective] = []
    for text in texts:
        direction, column = "minimize", text.strip()
        if ":" in column:
            prefix, column = column.split(":", 1)
            if prefix not in ("min", "max"):
                raise ConfigError(f"--objective {text!r}: expected COLUMN, min:COLUMN or max:COLUMN")
            direction = "maximize" if prefix == "max" else "minimize"
        if column not in known:
            raise ConfigError(f"--objective {text!r}: not a summary column; expected one of: {', '.join(known)}")
        if any(o.column == column for o in out):
            raise ConfigError(f"--objective {column}: given twice")
        out.append(Objective(column, direction))
    return tuple(out)


# ------------------------------------------------------------------ sampling
def counted(study: optuna.Study) -> int:
    """Trials that count towards --trials: completed, or failed with a result (a simulation error);
    not the ones cut short."""
    return sum(1 for t in study.get_trials(deepcopy=False) if _counts(t))


def _counts(trial: optuna.trial.FrozenTrial) -> bool:
    if trial.state == TrialState.COMPLETE:
        return True
    return trial.state == TrialState.FAIL and trial.user_attrs.get("outcome") == "error"


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """Wraps a TPE, NSGA-II or random sampler that is made afresh before every trial from (seed, index)."""

    def __init__(self, kind: str = "tpe", seed: int = 0) -> None:
        if kind not in SAMPLERS:
            raise ConfigError(f"--sampler: expected one of {', '.join(SAMPLERS)}, got {kind!r}")
        self.kind, self.seed = kind, int(seed)
        self.last_index = 0  # index of the trial being sampled
        self._inner = self._make(0)

    def _make(self, index: int) -> optuna.samplers.BaseSampler:
        seed = (self.seed * 1_000_003 + index) % 2**32
        if self.kind == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed)
        if self.kind == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        return optuna.samplers.TPESampler(seed=seed)

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        index = trial.user_attrs.get("index")  # a trial queued again keeps its index
        self.last_index = int(index) if index is not None else counted(study)
        self._inner = self._make(self.last_index)
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: optuna.trial.FrozenTrial,
                        search_space: dict[str, Any]) -> dict[str, Any]:
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, param_name: str,
                           param_distribution: Any) -> Any:
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:  # every trial is seeded from (seed, index) already
        pass


def storage_url(out_dir: Path) -> str:
    return f"sqlite:///{(Path(out_dir) / STUDY_FILE).resolve()}"


def open_study(out_dir: Path, objectives: Sequence[Objective], sampler: TrialSeededSampler) -> optuna.Study:
    """The study in DIR/study.db (created, or loaded to resume)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(
        storage=storage_url(out_dir), study_name=STUDY_NAME, sampler=sampler, load_if_exists=True,
        directions=[o.direction for o in objectives],
    )


def requeue_unfinished(study: optuna.Study) -> list[int]:
    """Mark the trials left running (Ctrl-C, a crash) failed without a result and queue their
    parameters again, with their index; returns their numbers."""
    numbers = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(t.number, state=TrialState.FAIL)
        attrs = {"index": t.user_attrs["index"]} if "index" in t.user_attrs else None
        study.enqueue_trial(dict(t.params), user_attrs=attrs)
        numbers.append(t.number)
    return numbers


def tell(study: optuna.Study, trial: optuna.Trial, outcome: Mapping[str, Any],
         objectives: Sequence[Objective]) -> None:
    """Record a trial's outcome ({"metrics": {...}} or {"error": "..."}, and "wall_s") and finish it."""
    metrics = dict(outcome.get("metrics") or {})
    error = outcome.get("error")
    values: list[float] = []
    if error is None:
        for o in objectives:
            value = metrics.get(o.column)
            if value is None or not math.isfinite(value):
                error = f"objective {o.column} is {value} (no completed request?)"
                break
            values.append(float(value))
    trial.set_user_attr("wall_s", round(float(outcome.get("wall_s", 0.0)), 3))
    if metrics:
        trial.set_user_attr("metrics", metrics)
    if error:
        trial.set_user_attr("error", " ".join(str(error).split()))
    trial.set_user_attr("outcome", "error" if error else "ok")  # last: what `counted` reads
    if error:
        study.tell(trial, state=TrialState.FAIL)
    else:
        study.tell(trial, values if len(values) > 1 else values[0])


def run_local(study: optuna.Study, distributions: Mapping[str, Any], evaluate: Callable[[dict], dict],
              objectives: Sequence[Objective], n_trials: int, on_done: Callable[[], None]) -> None:
    """Ask, simulate and tell, one trial at a time, until `n_trials` count."""
    sampler = study.sampler
    while counted(study) < n_trials:
        trial = study.ask(fixed_distributions=dict(distributions))
        if "index" not in trial.user_attrs:
            trial.set_user_attr("index", getattr(sampler, "last_index", trial.number))
        try:
            outcome = evaluate(dict(trial.params))
        except BaseException:  # Ctrl-C or a bug: this trial runs again on --resume
            requeue_unfinished(study)
            raise
        tell(study, trial, outcome, objectives)
        on_done()

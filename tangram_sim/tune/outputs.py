"""What a tune writes from its study: trials.csv, front.csv, front.png and best-systems.yaml.

Every table is ordered by trial index (the order trials were sampled in) and holds only what the simulations
decided: parameters as simulated (blank where a key's `when` did not hold), objectives, state and error;
never times, so the same seed and number of trials give the same bytes. Trials cut short and run again are
not listed (tune.json counts them). The front is the set of completed trials that no other completed trial
dominates (with one objective: the best value); front.csv and best-systems.yaml list each distinct set of
objective values once, by the first trial that reached it (`ties`: the later ones).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tangram_sim.tune.space import Space
from tangram_sim.tune.study import Objective, _counts

FLOAT_FORMAT = "%.6g"


def trials_table(study: Any, space: Space, objectives: Sequence[Objective]) -> pd.DataFrame:
    """One row per trial that counts: trial (index), state, parameters, objectives, error."""
    from optuna.trial import TrialState

    rows = []
    for t in study.get_trials(deepcopy=False):
        if not _counts(t) or not all(p.key in t.params for p in space.params):
            continue
        complete = t.state == TrialState.COMPLETE
        row: dict[str, Any] = {"trial": int(t.user_attrs.get("index", t.number)),
                               "state": "complete" if complete else "failed"}
        values = space.values(t.params)
        # a key the trial did not simulate (its `when` does not hold) is left blank: the sampler drew it only
        # to keep every trial's distributions the same
        row.update({p.key: values[p.key] if space.applies(p, values) else None for p in space.params})
        for i, o in enumerate(objectives):
            row[o.column] = float(t.values[i]) if complete else math.nan
        row["error"] = t.user_attrs.get("error", "")
        rows.append(row)
    columns = ["trial", "state", *(p.key for p in space.params), *(o.column for o in objectives), "error"]
    table = pd.DataFrame(rows, columns=columns)
    return table.sort_values("trial", kind="stable").reset_index(drop=True)


def pareto_mask(trials: pd.DataFrame, objectives: Sequence[Objective]) -> pd.Series:
    """Which trials are on the front: completed, and dominated by no other completed trial, comparing the
    objectives as trials.csv writes them (6 significant digits: a difference in the 13th digit of a TTFT
    is noise, not a better system)."""
    mask = pd.Series(False, index=trials.index)
    done = trials[trials["state"] == "complete"]
    if done.empty:
        return mask
    signs = np.array([1.0 if o.direction == "minimize" else -1.0 for o in objectives])
    values = _rounded(done[[o.column for o in objectives]]).to_numpy(dtype=float) * signs
    for pos, i in enumerate(done.index):
        mask[i] = not np.any(np.all(values <= values[pos], axis=1) & np.any(values < values[pos], axis=1))
    return mask


def pareto_front(trials: pd.DataFrame, objectives: Sequence[Objective]) -> pd.DataFrame:
    """The front, one row per distinct set of objective values: its first trial, the trials that tied
    with it in `ties`; ordered by the objectives."""
    front = trials[pareto_mask(trials, objectives)]
    if front.empty:
        return front.assign(ties="")
    columns = [o.column for o in objectives]
    key = _rounded(front[columns]).astype(str).agg("|".join, axis=1)
    ties = front.groupby(key, sort=False)["trial"].agg(lambda t: " ".join(str(int(x)) for x in sorted(t)[1:]))
    front = front.loc[~key.duplicated()].copy()
    front["ties"] = key[front.index].map(ties).to_numpy()
    ascending = [o.direction == "minimize" for o in objectives]
    return front.sort_values([*columns, "trial"], ascending=[*ascending, True], kind="stable").reset_index(drop=True)


def _rounded(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.map(lambda v: float(f"{v:.6g}"))


def front_figure(trials: pd.DataFrame, front: pd.DataFrame, objectives: Sequence[Objective], title: str,
                 base: str | None = None) -> Any:
    """Every completed trial (grey) and the front (highlighted): objective pairs, or with one objective
    the value of each trial in order and the best so far. base: trial 0 is the base system, marked."""
    from matplotlib.figure import Figure

    done = trials[trials["state"] == "complete"]
    reference = done[done["trial"] == 0] if base else done.iloc[:0]
    labels = [f"{o.column} ({'max' if o.direction == 'maximize' else 'min'})" for o in objectives]
    if len(objectives) == 1:
        fig = Figure(figsize=(6.4, 4.2), dpi=150)
        ax = fig.add_subplot()
        col = objectives[0].column
        ax.scatter(done["trial"], done[col], s=16, color="#9e9e9e", label="trials")
        best = done[col].cummin() if objectives[0].direction == "minimize" else done[col].cummax()
        ax.step(done["trial"], best, where="post", color="#1f4e79", label="best so far")
        ax.scatter(front["trial"], front[col], s=40, color="#d62728", zorder=3, label="best")
        if not reference.empty:
            ax.scatter(reference["trial"], reference[col], s=60, marker="x", color="black", zorder=4,
                       label=f"base ({base})")
        ax.set_xlabel("trial")
        ax.set_ylabel(labels[0])
        ax.legend(fontsize=8)
    else:
        pairs = [(i, j) for i in range(len(objectives)) for j in range(i + 1, len(objectives))]
        cols = min(3, len(pairs))
        rows = math.ceil(len(pairs) / cols)
        fig = Figure(figsize=(4.6 * cols, 4.0 * rows), dpi=150)
        for n, (i, j) in enumerate(pairs):
            ax = fig.add_subplot(rows, cols, n + 1)
            x, y = objectives[i].column, objectives[j].column
            ax.scatter(done[x], done[y], s=14, color="#9e9e9e", label="trials")
            ax.scatter(front[x], front[y], s=36, color="#d62728", zorder=3, label="front")
            if not reference.empty:
                ax.scatter(reference[x], reference[y], s=60, marker="x", color="black", zorder=4,
                           label=f"base ({base})")
            if len(objectives) == 2:
                line = front.sort_values(x)
                ax.plot(line[x], line[y], color="#d62728", linewidth=1, alpha=0.6)
            ax.set_xlabel(labels[i])
            ax.set_ylabel(labels[j])
            ax.grid(alpha=0.3)
            if n == 0:
                ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def best_systems_yaml(front: pd.DataFrame, space: Space, objectives: Sequence[Objective], experiment: str) -> str:
    """The front's systems as a YAML list to paste under `systems:` (preset + overrides), each
    preceded by a comment with its objectives (and the cluster keys it was found with)."""
    from tangram_sim.experiments.config import dump_yaml

    what = "best system" if len(objectives) == 1 else "systems on the Pareto front"
    lines = [
        f"# tangram-sim tune of {experiment}: {len(front)} {what} of "
        + ", ".join(f"{o.column} ({'max' if o.direction == 'maximize' else 'min'})" for o in objectives),
        "# paste under `systems:` of an experiment; each starts from preset "
        f"{space.preset!r} (space base {space.base!r})",
    ]
    for _, row in front.iterrows():
        values = {p.key: _plain(row[p.key]) for p in space.params}
        entry = space.system_entry(values, f"{space.system}-{int(row['trial'])}")
        figures = ", ".join(f"{o.column} {row[o.column]:.4g}" for o in objectives)
        lines.append(f"# trial {int(row['trial'])}: {figures}")
        cluster = space.cluster_values(values)
        if cluster:
            lines.append("# found with the cluster keys " + ", ".join(f"{k}={v}" for k, v in cluster.items()))
        lines.append(dump_yaml([entry]).rstrip())
    if front.empty:
        lines.append("[]  # no trial completed")
    return "\n".join(lines) + "\n"


def _plain(value: Any) -> Any:
    """numpy scalars from a DataFrame as plain Python values (YAML writes them plainly)."""
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_outputs(out_dir: Path, study: Any, space: Space, objectives: Sequence[Objective], experiment: str,
                  write: Any, base: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Write trials.csv, front.csv, front.png and best-systems.yaml through `write(name, fn)` (atomic).
    base: the base system's name when trial 0 simulated it."""
    trials = trials_table(study, space, objectives)
    trials.insert(2, "front", pareto_mask(trials, objectives))
    front = pareto_front(trials, objectives)
    write("trials.csv", lambda tmp: trials.to_csv(tmp, index=False, float_format=FLOAT_FORMAT))
    shown = front.drop(columns=["state", "front", "error"])
    metrics = _front_metrics(study, front, objectives)
    if not metrics.empty:
        shown = shown.merge(metrics, on="trial", how="left")
    write("front.csv", lambda tmp: shown.to_csv(tmp, index=False, float_format=FLOAT_FORMAT))
    title = f"{experiment}: {len(trials)} trials, front of {len(front)}"
    figure = front_figure(trials, front, objectives, title, base)
    write("front.png", lambda tmp: figure.savefig(tmp, format="png"))
    text = best_systems_yaml(front, space, objectives, experiment)
    write("best-systems.yaml", lambda tmp: Path(tmp).write_text(text))
    return trials, front


def _front_metrics(study: Any, front: pd.DataFrame, objectives: Sequence[Objective]) -> pd.DataFrame:
    """The other summary figures of the front's trials (means over the sweep points)."""
    wanted = set(int(t) for t in front["trial"])
    skip = {o.column for o in objectives}
    rows = []
    for t in study.get_trials(deepcopy=False):
        index = t.user_attrs.get("index", t.number)
        if _counts(t) and index in wanted and t.user_attrs.get("outcome") == "ok":
            metrics = t.user_attrs.get("metrics") or {}
            rows.append({"trial": int(index), **{k: v for k, v in metrics.items() if k not in skip}})
    return pd.DataFrame(rows).drop_duplicates("trial") if rows else pd.DataFrame()

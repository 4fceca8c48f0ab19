"""`tangram-sim tune`: search system policies and parameters with Optuna (locally, or on Ray Tune).

- `space`, `space_file`: the search space; SPACE.yaml, checked against the experiment, the system
  fields and the policy registries;
- `study`: objectives, the Optuna study in DIR/study.db, trials seeded by their index, the local loop;
- `trial`: one trial, simulated through the Python API (`tangram_sim.api`);
- `ray_backend`: the same trials as Ray Tune trials searched by `OptunaSearch`;
- `outputs`: trials.csv, front.csv, front.png, best-systems.yaml;
- `runner`: `tune_experiment`, the folder and its record (tune.json).

Optuna (the `tune` extra) is imported only when a tune runs.
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_space", "tune_experiment"]


def __getattr__(name: str) -> Any:
    if name == "tune_experiment":
        from tangram_sim.tune.runner import tune_experiment

        return tune_experiment
    if name == "load_space":
        from tangram_sim.tune.space_file import load_space

        return load_space
    raise AttributeError(f"module 'tangram_sim.tune' has no attribute {name!r}")

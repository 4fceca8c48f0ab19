"""Experiment YAMLs: schema, sweeps, and the runner that writes tables, plots and a report."""

from tangram_sim.experiments.config import load_yaml, sweep_points, validate
from tangram_sim.experiments.runner import run_experiment

__all__ = ["load_yaml", "run_experiment", "sweep_points", "validate"]

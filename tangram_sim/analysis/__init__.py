"""Offline analysis of runs: the exact retention optimum of small cases (`optimum`) and of a run's own
schedule (`schedule`; `python -m tangram_sim.analysis RUN_DIR`)."""

from tangram_sim.analysis.optimum import Optimum, offline_optimum, unlimited_memory_loads

__all__ = ["Optimum", "offline_optimum", "unlimited_memory_loads"]

"""Checks of a run's configuration that need no simulation, made before anything is written.

A model larger than the GPU, `tensor_parallel` above the GPUs of a node, or a bad calibration file
would otherwise fail every job inside the workers ("2 of 2 job(s) failed", then advice to --resume);
here they are one line, before the output folder exists.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from tangram_sim.errors import ConfigError, TangramError

__all__ = ["check_points"]


def check_points(points: Sequence[dict[str, Any]], base_dir: Path | None, *, calibration_partial: bool = False) -> None:
    """Every sweep point's models fit its GPUs under every system, and its calibration file reads and
    covers its models (unless `calibration_partial`: the others are timed by the roofline)."""
    from tangram_sim.experiments.config import build_calibration, build_cluster, build_models, build_systems
    from tangram_sim.experiments.runner import point_label
    from tangram_sim.sim.calibration_file import uncovered_models
    from tangram_sim.sim.simulate import _validate

    empty = pd.DataFrame({"model": pd.Series([], dtype=object)})
    seen_calibrations: set[str] = set()
    for i, p in enumerate(points):
        config = p["config"]
        label = point_label(i, p["point"]) if len(points) > 1 else ""
        prefix = f"{label}: " if label else ""
        models = build_models(config, base_dir)
        cluster = build_cluster(config)
        for system in build_systems(config):
            try:
                _validate(models, empty, cluster, system)
            except TangramError as exc:  # ConfigError, CapacityError: the point named in front
                raise type(exc)(f"{prefix}{exc}") from None
        path = config.get("calibration")
        tm = config["cluster"].get("time_model")
        key = f"{path}|{sorted(models)}|{tm is None}"
        if path is None or key in seen_calibrations:
            continue
        seen_calibrations.add(key)
        calibration = build_calibration(config)
        missing = uncovered_models(calibration, [m["name"] for m in config["models"]], tm)
        if missing and not calibration_partial:
            have = ", ".join(sorted(calibration.models or {})) or "none"
            raise ConfigError(
                f"{prefix}calibration {path}: no coefficients for model(s) {', '.join(missing)} (it has: {have}); "
                "they would be timed by the roofline: calibrate them, set cluster.time_model, or pass "
                "--calibration-partial")

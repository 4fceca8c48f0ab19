"""A calibration refitted on a validation replay's own tables: the time model's error, apart.

`real/validate.sh` predicts a replay with a calibration measured beforehand (`real.calibrate`, on
designed replays). When the prediction misses, two things can be at fault: the calibration (the host
ran at another speed, or the designed trace's steps were not the replay's) or the time model itself (a
linear prefill, a mean step time where the replay's steps vary, a load formula). Refitting with the
same fits (`fits.fit_calibration`) on the validated replay's own `loads`, `steps` and `layers`
and simulating again takes the first away: what that simulation still misses is the model's. The
refit is a diagnosis, never a prediction (it has seen the answer), and `validate.md` says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from tangram_sim.errors import ConfigError
from tangram_sim.real.calibrate import CalibrationReport
from tangram_sim.real.fits import fit_calibration
from tangram_sim.real.loader import Checkpoint

__all__ = ["refit_on_replay"]

# columns a replay made before units could be copied from other arenas lacks (no copies then)
_COPY_COLUMNS = ("units_copied", "copied_bytes", "copy_s")


def refit_on_replay(replay_dir: str | Path, calibration_yaml: str | Path,
                    ckpts: dict[str, Checkpoint]) -> CalibrationReport:
    """The calibration that the replay in `replay_dir` (a `real replay` run folder) gives with the
    calibration's fits, the copy benchmarks' rates taken from `calibration_yaml` (the predictive
    calibration of the same device). Its measurements say where it came from."""
    from tangram_sim.experiments.config import build_systems, load_yaml
    from tangram_sim.experiments.runner import prepare

    replay_dir = Path(replay_dir)
    tables = {}
    for name in ("loads", "steps"):
        path = replay_dir / f"{name}.parquet"
        if not path.is_file():
            raise ConfigError(f"{path}: not found, expected the {name} table of a real replay")
        tables[name] = pd.read_parquet(path)
    loads, steps = tables["loads"], tables["steps"]
    layers_path = replay_dir / "layers.parquet"
    layers = pd.read_parquet(layers_path) if layers_path.is_file() else None
    raw = yaml.safe_load(Path(calibration_yaml).read_text()) or {}
    measured: dict[str, Any] = raw.get("measurements") or {}
    h2d_bps = measured.get("h2d_copy_bps") or raw.get("h2d_bps")
    d2d_bps = (measured.get("loads") or {}).get("d2d_copy_bps") or raw.get("d2d_bps")
    if not h2d_bps or not d2d_bps:
        raise ConfigError(f"{calibration_yaml}: expected h2d_bps and d2d_bps (or the copy benchmarks under "
                          "measurements) to cap and back the refit's rates")
    _, points = prepare(*load_yaml(replay_dir / "experiment.sim.yaml"), ())
    config = points[0]["config"]
    layered = {s.name: bool(s.execute_while_load) for s in build_systems(config)}
    for column in _COPY_COLUMNS:
        if column not in loads:
            loads[column] = 0
    loads = loads.assign(load_s=loads["move_s"] + loads["copy_s"] + loads["read_s"],
                         layered=loads["system"].astype(str).map(layered).fillna(False).astype(bool))
    arenas = int(config["cluster"]["nodes"]) * int(config["cluster"]["gpus_per_node"])
    cal, fits = fit_calibration(loads, steps, layers, ckpts, h2d_bps=float(h2d_bps), d2d_bps=float(d2d_bps),
                                arenas=arenas, label=f"{raw.get('device', 'unknown')}, refitted on {replay_dir}")
    measurements = {"refitted_on": str(replay_dir), "from_calibration": str(calibration_yaml),
                    "device_load_bps": fits["device_load_bps"], "loads": fits["loads"], "models": fits["models"]}
    for key in ("layers", "layered_loads"):
        if key in fits:
            measurements[key] = fits[key]
    return CalibrationReport(cal, measurements)

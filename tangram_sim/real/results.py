"""A replay's results: the run-directory layout of `tangram-sim run` (`tangram_sim.rundir`), plus what
only a real device measures (memory readings, where each cold start's time went) and replay.json."""

from __future__ import annotations

import json
import platform
from collections.abc import Sequence
from typing import Any

from tangram_sim.core.metrics import TIMELINE_COLUMNS
from tangram_sim.experiments.config import dump_yaml
from tangram_sim.real.memory import driver_info
from tangram_sim.real.replay import ReplayResult
from tangram_sim.real.setup import ReplaySetup
from tangram_sim.rundir import JobKey, RunWriter

FRAMES = ("requests", "timeline", "memory", "loads", "steps")


def replay_config_text(setup: ReplaySetup) -> str:
    """config.yaml of a replay: experiment.sim.yaml, described, with the devices and the arena size."""
    devices = [str(d) for d in setup.devices]
    cfg = dict(setup.sim_config)
    cfg["description"] = f"Real replay on {', '.join(devices)} (time scale {setup.time_scale:g})."
    cfg["real"] = {**setup.real, "devices": devices, "capacity_bytes": setup.capacity}
    return dump_yaml(cfg)


def write_system(writer: RunWriter, index: int, result: ReplayResult) -> None:
    """One system's replay, stored as soon as it is done (kept if a later system fails)."""
    row = {"system": result.system, "point": 0}
    row.update({k: v for k, v in result.summary.items() if k != "system"})
    frames = {name: getattr(result, name) for name in FRAMES}
    if len(result.layers):  # execute-while-load: each first prefill's measured layer spans
        frames["layers"] = result.layers
    writer.write_job(JobKey(0, index), row, frames,
                     timing={"system": result.system, "point": 0, "wall_s": round(result.wall_s, 3)})


def replay_meta(setup: ReplaySetup, results: Sequence[ReplayResult]) -> dict[str, Any]:
    """replay.json: the devices as their drivers describe them, the arena, the checkpoints, wall time and
    the lag of each system."""
    return {
        "experiment": setup.config["name"],
        "devices": [driver_info(d) for d in dict.fromkeys(setup.devices)],
        "gpus": [str(d) for d in setup.devices],
        "host": platform.node(),
        "capacity_bytes": setup.capacity,
        "time_scale": setup.time_scale,
        "checkpoints": {m: str(c.path) for m, c in setup.ckpts.items()},
        "model_bytes": {m: c.spec.weight_bytes for m, c in setup.ckpts.items()},
        "wall_s": {r.system: r.wall_s for r in results},
        "lag_s": {r.system: {k: r.summary[k] for k in ("lag_p50_s", "lag_p99_s", "lag_max_s", "lag_bound_s")}
                  for r in results},
        "timeline_columns": TIMELINE_COLUMNS,
    }


def write_meta(writer: RunWriter, setup: ReplaySetup, results: Sequence[ReplayResult]) -> None:
    writer.write_text("replay.json", json.dumps(replay_meta(setup, results), indent=2, default=str) + "\n")

"""A replay's results in the layout of `tangram-sim run`, plus what only a real device measures."""

from __future__ import annotations

import json
import platform
from collections.abc import Sequence

import pandas as pd

from tangram_sim.core.metrics import TIMELINE_COLUMNS
from tangram_sim.experiments.config import dump_yaml
from tangram_sim.real.memory import driver_info
from tangram_sim.real.replay import ReplayResult
from tangram_sim.real.setup import ReplaySetup


def write_results(setup: ReplaySetup, results: Sequence[ReplayResult]) -> None:
    """config.yaml, summary.csv, timings.csv, requests/timeline/memory/loads parquet, replay.json."""
    out = setup.out_dir
    devices = [str(d) for d in setup.devices]
    cfg = dict(setup.sim_config)
    cfg["description"] = f"Real replay on {', '.join(devices)} (time scale {setup.time_scale:g})."
    cfg["real"] = {**setup.real, "devices": devices, "capacity_bytes": setup.capacity}
    (out / "config.yaml").write_text(dump_yaml(cfg))
    rows, timings, frames = [], [], {"requests": [], "timeline": [], "memory": [], "loads": []}
    for r in results:
        row = {"system": r.system, "point": 0}
        row.update({k: v for k, v in r.summary.items() if k != "system"})
        rows.append(row)
        timings.append({"system": r.system, "point": 0, "wall_s": round(r.wall_s, 3)})
        for key in frames:
            frame = getattr(r, key).copy()
            frame.insert(0, "point", 0)
            frame.insert(0, "system", r.system)
            frames[key].append(frame)
    pd.DataFrame(rows).to_csv(out / "summary.csv", index=False, float_format="%.6g")
    pd.DataFrame(timings).to_csv(out / "timings.csv", index=False)
    for key, parts in frames.items():
        if parts:
            pd.concat(parts, ignore_index=True).to_parquet(out / f"{key}.parquet", index=False)
    meta = {
        "experiment": setup.config["name"],
        "devices": [driver_info(d) for d in dict.fromkeys(setup.devices)],
        "gpus": devices,
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
    (out / "replay.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")

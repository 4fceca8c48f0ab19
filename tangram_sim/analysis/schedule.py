"""Each GPU's realised sequence of cold starts, and the exact retention optimum of a run on it.

`gpu_schedules` reads a request table (the simulator's or the replay's) with the run's model entries:
per GPU, in start order (arrival + queue, then `rid`), the model of each cold start and the units
that GPU held for it (a tensor-parallel rank `r` is on GPU `leader + r` and holds its own shard).
`run_optimum` applies `offline_optimum` to every GPU of every system of a run directory, with the
GPU's whole memory as capacity and no reserve, which makes it a lower bound on the bytes any retention
policy loads on that run's schedule: `python -m tangram_sim.analysis RUN_DIR` prints it beside the
run's bytes loaded and the unlimited-memory bound.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tangram_sim.analysis.optimum import MAX_UNITS, offline_optimum, unlimited_memory_loads
from tangram_sim.arena import Key
from tangram_sim.core.records import ModelEntry, build_entries
from tangram_sim.errors import TangramError
from tangram_sim.sim.hardware import GiB

Schedule = list[tuple[str, tuple[Key, ...]]]  # (model, units held on this GPU) per cold start


def unit_sizes(entries: Mapping[str, ModelEntry]) -> dict[Key, int]:
    """Bytes of every unit shard of every model (a shared unit has one key and one size)."""
    return {key: nbytes for e in entries.values() for units in e.rank_units for key, nbytes in units}


def gpu_schedules(requests: pd.DataFrame, entries: Mapping[str, ModelEntry]) -> dict[int, Schedule]:
    """GPU -> its cold starts in start order (module docstring); GPUs without one are absent."""
    cold = requests[requests["cold"].astype(bool)]
    start = cold["arrival_s"].to_numpy(dtype=np.float64) + cold["queue_s"].to_numpy(dtype=np.float64)
    order = np.lexsort((cold["rid"].to_numpy(), start))
    out: dict[int, Schedule] = {}
    for gpu, model in zip(cold["gpu"].to_numpy()[order].tolist(), cold["model"].to_numpy()[order].tolist()):
        entry = entries[str(model)]
        for rank, keys in enumerate(entry.rank_keys):
            out.setdefault(int(gpu) + rank, []).append((str(model), keys))
    return out


def schedule_optimum(requests: pd.DataFrame, entries: Mapping[str, ModelEntry], capacity: int,
                     max_units: int = MAX_UNITS) -> dict[str, Any]:
    """Over every GPU of one run: the bytes loaded, the exact optimum (NaN, with a note, when a GPU's
    case is over the exact search's limits) and the unlimited-memory bound."""
    sizes = unit_sizes(entries)
    cold = requests[requests["cold"].astype(bool)]
    optimum: float = 0
    unlimited = 0
    note = ""
    for gpu, schedule in sorted(gpu_schedules(requests, entries).items()):
        steps = [keys for _, keys in schedule]
        unlimited += unlimited_memory_loads(steps, sizes)
        if note:
            continue
        try:
            optimum += offline_optimum(steps, sizes, capacity, max_units=max_units).loaded_bytes
        except ValueError as exc:
            optimum, note = math.nan, f"gpu {gpu}: {exc}"
    return {"cold_starts": len(cold), "bytes_needed": int(cold["bytes_needed"].sum()),
            "bytes_loaded": int(cold["bytes_loaded"].sum()), "optimum_bytes": optimum,
            "unlimited_bytes": unlimited, "note": note}


def run_optimum(run_dir: str | Path, max_units: int = MAX_UNITS) -> pd.DataFrame:
    """`schedule_optimum` of every (point, system) of a run directory of `tangram-sim run` (or of a
    replay: its arena size is the capacity), from its config.yaml and requests.parquet."""
    from tangram_sim.experiments.config import (
        apply_point,
        build_cluster,
        build_models,
        build_systems,
        load_yaml,
        sweep_points,
    )

    run_dir = Path(run_dir)
    if not (run_dir / "requests.parquet").is_file():
        raise TangramError(f"{run_dir}: no requests.parquet; expected a run directory with its requests")
    raw, base_dir = load_yaml(run_dir / "config.yaml")
    requests = pd.read_parquet(run_dir / "requests.parquet")
    rows = []
    for point, values in enumerate(sweep_points(raw)):
        config = apply_point(raw, values)
        cluster = build_cluster(config)
        capacity = int((config.get("real") or {}).get("capacity_bytes") or cluster.gpu.memory_bytes)
        models = build_models(config, base_dir)
        specs = {n: (c.spec, c.sensitivity, c.tensor_parallel) for n, c in models.items()}
        for system in build_systems(config):
            table = requests[(requests["point"] == point) & (requests["system"] == system.name)]
            if not len(table):
                continue
            entries = build_entries(specs, system, cluster.alignment)
            row = {"system": system.name, "point": point, **schedule_optimum(table, entries, capacity, max_units)}
            rows.append(row)
    frame = pd.DataFrame(rows)
    if len(frame):
        needed = frame["bytes_needed"].where(frame["bytes_needed"] > 0)
        for column, loaded in (("io_reduction", "bytes_loaded"), ("io_reduction_optimum", "optimum_bytes"),
                               ("io_reduction_bound", "unlimited_bytes")):
            frame[column] = (1.0 - frame[loaded] / needed).where(frame["bytes_needed"] > 0, 0.0)
    return frame


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tangram_sim.analysis",
        description="Per system of a run: bytes loaded by its retention policy, the exact offline optimum "
                    "on the same schedule (whole GPU memory, no KV reserve: a lower bound) and the "
                    "unlimited-memory bound.")
    parser.add_argument("run_dir", help="a run directory of tangram-sim run (config.yaml, requests.parquet)")
    parser.add_argument("--max-units", type=int, default=MAX_UNITS,
                        help=f"largest number of distinct units per GPU to solve exactly (default {MAX_UNITS})")
    args = parser.parse_args(argv)
    try:
        frame = run_optimum(args.run_dir, args.max_units)
    except TangramError as exc:
        print(f"Error: {exc}")
        return 2
    shown = frame.copy()
    for column, name in (("bytes_needed", "needed_gib"), ("bytes_loaded", "loaded_gib"),
                         ("optimum_bytes", "optimum_gib"), ("unlimited_bytes", "unlimited_gib"), ("note", "note")):
        if column in shown:
            values = shown.pop(column)
            shown[name] = values / GiB if column != "note" else values
    with pd.option_context("display.width", 200, "display.max_columns", None, "display.max_colwidth", 80):
        print(shown.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    return 0

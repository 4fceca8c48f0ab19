"""The unlimited-memory bound on weight reuse for a run's own schedule.

Given where each cold start ran (its GPU, or the aligned group of GPUs of a tensor-parallel instance,
whose leader is the request's `gpu`) and which model it started, the fewest bytes any retention policy
could have loaded on that schedule are the bytes loaded if GPU memory were unlimited and nothing were
ever evicted: each reuse unit crosses PCIe once per GPU, at the first cold start on that GPU that
needs it. A unit shared by a fine-tune and its base counts once per GPU; a tensor-parallel model's rank
`r` needs its own shard on GPU `leader + r`. Every GPU starts empty and a unit becomes resident only by
being loaded for a cold start that needs it, so every policy loads at least these bytes at each cold
start, not only in total: the bound holds over any subset of cold starts (e.g. those of completed
requests).

It bounds the run's own schedule only: the placement and the timing of cold starts are the run's, so a
different scheduler, keep-alive or packing (even another retention policy, by changing which instances
end when) gives another schedule, whose bound may be lower or higher.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from tangram_sim.arena import Key
    from tangram_sim.core.records import ModelEntry

BOUND_COLUMNS = ("io_reduction_bound", "request_bytes_from_gpu_bound")


def first_load_bytes(requests: pd.DataFrame, entries: Mapping[str, ModelEntry]) -> np.ndarray:
    """Per row of a request table (columns rid, arrival_s, queue_s, model, gpu, cold): the bytes its
    cold start loads under unlimited memory (0 for a warm request and for a cold start whose units
    every GPU of its instance already had). Cold starts of one GPU are ordered by their start time
    (arrival + queue), then `rid`.

    Only the first cold start of each (GPU, model) can load anything, so the loop runs over at most
    GPUs x models rows whatever the number of requests."""
    out = np.zeros(len(requests), dtype=np.int64)
    cold = requests["cold"].to_numpy(dtype=bool)
    if not cold.any():
        return out
    rows = np.flatnonzero(cold)
    starts = requests["arrival_s"].to_numpy(dtype=np.float64)[rows] + requests["queue_s"].to_numpy(
        dtype=np.float64)[rows]
    rows = rows[np.lexsort((requests["rid"].to_numpy()[rows], starts))]
    firsts = pd.DataFrame({"gpu": requests["gpu"].to_numpy()[rows],
                           "model": requests["model"].to_numpy()[rows], "row": rows})
    firsts = firsts.drop_duplicates(["gpu", "model"], keep="first")
    resident: dict[int, set[Key]] = {}  # GPU -> units it holds, never evicted
    for gpu, model, row in zip(firsts["gpu"].tolist(), firsts["model"].tolist(), firsts["row"].tolist()):
        entry = entries[str(model)]
        loaded = 0
        for rank, units in enumerate(entry.rank_units):
            held = resident.setdefault(int(gpu) + rank, set())
            for key, nbytes in units:
                if key not in held:
                    held.add(key)
                    loaded += nbytes
        out[row] = loaded
    return out


def bound_metrics(requests: pd.DataFrame, entries: Mapping[str, ModelEntry]) -> dict[str, Any]:
    """The bound's counterparts of `io_reduction` and `request_bytes_from_gpu` (see the module
    docstring), same conventions (0.0 when nothing was needed):

    - io_reduction_bound: 1 - bound bytes / bytes needed, over cold starts;
    - request_bytes_from_gpu_bound: 1 - bound bytes / model bytes, over completed requests (the bound
      bytes of their cold starts; a warm request loads nothing either way).

    Each is >= its counterpart for any retention policy on the run's schedule, and <= 1."""
    first = first_load_bytes(requests, entries)
    cold = requests["cold"].to_numpy(dtype=bool)
    done = (requests["outcome"] == "completed").to_numpy()
    needed = requests["bytes_needed"].to_numpy(dtype=np.int64)
    cold_needed, done_needed = int(needed[cold].sum()), int(needed[done].sum())
    return {
        "io_reduction_bound": 1.0 - int(first[cold].sum()) / cold_needed if cold_needed else 0.0,
        "request_bytes_from_gpu_bound": 1.0 - int(first[done].sum()) / done_needed if done_needed else 0.0,
    }

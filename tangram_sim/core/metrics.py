"""Per-request records, memory timeline and the per-system summary.

The summary carries two families of weight-loading metrics. Per cold start (ours): `io_reduction`
(1 - bytes loaded / bytes needed over cold starts), `full_hit_ratio` (share of cold starts that loaded
nothing) and `mean_load_s` (mean load time of a cold start). Per request (the Tangram authors' way of
counting, where a warm request is a full hit with nothing to load), over completed requests:
`request_resident_ratio` (share whose model was fully resident on their GPU(s) when served),
`request_bytes_from_gpu` (1 - bytes loaded / model bytes) and `mean_load_per_request_s` (warm = 0).
Every request served by an instance records its model's bytes (`bytes_needed`): a warm one reused
them all, so loaded + reused = needed holds for every completed request.
Given the run's model entries, the summary adds the unlimited-memory bound of each byte figure on the
run's own schedule, `io_reduction_bound` and `request_bytes_from_gpu_bound` (`core.bound`).

A run that prefetches (`core.prefetch`) adds its counters, summed over GPUs: `prefetched_bytes`,
`prefetch_used_bytes`, `prefetch_wasted_bytes` (of which `prefetch_cancelled_bytes`) and
`prefetch_resident_bytes`, and `io_reduction_with_prefetch` = 1 - (bytes loaded by cold starts +
prefetched bytes + cancelled bytes) / bytes needed: every byte that crossed PCIe, since a cold start
that finds a prefetched unit reuses it, so `io_reduction` alone no longer counts all the loading (and
may exceed its bound); `io_reduction_with_prefetch` stays within `io_reduction_bound`.

Last come the SLO and cost columns (`core.slo`): `ttft_slo_attainment`, `tpot_slo_attainment` and
`goodput_rps` against the experiment's `slo`, `gpu_held_s` and `gpu_seconds_per_request` (GPU time
held by instances, busy or idle) and `mean_overlap_s`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from tangram_sim.core.bound import bound_metrics
from tangram_sim.core.slo import Slo, slo_metrics

if TYPE_CHECKING:
    from tangram_sim.core.records import ModelEntry

REQUEST_COLUMNS = [
    "rid", "arrival_s", "model", "input_tokens", "output_tokens", "gpu", "cold", "queue_s", "load_s",
    "bytes_needed", "bytes_loaded", "bytes_reused", "bytes_moved", "bytes_evicted", "bytes_extra_evicted",
    "startup_s", "overlap_s", "ttft_s", "e2e_s",
    "waited_for_kv_s", "preemptions", "outcome", "reason", "first_layer_s",
]
TIMELINE_COLUMNS = [
    "time_s", "gpu", "active_model", "active_bytes", "retained_bytes", "kv_bytes", "loading_bytes",
    "free_bytes", "largest_free_bytes", "fragmentation",
]
SLO_TARGETS_S = (0.5, 1.0, 2.0, 5.0)


def request_row(r: Any) -> tuple:
    """One request's REQUEST_COLUMNS values."""
    return (
        r.rid, r.arrival, r.model, r.input_tokens, r.output_tokens, r.gpu, r.cold, r.queue_s, r.load_s,
        r.bytes_needed, r.bytes_loaded, r.bytes_reused, r.bytes_moved, r.bytes_evicted, r.bytes_extra_evicted,
        r.startup_s, r.overlap_s, r.ttft_s, r.e2e_s,
        r.waited_for_kv_s, r.preemptions, r.outcome, r.reason, r.first_layer_s,
    )


def requests_frame(requests: list) -> pd.DataFrame:
    return pd.DataFrame([request_row(r) for r in requests], columns=REQUEST_COLUMNS)


def timeline_frame(samples: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(samples, columns=TIMELINE_COLUMNS)


def _pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else math.nan


def per_request_metrics(requests: pd.DataFrame) -> dict[str, float]:
    """The Tangram authors' per-request figures over the completed requests of a request table (columns
    outcome, cold, load_s, bytes_needed, bytes_loaded); each is 0.0 when no request completed.

    - request_resident_ratio: share whose model was fully resident when served (warm, or a cold start
      that loaded nothing);
    - request_bytes_from_gpu: 1 - bytes loaded / model bytes, both summed over the requests;
    - mean_load_per_request_s: mean load time, a warm request counting 0."""
    done = requests[requests["outcome"] == "completed"]
    n = len(done)
    resident = (~done["cold"].astype(bool)) | (done["bytes_loaded"] == 0)
    needed = int(done["bytes_needed"].sum())
    loaded = int(done["bytes_loaded"].sum())
    return {
        "request_resident_ratio": float(resident.sum() / n) if n else 0.0,
        "request_bytes_from_gpu": 1.0 - loaded / needed if needed else 0.0,
        "mean_load_per_request_s": float(done["load_s"].to_numpy(dtype=float).sum() / n) if n else 0.0,
    }


def summarize(requests: pd.DataFrame, gpu_busy_s: float, compaction_bytes: int,
              entries: Mapping[str, ModelEntry] | None = None,
              prefetch: Mapping[str, int] | None = None, *, slo: Slo | None = None,
              gpu_held_s: float = 0.0) -> dict[str, Any]:
    """One row of numbers per system; every figure derives from the request table. Load and byte
    figures named without `request_` are per cold start; see the module docstring. With the run's
    model `entries` (and the table's model, gpu, arrival_s and queue_s columns), the two bound columns
    follow their counterparts. With a run's `prefetch` counters (`core.prefetch.PREFETCH_COLUMNS`),
    they and `io_reduction_with_prefetch` are added (nothing is added without them). The SLO and cost
    columns (`core.slo`) come last, against `slo` (None: the default SLO) and the GPU time the run's
    instances held (`gpu_held_s`)."""
    bound = bound_metrics(requests, entries) if entries is not None else {}
    done = requests[requests["outcome"] == "completed"]
    cold = requests[requests["cold"].astype(bool)]  # (an empty table's column is not boolean)
    ttft = done["ttft_s"].to_numpy()
    load = cold["load_s"].to_numpy()
    needed = int(cold["bytes_needed"].sum())
    loaded = int(cold["bytes_loaded"].sum())
    out: dict[str, Any] = {
        "requests": len(requests),
        "completed": len(done),
        "rejected": int((requests["outcome"] == "rejected").sum()),
        "cold_starts": len(cold),
        "mean_ttft_s": float(ttft.mean()) if len(ttft) else math.nan,
        "p50_ttft_s": _pct(ttft, 50),
        "p90_ttft_s": _pct(ttft, 90),
        "p99_ttft_s": _pct(ttft, 99),
        "mean_load_s": float(load.mean()) if len(load) else 0.0,
        "p99_load_s": _pct(load, 99) if len(load) else 0.0,
        "mean_queue_s": float(requests["queue_s"].mean()) if len(requests) else math.nan,
        "mean_e2e_s": float(done["e2e_s"].mean()) if len(done) else math.nan,
        "bytes_needed": needed,
        "bytes_loaded": loaded,
        "bytes_reused": int(cold["bytes_reused"].sum()),
        "io_reduction": 1.0 - loaded / needed if needed else 0.0,
        **({"io_reduction_bound": bound["io_reduction_bound"]} if bound else {}),
        **({"io_reduction_with_prefetch": _with_prefetch(needed, loaded, prefetch)} if prefetch is not None else {}),
        "full_hit_ratio": float((cold["bytes_loaded"] == 0).mean()) if len(cold) else 0.0,
        **per_request_metrics(requests),
        **({"request_bytes_from_gpu_bound": bound["request_bytes_from_gpu_bound"]} if bound else {}),
        "compaction_bytes": int(compaction_bytes),
        "evicted_bytes": int(cold["bytes_evicted"].sum()),
        "extra_evicted_bytes": int(cold["bytes_extra_evicted"].sum()),
        "gpu_busy_s": float(gpu_busy_s),
        "waited_for_kv_s": float(requests["waited_for_kv_s"].sum()),
        "preemptions": int(requests["preemptions"].sum()),
        **({k: int(v) for k, v in prefetch.items()} if prefetch is not None else {}),
    }
    n = len(requests)
    for target in SLO_TARGETS_S:
        out[f"slo_ttft_{target:g}s"] = float((done["ttft_s"] <= target).sum() / n) if n else math.nan
    out.update(slo_metrics(requests, slo, gpu_held_s))
    return out


def _with_prefetch(needed: int, loaded: int, prefetch: Mapping[str, int]) -> float:
    """1 - every byte that crossed PCIe for cold starts or prefetches / bytes the cold starts needed."""
    if not needed:
        return 0.0
    return 1.0 - (loaded + prefetch["prefetched_bytes"] + prefetch["prefetch_cancelled_bytes"]) / needed


def accounting_problems(requests: Iterable[Any], finished: int, limit: int = 5) -> list[str]:
    """What breaks the per-request accounting at the end of a run (the simulator's or the replay's):
    a request without an outcome, a rejection without a reason, a request (cold or warm) whose loaded +
    reused bytes differ from the bytes it needed, a completed request without its model's bytes, or a
    recorded outcome count that differs from the requests.
    Stops listing requests after `limit` + 1 problems; the caller adds its own driver's checks."""
    problems: list[str] = []
    total = 0
    for r in requests:
        total += 1
        if len(problems) > limit:
            continue  # keep counting the requests
        if r.outcome not in ("completed", "rejected"):
            problems.append(f"request {r.rid} ({r.model}) has no outcome")
        elif r.outcome == "rejected" and not r.reason:
            problems.append(f"request {r.rid} rejected without a reason")
        if r.bytes_loaded + r.bytes_reused != r.bytes_needed:
            problems.append(
                f"request {r.rid}: loaded {r.bytes_loaded} + reused {r.bytes_reused} != needed {r.bytes_needed}"
            )
        elif r.outcome == "completed" and r.bytes_needed <= 0:
            problems.append(f"request {r.rid} ({r.model}) completed without its model's bytes (needed 0)")
    if finished != total:
        problems.append(f"{finished} outcomes recorded for {total} requests")
    return problems

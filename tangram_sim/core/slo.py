"""Service-level objectives and the cost side of a run: the summary columns that serverless LLM papers
report beside latency percentiles (SLO attainment, goodput, GPU time per request).

An experiment states its SLO as `slo: {ttft_s, tpot_s}`, optionally per model (`slo.models.NAME`); the
defaults and where they come from are in the schema of `tangram_sim.experiments.config`. Every column
is deterministic and finite (an empty run gives 0.0, never NaN), computed from the request table and
one counter per GPU, so the simulator does no extra work per request:

- TPOT of a completed request: (e2e - ttft) / (output_tokens - 1), the mean time of its decode steps.
  A request with one output token has no decode step and meets the TPOT SLO trivially.
- `ttft_slo_attainment`, `tpot_slo_attainment`: share of *all* requests of the trace, completed or
  rejected, that completed within the SLO. A rejected request never got (all of) its answer, so it
  misses both; counting completed requests only would reward a system for rejecting its slow ones.
- `goodput_rps`: requests that meet both SLOs per second, over the run's serving span: first arrival to
  last completion. (No other summary column is a rate; `sim_end_s` also counts the idle keep-alive
  after the last completion, which would make goodput depend on `keep_alive_s`.) 0.0 when nothing
  completed.
- `gpu_held_s`: the GPU time billed, summed over GPUs: each instance holds its GPU(s) from the start of
  its cold start (engine start and loading included) to its end (keep-alive expiry, or another model
  taking the GPU), busy or idle. A GPU runs at most one instance at a time, so these are the
  GPU-seconds during which an instance occupies the GPU, each counted once; a tensor-parallel instance
  counts each of its GPUs. A GPU without an instance (idle, holding retained weights, or prefetching) is
  not billed.
- `gpu_seconds_per_request`: `gpu_held_s` / completed requests; 0.0 when none completed (`gpu_held_s`
  still shows what was spent).
- `mean_overlap_s`: mean of the request field `overlap_s` (load time hidden behind compute) over cold
  starts, rejected ones included as in `mean_load_s`; 0.0 without cold starts, and 0.0 for cold starts
  that load everything before their first prefill.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

# Defaults of `slo` (sources: the `slo` entry of the experiment schema in experiments/config.py).
DEFAULT_TTFT_S = 2.0
DEFAULT_TPOT_S = 0.2

SLO_COLUMNS = ("ttft_slo_attainment", "tpot_slo_attainment", "goodput_rps", "gpu_held_s",
               "gpu_seconds_per_request", "mean_overlap_s")


@dataclass(frozen=True, slots=True)
class Slo:
    """TTFT and TPOT targets in seconds, with per-model exceptions (model -> (ttft_s, tpot_s))."""

    ttft_s: float = DEFAULT_TTFT_S
    tpot_s: float = DEFAULT_TPOT_S
    models: Mapping[str, tuple[float, float]] = field(default_factory=dict)

    @classmethod
    def from_config(cls, section: Mapping[str, Any] | None) -> Slo:
        """The SLO of a validated experiment's `slo` section (None: the defaults)."""
        if not section:
            return cls()
        models = {str(name): (float(m["ttft_s"]), float(m["tpot_s"]))
                  for name, m in (section.get("models") or {}).items()}
        return cls(float(section["ttft_s"]), float(section["tpot_s"]), models)

    def limits(self, models: pd.Series) -> tuple[np.ndarray | float, np.ndarray | float]:
        """(TTFT limit, TPOT limit) per request of a `model` column; scalars without per-model SLOs."""
        if not self.models:
            return self.ttft_s, self.tpot_s
        names = models.astype(str)
        ttft = names.map({m: t for m, (t, _) in self.models.items()}).fillna(self.ttft_s)
        tpot = names.map({m: t for m, (_, t) in self.models.items()}).fillna(self.tpot_s)
        return ttft.to_numpy(dtype=np.float64), tpot.to_numpy(dtype=np.float64)


def slo_metrics(requests: pd.DataFrame, slo: Slo | None = None, gpu_held_s: float = 0.0) -> dict[str, float]:
    """The SLO_COLUMNS of a request table (columns outcome, model, arrival_s, output_tokens, ttft_s,
    e2e_s, cold and, when present, overlap_s) and the GPU time its instances held; see the module
    docstring for the definitions."""
    slo = slo if slo is not None else Slo()
    n = len(requests)
    done = (requests["outcome"] == "completed").to_numpy(dtype=bool)
    completed = int(done.sum())
    out = dict.fromkeys(SLO_COLUMNS, 0.0)
    out["gpu_held_s"] = float(gpu_held_s)
    out["gpu_seconds_per_request"] = float(gpu_held_s) / completed if completed else 0.0
    cold = requests["cold"].astype(bool).to_numpy(dtype=bool)  # (an empty table's column is not boolean)
    if cold.any() and "overlap_s" in requests.columns:
        out["mean_overlap_s"] = float(requests["overlap_s"].to_numpy(dtype=np.float64)[cold].mean())
    if not completed:
        return out
    ttft = requests["ttft_s"].to_numpy(dtype=np.float64)
    e2e = requests["e2e_s"].to_numpy(dtype=np.float64)
    tokens = requests["output_tokens"].to_numpy(dtype=np.int64)
    ttft_limit, tpot_limit = slo.limits(requests["model"])
    decodes = tokens > 1
    tpot = np.zeros(n)
    np.divide(e2e - ttft, tokens - 1, out=tpot, where=decodes)
    # NaN (a rejected request's TTFT) compares False; `done` excludes rejected requests in any case
    ttft_ok = done & (ttft <= ttft_limit)
    tpot_ok = done & (~decodes | (tpot <= tpot_limit))
    arrival = requests["arrival_s"].to_numpy(dtype=np.float64)
    span = float((arrival[done] + e2e[done]).max() - arrival.min())
    out["ttft_slo_attainment"] = int(ttft_ok.sum()) / n
    out["tpot_slo_attainment"] = int(tpot_ok.sum()) / n
    out["goodput_rps"] = int((ttft_ok & tpot_ok).sum()) / span if span > 0 else 0.0
    return out

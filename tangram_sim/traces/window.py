"""Cut and rescale a canonical trace.

Experiments rarely replay a whole trace: they take a slice (a busy hour, the first N requests) and
often compress time to reach a target load on a small simulated cluster. Doing it in one function with
one documented order (cut in original time, then count, then shift, then compress) keeps the meaning
of `start_s`/`duration_s` independent of `rate_scale`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from tangram_sim.errors import TraceError


def _number(value: Any, where: str, *, positive: bool) -> float:
    ok = not isinstance(value, bool) and isinstance(value, int | float) and np.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        raise TraceError(f"{where}: expected a number {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


def window(
    df: pd.DataFrame,
    start_s: float = 0.0,
    duration_s: float | None = None,
    max_requests: int | None = None,
    rate_scale: float = 1.0,
    *,
    where: str = "window",
) -> pd.DataFrame:
    """Requests arriving in [start_s, start_s + duration_s), at most the first `max_requests`,
    shifted so the first arrives at 0, with arrival times divided by `rate_scale` (2.0 = twice the load).

    `start_s` and `duration_s` are in the trace's original time. An empty result is a TraceError
    (naming `where`), since an experiment without requests is always a mistake.
    """
    start = _number(start_s, f"{where}.start_s", positive=False)
    scale = _number(rate_scale, f"{where}.rate_scale", positive=True)
    arrival = df["arrival_s"].to_numpy(dtype=np.float64)
    lo = int(np.searchsorted(arrival, start, side="left"))
    hi = len(arrival)
    if duration_s is not None:
        end = start + _number(duration_s, f"{where}.duration_s", positive=True)
        hi = int(np.searchsorted(arrival, end, side="left"))
    if max_requests is not None:
        if (
            isinstance(max_requests, bool)
            or not isinstance(max_requests, int | np.integer)
            or max_requests < 1
        ):
            raise TraceError(f"{where}.max_requests: expected an integer >= 1, got {max_requests!r}")
        hi = min(hi, lo + int(max_requests))
    if hi <= lo:
        span = f"0..{arrival[-1]:.3f} s" if len(arrival) else "no requests"
        end_text = "end" if duration_s is None else f"{start + float(duration_s):g} s"
        raise TraceError(f"{where}: no requests in [{start:g} s, {end_text}); the trace spans {span}")
    out = df.iloc[lo:hi].reset_index(drop=True)
    shifted = out["arrival_s"].to_numpy(dtype=np.float64) - arrival[lo]
    out["arrival_s"] = shifted / scale
    out.attrs = dict(df.attrs)
    return out

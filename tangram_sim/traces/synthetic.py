"""Synthetic traces: controlled arrival burstiness, popularity skew and load shape.

Real traces fix one point in the design space; sweeping burstiness (gamma inter-arrivals with a
chosen coefficient of variation), model popularity (Zipf alpha) and diurnal load is how policies are
stress-tested. Everything is drawn from the given seeded Generator, split into independent child
streams for arrivals, tokens and models, so changing e.g. the token distribution leaves the arrival
times of the same seed unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from tangram_sim.errors import TraceError
from tangram_sim.traces.formats import _canonical
from tangram_sim.traces.mapping import zipf_probabilities

ARRIVALS = ("poisson", "gamma")


@dataclass(frozen=True)
class Diurnal:
    """Sinusoidal load: rate(t) = rate * (1 + amplitude * sin(2 pi t / period_s + phase))."""

    amplitude: float
    period_s: float = 86400.0
    phase: float = 0.0

    def __post_init__(self) -> None:
        _check_diurnal(self.amplitude, self.period_s, "diurnal")

    @classmethod
    def from_config(cls, value: Any, where: str = "diurnal") -> Diurnal:
        """Build from a config mapping `{amplitude, period_s, phase}`, naming `where` in errors."""
        allowed = ("amplitude", "period_s", "phase")
        if not isinstance(value, Mapping):
            raise TraceError(f"{where}: expected a mapping with {', '.join(allowed)}, got {value!r}")
        for key in value:
            if key not in allowed:
                raise TraceError(f"{where}.{key}: unknown key; expected {', '.join(allowed)}")
        if "amplitude" not in value:
            raise TraceError(f"{where}.amplitude: missing; expected a number in [0, 1]")
        args = {}
        for key in allowed:
            if key in value:
                v = value[key]
                if isinstance(v, bool) or not isinstance(v, int | float) or not np.isfinite(v):
                    raise TraceError(f"{where}.{key}: expected a number, got {v!r}")
                args[key] = float(v)
        _check_diurnal(args["amplitude"], args.get("period_s", 86400.0), where)
        return cls(**args)


def _check_diurnal(amplitude: float, period_s: float, where: str) -> None:
    if not 0.0 <= amplitude <= 1.0:
        raise TraceError(f"{where}.amplitude: expected a number in [0, 1], got {amplitude!r}")
    if not period_s > 0:
        raise TraceError(f"{where}.period_s: expected a number > 0, got {period_s!r}")


def _positive(name: str, value: float | None) -> None:
    if value is not None and (isinstance(value, bool) or not np.isfinite(value) or value <= 0):
        raise TraceError(f"synthesize.{name}: expected a number > 0, got {value!r}")


def _gaps(rng: np.random.Generator, size: int, rate: float, arrival: str, cv: float) -> np.ndarray:
    if arrival == "poisson":
        return rng.exponential(1.0 / rate, size)
    shape = 1.0 / (cv * cv)
    return rng.gamma(shape, 1.0 / (shape * rate), size)


def arrival_times(
    rng: np.random.Generator,
    *,
    rate: float,
    n_requests: int | None = None,
    duration_s: float | None = None,
    arrival: str = "poisson",
    cv: float = 1.0,
    diurnal: Diurnal | None = None,
) -> np.ndarray:
    """Arrival times (first at 0) of a renewal process, optionally thinned to a sinusoidal rate.

    Thinning keeps a candidate at time t with probability rate(t) / peak rate; it makes a bursty
    (cv > 1) process somewhat less bursty, because independent deletion pushes any process towards
    Poisson. Stops after n_requests or at duration_s, whichever comes first.
    """
    peak = rate * (1.0 + diurnal.amplitude) if diurnal else rate
    chunks: list[np.ndarray] = []
    have, t_end = 0, 0.0
    first = True
    while True:
        want = (n_requests - have) if n_requests is not None else int((duration_s - t_end) * rate)
        size = int(min(max(1024, want * (1.0 + (diurnal.amplitude if diurnal else 0.0)) * 1.05 + 64), 2**22))
        gaps = _gaps(rng, size, peak, arrival, cv)
        if first:
            gaps[0] = 0.0
            first = False
        t = t_end + np.cumsum(gaps)
        t_end = float(t[-1])
        if diurnal:
            level = 1.0 + diurnal.amplitude * np.sin(2 * np.pi * t / diurnal.period_s + diurnal.phase)
            t = t[rng.random(size) * (1.0 + diurnal.amplitude) < level]
        if duration_s is not None:
            t = t[t < duration_s]
        chunks.append(t)
        have += len(t)
        if (n_requests is not None and have >= n_requests) or (
            duration_s is not None and t_end >= duration_s
        ):
            break
    times = np.concatenate(chunks)
    if n_requests is not None:
        times = times[:n_requests]
    return times


def lognormal_tokens(
    rng: np.random.Generator, n: int, mean: float, sigma: float, max_tokens: int | None = None
) -> np.ndarray:
    """Integer token counts >= 1 from a lognormal with the given mean (not median) and log-sigma."""
    mu = np.log(mean) - sigma * sigma / 2.0
    values = np.maximum(np.rint(rng.lognormal(mu, sigma, n)), 1)
    if max_tokens is not None:
        values = np.minimum(values, max_tokens)
    return values.astype(np.int64)


def synthesize(
    models: Sequence[str],
    rng: np.random.Generator,
    *,
    rate: float,
    n_requests: int | None = None,
    duration_s: float | None = None,
    arrival: str = "poisson",
    cv: float = 1.0,
    zipf_alpha: float = 0.0,
    diurnal: Diurnal | Mapping[str, Any] | None = None,
    input_mean: float = 1024.0,
    output_mean: float = 256.0,
    input_sigma: float = 1.0,
    output_sigma: float = 1.0,
    max_tokens: int | None = None,
    token_table: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """A canonical trace with `rate` requests/s (mean), stopping at n_requests or duration_s.

    `arrival`: `poisson`, or `gamma` with coefficient of variation `cv` (cv=1 is Poisson, cv>1 bursty).
    Models follow Zipf(`zipf_alpha`) in list order. Tokens: lognormal with the given means and
    log-sigmas (capped at `max_tokens`), or (input, output) pairs drawn jointly from `token_table`.
    """
    if not models:
        raise TraceError("synthesize.models: expected at least one model name")
    if n_requests is None and duration_s is None:
        raise TraceError("synthesize: give n_requests or duration_s")
    if n_requests is not None and (
        isinstance(n_requests, bool) or int(n_requests) != n_requests or n_requests < 1
    ):
        raise TraceError(f"synthesize.n_requests: expected an integer >= 1, got {n_requests!r}")
    for name, value in (
        ("rate", rate),
        ("duration_s", duration_s),
        ("cv", cv),
        ("input_mean", input_mean),
        ("output_mean", output_mean),
    ):
        _positive(name, value)
    for name, value in (
        ("input_sigma", input_sigma),
        ("output_sigma", output_sigma),
        ("zipf_alpha", zipf_alpha),
    ):
        if isinstance(value, bool) or not np.isfinite(value) or value < 0:
            raise TraceError(f"synthesize.{name}: expected a number >= 0, got {value!r}")
    if max_tokens is not None and max_tokens < 1:
        raise TraceError(f"synthesize.max_tokens: expected an integer >= 1, got {max_tokens!r}")
    if arrival not in ARRIVALS:
        raise TraceError(f"synthesize.arrival: expected one of {', '.join(ARRIVALS)}, got {arrival!r}")
    if diurnal is not None and not isinstance(diurnal, Diurnal):
        diurnal = Diurnal.from_config(diurnal)

    arr_rng, tok_rng, mod_rng = (np.random.default_rng(s) for s in rng.integers(0, 2**63, size=3))
    times = arrival_times(
        arr_rng,
        rate=rate,
        n_requests=None if n_requests is None else int(n_requests),
        duration_s=duration_s,
        arrival=arrival,
        cv=cv,
        diurnal=diurnal,
    )
    n = len(times)
    if n == 0:
        raise TraceError("synthesize: no requests generated; raise duration_s or rate")
    if token_table is not None:
        if len(token_table) == 0:
            raise TraceError("synthesize.token_table: the table holds no requests")
        rows = tok_rng.integers(0, len(token_table), size=n)
        inputs = token_table["input_tokens"].to_numpy(dtype=np.int64)[rows]
        outputs = token_table["output_tokens"].to_numpy(dtype=np.int64)[rows]
    else:
        inputs = lognormal_tokens(tok_rng, n, input_mean, input_sigma, max_tokens)
        outputs = lognormal_tokens(tok_rng, n, output_mean, output_sigma, max_tokens)
    codes = mod_rng.choice(len(models), size=n, p=zipf_probabilities(len(models), zipf_alpha))
    df = _canonical(times, (codes, list(models)), inputs, outputs)
    df.attrs.update({"source": "synthetic", "format": "synthetic", "skipped_rows": 0})
    return df

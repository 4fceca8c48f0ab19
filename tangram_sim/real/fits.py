"""The calibration's fits: the simulator's load formula, step coefficients, per-layer shares and the
layered starts' rate, from replays' `loads`, `steps` and `layers` tables (numpy and pandas only).

`real.calibrate` fits them on its designed replays (its docstring says what each fit is and why);
`real.refit` on a validation replay's own tables. See `fit_calibration`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from tangram_sim.errors import ConfigError
from tangram_sim.real.layerfit import fit_layered_rate, fit_layers
from tangram_sim.sim.timemodel import Calibration, ModelCoefficients

if TYPE_CHECKING:
    from tangram_sim.real.loader import Checkpoint

__all__ = ["fit_calibration", "fit_linear", "fit_loads", "fit_steps"]


def fit_linear(x: np.ndarray, y: np.ndarray, nonneg: bool = True,
               relative: bool = False) -> tuple[np.ndarray, float]:
    """Least squares y ~ x @ c (no implicit intercept), coefficients clipped to >= 0 by refitting
    without the negative ones (an active-set NNLS that is exact for the few columns used here).

    `relative` minimises relative rather than absolute errors, so that a convex curve (prefill of
    long prompts) does not pull the fit away from the short, common cases. Returns (c, relative RMS
    residual)."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    w = 1.0 / np.maximum(y, 1e-12) if relative else np.ones_like(y)
    active = list(range(x.shape[1]))
    coef = np.zeros(x.shape[1])
    while active:
        sol = np.linalg.lstsq(x[:, active] * w[:, None], y * w, rcond=None)[0]
        if not nonneg or (sol >= 0).all():
            coef[:] = 0
            coef[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    resid = y - x @ coef
    scale = float(np.sqrt(np.mean(y**2))) or 1.0
    return coef, float(np.sqrt(np.mean(resid**2)) / scale)


def _overlapped(loads: pd.DataFrame, share: float = 0.2) -> np.ndarray:
    """Per load: whether another arena's load of the same replay covered more than `share` of it."""
    out = np.zeros(len(loads), dtype=bool)
    for _, g in loads.groupby("system"):
        s = g["wall_s"].to_numpy(float)
        e = s + g["load_s"].to_numpy(float)
        gpu = g["gpu"].to_numpy()
        for k, i in enumerate(g.index):
            other = gpu != gpu[k]
            cover = np.clip(np.minimum(e[other], e[k]) - np.maximum(s[other], s[k]), 0, None).sum()
            out[loads.index.get_loc(i)] = cover > share * max(e[k] - s[k], 1e-12)
    return out


def fit_loads(loads: pd.DataFrame, d2d_bps: float, h2d_bps: float,
              arenas: int = 1) -> tuple[float, float, float, float, float, dict[str, Any]]:
    """(load_overhead_s, unit_overhead_s, device_bps, read_bps, move_bps, details) of the simulator's load
    formula over the measured starts: a start that reads anything pays `load_overhead_s` (the loader's
    setup) and `unit_overhead_s` per unit, and streams its bytes through its GPU's link (`device_bps`:
    the rate one arena's loads reach) and the node's storage, which the arenas share (`read_bps`: their
    aggregate); its compaction moves run at `move_bps`.

    The reads and the moves are timed apart (`read_s`, `move_s`), so each is fitted on its own time:
    moves at the replay's own aggregate rate (bytes moved / seconds moving, when at least three starts
    moved anything; else the copy benchmark's `d2d_bps`). Moves on a device are slower than a copy
    benchmark (an overlapping move goes in distance-sized chunks or through a scratch buffer), and a
    fit that charged them at the benchmark's rate gave the difference to the fixed cost of every start.
    The overheads and the device rate are fitted (non-negative least squares) on the reads of the starts
    that ran alone (no other arena loading for more than a fifth of it); a fitted rate above h2d is
    capped there and the overheads refitted. The aggregate is the arenas' number times the median rate
    of the starts that overlapped another one (when there are at least five; else no contention is
    assumed), never below one arena's rate."""
    moved = loads["moved_bytes"].to_numpy(float)
    move_s = loads["move_s"].to_numpy(float)
    movers = moved > 0
    move_bps = float(moved[movers].sum() / move_s[movers].sum()) \
        if movers.sum() >= 3 and move_s[movers].sum() > 0 else float(d2d_bps)
    y = loads["read_s"].to_numpy(float)
    units = (loads["units_loaded"] - loads["units_copied"]).to_numpy(float)  # the units read from the files
    x = np.c_[(units > 0).astype(float), units, loads["loaded_bytes"].to_numpy(float)]
    both = _overlapped(loads) if arenas > 1 and "wall_s" in loads else np.zeros(len(loads), dtype=bool)
    alone = ~both
    # layered starts read beside their compute (`layerfit.fit_layered_rate` fits their rate): the formula
    # is fitted on the serial ones when there are enough of them
    layered = loads["layered"].to_numpy(bool) if "layered" in loads else np.zeros(len(loads), dtype=bool)
    if (alone & ~layered).sum() >= 5:
        alone &= ~layered
        both &= ~layered
    (fixed, unit, per_byte), rel = fit_linear(x[alone], y[alone])
    if per_byte <= 0 or 1.0 / per_byte > h2d_bps:
        per_byte = 1.0 / h2d_bps
        (fixed, unit), rel = fit_linear(x[alone][:, :2], y[alone] - x[alone][:, 2] * per_byte)
    device_bps = 1.0 / per_byte
    streamed = both & (x[:, 2] > 0)
    rates = x[streamed, 2] / np.maximum(y[streamed] - fixed - unit * x[streamed, 1], 1e-9)
    read_bps = arenas * device_bps
    if len(rates) >= 5:
        read_bps = float(np.clip(arenas * np.median(rates), device_bps, arenas * device_bps))
    # copies from other arenas as measured (their rate is fitted apart: `peer_bps`)
    pred = x @ np.array([fixed, unit, per_byte]) + moved / move_bps + loads["copy_s"].to_numpy(float)
    per_system = {}
    for name, idx in loads.groupby("system").groups.items():
        real = float(loads.loc[idx, "load_s"].mean())
        fitted = float(pred[loads.index.get_indexer(idx)].mean())
        per_system[name] = {"mean_load_s": real, "fit_alone_mean_load_s": fitted, "starts": len(idx)}
    details = {"starts": len(loads), "alone": int(alone.sum()), "overlapped": int(both.sum()),
               "overlapped_median_bps": float(np.median(rates)) if len(rates) else None,
               "rel_rms_residual_alone": rel, "per_system": per_system,
               "moves": int(movers.sum()), "moved_bytes": float(moved.sum()), "move_s": float(move_s[movers].sum()),
               "move_bps": move_bps, "d2d_copy_bps": float(d2d_bps)}
    return float(fixed), float(unit), float(device_bps), float(read_bps), move_bps, details


def fit_steps(steps: pd.DataFrame, model: str) -> tuple[ModelCoefficients, dict[str, Any]]:
    """One model's prefill and decode coefficients from the replays' steps (least squares)."""
    mine = steps[steps["model"] == model]
    pre = mine[mine["kind"] == "prefill"]
    dec = mine[mine["kind"] == "decode"]
    if len(pre) < 3 or len(dec) < 3:
        raise ConfigError(f"model {model}: {len(pre)} prefill and {len(dec)} decode steps in the calibration "
                          "replays, expected at least 3 of each (more requests, or a larger share of this model)")
    tok = pre["tokens"].to_numpy(float)
    # absolute least squares with an intercept: the fit keeps the mean of the steps (what queueing and
    # TTFT add up), where a fit on relative errors bends to the many short steps and under-predicts it
    (p_base, p_tok), p_rel = fit_linear(np.c_[np.ones(len(pre)), tok], pre["seconds"].to_numpy(float))
    batch = dec["requests"].to_numpy(float)
    kv = dec["kv_tokens"].to_numpy(float)
    (d_base, d_seq, d_kv), d_rel = fit_linear(np.c_[np.ones(len(dec)), batch - 1, kv],
                                              dec["seconds"].to_numpy(float))
    coeffs = ModelCoefficients(float(p_base), float(p_tok), float(d_base), float(d_seq), float(d_kv))
    details = {
        "prefill_steps": len(pre),
        "prefill_mean_s": float(pre["seconds"].mean()),
        "prefill_mean_tokens": float(tok.mean()),
        "prefill_fit_mean_s": float(p_base + p_tok * tok.mean()),
        "prefill_rel_rms_residual": p_rel,
        "decode_steps": len(dec),
        "decode_mean_s": float(dec["seconds"].mean()),
        "decode_fit_mean_s": float(np.mean(d_base + d_seq * (batch - 1) + d_kv * kv)),
        "decode_mean_s_by_batch": {int(b): float(g.mean()) for b, g in dec.groupby("requests")["seconds"]},
        "decode_rel_rms_residual": d_rel,
    }
    return coeffs, details


def fit_calibration(loads: pd.DataFrame, steps: pd.DataFrame, layers: pd.DataFrame | None,
                    ckpts: dict[str, Checkpoint], *, h2d_bps: float, d2d_bps: float, arenas: int,
                    label: str) -> tuple[Calibration, dict[str, Any]]:
    """The calibration that replays' `loads` and `steps` (and, with execute-while-load, `layers`) tables
    give, and the fits' details (for `measurements`). `loads` carries `system`, `load_s` and `layered`
    columns beside the replay's own; `h2d_bps` and `d2d_bps` are the copy benchmarks' rates (caps and
    fallbacks). `calibrate` fits on its designed replays; `real.refit` on a validation replay's own
    tables, to tell the time model's error from the calibration's."""
    if loads.empty:
        raise ConfigError("the calibration replays made no cold start, expected models to load")
    load_overhead, unit_overhead, device_bps, read_bps, move_bps, load_fit = fit_loads(loads, d2d_bps, h2d_bps,
                                                                                      arenas)
    engine_overhead = float(loads["engine_s"].mean())
    copiers = loads["copied_bytes"] > 0
    peer_bps = float(loads.loc[copiers, "copied_bytes"].sum() / loads.loc[copiers, "copy_s"].sum()) \
        if copiers.sum() >= 3 and loads.loc[copiers, "copy_s"].sum() > 0 else None
    models: dict[str, ModelCoefficients] = {}
    per_model: dict[str, Any] = {}
    for name in ckpts:
        coeffs, details = fit_steps(steps, name)
        models[name] = coeffs
        mine = loads[loads["model"] == name]
        per_model[name] = {**details, "engine_s": float(mine["engine_s"].mean()) if len(mine) else None,
                           "cold_starts": len(mine)}
    fits: dict[str, Any] = {"device_load_bps": float(device_bps), "models": per_model}
    if layers is not None and len(layers):
        shares, fits["layers"] = fit_layers(layers, loads, ckpts, float(min(h2d_bps, device_bps)), load_overhead,
                                            unit_overhead)
        for name, share in shares.items():
            models[name] = replace(models[name], prefill_layer_shares=share)
    # the simulator's GPU link runs at the rate one arena's loads reach (at most the copy rate h2d_bps,
    # measured by chunk under `measurements`), the node's storage at the arenas' aggregate
    link_bps = float(min(h2d_bps, device_bps))
    layered_bps, layered_fit = fit_layered_rate(loads, load_overhead, unit_overhead, link_bps)
    if layered_fit["starts"]:
        fits["layered_loads"] = layered_fit
    fits["loads"] = {**load_fit, "mean_load_s": float(loads["load_s"].mean()),
                     "mean_units_loaded": float(loads["units_loaded"].mean()),
                     "mean_loaded_bytes": float(loads["loaded_bytes"].mean()),
                     "copies": int(copiers.sum()), "copied_bytes": float(loads["copied_bytes"].sum()),
                     "copy_s": float(loads["copy_s"].sum())}
    cal = Calibration(device=label, h2d_bps=link_bps, d2d_bps=move_bps,
                      unit_overhead_s=unit_overhead, engine_overhead_s=engine_overhead, models=models,
                      read_bps=read_bps, load_overhead_s=load_overhead, peer_bps=peer_bps,
                      layered_load_bps=layered_bps)
    return cal, fits

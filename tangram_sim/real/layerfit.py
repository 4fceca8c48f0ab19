"""Per-layer fits of a calibration (`real.calibrate`), from the layer spans that execute-while-load
replays measure (`ReplayResult.layers`: each first prefill's blocks, when their bytes were in, when
each began and ended computing).

- compute: the share of a prefill each layer block takes (`ModelCoefficients.prefill_layer_shares`),
  the mean over the measured first prefills of each block's compute over their sum; the time model
  splits its (calibrated) prefill time by it. Kept beside it: the residual of that split and of the
  split by FLOPs it replaces (`TimeModel.prefill_layers_s`' default), so a reader sees whether the
  measured shares were needed.
- load: when each block's bytes were in, after the load began, against the bytes read through that
  block (starts that read every unit: their blocks stream in load order), least squares of
  `intercept + bytes / rate`; and the residual of what the simulator charges for it (the start's
  load and unit overheads before the first byte, then the bytes at the calibrated link rate). The
  simulator takes no new coefficient from it: it is the check that its load formula, fitted on whole
  loads, also places the layers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from tangram_sim.models.layers import layer_blocks
from tangram_sim.real.loader import Checkpoint

__all__ = ["fit_layers"]


def _rel_rms(y: np.ndarray, pred: np.ndarray) -> float:
    scale = float(np.sqrt(np.mean(y**2))) or 1.0
    return float(np.sqrt(np.mean((y - pred) ** 2)) / scale)


def fit_layers(layers: pd.DataFrame, loads: pd.DataFrame, ckpts: dict[str, Checkpoint], h2d_bps: float,
               load_overhead_s: float, unit_overhead_s: float) -> tuple[dict[str, tuple[float, ...]], dict[str, Any]]:
    """Per model with measured first prefills: (its prefill shares per block, details with residuals).
    `layers` and `loads` carry a `system` column (the replays of several systems together)."""
    shares: dict[str, tuple[float, ...]] = {}
    details: dict[str, Any] = {}
    for name, ck in ckpts.items():
        mine = layers[layers["model"] == name]
        if mine.empty:
            continue
        blocks = layer_blocks(ck.spec)
        n = len(blocks)
        spans, ready, starts = [], [], []
        for key, g in mine.groupby(["system", "gpu", "rid"]):
            g = g.sort_values("block")
            if len(g) != n:
                continue
            spans.append((g["finish_s"] - g["start_s"]).to_numpy(float))
            ready.append((g["ready_s"] - g["load_start_s"]).to_numpy(float))
            starts.append(key)
        if not spans:
            continue
        c = np.array(spans)
        total = c.sum(axis=1)
        share = (c / np.maximum(total, 1e-12)[:, None]).mean(axis=0)
        share = share / share.sum()
        flops = np.asarray(blocks.flops_per_token, float)
        by_flops = flops / flops.sum() if flops.sum() > 0 else np.full(n, 1.0 / n)
        shares[name] = tuple(float(s) for s in share)
        d: dict[str, Any] = {
            "prefills": len(spans),
            "mean_prefill_compute_s": float(total.mean()),
            "shares": [float(s) for s in share],
            "shares_rel_rms_residual": _rel_rms(c, share[None, :] * total[:, None]),
            "flops_split_rel_rms_residual": _rel_rms(c, by_flops[None, :] * total[:, None]),
        }
        # load: starts that read every unit (the bytes through block b are the blocks' bytes before it)
        full = loads[(loads["model"] == name) & (loads["units_loaded"] == loads["units"])
                     & (loads["units_loaded"] > 0)]
        whole = {(s, g, r) for s, g, r in zip(full["system"], full["gpu"], full["rid"])}
        units = dict(zip(zip(full["system"], full["gpu"], full["rid"]), full["units_loaded"]))
        through = np.cumsum(np.asarray(blocks.nbytes, float))
        xs, ys, pred = [], [], []
        for key, r in zip(starts, ready):
            if key not in whole:
                continue
            xs.append(through)
            ys.append(r)
            pred.append(load_overhead_s + unit_overhead_s * units[key] + through / h2d_bps)
        if xs:
            x = np.concatenate(xs)
            y = np.concatenate(ys)
            coef, *_ = np.linalg.lstsq(np.c_[np.ones(len(x)), x], y, rcond=None)
            intercept, per_byte = float(coef[0]), float(coef[1])
            d["load"] = {
                "starts": len(xs),
                "intercept_s": intercept,
                "rate_bps": 1.0 / per_byte if per_byte > 0 else None,
                "rel_rms_residual": _rel_rms(y, intercept + per_byte * x),
                "simulator_rel_rms_residual": _rel_rms(y, np.concatenate(pred)),
                "mean_last_layer_s": float(np.mean([r[-1] for r in ys])),
            }
        details[name] = d
    return shares, details


def fit_layered_rate(loads: pd.DataFrame, load_overhead_s: float, unit_overhead_s: float,
                     device_bps: float) -> tuple[float | None, dict[str, Any]]:
    """The rate the reads of layered starts reach beside their device's compute
    (`Calibration.layered_load_bps`), and details. `loads` carries a `layered` column (the start ran
    under execute-while-load). Each layered start that read anything pays the serial formula's
    overheads; the rest of its read time carries its bytes: the rate is the starts' bytes over those
    seconds (an aggregate, so that short starts do not weigh like long ones). None when fewer than
    three layered starts read anything, or when they read no slower than serial starts (the simulator
    then needs no second rate: a GPU's copy engines run beside its SMs)."""
    mine = loads[loads["layered"].astype(bool) & (loads["loaded_bytes"] > 0)] if "layered" in loads else loads[:0]
    details: dict[str, Any] = {"starts": len(mine), "serial_bps": float(device_bps)}
    if len(mine) < 3:
        return None, details
    nbytes = mine["loaded_bytes"].to_numpy(float)  # read from the files (copies from other arenas apart)
    units = (mine["units_loaded"] - mine["units_copied"] if "units_copied" in mine else mine["units_loaded"]).to_numpy(float)
    streaming = mine["read_s"].to_numpy(float) - load_overhead_s - unit_overhead_s * units
    rate = float(nbytes.sum() / max(streaming.sum(), 1e-12))
    serial = load_overhead_s + unit_overhead_s * units + nbytes / device_bps
    details.update({"rate_bps": rate, "mean_read_s": float(mine["read_s"].mean()),
                    "serial_formula_mean_read_s": float(serial.mean()),
                    "per_start_rate_bps_p10_p50_p90": [float(v) for v in np.percentile(
                        nbytes / np.maximum(streaming, 1e-12), [10, 50, 90])]})
    if rate >= device_bps:
        return None, details
    fitted = serial - nbytes / device_bps + nbytes / rate
    details["fitted_mean_read_s"] = float(fitted.mean())
    details["rel_rms_residual"] = _rel_rms(mine["read_s"].to_numpy(float), fitted)
    return rate, details

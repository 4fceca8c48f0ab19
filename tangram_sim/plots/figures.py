"""The figures of a run directory, one function per figure.

Every figure function takes a `RunData` and returns a matplotlib `Figure`, or None when the figure
does not apply (no sweep, no cold starts, no timeline). Figures are built with `matplotlib.figure.Figure`
and never through pyplot, so no GUI backend or global figure state is involved (safe in workers,
notebooks and headless machines). Each system keeps one colour across all figures: its position in
config.yaml picks it, so "tangram" is the same colour in the CDF, the bars and the sweep lines.
The figures of weight loading are in `plots.loading`; reading a run directory in `plots.rundata`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from tangram_sim.plots.loading import breakdown, io_reduction, load_by_model
from tangram_sim.plots.rundata import (
    GB,
    RunData,
    _axes,
    _fmt_s,
    _fmt_value,
    _grid,
    _hide_unused,
    _pick,
    _plain,
    _point_title,
    _time_unit,
    load_run,
    short_keys,
)
from tangram_sim.plots.service import slo_cost, slo_cost_caption

__all__ = ["FIGURES", "GB", "FigureSpec", "RunData", "load_run", "render_all", "short_keys"]

DPI = 150
MAX_CDF_PANELS = 6
MAX_GPU_PANELS = 8
# Units of common sweep keys, by their last dotted component, for axis labels.
KEY_UNITS = {
    "gpu_memory_gib": "GiB", "host_cache_gib": "GiB", "rate": "req/s", "ssd_gbps": "GB/s",
    "network_gbps": "GB/s", "rate_scale": "x", "n_requests": "requests", "max_requests": "requests",
    "keep_alive_s": "s",
}
MEMORY_KINDS = (  # (timeline column, legend label, colour), bottom to top of the stack
    ("active_bytes", "active weights (in use)", "#1f4e79"),
    ("retained_bytes", "retained weights (idle, reusable)", "#6baed6"),
    ("kv_bytes", "KV cache", "#f39c12"),
    ("loading_bytes", "loading", "#d62728"),
    ("free_bytes", "free", "#e6e6e6"),
)
LINE_STYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)))
MARKERS = ("o", "s", "^", "D", "v", "P")


# ------------------------------------------------------------------ 1. TTFT CDF
def ttft_cdf(run: RunData) -> Figure | None:
    """TTFT distribution per system: tails matter for serverless, so a log-x CDF, one panel per point."""
    req = run.requests
    if req is None or req.empty:
        return None
    done = req[req["outcome"] == "completed"]
    points = _pick(run.points, MAX_CDF_PANELS)
    rows, cols = _grid(len(points))
    fig = Figure(figsize=(4.6 * cols, 3.6 * rows + 0.4), layout="constrained")
    axes = _axes(fig, rows, cols, sharey=True)
    positive = done.loc[done["ttft_s"] > 0, "ttft_s"]
    floor = float(positive.min()) if len(positive) else 1e-3
    for ax, point in zip(axes, points):
        sub = done[done["point"] == point]
        for system in run.systems:
            ttft = np.sort(sub.loc[sub["system"] == system, "ttft_s"].to_numpy(dtype=float))
            if len(ttft) == 0:
                ax.plot([], [], color=run.colors[system], label=f"{system} (no completed requests)")
                continue
            ttft = np.maximum(ttft, floor)
            y = np.arange(1, len(ttft) + 1) / len(ttft)
            p50 = float(np.median(ttft))
            ax.step(ttft, y, where="post", color=run.colors[system], lw=1.6,
                    label=f"{system} (p50 {_fmt_s(p50)} s)")
        ax.set_xscale("log")
        ax.set_ylim(0, 1.01)
        ax.axhline(0.5, color="0.6", lw=0.7, ls=":")
        ax.grid(True, which="major", alpha=0.3)
        ax.set_xlabel("time to first token (s, log scale)")
        if len(run.points) > 1:
            ax.set_title(run.point_label(point), fontsize=10)
        ax.legend(fontsize=7.5, loc="upper left")  # a CDF leaves the top left empty
    for i, ax in enumerate(axes[: len(points)]):
        if i % cols == 0:
            ax.set_ylabel("fraction of completed requests")
    _hide_unused(axes, len(points))
    fig.suptitle("TTFT CDF per system (completed requests)")
    return fig


# ------------------------------------------------------------------ 5. memory timeline
def _timeline_of(run: RunData, system: str, point: int) -> pd.DataFrame | None:
    tl = run.timeline
    if tl is None or tl.empty:
        return None
    sub = tl[(tl["system"] == system) & (tl["point"] == point)]
    return None if sub.empty else sub.sort_values("time_s")


def timeline_system(run: RunData) -> str | None:
    """The system whose memory is drawn: the last one (the full system) that has samples at point 0."""
    point = run.first_point()
    for system in reversed(run.systems):
        if _timeline_of(run, system, point) is not None:
            return system
    return None


def memory_timeline(run: RunData) -> Figure | None:
    """Where GPU memory goes over time: shows retained weights filling idle memory and KV competing."""
    system = timeline_system(run)
    if system is None:
        return None
    point = run.first_point()
    sub = _timeline_of(run, system, point)
    assert sub is not None
    gpus = sorted(sub["gpu"].unique())[:MAX_GPU_PANELS]
    rows, cols = _grid(len(gpus), max_cols=1 if len(gpus) <= 4 else 2)
    fig = Figure(figsize=(7.5 * cols, 2.4 * rows + 1.0), layout="constrained")
    axes = _axes(fig, rows, cols, sharex=True, sharey=True)
    scale, unit = _time_unit(float(sub["time_s"].max()))
    for ax, gpu in zip(axes, gpus):
        g = sub[sub["gpu"] == gpu]
        t = g["time_s"].to_numpy(dtype=float) / scale
        ys = [g[col].to_numpy(dtype=float) / GB for col, _, _ in MEMORY_KINDS]
        ax.stackplot(t, ys, colors=[c for _, _, c in MEMORY_KINDS], step="post", lw=0)
        ax.set_title(f"GPU {gpu}", fontsize=9, loc="left")
        ax.set_ylabel("memory (GB)")
        ax.margins(x=0)
        ax.set_ylim(bottom=0)
    for ax in axes[len(gpus) - cols: len(gpus)]:
        ax.set_xlabel(f"simulated time ({unit})")
        ax.tick_params(labelbottom=True)
    _hide_unused(axes, len(gpus))
    handles = [Patch(color=c, label=lbl) for _, lbl, c in MEMORY_KINDS]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8)
    n_all = sub["gpu"].nunique()
    shown = f" (first {len(gpus)} of {n_all} GPUs)" if n_all > len(gpus) else ""
    fig.suptitle(f"GPU memory over time: {system}{_point_title(run, point)}{shown}")
    return fig


# ------------------------------------------------------------------ 6. fragmentation
FRAG_WINDOWS = 25  # smoothing window = run length / this; raw samples swing with every load and exit


def _moving_mean(t: np.ndarray, y: np.ndarray, window: float) -> np.ndarray:
    """Mean of the samples within +-window/2 of each sample (centred; samples may be uneven)."""
    csum = np.concatenate(([0.0], np.cumsum(y)))
    lo = np.searchsorted(t, t - window / 2, side="left")
    hi = np.searchsorted(t, t + window / 2, side="right")
    return (csum[hi] - csum[lo]) / np.maximum(hi - lo, 1)


def fragmentation(run: RunData) -> Figure | None:
    """Free memory split into unusable pieces over time (1 - largest free block / free bytes)."""
    tl = run.timeline
    if tl is None or tl.empty or "fragmentation" not in tl.columns:
        return None
    point = run.first_point()
    sub = tl[tl["point"] == point]
    if sub.empty:
        return None
    gpus = sorted(sub["gpu"].unique())[:MAX_GPU_PANELS]
    rows, cols = _grid(len(gpus), max_cols=1 if len(gpus) <= 4 else 2)
    fig = Figure(figsize=(7.5 * cols, 2.3 * rows + 1.0), layout="constrained")
    axes = _axes(fig, rows, cols, sharex=True, sharey=True)
    scale, unit = _time_unit(float(sub["time_s"].max()))
    systems = [s for s in run.systems if s in set(sub["system"])]
    t_max = float(sub["time_s"].max())
    window_s = t_max / FRAG_WINDOWS if t_max > 0 else 1.0
    for ax, gpu in zip(axes, gpus):
        for system in systems:
            g = sub[(sub["gpu"] == gpu) & (sub["system"] == system)].sort_values("time_s")
            if g.empty:
                continue
            t = g["time_s"].to_numpy(dtype=float)
            frag = 100 * g["fragmentation"].to_numpy(dtype=float)
            ax.step(t / scale, frag, where="post", color=run.colors[system], lw=0.5, alpha=0.2)
            ax.plot(t / scale, _moving_mean(t, frag, window_s), color=run.colors[system], lw=1.8)
        ax.set_title(f"GPU {gpu}", fontsize=9, loc="left")
        ax.set_ylabel("fragmentation (%)")
        ax.set_ylim(0, 100)
        ax.text(0.99, 0.95, f"bold: moving mean over {window_s / scale:.2g} {unit}", transform=ax.transAxes,
                ha="right", va="top", fontsize=7, color="0.35")
        ax.margins(x=0)
        ax.grid(True, alpha=0.3)
    for ax in axes[len(gpus) - cols: len(gpus)]:
        ax.set_xlabel(f"simulated time ({unit})")
        ax.tick_params(labelbottom=True)
    _hide_unused(axes, len(gpus))
    means = sub.groupby("system")["fragmentation"].mean()
    handles = [Line2D([], [], color=run.colors[s], lw=2, label=f"{s} (mean {100 * means[s]:.1f}%)")
               for s in systems]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 4), fontsize=8)
    fig.suptitle("Fragmentation of free GPU memory (1 - largest free block / free bytes)"
                 f"{_point_title(run, point)}")
    return fig


# ------------------------------------------------------------------ 7. sweep lines
SWEEP_ROWS = (  # (summary column, axis label, factor): per cold start, then per request under it
    (("mean_load_s", "mean load time per cold start (s)", 1.0),
     ("io_reduction", "I/O reduction per cold start (%)", 100.0),
     ("p50_ttft_s", "p50 TTFT (s)", 1.0)),
    (("mean_load_per_request_s", "mean load time per request (s)", 1.0),
     ("request_bytes_from_gpu", "bytes from GPU per request (%)", 100.0),
     ("request_resident_ratio", "resident per request (% of requests)", 100.0)),
    (("ttft_slo_attainment", "TTFT SLO attainment (% of requests)", 100.0),  # service level and cost
     ("goodput_rps", "goodput (requests/s meeting both SLOs)", 1.0),
     ("gpu_seconds_per_request", "GPU time per request (GPU-seconds)", 1.0)),
)


def sweep_axes(run: RunData) -> tuple[str, list[str]] | None:
    """(x key, other varying keys): x is the key with the most values, the rest become line styles."""
    varying = [k for k in run.sweep_keys if run.summary[k].nunique() > 1]
    if not varying:
        return None
    x_key = max(varying, key=lambda k: run.summary[k].nunique())
    return x_key, [k for k in varying if k != x_key]


def _key_label(key: str) -> str:
    unit = KEY_UNITS.get(key.rsplit(".", 1)[-1])
    return f"{key} ({unit})" if unit else key


def sweep_lines(run: RunData) -> Figure | None:
    """Sensitivity/scalability: each metric against the swept key, one line per system."""
    axes_keys = sweep_axes(run)
    if axes_keys is None:
        return None
    x_key, group_keys = axes_keys
    summary = run.summary
    grid = [[m for m in row if m[0] in summary.columns] for row in SWEEP_ROWS]
    grid = [row for row in grid if row]
    if not grid:
        return None
    cols = max(len(row) for row in grid)
    slots = [(r * cols + c, m) for r, row in enumerate(grid) for c, m in enumerate(row)]
    numeric = pd.api.types.is_numeric_dtype(summary[x_key])
    categories = list(dict.fromkeys(summary[x_key])) if not numeric else []
    groups = (list(summary[group_keys].drop_duplicates().itertuples(index=False, name=None))
              if group_keys else [()])
    short = short_keys(group_keys)
    fig = Figure(figsize=(4.6 * cols, 3.9 * len(grid) + 0.3), layout="constrained")
    axes = _axes(fig, len(grid), cols)
    used = {slot for slot, _ in slots}
    for i, ax in enumerate(axes):
        ax.set_visible(i in used)  # a row shorter than the grid leaves its last panels empty
    for slot, (col, label, factor) in slots:
        ax = axes[slot]
        for system in run.systems:
            for gi, group in enumerate(groups):
                mask = summary["system"] == system
                for key, value in zip(group_keys, group):
                    mask &= summary[key] == value
                sub = summary[mask].sort_values(x_key) if numeric else summary[mask]
                if sub.empty:
                    continue
                x = (sub[x_key].to_numpy(dtype=float) if numeric
                     else np.array([categories.index(v) for v in sub[x_key]]))
                ax.plot(x, sub[col].to_numpy(dtype=float) * factor, color=run.colors[system], lw=1.6,
                        ls=LINE_STYLES[gi % len(LINE_STYLES)], marker=MARKERS[gi % len(MARKERS)], ms=4)
        if numeric:
            xs = np.sort(summary[x_key].unique().astype(float))
            if xs.min() > 0 and xs.max() / xs.min() >= 8:
                ax.set_xscale("log", base=2 if all(float(v).is_integer() for v in xs) else 10)
            ax.set_xticks(xs, [_fmt_value(_plain(v)) for v in xs])
            ax.minorticks_off()
        else:
            ax.set_xticks(range(len(categories)), [str(c) for c in categories], rotation=20, ha="right")
        ax.set_xlabel(_key_label(x_key))
        values = summary[col].to_numpy(dtype=float) * factor
        values = values[np.isfinite(values)]
        if factor == 1.0 and len(values) and values.min() > 0 and values.max() / values.min() >= 20:
            ax.set_yscale("log")  # seconds spanning orders of magnitude
            label = label.replace("(s)", "(s, log scale)")
        else:
            ax.set_ylim(bottom=0)
        ax.set_ylabel(label)
        ax.set_title(label.split(" (")[0])
        ax.grid(True, alpha=0.3)
    handles: list[Any] = [Line2D([], [], color=run.colors[s], lw=2, label=s) for s in run.systems]
    if group_keys:
        for gi, group in enumerate(groups):
            text = ", ".join(f"{short[k]}={_fmt_value(_plain(v))}" for k, v in zip(group_keys, group))
            handles.append(Line2D([], [], color="0.3", ls=LINE_STYLES[gi % len(LINE_STYLES)],
                                  marker=MARKERS[gi % len(MARKERS)], ms=4, label=text))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), fontsize=8)
    fig.suptitle(f"Sweep over {x_key}" + (f" (line style: {', '.join(group_keys)})" if group_keys else ""))
    return fig


# ------------------------------------------------------------------ registry and captions
@dataclass(frozen=True)
class FigureSpec:
    """A figure file, the function drawing it and the caption the report puts under it."""

    file: str
    draw: Callable[[RunData], Figure | None]
    caption: Callable[[RunData], str]


def _at(run: RunData) -> str:
    return f" at {run.point_label(run.first_point())}" if len(run.points) > 1 else ""


def _cdf_caption(run: RunData) -> str:
    shown = _pick(run.points, MAX_CDF_PANELS)
    panels = (f" One panel per sweep point ({len(shown)} of {len(run.points)} shown)."
              if len(run.points) > 1 else "")
    return ("Cumulative distribution of time to first token of completed requests, per system "
            f"(log x axis; the dotted line marks the median).{panels}")


def _memory_caption(run: RunData) -> str:
    system = timeline_system(run) or "the last system"
    return (f"GPU memory of {system}{_at(run)} over simulated time, stacked by kind: weights of running "
            "instances, retained weights of finished instances (reusable), KV cache, bytes being loaded, "
            f"and free memory; one panel per GPU (at most {MAX_GPU_PANELS}).")


def _per_request(run: RunData) -> bool:
    """summary.csv has the per-request metrics (a run written before they existed does not)."""
    return "request_resident_ratio" in run.summary.columns


AUTHORS = "the Tangram authors' count, a warm request loading nothing"


def _sweep_caption(run: RunData) -> str:
    keys = sweep_axes(run)
    if keys is None:
        return "Metrics against the swept key, one line per system."
    x_key, others = keys
    styles = f"; line style and marker distinguish {', '.join(others)}" if others else ""
    what = "Mean load time per cold start, I/O reduction per cold start and p50 TTFT"
    service = "goodput_rps" in run.summary.columns
    if _per_request(run):
        what = (f"{what} (top row), and per request ({AUTHORS}) mean load time, share of model bytes "
                "served from GPU memory and share of requests whose model was resident "
                f"({'middle' if service else 'bottom'} row),")
    if service:
        what += (" TTFT SLO attainment, goodput and GPU-seconds held per completed request (bottom row; "
                 "see the service-level figure),")
    return f"{what} against {x_key}, one colour per system{styles}."


def _load_by_model_caption(run: RunData) -> str:
    return (f"Mean weight load time per model and system{_at(run)}: per cold start (top; a missing bar "
            "means that system had no cold start of that model, or loaded nothing for it) and per "
            f"completed request ({AUTHORS}; bottom).")


def _breakdown_caption(run: RunData) -> str:
    load = ("Mean load time per cold start, mean load time per request "
            f"({AUTHORS}),") if "mean_load_per_request_s" in run.summary.columns else "Mean load time"
    first = run.systems[0] if run.systems else "the first system"
    return (f"{load} and p50 TTFT per system in configuration order{_at(run)}, with the speed-up over "
            f"{first}; with breakdown stages as systems this is the paper's breakdown figure.")


def _io_caption(run: RunData) -> str:
    cold = ("share of the weight bytes needed by cold starts that were reused from GPU memory instead of "
            "loaded (left) and share of cold starts that loaded nothing (right)")
    if not _per_request(run):
        return f"Per cold start: {cold}{_at(run)}."
    return (f"Top, per cold start: {cold}. Bottom, per completed request ({AUTHORS}): share of the model "
            "bytes served from GPU memory (left) and share of requests whose model was fully resident "
            f"on their GPU(s) (right){_at(run)}.")


FIGURES: tuple[FigureSpec, ...] = (
    FigureSpec("ttft_cdf.png", ttft_cdf, _cdf_caption),
    FigureSpec("load_by_model.png", load_by_model, _load_by_model_caption),
    FigureSpec("breakdown.png", breakdown, _breakdown_caption),
    FigureSpec("io_reduction.png", io_reduction, _io_caption),
    FigureSpec("memory_timeline.png", memory_timeline, _memory_caption),
    FigureSpec("fragmentation.png", fragmentation, lambda r: (
        f"Fragmentation of free GPU memory (1 - largest free block / free bytes) over time, one panel per "
        f"GPU and one colour per system{_at(r)}; 0% means all free memory is one block.")),
    FigureSpec("slo_cost.png", slo_cost, slo_cost_caption),
    FigureSpec("sweep.png", sweep_lines, _sweep_caption),
)


def render_all(run_dir: Path | str, *, require_complete: bool = True) -> list[Path]:
    """Draw every applicable figure into run_dir/plots/ and return the written paths.

    A figure that does not apply is skipped, and an old file of that name is removed, so the
    plots folder (and the report that embeds it) never shows results of an earlier run.
    require_complete: see `load_run`.
    """
    run = load_run(run_dir, require_complete=require_complete)
    out = run.run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for spec in FIGURES:
        path = out / spec.file
        fig = spec.draw(run)
        if fig is None:
            path.unlink(missing_ok=True)
            continue
        fig.savefig(path, dpi=DPI, bbox_inches="tight")
        written.append(path)
    return written

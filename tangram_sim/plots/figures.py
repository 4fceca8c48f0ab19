"""The figures of a run directory, one function per figure.

Every figure function takes a `RunData` and returns a matplotlib `Figure`, or None when the figure
does not apply (no sweep, no cold starts, no timeline). Figures are built with `matplotlib.figure.Figure`
and never through pyplot, so no GUI backend or global figure state is involved (safe in workers,
notebooks and headless machines). Each system keeps one colour across all figures: its position in
config.yaml picks it, so "tangram" is the same colour in the CDF, the bars and the sweep lines.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from tangram_sim import rundir
from tangram_sim.errors import TangramError

GB = 1e9  # reports use decimal GB, as the paper and the model catalog do
DPI = 150
MAX_CDF_PANELS = 6
MAX_GPU_PANELS = 8
NO_SWEEP_KEYS = ("system", "point")
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


# ------------------------------------------------------------------ loading
@dataclass
class RunData:
    """Everything a figure or the report reads from one run directory, loaded once."""

    run_dir: Path
    config: dict[str, Any]
    summary: pd.DataFrame
    requests: pd.DataFrame | None
    timeline: pd.DataFrame | None
    systems: list[str]  # config order (the breakdown order), then any extra found in summary.csv
    sweep_keys: list[str]  # dotted keys that are columns of summary.csv
    colors: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.config.get("name") or self.run_dir.name)

    @property
    def points(self) -> list[int]:
        return sorted(int(p) for p in self.summary["point"].unique())

    def point_values(self, point: int) -> dict[str, Any]:
        """The sweep key values of one point, e.g. {'cluster.gpus_per_node': 2}."""
        rows = self.summary[self.summary["point"] == point]
        if rows.empty:
            return {}
        return {k: _plain(rows[k].iloc[0]) for k in self.sweep_keys}

    def point_label(self, point: int) -> str:
        values = self.point_values(point)
        if not values:
            return f"point {point}"
        short = short_keys(self.sweep_keys)
        return ", ".join(f"{short[k]}={_fmt_value(v)}" for k, v in values.items())

    def first_point(self) -> int:
        return self.points[0] if self.points else 0


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _fmt_value(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def short_keys(keys: list[str]) -> dict[str, str]:
    """Last dotted component of each key, unless two keys would then read the same."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def _read_parquet(path: Path) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt or truncated file
        raise TangramError(
            f"{path}: cannot read parquet ({exc.__class__.__name__}); expected a `tangram-sim run` output"
        ) from None


def load_run(run_dir: Path | str, *, require_complete: bool = True) -> RunData:
    """Read a directory written by `tangram-sim run`; raise TangramError if it is not one.

    require_complete: refuse a run whose run.json is missing or not "complete" (interrupted, failed,
    still running), so figures never show part of a run as if it were all of it; the run itself
    passes False to draw its figures before it writes its final run.json.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise TangramError(f"{run_dir}: not a directory; expected a run directory from `tangram-sim run`")
    if require_complete:
        rundir.require_complete(run_dir)
    summary_path = run_dir / "summary.csv"
    if not summary_path.is_file():
        raise TangramError(f"{run_dir}: no summary.csv; expected a run directory from `tangram-sim run`")
    try:
        summary = pd.read_csv(summary_path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise TangramError(f"{summary_path}: not a readable CSV ({exc})") from None
    if "system" not in summary.columns:
        raise TangramError(f"{summary_path}: expected a 'system' column (one row per system and point)")
    summary["system"] = summary["system"].astype(str)
    if "point" not in summary.columns:
        summary["point"] = 0
    config: dict[str, Any] = {}
    config_path = run_dir / "config.yaml"
    if config_path.is_file():
        try:
            loaded = yaml.safe_load(config_path.read_text())
        except yaml.YAMLError as exc:
            raise TangramError(f"{config_path}: invalid YAML ({str(exc).splitlines()[0]})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise TangramError(f"{config_path}: expected a mapping (the resolved experiment)")
        config = loaded or {}
    systems = [str(s.get("name")) for s in config.get("systems") or [] if isinstance(s, dict)]
    systems = [s for s in systems if s in set(summary["system"])]
    systems += [s for s in dict.fromkeys(summary["system"]) if s not in systems]
    sweep = config.get("sweep") if isinstance(config.get("sweep"), dict) else {}
    sweep_keys = [k for k in sweep if k in summary.columns]
    if not sweep_keys:  # config lost or hand-made: columns between 'point' and the metrics
        cols = list(summary.columns)
        if "requests" in cols:
            sweep_keys = [c for c in cols[: cols.index("requests")] if c not in NO_SWEEP_KEYS]
    requests = _read_parquet(run_dir / "requests.parquet")
    timeline = _read_parquet(run_dir / "timeline.parquet")
    palette = colormaps["tab10" if len(systems) <= 10 else "tab20"]
    colors = {s: palette(i % palette.N) for i, s in enumerate(systems)}
    return RunData(run_dir, config, summary, requests, timeline, systems, sweep_keys, colors)


# ------------------------------------------------------------------ helpers
def _grid(n: int, max_cols: int = 3) -> tuple[int, int]:
    cols = min(max_cols, max(1, n))
    return math.ceil(n / cols), cols


def _pick(items: list[Any], k: int) -> list[Any]:
    """At most k items spread evenly, always keeping the first and the last."""
    if len(items) <= k:
        return list(items)
    idx = sorted({round(i * (len(items) - 1) / (k - 1)) for i in range(k)})
    return [items[i] for i in idx]


def _time_unit(max_s: float) -> tuple[float, str]:
    if max_s > 3 * 3600:
        return 3600.0, "h"
    if max_s > 1200:
        return 60.0, "min"
    return 1.0, "s"


def _axes(fig: Figure, rows: int, cols: int, **kw: Any) -> list[Any]:
    axes = fig.subplots(rows, cols, squeeze=False, **kw)
    return list(axes.ravel())


def _hide_unused(axes: list[Any], used: int) -> None:
    for ax in axes[used:]:
        ax.set_visible(False)


def _system_handles(run: RunData, systems: list[str] | None = None) -> list[Patch]:
    return [Patch(color=run.colors[s], label=s) for s in (systems or run.systems)]


def _point_rows(run: RunData, point: int) -> pd.DataFrame:
    """summary.csv rows of one point, in config order of the systems."""
    rows = run.summary[run.summary["point"] == point].set_index("system")
    return rows.reindex([s for s in run.systems if s in rows.index])


def _point_title(run: RunData, point: int) -> str:
    return f" ({run.point_label(point)})" if len(run.points) > 1 else ""


def _annotate(ax: Any, bars: Any, labels: list[str], fontsize: float = 8) -> None:
    for bar, text in zip(bars, labels):
        if text:
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), xytext=(0, 2),
                        textcoords="offset points", ha="center", va="bottom", fontsize=fontsize)


def _fmt_s(v: float) -> str:
    if v is None or not np.isfinite(v):
        return "n/a"
    if abs(v) < 10:
        return f"{v:.3f}" if abs(v) < 1 else f"{v:.2f}"
    return f"{v:.1f}" if abs(v) < 1000 else f"{v:.0f}"


def _model_order(run: RunData, found: list[str]) -> list[str]:
    names = [str(m.get("name")) for m in run.config.get("models") or [] if isinstance(m, dict)]
    order = [m for m in names if m in found]
    return order + sorted(m for m in found if m not in order)


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


# ------------------------------------------------------------------ 2. load time per model
def load_by_model(run: RunData) -> Figure | None:
    """Mean load time per model: reuse helps most for the models that stay resident."""
    req = run.requests
    if req is None or req.empty:
        return None
    point = run.first_point()
    cold = req[(req["point"] == point) & req["cold"].astype(bool)]
    if cold.empty:
        return None
    means = cold.groupby(["model", "system"])["load_s"].mean().unstack("system")
    counts = cold.groupby(["model", "system"]).size().unstack("system")
    models = _model_order(run, list(means.index))
    systems = run.systems
    width = 0.8 / len(systems)
    x = np.arange(len(models))
    fig = Figure(figsize=(min(14.0, max(7.0, 0.28 * len(models) * len(systems) + 3.5)), 4.6),
                 layout="constrained")
    ax = fig.subplots()
    for i, system in enumerate(systems):
        vals = [means.at[m, system] if system in means.columns else np.nan for m in models]
        vals = np.nan_to_num(np.asarray(vals, dtype=float), nan=0.0)
        n = int(counts[system].sum()) if system in counts.columns else 0
        label = f"{system} ({n} cold starts)" if n else f"{system} (no cold starts)"
        ax.bar(x - 0.4 + width * (i + 0.5), vals, width, color=run.colors[system], label=label)
    ax.set_xticks(x, models, rotation=25, ha="right")
    ax.set_ylabel("mean load time per cold start (s)")
    ax.set_xlabel("model")
    ax.grid(True, axis="y", alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=8)
    ax.set_title(f"Mean weight load time per model{_point_title(run, point)}")
    return fig


# ------------------------------------------------------------------ 3. breakdown
def breakdown(run: RunData) -> Figure | None:
    """Mean load and p50 TTFT per system in config order: with breakdown stages as systems, each bar
    shows what one more mechanism buys over the first system."""
    point = run.first_point()
    rows = _point_rows(run, point)
    metrics = [(c, t) for c, t in (("mean_load_s", "mean load time (s)"), ("p50_ttft_s", "p50 TTFT (s)"))
               if c in rows.columns]
    if rows.empty or not metrics:
        return None
    systems = list(rows.index)
    fig = Figure(figsize=(max(7.5, 1.3 * len(systems) * len(metrics) + 1), 4.4), layout="constrained")
    axes = _axes(fig, 1, len(metrics))
    for ax, (col, title) in zip(axes, metrics):
        vals = rows[col].to_numpy(dtype=float)
        bars = ax.bar(range(len(systems)), np.nan_to_num(vals), color=[run.colors[s] for s in systems])
        base = vals[0]
        labels = []
        for i, v in enumerate(vals):
            text = _fmt_s(v)
            if i and np.isfinite(v) and np.isfinite(base) and v > 0 and base > 0:
                if abs(base / v - 1) < 0.005:
                    text += "\n(same)"
                else:
                    text += f"\n({base / v:.2f}x faster)" if v < base else f"\n({v / base:.2f}x slower)"
            labels.append(text)
        _annotate(ax, bars, labels)
        ax.set_xticks(range(len(systems)), systems, rotation=20, ha="right")
        ax.set_ylabel(title)
        ax.set_title(title.split(" (")[0])
        ax.margins(y=0.18)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"Breakdown per system (vs {systems[0]} in brackets){_point_title(run, point)}")
    return fig


# ------------------------------------------------------------------ 4. I/O reduction
def io_reduction(run: RunData) -> Figure | None:
    """Share of bytes not loaded over PCIe and share of cold starts needing no load at all."""
    point = run.first_point()
    rows = _point_rows(run, point)
    metrics = [(c, t) for c, t in (("io_reduction", "I/O reduction (% of needed bytes reused)"),
                                   ("full_hit_ratio", "full hits (% of cold starts with nothing to load)"))
               if c in rows.columns]
    if rows.empty or not metrics:
        return None
    systems = list(rows.index)
    fig = Figure(figsize=(max(7.5, 1.3 * len(systems) * len(metrics) + 1), 4.4), layout="constrained")
    axes = _axes(fig, 1, len(metrics), sharey=True)
    top = 100 * float(np.nan_to_num(rows[[c for c, _ in metrics]].to_numpy(dtype=float)).max())
    for ax, (col, title) in zip(axes, metrics):
        vals = 100 * np.nan_to_num(rows[col].to_numpy(dtype=float))
        bars = ax.bar(range(len(systems)), vals, color=[run.colors[s] for s in systems])
        _annotate(ax, bars, [f"{v:.1f}%" for v in vals])
        ax.set_xticks(range(len(systems)), systems, rotation=20, ha="right")
        ax.set_ylim(0, min(110.0, max(10.0, 1.2 * top)))  # zoom in when reuse is small
        ax.set_ylabel("% (higher is better)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"Weight I/O saved by GPU memory reuse{_point_title(run, point)}")
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
SWEEP_METRICS = (
    ("mean_load_s", "mean load time (s)", 1.0),
    ("p50_ttft_s", "p50 TTFT (s)", 1.0),
    ("io_reduction", "I/O reduction (%)", 100.0),
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
    metrics = [m for m in SWEEP_METRICS if m[0] in summary.columns]
    if not metrics:
        return None
    numeric = pd.api.types.is_numeric_dtype(summary[x_key])
    categories = list(dict.fromkeys(summary[x_key])) if not numeric else []
    groups = (list(summary[group_keys].drop_duplicates().itertuples(index=False, name=None))
              if group_keys else [()])
    short = short_keys(group_keys)
    fig = Figure(figsize=(4.6 * len(metrics), 4.2), layout="constrained")
    axes = _axes(fig, 1, len(metrics))
    for ax, (col, label, factor) in zip(axes, metrics):
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


def _sweep_caption(run: RunData) -> str:
    keys = sweep_axes(run)
    if keys is None:
        return "Metrics against the swept key, one line per system."
    x_key, others = keys
    styles = f"; line style and marker distinguish {', '.join(others)}" if others else ""
    return (f"Mean load time, p50 TTFT and I/O reduction against {x_key}, one colour per system{styles}.")


FIGURES: tuple[FigureSpec, ...] = (
    FigureSpec("ttft_cdf.png", ttft_cdf, _cdf_caption),
    FigureSpec("load_by_model.png", load_by_model, lambda r: (
        f"Mean weight load time of cold starts per model and system{_at(r)}; a missing bar means that "
        "system had no cold start of that model (or loaded nothing for it).")),
    FigureSpec("breakdown.png", breakdown, lambda r: (
        f"Mean load time and p50 TTFT per system in configuration order{_at(r)}, with the speed-up over "
        f"{r.systems[0] if r.systems else 'the first system'}; with breakdown stages as systems this is "
        "the paper's breakdown figure.")),
    FigureSpec("io_reduction.png", io_reduction, lambda r: (
        f"Share of the weight bytes needed by cold starts that were reused from GPU memory instead of "
        f"loaded (left) and share of cold starts that loaded nothing (right){_at(r)}.")),
    FigureSpec("memory_timeline.png", memory_timeline, _memory_caption),
    FigureSpec("fragmentation.png", fragmentation, lambda r: (
        f"Fragmentation of free GPU memory (1 - largest free block / free bytes) over time, one panel per "
        f"GPU and one colour per system{_at(r)}; 0% means all free memory is one block.")),
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

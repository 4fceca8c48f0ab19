"""Figures of weight loading: load time per model, the breakdown per system, and the I/O saved by GPU
memory reuse. Each shows the per-cold-start figure and, when summary.csv has it, its per-request
counterpart (the Tangram authors' way of counting, where a warm request loads nothing)."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from tangram_sim.plots.rundata import (
    RunData,
    _annotate,
    _axes,
    _fmt_s,
    _model_order,
    _point_rows,
    _point_title,
)


# ------------------------------------------------------------------ 2. load time per model
def load_by_model(run: RunData) -> Figure | None:
    """Mean load time per model, per cold start (top) and per completed request with warm requests at 0
    (bottom): reuse helps most for the models that stay resident."""
    req = run.requests
    if req is None or req.empty:
        return None
    point = run.first_point()
    at = req[req["point"] == point]
    cold = at[at["cold"].astype(bool)]
    if cold.empty:
        return None
    done = at[at["outcome"] == "completed"]
    panels = (
        (cold, "mean load time per cold start (s)", "per cold start"),
        (done, "mean load time per request (s)",
         "per completed request (warm = 0, the Tangram authors' count)"),
    )
    models = _model_order(run, sorted(set(cold["model"]) | set(done["model"])))
    systems = run.systems
    width = 0.8 / len(systems)
    x = np.arange(len(models))
    fig = Figure(figsize=(min(14.0, max(7.0, 0.28 * len(models) * len(systems) + 3.5)), 7.8),
                 layout="constrained")
    axes = _axes(fig, 2, 1, sharex=True)
    for ax, (frame, ylabel, title) in zip(axes, panels):
        means = frame.groupby(["model", "system"])["load_s"].mean().unstack("system")
        for i, system in enumerate(systems):
            vals = [means.at[m, system] if system in means.columns and m in means.index else np.nan
                    for m in models]
            vals = np.nan_to_num(np.asarray(vals, dtype=float), nan=0.0)
            ax.bar(x - 0.4 + width * (i + 0.5), vals, width, color=run.colors[system])
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    axes[-1].set_xticks(x, models, rotation=25, ha="right")
    axes[-1].set_xlabel("model")
    handles = []
    for system in systems:
        n = int((cold["system"] == system).sum())
        m = int((done["system"] == system).sum())
        text = f"{n} cold starts" if n else "no cold starts"
        handles.append(Patch(color=run.colors[system], label=f"{system} ({text}, {m} completed)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 3), fontsize=8)
    fig.suptitle(f"Mean weight load time per model{_point_title(run, point)}")
    return fig


# ------------------------------------------------------------------ 3. breakdown
BREAKDOWN_METRICS = (  # (summary column, axis label, panel title)
    ("mean_load_s", "mean load time per cold start (s)", "mean load per cold start"),
    ("mean_load_per_request_s", "mean load time per request, warm = 0 (s)", "mean load per request"),
    ("p50_ttft_s", "p50 TTFT (s)", "p50 TTFT"),
)


def breakdown(run: RunData) -> Figure | None:
    """Mean load (per cold start and per request) and p50 TTFT per system in config order: with
    breakdown stages as systems, each bar shows what one more mechanism buys over the first system."""
    point = run.first_point()
    rows = _point_rows(run, point)
    metrics = [m for m in BREAKDOWN_METRICS if m[0] in rows.columns]
    if rows.empty or not metrics:
        return None
    systems = list(rows.index)
    fig = Figure(figsize=(max(7.5, 1.3 * len(systems) * len(metrics) + 1), 4.4), layout="constrained")
    axes = _axes(fig, 1, len(metrics))
    for ax, (col, label, title) in zip(axes, metrics):
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
        ax.set_ylabel(label)
        ax.set_title(title)
        ax.margins(y=0.18)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"Breakdown per system (vs {systems[0]} in brackets){_point_title(run, point)}")
    return fig


# ------------------------------------------------------------------ 4. I/O reduction
IO_ROWS = (  # one row of panels per way of counting: (summary column, panel title)
    (("io_reduction", "I/O reduction per cold start\n(% of needed bytes reused)"),
     ("full_hit_ratio", "full hits per cold start\n(% of cold starts that loaded nothing)")),
    (("request_bytes_from_gpu", "bytes from GPU per request\n(% of model bytes not loaded)"),
     ("request_resident_ratio", "resident per request\n(% of requests whose model was resident)")),
)


def io_reduction(run: RunData) -> Figure | None:
    """Share of bytes not loaded over PCIe and share needing no load at all: per cold start (top row)
    and per completed request, the Tangram authors' metrics (bottom row, when summary.csv has them)."""
    point = run.first_point()
    rows = _point_rows(run, point)
    grid = [[m for m in row if m[0] in rows.columns] for row in IO_ROWS]
    grid = [row for row in grid if row]
    if rows.empty or not grid:
        return None
    systems = list(rows.index)
    cols = max(len(row) for row in grid)
    fig = Figure(figsize=(max(7.5, 1.3 * len(systems) * cols + 1), 4.4 * len(grid)), layout="constrained")
    axes = _axes(fig, len(grid), cols, sharey=True)
    shown = [c for row in grid for c, _ in row]
    top = 100 * float(np.nan_to_num(rows[shown].to_numpy(dtype=float)).max())
    for r, row in enumerate(grid):
        for c in range(cols):
            ax = axes[r * cols + c]
            if c >= len(row):
                ax.set_visible(False)
                continue
            col, title = row[c]
            vals = 100 * np.nan_to_num(rows[col].to_numpy(dtype=float))
            bars = ax.bar(range(len(systems)), vals, color=[run.colors[s] for s in systems])
            _annotate(ax, bars, [f"{v:.1f}%" for v in vals])
            ax.set_xticks(range(len(systems)), systems, rotation=20, ha="right")
            ax.set_ylim(0, min(110.0, max(10.0, 1.2 * top)))  # zoom in when reuse is small
            ax.set_ylabel("% (higher is better)")
            ax.set_title(title, fontsize=10)
            ax.grid(True, axis="y", alpha=0.3)
    both = len(grid) == 2
    how = ": per cold start (top), per request as the Tangram authors count (bottom)" if both else ""
    fig.suptitle(f"Weight I/O saved by GPU memory reuse{how}{_point_title(run, point)}")
    return fig

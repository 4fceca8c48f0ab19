"""The figure of service level and cost: SLO attainment, goodput and GPU time per request, per system.

Latency percentiles say how fast a system is; these say how many requests it served well enough and
what GPU time that cost (`core.slo` defines the columns). A run written before the columns existed
has none, and the figure is skipped.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure

from tangram_sim.plots.rundata import RunData, _annotate, _axes, _fmt_s, _fmt_value, _point_rows, _point_title

SERVICE_METRICS = (  # (summary column, panel title, axis label, kind: "pct" shown x100, "num" as is)
    ("ttft_slo_attainment", "TTFT SLO attainment", "% of all requests (higher is better)", "pct"),
    ("tpot_slo_attainment", "TPOT SLO attainment", "% of all requests (higher is better)", "pct"),
    ("goodput_rps", "goodput", "requests/s meeting both SLOs (higher is better)", "num"),
    ("gpu_seconds_per_request", "GPU time per request",
     "GPU-seconds held per completed request (lower is better)", "num"),
)


def slo_text(config: dict[str, Any]) -> str:
    """'TTFT <= 2 s, TPOT <= 0.2 s' from a resolved config's `slo` (plus 'per-model targets for N
    models'), or '' for a config written before `slo` existed."""
    slo = config.get("slo")
    if not isinstance(slo, dict) or "ttft_s" not in slo or "tpot_s" not in slo:
        return ""
    text = f"TTFT <= {_fmt_value(slo['ttft_s'])} s, TPOT <= {_fmt_value(slo['tpot_s'])} s"
    models = slo.get("models")
    if isinstance(models, dict) and models:
        text += f" (per-model targets for {len(models)} model{'s' if len(models) > 1 else ''})"
    return text


def slo_cost(run: RunData) -> Figure | None:
    """Share of requests within each SLO, goodput and GPU-seconds per completed request per system in
    config order, at the first sweep point."""
    point = run.first_point()
    rows = _point_rows(run, point)
    metrics = [m for m in SERVICE_METRICS if m[0] in rows.columns]
    if rows.empty or not metrics:
        return None
    systems = list(rows.index)
    fig = Figure(figsize=(max(9.0, 1.1 * len(systems) * len(metrics) + 1), 4.6), layout="constrained")
    axes = _axes(fig, 1, len(metrics))
    for ax, (col, title, label, kind) in zip(axes, metrics):
        vals = np.nan_to_num(rows[col].to_numpy(dtype=float))
        if kind == "pct":
            vals = 100 * vals
        bars = ax.bar(range(len(systems)), vals, color=[run.colors[s] for s in systems])
        _annotate(ax, bars, [f"{v:.1f}%" if kind == "pct" else _number(v) for v in vals])
        if kind == "pct":
            ax.set_ylim(0, 110)
        else:
            ax.margins(y=0.18)
        ax.set_xticks(range(len(systems)), systems, rotation=20, ha="right")
        ax.set_ylabel(label, fontsize=8.5)
        ax.set_title(title)
        ax.grid(True, axis="y", alpha=0.3)
    target = slo_text(run.config)
    fig.suptitle(f"Service level and cost per system{f' (SLO: {target})' if target else ''}"
                 f"{_point_title(run, point)}")
    return fig


def _number(value: float) -> str:
    """Goodput and GPU-seconds: three significant digits, small rates included (0.0123, not 0.012)."""
    return f"{value:.3g}" if 0 < abs(value) < 1 else _fmt_s(value)


def slo_cost_caption(run: RunData) -> str:
    target = slo_text(run.config)
    at = f" at {run.point_label(run.first_point())}" if len(run.points) > 1 else ""
    return (f"Per system{at}: share of all requests (a rejected one counts as a miss) that completed within "
            f"the TTFT SLO and within the TPOT SLO{f' ({target})' if target else ''}, goodput (requests per "
            "second meeting both, from the first arrival to the last completion), and the cost side: GPU "
            "time held by instances, busy or idle, per completed request.")

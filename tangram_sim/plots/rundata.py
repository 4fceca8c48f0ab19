"""What the figures and the report read from a run directory (`RunData`, `load_run`), and the small
helpers the figure modules share: grids of axes, system colours, value formatting."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from tangram_sim import rundir
from tangram_sim.errors import TangramError

GB = 1e9  # reports use decimal GB, as the paper and the model catalog do
NO_SWEEP_KEYS = ("system", "point")


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

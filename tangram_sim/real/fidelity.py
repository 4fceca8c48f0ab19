"""Sim-vs-real fidelity: how far a simulation's predictions are from a real replay of the same trace.

Both sides are run directories (`tangram-sim run` and `tangram-sim real replay` write the same
layout), so the comparison reads `summary.csv`-level figures recomputed from `requests.parquet` (the
same requests on both sides, matched by `rid`) and reports, per system present in both:

- mean / p50 / p99 load time of cold starts, mean / p50 / p99 TTFT of completed requests, bytes loaded
  and the mean queueing delay: simulated, real, and the relative error (sim - real) / real;
- the full-hit ratio (cold starts that loaded nothing): its error is the difference in points, since
  the ratio is often 0 for the baseline;
- per request, as the Tangram authors count (`core.metrics.per_request_metrics`): the mean load time
  with warm requests at 0 (relative error), the share of requests whose model was resident and the
  share of model bytes served from GPU memory (differences in points);
- per request: the Pearson correlation of load times and of TTFTs, and the share of requests that are
  cold on both sides or warm on both sides;
- per GPU: requests served, cold starts and bytes loaded on each side (the router's decisions);
- the replay's lag (p50/p99/max, from its summary.csv): how far behind the wall clock it ran;
- bytes loaded per source (`bytes_from_<source>` of both summary.csv files, `core.sources`), for the
  sources either side read from: simulated, real and the relative error;
- `replay_spread`: one simulation against several replays of the same trace with the same calibration:
  how far the replays are from each other (the noise floor a prediction is judged against) and from
  the simulation;
- `ewl_reduction`: for a pair of systems that differ by execute-while-load, the reduction of the mean
  cold-start TTFT that turning it on brings, predicted by the simulation and measured by the replay.

Pure pandas/numpy (no torch): it runs wherever the two folders are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tangram_sim.core.metrics import per_request_metrics
from tangram_sim.core.sources import SOURCE_COLUMNS
from tangram_sim.errors import TangramError
from tangram_sim.rundir import require_complete

__all__ = ["METRICS", "Fidelity", "compare_runs", "ewl_reduction", "fidelity_table", "plot_fidelity",
           "format_spread", "replay_spread"]

# (column, label, unit, how the error is expressed: "rel" = (sim - real) / real, "diff" = sim - real)
METRICS: tuple[tuple[str, str, str, str], ...] = (
    ("mean_load_s", "mean load time (per cold start)", "s", "rel"),
    ("p50_load_s", "p50 load time (per cold start)", "s", "rel"),
    ("p99_load_s", "p99 load time (per cold start)", "s", "rel"),
    ("mean_ttft_s", "mean TTFT", "s", "rel"),
    ("p50_ttft_s", "p50 TTFT", "s", "rel"),
    ("p99_ttft_s", "p99 TTFT", "s", "rel"),
    ("mean_queue_s", "mean queueing", "s", "rel"),
    ("bytes_loaded", "bytes loaded", "B", "rel"),
    ("cold_starts", "cold starts", "", "rel"),
    ("full_hit_ratio", "full-hit ratio (per cold start)", "", "diff"),
    ("mean_load_per_request_s", "mean load time (per request)", "s", "rel"),
    ("request_resident_ratio", "resident ratio (per request)", "", "diff"),
    ("request_bytes_from_gpu", "bytes from GPU (per request)", "", "diff"),
)
AGREEMENT = (
    ("load_s_corr", "load time correlation (per request)"),
    ("ttft_s_corr", "TTFT correlation (per request)"),
    ("cold_match", "same cold/warm outcome (per request)"),
)
HEADLINE = ("mean_load_s", "p50_ttft_s")  # the figures the fidelity goal is stated on


LAG = ("lag_p50_s", "lag_p99_s", "lag_max_s", "lag_bound_s")  # the replay's, from its summary.csv


@dataclass(slots=True)
class Fidelity:
    table: pd.DataFrame  # one row per system: <metric>_sim, <metric>_real, <metric>_err, agreement, lag
    sim_dir: Path  # the simulation's run directory
    real_dir: Path  # the replay's run directory
    gpus: pd.DataFrame | None = None  # per (system, point, gpu): requests, cold starts, bytes, both sides

    def worst_headline_error(self) -> float:
        """Largest |relative error| of mean load time and p50 TTFT over the systems (NaN if none)."""
        cols = [f"{m}_err" for m in HEADLINE if f"{m}_err" in self.table.columns]
        values = self.table[cols].abs().to_numpy(dtype=float)
        return float(np.nanmax(values)) if values.size and not np.isnan(values).all() else math.nan


def _requests(run_dir: Path) -> pd.DataFrame:
    path = run_dir / "requests.parquet"
    if not path.is_file():
        raise TangramError(f"{run_dir}: no requests.parquet; expected a run directory from "
                           "`tangram-sim run` or `tangram-sim real replay` (outputs.requests: true)")
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise TangramError(f"{path}: cannot read parquet ({exc.__class__.__name__})") from None
    missing = {"system", "rid", "cold", "load_s", "ttft_s", "outcome", "bytes_needed", "bytes_loaded"} - set(
        frame.columns)
    if missing:
        raise TangramError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
    if "point" not in frame.columns:
        frame["point"] = 0
    frame["system"] = frame["system"].astype(str)
    return frame


def _pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else math.nan


def _figures(req: pd.DataFrame) -> dict[str, float]:
    """The compared figures of one system's requests (the definitions of `core.metrics.summarize`)."""
    cold = req[req["cold"]]
    done = req[req["outcome"] == "completed"]
    load = cold["load_s"].to_numpy(dtype=float)
    ttft = done["ttft_s"].to_numpy(dtype=float)
    return {
        "mean_load_s": float(load.mean()) if len(load) else 0.0,
        "p50_load_s": _pct(load, 50) if len(load) else 0.0,
        "p99_load_s": _pct(load, 99) if len(load) else 0.0,
        "mean_ttft_s": float(ttft.mean()) if len(ttft) else math.nan,
        "p50_ttft_s": _pct(ttft, 50),
        "p99_ttft_s": _pct(ttft, 99),
        "mean_queue_s": float(req["queue_s"].mean()) if "queue_s" in req and len(req) else math.nan,
        "bytes_loaded": float(cold["bytes_loaded"].sum()),
        "cold_starts": float(len(cold)),
        "full_hit_ratio": float((cold["bytes_loaded"] == 0).mean()) if len(cold) else 0.0,
        **per_request_metrics(req),
    }


def _corr(a: pd.Series, b: pd.Series) -> float:
    ok = a.notna() & b.notna()
    a, b = a[ok].astype(float), b[ok].astype(float)
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


def _error(sim: float, real: float, kind: str) -> float:
    if kind == "diff":
        return sim - real
    if real == 0:
        return 0.0 if sim == 0 else math.inf
    return (sim - real) / real


def fidelity_table(sim: pd.DataFrame, real: pd.DataFrame) -> pd.DataFrame:
    """Per (system, point) in both request tables: simulated, real, error, and per-request agreement."""
    rows = []
    keys = sorted(set(zip(sim["system"], sim["point"])) & set(zip(real["system"], real["point"])),
                  key=lambda k: (list(dict.fromkeys(real["system"])).index(k[0]), k[1]))
    for system, point in keys:
        s = sim[(sim["system"] == system) & (sim["point"] == point)].set_index("rid")
        r = real[(real["system"] == system) & (real["point"] == point)].set_index("rid")
        common = s.index.intersection(r.index)
        if len(common) != len(r) or len(common) != len(s):
            raise TangramError(
                f"system {system}: the runs hold different requests ({len(s)} simulated, {len(r)} replayed, "
                f"{len(common)} in common); expected the simulation of the replay's experiment.sim.yaml"
            )
        fs, fr = _figures(s), _figures(r)
        row: dict[str, Any] = {"system": system, "point": int(point), "requests": len(common)}
        for col, _label, _unit, kind in METRICS:
            row[f"{col}_sim"] = fs[col]
            row[f"{col}_real"] = fr[col]
            row[f"{col}_err"] = _error(fs[col], fr[col], kind)
        s, r = s.loc[common], r.loc[common]
        row["load_s_corr"] = _corr(s["load_s"], r["load_s"])
        row["ttft_s_corr"] = _corr(s["ttft_s"], r["ttft_s"])
        row["cold_match"] = float((s["cold"].astype(bool) == r["cold"].astype(bool)).mean())
        rows.append(row)
    if not rows:
        raise TangramError(
            f"no system is in both runs (simulated: {', '.join(sorted(set(sim['system'])))}; replayed: "
            f"{', '.join(sorted(set(real['system'])))})"
        )
    return pd.DataFrame(rows)


def compare_runs(sim_dir: str | Path, real_dir: str | Path) -> Fidelity:
    """Read both run directories and compute the fidelity table.

    Both must be complete runs (run.json "complete"): an interrupted or failed run holds only some
    systems or points, and its errors would look like the simulator's.
    """
    sim_dir, real_dir = Path(sim_dir), Path(real_dir)
    for d in (sim_dir, real_dir):
        if not d.is_dir():
            raise TangramError(f"{d}: not a directory; expected a run directory")
        require_complete(d)
    sim, real = _requests(sim_dir), _requests(real_dir)
    table = fidelity_table(sim, real)
    lag = _summary(real_dir, LAG)
    for col in LAG:
        table[col] = [lag.get((str(r.system), int(r.point)), {}).get(col, math.nan) for r in table.itertuples()]
    sources = (_summary(sim_dir, SOURCE_COLUMNS), _summary(real_dir, SOURCE_COLUMNS))
    keys = [(str(r.system), int(r.point)) for r in table.itertuples()]
    for col in SOURCE_COLUMNS:
        sim_b, real_b = ([side.get(k, {}).get(col, math.nan) for k in keys] for side in sources)
        if any(v > 0 for v in [*sim_b, *real_b]):  # NaN > 0 is False: a summary without the column
            table[f"{col}_sim"], table[f"{col}_real"] = sim_b, real_b
            table[f"{col}_err"] = [_error(a, b, "rel") for a, b in zip(sim_b, real_b)]
    return Fidelity(table, sim_dir, real_dir, gpu_table(sim, real, table))


SPREAD = ("mean_load_s", "p50_ttft_s", "p99_ttft_s", "mean_ttft_s")  # the figures `replay_spread` reports


def replay_spread(sim_dir: str | Path, real_dirs: list[str | Path]) -> pd.DataFrame:
    """Per (system, point, metric of `SPREAD`): the simulated value, each replay's, their median, the
    replays' spread (the largest |replay - median| / median: how far one replay may fall from the
    centre of its own repeats), the simulation's error against that median, and in how many replays the
    simulation is within 10%. Needs two or more complete replays of the simulation's trace."""
    if len(real_dirs) < 2:
        raise TangramError(f"replay_spread: {len(real_dirs)} replay(s); expected two or more")
    tables = [compare_runs(sim_dir, d).table.set_index(["system", "point"]) for d in real_dirs]
    keys = [k for k in tables[0].index if all(k in t.index for t in tables[1:])]
    rows = []
    for system, point in keys:
        for col in SPREAD:
            sim = float(tables[0].loc[(system, point), f"{col}_sim"])
            reals = np.array([float(t.loc[(system, point), f"{col}_real"]) for t in tables])
            med = float(np.median(reals))
            errs = [_error(sim, r, "rel") for r in reals]
            row: dict[str, Any] = {"system": system, "point": int(point), "metric": col, "sim": sim}
            row.update({f"replay_{i + 1}": float(r) for i, r in enumerate(reals)})
            row.update(median=med, spread=float(np.max(np.abs(reals - med))) / med if med else math.nan,
                       sim_err_median=_error(sim, med, "rel"),
                       within_10=int(sum(abs(e) <= 0.10 for e in errs)), replays=len(reals))
            rows.append(row)
    return pd.DataFrame(rows)


def format_spread(spread: pd.DataFrame) -> str:
    """`replay_spread`'s table as text: one line per system and metric."""
    n = int(spread["replays"].iloc[0]) if len(spread) else 0
    labels = {c: label for c, label, _u, _k in METRICS}
    w = max([16, *(len(str(x)) + 2 for x in spread["system"])])
    lines = [f"{'system':<{w}}{'metric':<34}{'simulated':>12}{'replays (min-max)':>26}{'spread':>9}"
             f"{'sim vs median':>15}{'within 10%':>12}"]
    for r in spread.itertuples():
        reals = [getattr(r, f"replay_{i + 1}") for i in range(n)]
        lines.append(f"{r.system:<{w}}{labels[r.metric]:<34}{r.sim * 1e3:>9.3f} ms"
                     f"{f'{min(reals) * 1e3:.3f}-{max(reals) * 1e3:.3f} ms':>26}{'-' if math.isnan(r.spread) else f'{r.spread:.1%}':>9}"
                     f"{_fmt_err(r.sim_err_median, 'rel'):>15}{f'{r.within_10} of {n}':>12}")
    return "\n".join(lines)


def ewl_reduction(sim_dir: str | Path, real_dir: str | Path, off: str, on: str) -> dict[str, float]:
    """Mean TTFT of completed cold starts under system `off` and `on` (the same but executing while
    loading), in the simulation and the replay; each side's reduction 1 - on / off, and the prediction's
    error relative to the measured reduction. The same for the cold starts' own part of it (`service`:
    TTFT less the queueing before the start, which execute-while-load changes only through the
    service times of the requests ahead)."""
    out: dict[str, float] = {}
    for side, path in (("sim", Path(sim_dir)), ("real", Path(real_dir))):
        req = _requests(path)
        for label, system in (("off", off), ("on", on)):
            mine = req[(req["system"] == system) & req["cold"].astype(bool) & (req["outcome"] == "completed")]
            if mine.empty:
                raise TangramError(f"{path}: no completed cold start of system {system!r}")
            out[f"{side}_{label}_cold_ttft_s"] = float(mine["ttft_s"].mean())
            out[f"{side}_{label}_cold_service_s"] = float((mine["ttft_s"] - mine["queue_s"]).mean())
            out[f"{side}_{label}_cold_starts"] = float(len(mine))
            if label == "on" and "overlap_s" in mine:
                out[f"{side}_mean_overlap_s"] = float(mine["overlap_s"].mean())
        out[f"{side}_reduction"] = 1.0 - out[f"{side}_on_cold_ttft_s"] / out[f"{side}_off_cold_ttft_s"]
        out[f"{side}_service_reduction"] = 1.0 - out[f"{side}_on_cold_service_s"] / out[f"{side}_off_cold_service_s"]
    for key in ("reduction", "service_reduction"):
        real = out[f"real_{key}"]
        out[f"{key}_error"] = (out[f"sim_{key}"] - real) / abs(real) if real else math.nan
    return out


def _summary(run_dir: Path, columns: tuple[str, ...]) -> dict[tuple[str, int], dict[str, float]]:
    """(system, point) -> `columns` of a run's summary.csv (none when it lacks one of them: the lag of
    a simulation, the bytes per source of a run made before they were counted)."""
    path = run_dir / "summary.csv"
    try:
        summary = pd.read_csv(path)
    except (OSError, ValueError):
        return {}
    if not set(columns) <= set(summary.columns):
        return {}
    if "point" not in summary.columns:
        summary["point"] = 0
    return {(str(r["system"]), int(r["point"])): {c: float(r[c]) for c in columns} for _, r in summary.iterrows()}


def gpu_table(sim: pd.DataFrame, real: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """Per (system, point, GPU) of the compared systems: requests served, cold starts and bytes loaded,
    simulated and replayed."""
    rows = []
    for t in table.itertuples():
        sides = {}
        for name, frame in (("sim", sim), ("real", real)):
            f = frame[(frame["system"] == t.system) & (frame["point"] == t.point)]
            sides[name] = f.groupby("gpu").agg(requests=("rid", "size"), cold_starts=("cold", "sum"),
                                               bytes_loaded=("bytes_loaded", "sum"))
        for gpu in sorted(set(sides["sim"].index) | set(sides["real"].index)):
            row: dict[str, Any] = {"system": t.system, "point": t.point, "gpu": int(gpu)}
            for col in ("requests", "cold_starts", "bytes_loaded"):
                for name in ("sim", "real"):
                    side = sides[name]
                    row[f"{col}_{name}"] = int(side.loc[gpu, col]) if gpu in side.index else 0
            rows.append(row)
    return pd.DataFrame(rows)


def _fmt(value: float, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if unit == "s":
        return f"{value * 1e3:.3f} ms"
    if unit == "B":
        return f"{value / 1e6:.2f} MB"
    return f"{value:.3f}" if not float(value).is_integer() else f"{int(value)}"


def _fmt_err(value: float, kind: str) -> str:
    if math.isnan(value):
        return "-"
    if math.isinf(value):
        return "inf"
    return f"{value * 100:+.1f}%" if kind == "rel" else f"{value:+.3f}"


def format_table(fid: Fidelity) -> str:
    """The table `tangram-sim compare` prints: one block of rows per system."""
    t = fid.table
    lines = []
    width = max(len(label) for _c, label, _u, _k in METRICS) + 2
    for _, row in t.iterrows():
        lines.append(f"{row['system']} (point {row['point']}, {row['requests']} requests)")
        lines.append(f"  {'':{width}}{'simulated':>14}{'replayed':>14}{'error':>10}")
        for col, label, unit, kind in METRICS:
            lines.append(f"  {label:{width}}{_fmt(row[f'{col}_sim'], unit):>14}"
                         f"{_fmt(row[f'{col}_real'], unit):>14}{_fmt_err(row[f'{col}_err'], kind):>10}")
        for col, label in AGREEMENT:
            value = row[col]
            lines.append(f"  {label}: {'-' if math.isnan(value) else f'{value:.3f}'}")
        if fid.gpus is not None and len(fid.gpus):
            g = fid.gpus[(fid.gpus["system"] == row["system"]) & (fid.gpus["point"] == row["point"])]
            for r in g.itertuples():
                lines.append(f"  gpu {r.gpu}: requests {r.requests_sim} / {r.requests_real}, cold starts "
                             f"{r.cold_starts_sim} / {r.cold_starts_real}, bytes loaded "
                             f"{r.bytes_loaded_sim / 1e6:.2f} / {r.bytes_loaded_real / 1e6:.2f} MB "
                             "(simulated / replayed)")
        shown = [(c, c.removeprefix("bytes_from_")) for c in SOURCE_COLUMNS
                 if f"{c}_err" in row and (row[f"{c}_sim"] > 0 or row[f"{c}_real"] > 0)]
        if shown:
            lines.append("  bytes by source (simulated / replayed): " + ", ".join(
                f"{name} {row[f'{c}_sim'] / 1e6:.2f} / {row[f'{c}_real'] / 1e6:.2f} MB "
                f"({_fmt_err(row[f'{c}_err'], 'rel')})" for c, name in shown))
        if "lag_p99_s" in row and not math.isnan(row["lag_p99_s"]):
            late = row["lag_p99_s"] > row["lag_bound_s"]
            lines.append(f"  replay lag: p50 {row['lag_p50_s'] * 1e3:.2f} ms, p99 {row['lag_p99_s'] * 1e3:.2f} ms, "
                         f"max {row['lag_max_s'] * 1e3:.2f} ms (bound {row['lag_bound_s'] * 1e3:.2f} ms)"
                         + ("  WARNING: the replay fell behind the wall clock" if late else ""))
    return "\n".join(lines)


def plot_fidelity(fid: Fidelity, path: str | Path) -> Path:
    """Relative errors per metric and system (with the +-10% goal band), and per-request load times."""
    from matplotlib.figure import Figure

    t = fid.table
    rel = [(c, label) for c, label, _u, kind in METRICS if kind == "rel"]
    fig = Figure(figsize=(12, 4.5), dpi=120)
    ax, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2.2, 1]})
    n = len(t)
    width = 0.8 / max(1, n)
    x = np.arange(len(rel))
    for i, (_, row) in enumerate(t.iterrows()):
        values = [row[f"{c}_err"] * 100 for c, _ in rel]
        values = [v if math.isfinite(v) else np.nan for v in values]
        ax.bar(x + (i - (n - 1) / 2) * width, values, width, label=str(row["system"]))
    ax.axhspan(-10, 10, color="#2ca02c", alpha=0.08, label="within 10%")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(x, [label for _, label in rel], rotation=30, ha="right")
    ax.set_ylabel("simulated vs replayed (%)")
    ax.set_title("Error of the simulation against the real replay")
    ax.legend(fontsize=8)
    sim, real = _requests(fid.sim_dir), _requests(fid.real_dir)
    top = 0.0
    for _, row in t.iterrows():
        s = sim[(sim["system"] == row["system"]) & (sim["point"] == row["point"])].set_index("rid")
        r = real[(real["system"] == row["system"]) & (real["point"] == row["point"])].set_index("rid")
        cold = s.index[s["cold"] | r.reindex(s.index)["cold"].fillna(False).astype(bool)]
        xs, ys = r.loc[cold, "load_s"] * 1e3, s.loc[cold, "load_s"] * 1e3
        top = max(top, float(xs.max() if len(xs) else 0), float(ys.max() if len(ys) else 0))
        ax2.scatter(xs, ys, s=8, alpha=0.6, label=f"{row['system']} (r={row['load_s_corr']:.2f})")
    ax2.plot([0, top], [0, top], color="black", lw=0.8)
    ax2.set_xlabel("replayed load time (ms)")
    ax2.set_ylabel("simulated load time (ms)")
    ax2.set_title("Per-request load time (cold in either)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path

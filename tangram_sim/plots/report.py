"""`report.md`: a self-contained Markdown summary of one run directory.

It is regenerated from the files (config.yaml, summary.csv, requests.parquet, plots/*.png), so
`tangram-sim plot DIR` can redo it after the fact, and it embeds every PNG found in plots/.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from tangram_sim.plots.figures import FIGURES
from tangram_sim.plots.rundata import GB, RunData, _fmt_s, _fmt_value, load_run, short_keys
from tangram_sim.plots.service import slo_text

# (summary column, header, kind): kind picks the formatting.
TABLE_COLUMNS = (
    ("requests", "requests", "int"),
    ("completed", "completed", "int"),
    ("rejected", "rejected", "int"),
    ("cold_starts", "cold starts", "int"),
    ("p50_ttft_s", "p50 TTFT (s)", "s"),
    ("p99_ttft_s", "p99 TTFT (s)", "s"),
    ("mean_e2e_s", "mean E2E (s)", "s"),
    ("slo_ttft_1s", "TTFT <= 1 s", "pct"),
)
# Weight loading counted two ways: over cold starts (ours) and over completed requests (the Tangram
# authors', where a warm request is a full hit with nothing to load).
COLD_START_COLUMNS = (
    ("cold_starts", "cold starts", "int"),
    ("mean_load_s", "mean load (s)", "s"),
    ("p99_load_s", "p99 load (s)", "s"),
    ("io_reduction", "I/O reduction", "pct"),
    ("full_hit_ratio", "full hits", "pct"),
    ("bytes_loaded", "loaded (GB)", "gb"),
    ("bytes_reused", "reused (GB)", "gb"),
)
PER_REQUEST_COLUMNS = (
    ("completed", "completed", "int"),
    ("mean_load_per_request_s", "mean load (s)", "s"),
    ("request_bytes_from_gpu", "bytes from GPU", "pct"),
    ("request_resident_ratio", "resident", "pct"),
)
COLD_START_NOTES = (
    "**mean / p99 load**: time a cold start spent on compaction copies and weight loading (engine start "
    "excluded).",
    "**I/O reduction**: 1 - bytes loaded / bytes needed, both summed over cold starts (the share reused "
    "from GPU memory).",
    "**full hits**: share of cold starts that loaded nothing.",
    "**loaded / reused (GB)**: weight bytes loaded over PCIe / reused in GPU memory, summed over cold "
    "starts (GB = 10^9 bytes).",
)
PER_REQUEST_NOTES = (
    "**mean load**: load time averaged over completed requests, a warm request counting 0.",
    "**bytes from GPU**: 1 - bytes loaded / model bytes, both summed over completed requests (a warm "
    "request takes all its model's bytes from GPU memory).",
    "**resident**: share of completed requests whose model was fully resident on their GPU(s) when served "
    "(warm, or a cold start that loaded nothing).",
)

# Service level and cost (`core.slo`): what the newer serverless LLM papers report beside latency.
SERVICE_COLUMNS = (
    ("ttft_slo_attainment", "TTFT SLO met", "pct"),
    ("tpot_slo_attainment", "TPOT SLO met", "pct"),
    ("goodput_rps", "goodput (req/s)", "rate"),
    ("gpu_held_s", "GPU time held (s)", "s"),
    ("gpu_seconds_per_request", "GPU-s per request", "s"),
    ("mean_overlap_s", "mean overlap (s)", "s"),
)
SERVICE_NOTES = (
    "**TTFT / TPOT SLO met**: share of all requests, a rejected one counting as a miss, that completed "
    "within the target; TPOT = (E2E - TTFT) / (output tokens - 1), and a one-token answer meets it.",
    "**goodput**: requests meeting both SLOs per second, from the first arrival to the last completion.",
    "**GPU time held**: GPU-seconds during which an instance occupied a GPU (from the start of its cold "
    "start to its end, busy or idle), summed over GPUs; **per request**: divided by the completed "
    "requests (0 when none completed).",
    "**mean overlap**: load time hidden behind compute, averaged over cold starts (0 while a cold start "
    "loads everything before its first prefill).",
)


DESCRIPTION_CHARS = 4000  # of an experiment's description quoted in report.md


def _cell(value: Any, kind: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if kind == "int":
        return f"{int(value):,}"
    if kind == "s":
        return _fmt_s(float(value))
    if kind == "pct":
        return f"{100 * float(value):.1f}%"
    if kind == "gb":
        return f"{float(value) / GB:,.1f}"
    if kind == "rate":
        return f"{float(value):.3g}"
    return _fmt_value(value)


def _md_table(header: list[str], rows: list[list[str]], right_from: int) -> str:
    align = ["---" if i < right_from else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _inline(mapping: Any) -> str:
    """A config section as `key=value` pairs, nested mappings in braces, for one readable line."""
    if isinstance(mapping, dict):
        return ", ".join(f"{k}={{{_inline(v)}}}" if isinstance(v, dict) else f"{k}={_inline(v)}"
                         for k, v in mapping.items() if v not in ({}, None))
    if isinstance(mapping, list):
        return "[" + ", ".join(_inline(v) for v in mapping) + "]"
    return _fmt_value(mapping)


def _setup(run: RunData) -> list[str]:
    cfg = run.config
    lines = []
    cluster = cfg.get("cluster") or {}
    if cluster:
        nodes, gpus = cluster.get("nodes", "?"), cluster.get("gpus_per_node", "?")
        mem = cluster.get("gpu_memory_gib")
        mem_text = f", {_fmt_value(mem)} GiB usable each" if mem is not None else ""
        shown = ("nodes", "gpus_per_node", "gpu", "gpu_memory_gib")
        rest = {k: v for k, v in cluster.items() if k not in shown}
        extra = f"; {_inline(rest)}" if _inline(rest) else ""
        swept = [k for k in run.sweep_keys if k.startswith("cluster.")]
        note = " (values of sweep point 0; see Sweep)" if swept else ""
        lines.append(f"- **Cluster{note}:** {nodes} node(s) x {gpus} GPU(s) "
                     f"({cluster.get('gpu', '?')}{mem_text}){extra}")
    models = [m for m in cfg.get("models") or [] if isinstance(m, dict)]
    if models:
        names = []
        for m in models:
            defaults = (("sensitivity", 1.0), ("tensor_parallel", 1))
            notes = [f"{k}={_fmt_value(m[k])}" for k, default in defaults if k in m and m[k] != default]
            names.append(f"{m.get('name')}" + (f" ({', '.join(notes)})" if notes else ""))
        lines.append(f"- **Models ({len(models)}):** " + ", ".join(names))
    if cfg.get("trace"):
        note = " (values of sweep point 0)" if any(k.startswith("trace.") for k in run.sweep_keys) else ""
        lines.append(f"- **Trace{note}:** {_inline(cfg['trace'])}")
    systems = [s for s in cfg.get("systems") or [] if isinstance(s, dict)]
    if systems:
        parts = []
        for s in systems:
            over = f", overrides: {_inline(s['overrides'])}" if s.get("overrides") else ""
            parts.append(f"{s.get('name')} (preset {s.get('preset', s.get('name'))}{over})")
        lines.append("- **Systems (in order):** " + "; ".join(parts))
    else:
        lines.append("- **Systems:** " + ", ".join(run.systems))
    sweep = cfg.get("sweep")
    if isinstance(sweep, dict) and sweep:
        lines.append("- **Sweep:** " + "; ".join(f"{k} in {_inline(v)}" for k, v in sweep.items())
                     + f" ({len(run.points)} points)")
    if "seed" in cfg:
        lines.append(f"- **Seed:** {cfg['seed']}")
    return lines


def _summary_table(run: RunData, columns: tuple[tuple[str, str, str], ...] = TABLE_COLUMNS) -> str:
    cols = [c for c in columns if c[0] in run.summary.columns]
    short = short_keys(run.sweep_keys)
    header = ["system"] + [short[k] for k in run.sweep_keys] + [h for _, h, _ in cols]
    order = {s: i for i, s in enumerate(run.systems)}
    table = run.summary.assign(_o=run.summary["system"].map(order)).sort_values(["point", "_o"])
    rows = []
    for _, r in table.iterrows():
        rows.append([str(r["system"])] + [_fmt_value(r[k]) for k in run.sweep_keys]
                    + [_cell(r[c], kind) for c, _, kind in cols])
    return _md_table(header, rows, right_from=1)


def _loading_tables(run: RunData) -> list[str]:
    """Weight loading per cold start, then per request (the Tangram authors' metrics), each metric
    explained in one line; a summary.csv written before the per-request metrics existed says so."""
    out = ["### Weight loading per cold start", "", _summary_table(run, COLD_START_COLUMNS), "",
           *(f"- {note}" for note in COLD_START_NOTES), ""]
    out += ["### Weight loading per request (the Tangram authors' metrics)", ""]
    if not any(c in run.summary.columns for c, _, _ in PER_REQUEST_COLUMNS[1:]):
        return out + ["Not in this run's summary.csv (written before these metrics existed); rerun the "
                      "experiment to get them.", ""]
    return out + [_summary_table(run, PER_REQUEST_COLUMNS), "",
                  *(f"- {note}" for note in PER_REQUEST_NOTES), ""]


def _service_tables(run: RunData) -> list[str]:
    """SLO attainment, goodput and GPU time per request, against the SLO of config.yaml; a summary.csv
    written before these columns existed says so."""
    out = ["### Service level and cost", ""]
    if not any(c in run.summary.columns for c, _, _ in SERVICE_COLUMNS):
        return out + ["Not in this run's summary.csv (written before these metrics existed); rerun the "
                      "experiment to get them.", ""]
    target = slo_text(run.config)
    if target:
        out += [f"SLO: {target} (`slo` in config.yaml).", ""]
    return out + [_summary_table(run, SERVICE_COLUMNS), "", *(f"- {note}" for note in SERVICE_NOTES), ""]


def _ratio_text(what: str, value: float, base: float) -> str:
    """'mean load 3.1x lower (0.14 s vs 0.43 s)': ratios for load, where reuse gives multiples."""
    pair = f"({_fmt_s(value)} s vs {_fmt_s(base)} s)"
    if not (np.isfinite(value) and np.isfinite(base)):
        return f"{what} n/a {pair}"
    if value == base:
        return f"{what} the same {pair}"
    if value == 0:
        return f"{what} eliminated {pair}"
    if base == 0:
        return f"{what} higher {pair}"
    if max(value, base) / min(value, base) < 1.1:  # "1.0x lower" reads as no change: use percent
        return _pct_text(what, value, base)
    if value < base:
        return f"{what} {base / value:.1f}x lower {pair}"
    return f"{what} {value / base:.1f}x higher {pair}"


def _pct_text(what: str, value: float, base: float) -> str:
    """'p50 TTFT 34% lower (...)': percentages for TTFT, as the paper states them."""
    if not np.isfinite(value):
        return f"{what} n/a (no completed requests)"
    pair = f"({_fmt_s(value)} s vs {_fmt_s(base)} s)"
    if not np.isfinite(base) or base == 0:
        return f"{what} {pair}"
    change = 100 * (value - base) / base
    if abs(change) < 0.5:
        return f"{what} about the same {pair}"
    return f"{what} {abs(change):.0f}% {'lower' if change < 0 else 'higher'} {pair}"


def _comparisons(run: RunData) -> list[str]:
    if len(run.systems) < 2:
        return []
    base_name = run.systems[0]
    lines = []
    for point in run.points:
        rows = run.summary[run.summary["point"] == point].set_index("system")
        if base_name not in rows.index:
            continue
        base = rows.loc[base_name]
        prefix = "  " if len(run.points) > 1 else ""
        if len(run.points) > 1:
            lines.append(f"- {run.point_label(point)}:")
        for system in run.systems[1:]:
            if system not in rows.index:
                continue
            r = rows.loc[system]
            parts = []
            for col, what in (("mean_load_s", "mean load per cold start"),
                              ("mean_load_per_request_s", "mean load per request")):
                if col in rows.columns:
                    parts.append(_ratio_text(what, float(r[col]), float(base[col])))
            if "p50_ttft_s" in rows.columns:
                parts.append(_pct_text("p50 TTFT", float(r["p50_ttft_s"]), float(base["p50_ttft_s"])))
            if "p99_ttft_s" in rows.columns:
                parts.append(_pct_text("p99 TTFT", float(r["p99_ttft_s"]), float(base["p99_ttft_s"])))
            if parts:
                lines.append(f"{prefix}- **{system}** vs {base_name}: " + ", ".join(parts))
    return lines


def _rejections(run: RunData) -> list[str]:
    """One line per system: how many, why, and (for a sweep) how many at each point."""
    if "rejected" not in run.summary.columns or not run.summary["rejected"].fillna(0).astype(int).any():
        return ["No request was rejected."]
    req = run.requests
    sweep = len(run.points) > 1
    lines = []
    for system in run.systems:
        rows = run.summary[run.summary["system"] == system].sort_values("point")
        n = int(rows["rejected"].fillna(0).sum())
        if not n:
            continue
        total = int(rows["requests"].sum()) if "requests" in rows.columns else 0
        share = f" of {total:,} ({100 * n / total:.1f}%)" if total else ""
        reasons = ""
        if req is not None and not req.empty:
            sub = req[(req["system"] == system) & (req["outcome"] == "rejected")]
            counts = sub["reason"].fillna("").replace("", "unspecified").value_counts()
            if len(counts):
                reasons = "; reasons: " + ", ".join(f"{reason} {c:,}" for reason, c in counts.items())
        per_point = ""
        if sweep:
            counts_at = [int(r) for r in rows["rejected"].fillna(0)]
            if len(set(counts_at)) == 1:
                per_point = f"; {counts_at[0]:,} at each point"
            else:
                per_point = "; per point: " + "; ".join(
                    f"({run.point_label(int(p))}) {c:,}" for p, c in zip(rows["point"], counts_at))
            share += f" over {len(rows)} points"
        lines.append(f"- **{system}**: {n:,} rejected{share}{reasons}{per_point}")
    return ["Rejected requests never got a first token and are left out of the TTFT statistics.", "", *lines]


def _figures(run: RunData) -> list[str]:
    plots = run.run_dir / "plots"
    pngs = {p.name: p for p in sorted(plots.glob("*.png"))} if plots.is_dir() else {}
    known = {spec.file: spec for spec in FIGURES}
    order = [f for f in known if f in pngs] + [f for f in pngs if f not in known]
    if not order:
        return ["No figures were drawn; run `tangram-sim plot " + str(run.run_dir) + "`."]
    lines = []
    for i, name in enumerate(order, 1):
        caption = known[name].caption(run) if name in known else name.removesuffix(".png").replace("_", " ")
        alt = f"Figure {i}: {name.removesuffix('.png')}"
        lines += [f"![{alt}](plots/{name})", "", f"*Figure {i}: {caption}*", ""]
    return lines


def write_report(run_dir: Path | str, *, require_complete: bool = True) -> Path:
    """Write run_dir/report.md from the run's files and return its path (require_complete: see load_run)."""
    run = load_run(run_dir, require_complete=require_complete)
    out: list[str] = [f"# {run.name}", ""]
    description = run.config.get("description")
    if description:
        text = str(description).strip()
        if len(text) > DESCRIPTION_CHARS:  # a report is read by people: the whole text is in config.yaml
            text = f"{text[:DESCRIPTION_CHARS]} ... ({len(text):,} characters in all; see config.yaml)"
        out += [text, ""]
    out += ["## Setup", "", *_setup(run), ""]
    out += ["## Results", "", _summary_table(run), "",
            "TTFT statistics cover completed requests; TTFT <= 1 s is a share of all requests.", ""]
    out += _loading_tables(run)
    out += _service_tables(run)
    comparisons = _comparisons(run)
    if comparisons:
        out += [f"### Compared with {run.systems[0]}", "", *comparisons, ""]
    out += ["### Rejected requests", "", *_rejections(run), ""]
    missing = [f for f in ("requests.parquet", "timeline.parquet") if not (run.run_dir / f).is_file()]
    if missing:
        out += [f"Not in this run: {', '.join(missing)} (figures that need them are omitted).", ""]
    out += ["## Figures", "", *_figures(run)]
    path = run.run_dir / "report.md"
    path.write_text("\n".join(out).rstrip() + "\n")
    return path


__all__ = ["write_report"]

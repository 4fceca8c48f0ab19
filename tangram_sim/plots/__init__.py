"""Figures and the Markdown report of a run directory written by `tangram-sim run`.

`render_all(dir)` draws dir/plots/*.png and `write_report(dir)` writes dir/report.md; both read only
the files of the run (config.yaml, summary.csv, requests.parquet, timeline.parquet), so they can be
rerun at any time with `tangram-sim plot DIR`.
"""

from __future__ import annotations

from tangram_sim.plots.figures import FIGURES, FigureSpec, render_all
from tangram_sim.plots.report import write_report
from tangram_sim.plots.rundata import RunData, load_run

__all__ = ["FIGURES", "FigureSpec", "RunData", "load_run", "render_all", "write_report"]

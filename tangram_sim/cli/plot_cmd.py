"""`tangram-sim plot DIR`: redraw the figures and report.md of a finished run from its files."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "plot",
        help="redraw DIR/plots/*.png and DIR/report.md of a run directory",
        description="Redraw the figures (DIR/plots/*.png) and the report (DIR/report.md) of a run "
                    "directory written by `tangram-sim run`, from its summary.csv and parquet files.",
    )
    p.add_argument("run_dir", metavar="DIR", help="run directory (holds config.yaml and summary.csv)")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    p.set_defaults(func=_plot)


def _plot(args: argparse.Namespace) -> int:
    from tangram_sim.plots import render_all, write_report  # matplotlib only when plotting

    run_dir = Path(args.run_dir)
    pngs = render_all(run_dir)
    report = write_report(run_dir)
    if not args.quiet:
        for path in pngs:
            print(path)
        print(report)
    return 0

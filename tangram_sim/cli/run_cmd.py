"""`tangram-sim run EXP.yaml`: simulate every system (and sweep point) of an experiment."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run",
        help="run an experiment YAML: summary.csv, requests/timeline parquet, plots, report.md",
        description="Simulate every system at every sweep point of an experiment and write the results.",
    )
    p.add_argument("experiment", help="experiment YAML file")
    p.add_argument("--out", help="output folder (default: results/<experiment name>)")
    p.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 1)),
                   help="parallel simulations (default: CPU count)")
    p.add_argument("--backend", choices=["local", "ray"], default="local",
                   help="local process pool, or Ray (RAY_ADDRESS, else a local Ray)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a dotted key, e.g. --set cluster.gpus_per_node=4 (repeatable)")
    p.add_argument("--calibration", help="calibration YAML from `tangram-sim real calibrate`")
    p.add_argument("--no-plots", action="store_true", help="skip plots and report")
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="drop malformed trace rows (counted and reported) instead of stopping at the first")
    p.add_argument("--quiet", action="store_true", help="no progress bar or table")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from tangram_sim.experiments import load_yaml, run_experiment

    raw, base_dir = load_yaml(args.experiment)
    sets = list(args.sets)
    if args.calibration:
        sets.append(f"calibration={Path(args.calibration).resolve()}")
    out = Path(args.out) if args.out else Path("results") / str(raw.get("name", Path(args.experiment).stem))
    summary = run_experiment(
        raw, base_dir, out, sets=sets, backend=args.backend, n_jobs=args.jobs, progress=not args.quiet,
        plots=False if args.no_plots else None, skip_bad_rows=args.skip_bad_rows,
    )
    if not args.quiet:
        cols = [c for c in ("system", "point", "requests", "completed", "rejected", "mean_load_s", "p50_ttft_s",
                            "p99_ttft_s", "io_reduction", "full_hit_ratio") if c in summary.columns]
        print(summary[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        print(f"results in {out}/ (summary.csv, requests.parquet, timeline.parquet, plots/, report.md)")
    skipped = summary.attrs.get("skipped_rows", 0)
    if skipped:
        print(f"warning: skipped {skipped} malformed trace row(s) (--skip-bad-rows)")
    return 0

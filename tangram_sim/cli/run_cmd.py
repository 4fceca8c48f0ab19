"""`tangram-sim run EXP.yaml`: simulate every system (and sweep point) of an experiment."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any


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
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted or partly failed run in --out: run only the jobs it has not "
                        "stored (same configuration only)")
    p.add_argument("--force", action="store_true",
                   help="empty --out first even if it holds something other than a run of this experiment")
    p.add_argument("--quiet", action="store_true", help="no progress bar or table")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from tangram_sim.api import load_experiment
    from tangram_sim.rundir import RunFailed

    experiment = load_experiment(args.experiment)
    sets = list(args.sets)
    if args.calibration:
        sets.append(f"calibration={Path(args.calibration).resolve()}")
    # validated when the run starts, once --out is checked
    experiment = experiment.with_overrides(sets, validate=False)
    raw = experiment.raw
    out = Path(args.out) if args.out else Path("results") / str(raw.get("name", Path(args.experiment).stem))
    try:
        result = experiment.run(
            out, jobs=args.jobs, backend=args.backend, progress=not args.quiet,
            plots=False if args.no_plots else None, skip_bad_rows=args.skip_bad_rows, resume=args.resume,
            force=args.force,
        )
    except RunFailed as exc:  # what succeeded is written: show it, then the one-line error
        if not args.quiet and exc.summary is not None and not exc.summary.empty:
            _print_table(exc.summary)
        _print_written(out, exc.record)
        raise
    record = result.record
    if not args.quiet:
        _print_table(result.summary)
        if result.already_complete:
            print(f"{out}/ is already complete ({record.jobs_total} job(s)); nothing to resume")
        else:
            _print_written(out, record)
    for note in result.notes:
        print(f"note: trace: {note}", file=sys.stderr)
    skipped = result.skipped_rows
    if skipped:
        print(f"warning: skipped {skipped} malformed trace row(s) (--skip-bad-rows)")
    return 0


def _print_table(summary: Any) -> None:
    cols = [c for c in ("system", "point", "requests", "completed", "rejected", "mean_load_s", "p50_ttft_s",
                        "p99_ttft_s", "io_reduction", "full_hit_ratio", "mean_load_per_request_s",
                        "request_resident_ratio") if c in summary.columns]
    print(summary[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))


def _print_written(out: Path, record: Any) -> None:
    """What this run actually wrote (from its run.json), figures counted rather than listed."""
    if record is None:
        return
    files = [f for f in record.files if not f.startswith("plots/")]
    figures = len(record.files) - len(files)
    shown = files + ([f"plots/ ({figures} figure{'s' if figures != 1 else ''})"] if figures else []) + ["run.json"]
    print(f"results in {out}/ ({', '.join(shown)})")

"""`tangram-sim run EXP.yaml`: simulate every system (and sweep point) of an experiment."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from tangram_sim.errors import ConfigError


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
    p.add_argument("--calibration-partial", action="store_true",
                   help="accept a calibration without coefficients for some models (the roofline times them)")
    p.add_argument("--max-jobs", type=int, default=None, metavar="N",
                   help="run a sweep of more than 10000 jobs (points x systems), up to N")
    p.add_argument("--no-plots", action="store_true", help="skip plots and report")
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="drop malformed trace rows (counted and reported) instead of stopping at the first")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted or partly failed run in --out: run only the jobs it has not "
                        "stored (same configuration only)")
    p.add_argument("--force", action="store_true",
                   help="empty --out first even if it holds a finished run, a tune or something else")
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
    if args.max_jobs is not None and args.max_jobs < 1:
        raise ConfigError(f"--max-jobs: expected an integer >= 1, got {args.max_jobs}")
    try:
        result = experiment.run(
            out, jobs=args.jobs, backend=args.backend, progress=not args.quiet,
            plots=False if args.no_plots else None, skip_bad_rows=args.skip_bad_rows, resume=args.resume,
            force=args.force, calibration_partial=args.calibration_partial, max_jobs=args.max_jobs,
        )
    except KeyboardInterrupt:
        print(_interrupted(out, args), file=sys.stderr)
        return 130
    except RunFailed as exc:  # what succeeded is written: show it, then the one-line error
        if not args.quiet and exc.summary is not None and not exc.summary.empty:
            _print_table(exc.summary, exc.record)
        _print_written(out, exc.record)
        raise
    record = result.record
    for line in result.summary.attrs.get("damaged_jobs") or ():
        print(f"note: stored job {line}; ran it again", file=sys.stderr)
    if args.resume and not result.already_complete and record is not None:
        print(f"resumed: reused {record.jobs_resumed} of {record.jobs_total} job(s) stored in {out}/, ran "
              f"{len(record.jobs_done) - record.jobs_resumed}", file=sys.stderr)
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


def _print_table(summary: Any, record: Any = None) -> None:
    """The summary's main columns; a sweep's swept values beside its point; numbers to 4 significant
    digits (a CPU replay's load times are microseconds: fixed decimals would print 0.000)."""
    record = record if record is not None else summary.attrs.get("record")
    swept = [str(k) for k in ((record.meta.get("sweep_keys") if record is not None else None) or [])]
    cols = [c for c in ("system", "point", *swept, "requests", "completed", "rejected", "mean_load_s", "p50_ttft_s",
                        "p99_ttft_s", "io_reduction", "full_hit_ratio", "mean_load_per_request_s",
                        "request_resident_ratio") if c in summary.columns]
    print(summary[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))


def resume_command(args: argparse.Namespace, out: Path) -> str:
    """The command that continues this run: its own options, --resume instead of --force."""
    import shlex

    words = ["tangram-sim", "run", args.experiment, "--out", str(out)]
    for assignment in args.sets:
        words += ["--set", assignment]
    if args.calibration:
        words += ["--calibration", args.calibration]
    for flag, on in (("--calibration-partial", args.calibration_partial), ("--skip-bad-rows", args.skip_bad_rows),
                     ("--no-plots", args.no_plots)):
        if on:
            words.append(flag)
    if args.max_jobs is not None:
        words += ["--max-jobs", str(args.max_jobs)]
    if args.backend != "local":
        words += ["--backend", args.backend]
    return shlex.join([*words, "--resume"])


def _interrupted(out: Path, args: argparse.Namespace) -> str:
    """What Ctrl-C leaves: the jobs kept and the exact command that continues."""
    from tangram_sim.rundir import RunDirError, read_record

    try:
        record = read_record(out)
    except RunDirError:
        record = None
    if record is None or record.status != "interrupted":
        return "interrupted (nothing was written)"
    return (f"interrupted: kept {len(record.jobs_done)} of {record.jobs_total} job(s) in {out}/; continue with: "
            f"{resume_command(args, out)}")


def _print_written(out: Path, record: Any) -> None:
    """What this run actually wrote (from its run.json), figures counted rather than listed."""
    if record is None:
        return
    files = [f for f in record.files if not f.startswith("plots/")]
    figures = len(record.files) - len(files)
    shown = files + ([f"plots/ ({figures} figure{'s' if figures != 1 else ''})"] if figures else []) + ["run.json"]
    print(f"results in {out}/ ({', '.join(shown)})")

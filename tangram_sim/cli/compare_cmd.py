"""`tangram-sim compare SIM_DIR REAL_DIR [--also REAL_DIR ...]`: the error of a simulation against a real
replay, and with more replays of the same trace their spread (`spread.csv`)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from tangram_sim.errors import ConfigError


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "compare",
        help="sim-vs-real fidelity: errors of a simulation against a real replay (fidelity.csv/.png)",
        description="Compare the run directory of a simulation (tangram-sim run DIR/experiment.sim.yaml) "
                    "with the replay it simulates (tangram-sim real replay): per system, simulated and "
                    "replayed load times, TTFTs, bytes and full hits per cold start, the per-request "
                    "figures of the Tangram authors (mean load with warm = 0, resident share, bytes from "
                    "GPU), their errors, and per-request agreement.",
    )
    p.add_argument("sim_dir", metavar="SIM_DIR", help="run directory of the simulation")
    p.add_argument("real_dir", metavar="REAL_DIR", help="run directory of the real replay")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="where fidelity.csv and fidelity.png go (default: compare/SIM-vs-REPLAY/ beside "
                        "SIM_DIR; never a run folder)")
    p.add_argument("--tolerance", type=float, default=None, metavar="FRACTION",
                   help="exit 1 if |error| of mean load time or p50 TTFT exceeds this (e.g. 0.1)")
    p.add_argument("--no-plot", action="store_true", help="write fidelity.csv only")
    p.add_argument("--also", action="append", default=[], metavar="REAL_DIR",
                   help="another replay of the same trace (repeatable): spread.csv and a table of how far "
                        "the replays fall from their median and the simulation from it")
    p.set_defaults(func=_compare)


def _compare(args: argparse.Namespace) -> int:
    from tangram_sim.real.fidelity import (
        compare_runs,
        format_spread,
        format_table,
        plot_fidelity,
        replay_spread,
    )

    if args.tolerance is not None and not args.tolerance > 0:
        raise ConfigError(f"--tolerance {args.tolerance}: expected a positive fraction, e.g. 0.1")
    from tangram_sim.real.pairing import check_kinds, check_out, config_differences, default_out
    from tangram_sim.rundir import check_out_dir

    sim_dir, real_dir = Path(args.sim_dir), Path(args.real_dir)
    check_kinds(sim_dir, real_dir)
    also = [Path(d) for d in args.also]
    for d in also:
        check_kinds(sim_dir, d)
    out = Path(args.out) if args.out else default_out(sim_dir, real_dir)
    check_out_dir(out)
    check_out(out)
    fid = compare_runs(sim_dir, real_dir)
    mismatch = config_differences(sim_dir, real_dir)
    if mismatch:
        print(f"warning: {mismatch}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    fid.table.to_csv(out / "fidelity.csv", index=False, float_format="%.6g")
    written = [out / "fidelity.csv"]
    if fid.gpus is not None:
        fid.gpus.to_csv(out / "fidelity_gpus.csv", index=False)
        written.append(out / "fidelity_gpus.csv")
    print(format_table(fid))
    if not args.no_plot:
        written.append(plot_fidelity(fid, out / "fidelity.png"))
    if also:
        spread = replay_spread(sim_dir, [real_dir, *also])
        spread.to_csv(out / "spread.csv", index=False, float_format="%.6g")
        written.append(out / "spread.csv")
        print(f"\n{len(also) + 1} replays (spread: the farthest from their median)")
        print(format_spread(spread))
    print(f"wrote {', '.join(str(p) for p in written)}")
    worst = fid.worst_headline_error()
    if args.tolerance is not None:
        ok = not math.isnan(worst) and worst <= args.tolerance
        verdict = "within" if ok else "NOT within"
        print(f"mean load time and p50 TTFT {verdict} {args.tolerance:.0%} of the replay (worst {worst:.1%})")
        return 0 if ok else 1
    return 0

"""Is tangram-plus's win a property of the workload or of one seed? Re-run the plus-* experiments at
other seeds and check, per workload point and seed, what the committed results claim at seed 7.

    python experiments/plus_seeds.py [--seeds 7 8 9 10 11] [--out results/plus-seeds] [--jobs 2] [--force]

The seed drives the trace's model mapping and arrivals (and random choices in the simulator), so each
seed is a different workload drawn from the same distribution. Writes to --out:

- `summary.csv`: every system's summary row at every point and seed (columns `experiment`, `seed`
  added), appended after each run, so an interrupted run resumes where it stopped (`--force`: start
  over, as after a change to the policies);
- `checks.csv`: per experiment, point and seed, tangram-plus against the others: mean load per cold
  start and p50 TTFT below every baseline (`load_win`, `p50_win`; `p50_tie` when equal to the best),
  p99 TTFT within 2% of tangram's (`p99_ok`), and its speed-up over serverlessllm's mean load.

Baselines are every system of the experiment but tangram-plus and the breakdown stages (`+...`), which
are not run here. Requests, timelines and plots are not kept (temporary run directories).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = ["plus-azure-conv", "plus-azure-code", "plus-servegen", "plus-synthetic-skew"]
SUBJECT = "tangram-plus"


def checks(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per (experiment, point, seed): tangram-plus against the baselines (module docstring)."""
    rows = []
    for (exp, point, seed), g in summary.groupby(["experiment", "point", "seed"], sort=True):
        plus = g[g.system == SUBJECT].iloc[0]
        base = g[(g.system != SUBJECT) & ~g.system.str.startswith("+")]
        tangram = base[base.system == "tangram"].iloc[0]
        sllm = base[base.system == "serverlessllm"].iloc[0]
        best_load = base.loc[base.mean_load_s.idxmin()]
        best_p50 = base.loc[base.p50_ttft_s.idxmin()]
        rows.append({
            "experiment": exp, "point": point, "seed": seed,
            "load_s": plus.mean_load_s, "best_baseline_load_s": best_load.mean_load_s,
            "best_load_baseline": best_load.system, "load_win": plus.mean_load_s < best_load.mean_load_s,
            "p50_ttft_s": plus.p50_ttft_s, "best_baseline_p50_s": best_p50.p50_ttft_s,
            "best_p50_baseline": best_p50.system, "p50_win": plus.p50_ttft_s < best_p50.p50_ttft_s,
            "p50_tie": plus.p50_ttft_s == best_p50.p50_ttft_s,
            "p99_ttft_s": plus.p99_ttft_s, "tangram_p99_s": tangram.p99_ttft_s,
            "p99_vs_tangram": plus.p99_ttft_s / tangram.p99_ttft_s - 1.0,
            "p99_ok": plus.p99_ttft_s <= 1.02 * tangram.p99_ttft_s,
            "load_per_request_win": plus.mean_load_per_request_s < base.mean_load_per_request_s.min(),
            "speedup_vs_serverlessllm": sllm.mean_load_s / plus.mean_load_s,
        })
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[7, 8, 9, 10, 11])
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "plus-seeds")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--experiments", nargs="+", default=EXPERIMENTS)
    ap.add_argument("--force", action="store_true", help="start over instead of resuming from summary.csv")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from tangram_sim import load_experiment

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "summary.csv"
    if args.force and path.exists():
        path.unlink()
    done = pd.read_csv(path) if path.exists() else pd.DataFrame(columns=["experiment", "seed"])
    have = set(zip(done.experiment, done.seed))
    for name in args.experiments:
        for seed in args.seeds:
            if (name, seed) in have:
                continue
            exp = load_experiment(ROOT / "experiments" / f"{name}.yaml")
            systems = [s for s in exp.raw["systems"] if not str(s["name"]).startswith("+")]
            exp = exp.with_overrides({"seed": seed, "systems": systems,
                                      "outputs": {"requests": False, "timeline": False, "plots": False}})
            tmp = Path(tempfile.mkdtemp(prefix=f"{name}-seed{seed}-"))
            try:
                exp.run(out=tmp / "run", jobs=args.jobs, progress=False)
                summary = pd.read_csv(tmp / "run" / "summary.csv")  # as rounded in every run directory
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            summary.insert(0, "seed", seed)
            summary.insert(0, "experiment", name)
            done = pd.concat([done, summary], ignore_index=True) if len(done) else summary
            part = path.with_suffix(".csv.part")
            done.to_csv(part, index=False)
            os.replace(part, path)  # after every run, whole: nothing finished is lost
            print(f"{name} seed {seed}: done", flush=True)
    table = checks(done)
    table.to_csv(args.out / "checks.csv", index=False)
    for col in ("load_win", "p50_win", "p50_tie", "p99_ok"):
        print(f"{col}: {int(table[col].sum())} of {len(table)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

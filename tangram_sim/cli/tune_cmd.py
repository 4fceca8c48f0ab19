"""`tangram-sim tune EXP.yaml --space SPACE.yaml --objective COL ...`: search the trial system's policies
and parameters with Optuna (locally, or on Ray Tune), and write the front and its systems."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "tune",
        help="search system policies and parameters (Optuna): trials.csv, front.csv/png, best-systems.yaml",
        description="Simulate the experiment with one trial system per trial, chosen by Optuna from "
                    "SPACE.yaml, and write every trial, the best system or the Pareto front of several "
                    "objectives, and the winning systems as YAML (needs the 'tune' extra).",
    )
    p.add_argument("experiment", help="experiment YAML file")
    p.add_argument("--space", required=True, help="SPACE.yaml: base preset and the keys to search")
    p.add_argument("--objective", dest="objectives", action="append", default=[], metavar="COLUMN",
                   help="summary.csv column to minimise; max:COLUMN to maximise (repeatable: a Pareto front)")
    p.add_argument("--trials", type=int, required=True, help="trials in total (with --resume: including "
                                                              "the ones done)")
    p.add_argument("--seed", type=int, default=0, help="sampler seed: the same seed and trials give the same "
                                                       "front (default 0)")
    p.add_argument("--sampler", choices=["tpe", "nsga2", "random"], default="tpe",
                   help="Optuna sampler (default tpe, single- and multi-objective)")
    p.add_argument("--backend", choices=["local", "ray"], default="local",
                   help="trials in this process, or on Ray Tune (RAY_ADDRESS, else a local Ray)")
    p.add_argument("--out", help="output folder (default: results/tune-<experiment name>)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a dotted key of the experiment, e.g. --set trace.max_requests=300")
    p.add_argument("--resume", action="store_true",
                   help="continue the study in --out (same experiment, space, objectives and seed) to --trials")
    p.add_argument("--force", action="store_true",
                   help="empty --out first (a tune there is replaced; without it, finished trials are kept)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or table")
    p.set_defaults(func=_tune)


def _tune(args: argparse.Namespace) -> int:
    from tangram_sim.api import load_experiment
    from tangram_sim.tune.runner import require_optuna, tune_experiment

    require_optuna()  # before anything else: the one missing piece to install
    experiment = load_experiment(args.experiment).with_overrides(args.sets)
    raw = experiment.raw
    out = Path(args.out) if args.out else Path("results") / f"tune-{raw.get('name', Path(args.experiment).stem)}"
    result = tune_experiment(experiment, args.space, args.objectives, args.trials, out, seed=args.seed,
                             sampler=args.sampler, backend=args.backend, resume=args.resume, force=args.force,
                             progress=not args.quiet)
    if not args.quiet:
        _print_front(result)
        record = result.record
        trials = record["trials"]
        print(f"{trials['done']} trial(s): {trials['complete']} complete, {trials['failed']} failed "
              f"({record['wall_s']:.1f} s)")
        print(f"results in {out}/ ({', '.join(f for f in result.files if f != 'tune.json')}, tune.json)")
    return 0


# SystemSpec fields read only under some policy: field -> (the field choosing the policy, when it applies)
APPLIES: dict[str, tuple[str, Any]] = {
    "fairness_window_s": ("fairness", lambda v: v == "fixed"),
    "fairness_bound_s": ("fairness", lambda v: v == "adaptive"),
    "kv_fraction": ("kv", lambda v: v == "static"),
    "unit_divisor": ("granularity", lambda v: v == "group"),
    "min_unit_bytes": ("granularity", lambda v: v == "group"),
}
PARAM_GROUPS: dict[str, tuple[str, Any]] = {
    "prefetch_params": ("prefetch", lambda v: v != "none"),
    "keep_alive_params": ("keep_alive", lambda v: v != "fixed"),
}


def _print_front(result: Any) -> None:
    record = result.record
    objectives = [label.split(":", 1)[-1] for label in record["settings"]["objectives"]]
    front = result.front[["trial", *record["params"], *objectives, "ties"]]
    shown = front.apply(lambda col: col.map(_cell)) if not front.empty else front
    for param in record["params"]:  # a parameter the trial's own policies do not read is left blank
        rule = APPLIES.get(param) or next((r for p, r in PARAM_GROUPS.items() if param.startswith(p)), None)
        if rule is not None and rule[0] in front.columns:
            shown.loc[[not rule[1](v) for v in front[rule[0]]], param] = ""
    if front.empty:
        print("no trial completed: nothing on the front (trials.csv has the errors)")
        return
    what = "best trial" if len(result.record["settings"]["objectives"]) == 1 else "Pareto front"
    print(f"{what}:")
    print(shown.to_string(index=False))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "" if value != value else f"{value:.4g}"
    return "" if value is None else str(value)

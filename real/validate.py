"""Hardware validation, end to end: does the simulator predict a real replay on this device?

Run from the repository root (see real/README.md):

    real/validate.sh --device cuda:0 --out $OUT        # a GPU machine (H200 step times: real/README.md)
    real/validate.sh --device cpu --out /tmp/validate   # the same steps on the CPU with tiny models

Steps, each timed, everything under `--out`:

1. checkpoints: the experiment's models, made at its `real.scale` (`OUT/prepare/checkpoints/`), and
   `OUT/prepare/experiment.sim.yaml`, the same experiment for the simulator (calibration reads it);
2. calibrate: `OUT/calibration.yaml` (bandwidths, load/engine overheads, prefill/decode per model);
   `--calibration FILE` reuses one measured earlier on the same card instead (it takes minutes);
3. bench: the loader against safetensors on the largest checkpoint (on the CPU a 0.25 GB synthetic
   one in `OUT/bench-checkpoint/`) (`OUT/bench_loader.json`); `--skip-bench` leaves it out;
4. replay: the trace under serverlessllm and tangram on the device (`OUT/replay/`), one GPU per arena:
   `--split N` carves the device into N arenas (default 2), so the router's placement across GPUs is
   exercised too;
5. simulate: `tangram-sim run OUT/replay/experiment.sim.yaml --calibration OUT/calibration.yaml`
   (`OUT/sim/`);
6. compare: `OUT/fidelity.csv`, `OUT/fidelity.png`;
7. refit: the same fits on the replay's own tables (`OUT/refit/calibration.yaml`, `real.refit`), simulated
   and compared again (`OUT/refit/sim`, `OUT/refit/fidelity.csv`): the time model's error without the
   calibration's;

`--repeat N` replays the trace N-1 more times with the same calibration (`OUT/replay-2`, ...) and
reports how far the replays fall from each other and from the one simulation (`OUT/spread.csv`): the
replay's own noise floor, against which a prediction's error is judged;

then `OUT/validate.md` (the short report) and `OUT/validate.json` (every figure).

`--ewl`: the systems become ServerlessLLM without and with execute-while-load (`EWL_SETS`), so the
calibration fits the per-layer shares from the layered replay and the report adds the reduction of
the mean cold-start TTFT that execute-while-load brings, predicted by the simulation against the one
the replay measured (goal: within 10% of it). The experiment is
`experiments/replay-cpu.yaml`, scaled up with `--set` overrides: on the CPU `small` checkpoints (tens of
MB, so a cold start copies for milliseconds) in 0.2 GiB arenas, on CUDA full-size bf16 models in
16 GiB arenas (120 requests at 4x); `--set` on this command can change them again.
Exit status: 0 when every step ran (and, with `--tolerance`, the headline errors are within it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import math
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = ROOT / "experiments" / "replay-cpu.yaml"
# A GPU-sized version of the CPU experiment: two real-size models and a fine-tune sharing half of one
# (6.2 + 7.6 + 6.2 GB of bf16 weights) on a 16 GiB arena that holds about two of them.
# The CPU fidelity check: `small` checkpoints (88-94 MB in float32: each cold start copies for several
# ms) on two 0.2 GiB arenas that hold about two models each, 200 requests with short prompts at 4x, so
# that each arena is busy about a quarter of the time (the two share the CPU's cores, which no model of
# separate GPUs includes); the policies' times are for operations of milliseconds to tens of ms.
CPU_SETS = [
    "real.scale=small",
    "cluster.gpu_memory_gib=0.2",
    "real.time_scale=4",
    "trace.input_mean=32",
    "trace.output_mean=8",
    "systems.0.overrides.keep_alive_s=0.2",
    "systems.1.overrides.keep_alive_s=0.2",
    "systems.0.overrides.fairness_window_s=0.5",
    "systems.1.overrides.fairness_window_s=0.5",
]
# --ewl: the same loader and engine without and with execute-while-load (placed before the device's sets,
# whose systems.0/systems.1 overrides then apply to both)
EWL_SETS = [
    "systems=[{name: serverlessllm, preset: serverlessllm, overrides: {kv_chunk_blocks: 1}}, "
    "{name: serverlessllm-ewl, preset: serverlessllm, overrides: {kv_chunk_blocks: 1, execute_while_load: true}}]",
]
CUDA_SETS = [
    "real.scale=full",
    "real.dtype=bfloat16",
    "real.readers=null",
    "real.time_scale=4",
    "cluster.gpu_memory_gib=16",
    "models=[{name: qwen2.5-3b}, {name: phi-3-mini-4k}, "
    "{name: qwen-ft, derive: {base: qwen2.5-3b, share_first_layers: 0.5}}]",
    "trace.n_requests=120",
    "systems.0.overrides.keep_alive_s=2.0",
    "systems.1.overrides.keep_alive_s=2.0",
    "systems.0.overrides.fairness_window_s=5.0",
    "systems.1.overrides.fairness_window_s=5.0",
]


def _shown(path: Path) -> str:
    """A path as the report shows it: relative to the repository when inside it."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _step(name: str, steps: dict[str, Any], fn: Callable[[], Any]) -> Any:
    print(f"== {name}", flush=True)
    t0 = time.perf_counter()
    try:
        result = fn()
    except Exception as exc:  # recorded, and the remaining steps that do not need it still run
        steps[name] = {"ok": False, "seconds": time.perf_counter() - t0,
                       "error": f"{exc.__class__.__name__}: {exc}"}
        traceback.print_exc()
        return None
    steps[name] = {"ok": True, "seconds": time.perf_counter() - t0}
    print(f"   {name}: {steps[name]['seconds']:.1f} s", flush=True)
    return result


def _markdown(r: dict[str, Any]) -> str:
    info = r["device_info"]
    lines = [
        f"# tangram-sim hardware validation: {info.get('card', info['device'])}",
        "",
        f"- date: {r['date']}; host {r['host']}; python {r['python']}, torch {info.get('torch')}",
        f"- device: {info['device']}, card: {info.get('card')}, driver: {info.get('driver')}, "
        f"CUDA: {info.get('cuda')}, PCIe: {info.get('pcie')}",
        f"- experiment: {r['experiment']} with {', '.join(r['sets']) or 'no overrides'}; "
        f"{r.get('split', 1)} arena(s) per device",
        f"- total: {r['seconds']:.1f} s",
        "",
        "| step | ok | seconds |",
        "|---|---|---|",
    ]
    for name, s in r["steps"].items():
        ok = "yes" if s["ok"] else "NO: " + s.get("error", "")[:80]
        lines.append(f"| {name} | {ok} | {s['seconds']:.1f} |")
    cal = r.get("calibration")
    if cal:
        lines += [
            "",
            "## Calibration",
            "",
            f"h2d {cal['h2d_bps'] / 1e9:.2f} GB/s, d2d {cal['d2d_bps'] / 1e9:.2f} GB/s, checkpoint read "
            f"{cal['read_bps'] / 1e9:.2f} GB/s, {cal['unit_overhead_s'] * 1e6:.1f} us per loaded unit, "
            f"engine start {cal['engine_overhead_s'] * 1e3:.2f} ms"
            + (f", reads beside compute (layered starts) {cal['layered_load_bps'] / 1e9:.2f} GB/s"
               if cal.get("layered_load_bps") else "") + " (`calibration.yaml`).",
        ]
    if r.get("bench"):
        lines += ["", "## Loader benchmark", "", "```", r["bench_text"], "```"]
    late = [x for x in r.get("lag", []) if x["lag_p99_s"] > x["lag_bound_s"]]
    if r.get("lag"):
        lines += ["", "## Replay lag", ""]
        lines += [f"- {x['system']}: p50 {x['lag_p50_s'] * 1e3:.2f} ms, p99 {x['lag_p99_s'] * 1e3:.2f} ms, "
                  f"max {x['lag_max_s'] * 1e3:.2f} ms (bound {x['lag_bound_s'] * 1e3:.2f} ms)" for x in r["lag"]]
    if late:
        lines += ["", f"**WARNING: the replay fell behind the wall clock under {', '.join(x['system'] for x in late)}**: "
                  "device work ran later than the trace placed it, so idle gaps and the overlap of GPUs differ "
                  "from the trace's; lower `real.time_scale` or the load and run again."]
    if r.get("fidelity"):
        lines += ["", "## Fidelity (simulation vs replay)", "", "```", r["fidelity_text"], "```", "",
                  f"Headline (mean load time, p50 TTFT): worst error {r['worst_headline_error']:.1%}; "
                  "goal: within 10%. Figure: `fidelity.png`; per system: `fidelity.csv`."]
    if r.get("refit_fidelity"):
        lines += ["", "## The time model's own error (calibration refitted on this replay)", "",
                  "The same fits on the replay's own loads and steps (`refit/calibration.yaml`), simulated "
                  "again (`refit/sim`): what this still misses is the time model's (a linear prefill, mean "
                  "step times), the rest of the error above is the calibration's (a host at another speed, "
                  "designed steps unlike the replay's). A diagnosis, not a prediction: it has seen the replay.",
                  "", "```", r["refit_fidelity_text"], "```", "",
                  f"Headline (mean load time, p50 TTFT): worst error {r['refit_worst_headline_error']:.1%}."]
    if r.get("spread"):
        n = r["spread"][0]["replays"]
        lines += ["", f"## The replay's own spread ({n} replays, one calibration)", "",
                  "The same trace replayed again with the same calibration (`replay-2`, ...: `spread.csv`). "
                  "`spread` is the largest distance of one replay from the replays' median: a simulation "
                  "cannot be expected closer than that to any single replay.", "", "```", r["spread_text"], "```"]
    e = r.get("ewl")
    if e:
        lines += ["", "## Execute-while-load (cold starts, means)", "",
                  "| | TTFT off | TTFT on | reduction | TTFT - queueing off | on | reduction | overlap |",
                  "|---|---|---|---|---|---|---|---|"]
        for side, label in (("sim", "simulation (calibrated)"), ("real", "replay (measured)")):
            lines.append(f"| {label} | {e[f'{side}_off_cold_ttft_s'] * 1e3:.2f} ms | "
                         f"{e[f'{side}_on_cold_ttft_s'] * 1e3:.2f} ms | {e[f'{side}_reduction']:.1%} | "
                         f"{e[f'{side}_off_cold_service_s'] * 1e3:.2f} ms | "
                         f"{e[f'{side}_on_cold_service_s'] * 1e3:.2f} ms | {e[f'{side}_service_reduction']:.1%} | "
                         f"{e.get(f'{side}_mean_overlap_s', math.nan) * 1e3:.2f} ms |")
        lines += ["", f"Predicted reduction vs measured: TTFT {e['reduction_error']:+.1%}, TTFT less queueing "
                  f"{e['service_reduction_error']:+.1%} of the measured one; goal: within 10%."]
    if e and r.get("ewl_spread"):
        for key, label in (("reduction", "TTFT"), ("service_reduction", "TTFT less queueing")):
            got = sorted(x[f"real_{key}"] for x in r["ewl_spread"])
            mid = got[len(got) // 2] if len(got) % 2 else (got[len(got) // 2 - 1] + got[len(got) // 2]) / 2
            far = (f"{max(abs(g - mid) for g in got) / abs(mid):.0%} of it from the median" if mid
                   else "median 0")
            near = sum(abs(e[f"sim_{key}"] - g) <= 0.1 * abs(g) for g in got)
            lines.append(f"- {label}: the {len(got)} replays measured a reduction of {got[0]:.1%} to {got[-1]:.1%} "
                         f"(median {mid:.1%}; the farthest {far}); predicted {e[f'sim_{key}']:.1%}, within 10% of {near} of them.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda:0", help="cuda:N, or cpu")
    parser.add_argument("--out", required=True, help="folder for everything")
    parser.add_argument("--experiment", default=str(EXPERIMENT), help="replay experiment YAML")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="more overrides of the experiment (after the CUDA defaults)")
    parser.add_argument("--full-calibration", action="store_true",
                        help="more instance starts and larger copies (slower)")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="exit 1 if mean load time or p50 TTFT error exceeds this fraction")
    parser.add_argument("--calibration-partial", action="store_true",
                        help="simulate even when the calibration lacks some of the experiment's models "
                             "(those are timed by the roofline), as `tangram-sim run --calibration-partial`")
    parser.add_argument("--calibration", default=None, metavar="FILE",
                        help="reuse this calibration.yaml (from an earlier run on the same card) "
                             "instead of the calibrate step")
    parser.add_argument("--skip-bench", action="store_true", help="leave out the loader benchmark")
    parser.add_argument("--ewl", action="store_true",
                        help="replay and simulate serverlessllm without and with execute-while-load, and "
                             "report the cold-start TTFT reduction predicted vs measured")
    parser.add_argument("--split", type=int, default=None,
                        help="arenas (GPUs of the replay) carved out of the device (default 2)")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="replay the trace N times with the same calibration and report the replays' "
                             "spread beside the simulation's error (default 1)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f"--repeat {args.repeat}: expected 1 or more")

    sys.path.insert(0, str(ROOT))
    from tangram_sim.experiments import run_experiment
    from tangram_sim.experiments.config import load_yaml
    from tangram_sim.real.calibrate import calibrate_experiment
    from tangram_sim.real.fidelity import (
        compare_runs,
        ewl_reduction,
        format_spread,
        format_table,
        plot_fidelity,
        replay_spread,
    )
    from tangram_sim.real.memory import driver_info
    from tangram_sim.real.refit import refit_on_replay
    from tangram_sim.real.replay import prepare_replay, run_replay
    from tangram_sim.real.setup import resolve_device
    from tangram_sim.sim.timemodel import Calibration

    t_start = time.perf_counter()
    device = resolve_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sets = (EWL_SETS if args.ewl else []) + (CUDA_SETS if device.type == "cuda" else CPU_SETS) + list(args.sets)
    split = args.split if args.split is not None else 2
    raw, base = load_yaml(args.experiment)
    prep_dir, replay_dir, sim_dir, refit_dir = out / "prepare", out / "replay", out / "sim", out / "refit"
    cal_path = out / "calibration.yaml"
    result: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "host": platform.node(),
        "device_info": driver_info(device),
        "experiment": _shown(Path(args.experiment)),
        "sets": sets,
        "split": split,
        "steps": {},
    }
    steps = result["steps"]

    setup = _step("checkpoints", steps, lambda: prepare_replay(raw, base, prep_dir, devices=[str(device)],
                                                               split=split, sets=sets))
    sim_yaml = prep_dir / "experiment.sim.yaml"
    if setup is not None:
        if args.calibration:  # measured earlier: copied beside the results, so the folder stays whole
            def reuse() -> Calibration:
                cal = Calibration.load(args.calibration)
                cal_path.write_text(Path(args.calibration).read_text())
                return cal

            calibration = _step("calibration (reused)", steps, reuse)
        else:
            report = _step("calibrate", steps, lambda: calibrate_experiment(
                *load_yaml(sim_yaml), str(device), quick=not args.full_calibration,
                log=lambda m: print(f"   {m}", flush=True)))
            if report is not None:
                report.write(cal_path)
            calibration = report.calibration if report is not None else None
        if calibration is not None:
            result["calibration"] = calibration.to_dict()

        def bench() -> dict[str, Any]:
            module = importlib.import_module("benchmarks.bench_loader")  # ROOT is on sys.path
            if device.type == "cuda":  # the experiment's largest checkpoint: a real-size model
                path = max(setup.ckpts.values(), key=lambda c: c.spec.weight_bytes).path
            else:  # tiny checkpoints measure overheads, not bandwidth: a 0.25 GB synthetic one
                path = module.make_checkpoint(out / "bench-checkpoint", "cpu", 0.25, None)
            r = module.run(path, str(device), repeats=3)
            result["bench_text"] = module.report(r)
            print(result["bench_text"])
            (out / "bench_loader.json").write_text(json.dumps(r, indent=2, default=str) + "\n")
            return r

        if not args.skip_bench:
            result["bench"] = _step("bench", steps, bench)
        summary = _step("replay", steps, lambda: run_replay(
            raw, base, replay_dir, devices=[str(device)], split=split, sets=sets, progress=True, force=True,
            checkpoints=prep_dir / "checkpoints"))
        if summary is not None:
            print(summary[["system", "requests", "completed", "cold_starts", "mean_load_s", "p50_ttft_s",
                           "bytes_loaded", "full_hit_ratio", "lag_p99_s"]].to_string(index=False))
            result["lag"] = summary[["system", "lag_p50_s", "lag_p99_s", "lag_max_s", "lag_bound_s"]].to_dict(
                orient="records")
        if summary is not None and calibration is not None:
            sim_raw, sim_base = load_yaml(replay_dir / "experiment.sim.yaml")
            # a calibration reused from another run may lack this experiment's models: with
            # --calibration-partial the roofline times those (as `tangram-sim run --calibration-partial`)
            done = _step("simulate", steps, lambda: run_experiment(
                sim_raw, sim_base, sim_dir, sets=[f"calibration={cal_path.resolve()}"], progress=False,
                calibration_partial=args.calibration_partial))
            if done is not None:
                def compare() -> Any:
                    fid = compare_runs(sim_dir, replay_dir)
                    fid.table.to_csv(out / "fidelity.csv", index=False, float_format="%.6g")
                    if fid.gpus is not None:
                        fid.gpus.to_csv(out / "fidelity_gpus.csv", index=False)
                    plot_fidelity(fid, out / "fidelity.png")
                    return fid

                fid = _step("compare", steps, compare)
                if fid is not None:
                    result["fidelity"] = fid.table.to_dict(orient="records")
                    result["fidelity_text"] = format_table(fid)
                    result["worst_headline_error"] = fid.worst_headline_error()
                    print(result["fidelity_text"])
                if fid is not None:
                    def refit() -> Any:  # the time model's own error: a calibration fitted on this replay
                        report = refit_on_replay(replay_dir, cal_path, setup.ckpts)
                        report.write(refit_dir / "calibration.yaml")
                        run_experiment(sim_raw, sim_base, refit_dir / "sim", progress=False,
                                       sets=[f"calibration={(refit_dir / 'calibration.yaml').resolve()}"])
                        got = compare_runs(refit_dir / "sim", replay_dir)
                        got.table.to_csv(refit_dir / "fidelity.csv", index=False, float_format="%.6g")
                        return got

                    again = _step("refit", steps, refit)
                    if again is not None:
                        result["refit_fidelity"] = again.table.to_dict(orient="records")
                        result["refit_fidelity_text"] = format_table(again)
                        result["refit_worst_headline_error"] = again.worst_headline_error()
                if fid is not None and args.repeat > 1:
                    again_dirs = [replay_dir]
                    for i in range(2, args.repeat + 1):
                        d = out / f"replay-{i}"
                        if _step(f"replay {i}", steps, lambda d=d: run_replay(
                                raw, base, d, devices=[str(device)], split=split, sets=sets, progress=True,
                                force=True, checkpoints=prep_dir / "checkpoints")) is not None:
                            again_dirs.append(d)

                    def spread() -> Any:
                        table = replay_spread(sim_dir, again_dirs)
                        table.to_csv(out / "spread.csv", index=False, float_format="%.6g")
                        return table

                    table = _step("spread", steps, spread)
                    if table is not None:
                        result["spread"] = table.to_dict(orient="records")
                        result["spread_text"] = format_spread(table)
                        print(result["spread_text"])
                        if args.ewl:  # the measured reduction of each replay against the one prediction
                            result["ewl_spread"] = [ewl_reduction(sim_dir, d, "serverlessllm", "serverlessllm-ewl")
                                                    for d in again_dirs]
                if fid is not None and args.ewl:
                    ewl = _step("ewl", steps, lambda: ewl_reduction(sim_dir, replay_dir, "serverlessllm",
                                                                     "serverlessllm-ewl"))
                    if ewl is not None:
                        result["ewl"] = ewl
                        print(json.dumps(ewl, indent=1))
    result["seconds"] = time.perf_counter() - t_start
    (out / "validate.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / "validate.md").write_text(_markdown(result))
    print(f"wrote {out / 'validate.md'} and {out / 'validate.json'} ({result['seconds']:.1f} s)")
    ok = all(s["ok"] for s in steps.values()) and len(steps) == 7 - args.skip_bench + args.ewl + (args.repeat > 1) * args.repeat
    worst = result.get("worst_headline_error", math.nan)
    if args.tolerance is not None and not (worst <= args.tolerance):
        print(f"fidelity: worst headline error {worst:.1%} exceeds {args.tolerance:.0%}")
        ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

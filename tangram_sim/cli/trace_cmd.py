"""`tangram-sim trace inspect|synth`: look at a trace file before an experiment uses it, or write one.

`inspect` answers the questions that decide whether a trace suits an experiment (how many requests,
over how long, at what rate, how long the prompts and answers are, which models) and shows how many
bad rows `--skip-bad-rows` dropped. `synth` writes a canonical trace that any experiment can replay.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tangram_sim.errors import TangramError, TraceError

_TOP_MODELS = 15
_SYNTH_OPTIONS = {
    "rate": "--rate",
    "n_requests": "--requests",
    "duration_s": "--duration",
    "cv": "--cv",
    "zipf_alpha": "--alpha",
    "input_mean": "--input-mean",
    "output_mean": "--output-mean",
}


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("trace", help="inspect a trace file or synthesize one")
    sub = parser.add_subparsers(title="trace commands", metavar="ACTION")
    parser.set_defaults(func=lambda args: _help(parser))

    from tangram_sim.traces.formats import FORMATS  # light: numpy/pandas only

    p_in = sub.add_parser("inspect", help="rows, duration, rate, token and model statistics of a trace")
    p_in.add_argument("file", metavar="FILE", help="trace file (CSV, Parquet or ServeGen text)")
    p_in.add_argument(
        "--format", default="auto", choices=("auto",) + FORMATS, help="file format (default: detect)"
    )
    p_in.add_argument(
        "--skip-bad-rows", action="store_true", help="skip and count bad rows instead of failing"
    )
    p_in.add_argument("--json", action="store_true", help="print JSON instead of text")
    p_in.set_defaults(func=cmd_inspect)

    p_syn = sub.add_parser(
        "synth", help="write a canonical trace (CSV or Parquet): synthetic, or an experiment's workload"
    )
    p_syn.add_argument("--out", required=True, metavar="FILE", help="output file, .csv or .parquet")
    p_syn.add_argument(
        "--from", dest="experiment", metavar="EXP.yaml",
        help="write the requests this experiment replays (its trace section, seed and --set overrides)",
    )
    p_syn.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                       help="with --from: override a dotted key of the experiment (repeatable)")
    p_syn.add_argument("--point", type=int, default=0, metavar="I",
                       help="with --from: which sweep point's trace (default 0, the first)")
    p_syn.add_argument("--models", help="comma-separated model names, most popular first")
    size = p_syn.add_mutually_exclusive_group()
    size.add_argument("--requests", type=int, metavar="N", help="number of requests")
    size.add_argument("--duration", type=float, metavar="S", help="length of the trace in seconds")
    p_syn.add_argument("--rate", type=float, metavar="R", help="mean requests per second")
    p_syn.add_argument("--arrival", default="poisson", choices=("poisson", "gamma"), help="inter-arrival law")
    p_syn.add_argument("--cv", type=float, default=1.0, help="coefficient of variation of gamma gaps")
    p_syn.add_argument("--alpha", type=float, default=0.0, help="Zipf skew of model popularity (0: uniform)")
    p_syn.add_argument("--diurnal-amplitude", type=float, default=None, help="sinusoidal rate amplitude 0..1")
    p_syn.add_argument("--diurnal-period", type=float, default=86400.0, help="period of the rate cycle, s")
    p_syn.add_argument("--input-mean", type=float, default=1024.0, help="mean input tokens (lognormal)")
    p_syn.add_argument("--output-mean", type=float, default=256.0, help="mean output tokens (lognormal)")
    p_syn.add_argument(
        "--token-source",
        default=None,
        metavar="FILE",
        help="draw (input, output) token pairs from this trace instead",
    )
    p_syn.add_argument("--seed", type=int, default=0, help="random seed (same seed, same trace)")
    p_syn.add_argument("--force", action="store_true", help="overwrite --out if it already exists")
    p_syn.set_defaults(func=cmd_synth)

    p_ex = sub.add_parser(
        "servegen-extract", help="cut ServeGen's client data to a compact Parquet extract (windows + PDFs)"
    )
    p_ex.add_argument("data", metavar="DATA", help="ServeGen repository clone or its data/ folder")
    p_ex.add_argument("--out", required=True, metavar="DIR", help="folder for windows.parquet and pdfs.parquet")
    p_ex.add_argument("--pools", default="m-small,m-mid,m-large,deepseek-r1,mm-image",
                      help="comma-separated pool names (default: the five the Tangram evaluation uses)")
    p_ex.add_argument("--span", nargs=2, type=float, default=[0.0, 86400.0], metavar=("START", "END"),
                      help="seconds of the data to keep (default: the first day)")
    p_ex.add_argument("--force", action="store_true", help="overwrite an existing extract in --out")
    p_ex.set_defaults(func=cmd_servegen_extract)


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def summarize(df: Any) -> dict[str, Any]:
    """Statistics of a canonical trace, as printed by `inspect` (plain types, JSON-ready).

    The mean rate is (rows - 1) / duration, i.e. one over the mean gap between arrivals.
    """
    import numpy as np

    n = len(df)
    duration = float(df["arrival_s"].iloc[-1]) if n else 0.0
    out: dict[str, Any] = {
        "rows": n,
        "duration_s": duration,
        "mean_rate_rps": (n - 1) / duration if duration > 0 else None,
    }
    for col in ("input_tokens", "output_tokens"):
        v = df[col].to_numpy()
        out[col] = {
            "mean": float(v.mean()),
            "p50": float(np.percentile(v, 50)),
            "p99": float(np.percentile(v, 99)),
            "max": int(v.max()),
        }
    if df["model"].isna().all():
        out["models"] = None
    else:
        counts = df["model"].value_counts(sort=False)
        ordered = sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))
        out["models"] = {str(k): int(v) for k, v in ordered}
    return out


def cmd_inspect(args: argparse.Namespace) -> int:
    from tangram_sim.traces.formats import read_trace

    df = read_trace(args.file, args.format, skip_bad_rows=args.skip_bad_rows)
    info = {
        "file": str(args.file),
        "format": df.attrs.get("format"),
        **summarize(df),
        "skipped_rows": int(df.attrs.get("skipped_rows", 0)),
    }
    info["models_are_labels"] = bool(df.attrs.get("models_are_labels", False))
    for key in ("start_time", "functions"):
        if key in df.attrs:
            info[key] = df.attrs[key]
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(_text(info))
    return 0


def _text(info: dict[str, Any]) -> str:
    rate = "n/a" if info["mean_rate_rps"] is None else f"{info['mean_rate_rps']:.3f} req/s"
    lines = [
        f"file:          {info['file']}",
        f"format:        {info['format']}",
        f"rows:          {info['rows']:,}",
        f"skipped rows:  {info['skipped_rows']:,}",
        f"duration:      {info['duration_s']:,.3f} s",
        f"mean rate:     {rate}",
    ]
    if "start_time" in info:
        lines.append(f"start time:    {info['start_time']}")
    if "functions" in info:
        lines.append(f"functions:     {info['functions']:,}")
    lines.append(f"{'tokens':<14}{'mean':>10}{'p50':>10}{'p99':>10}{'max':>10}")
    for col in ("input_tokens", "output_tokens"):
        s = info[col]
        lines.append(
            f"  {col.split('_')[0]:<12}{s['mean']:>10.1f}{s['p50']:>10.0f}{s['p99']:>10.0f}{s['max']:>10}"
        )
    models = info["models"]
    if models is None:
        lines.append("models:        none in the file (an experiment assigns them with trace.mapping)")
    else:
        heading = "model labels:" if info.get("models_are_labels") else "models:"
        lines.append(f"{heading:<15}{len(models)}")
        width = min(max(len(m) for m in models), 64)
        for name, count in list(models.items())[:_TOP_MODELS]:
            lines.append(f"  {name[:64]:<{width}}  {count:>10,}  {100 * count / info['rows']:5.1f}%")
        if len(models) > _TOP_MODELS:
            rest = sum(list(models.values())[_TOP_MODELS:])
            lines.append(f"  ... {len(models) - _TOP_MODELS:,} more with {rest:,} requests (see --json)")
    return "\n".join(lines)


def cmd_servegen_extract(args: argparse.Namespace) -> int:
    from tangram_sim.traces.servegen_data import EXTRACT_FILES, write_extract

    data, out = Path(args.data), Path(args.out)
    if not data.is_dir():
        raise TraceError(f"DATA: '{args.data}' is not a folder")
    start, end = args.span
    if not (0 <= start < end):
        raise TraceError(f"--span: expected START END with 0 <= START < END, got {start:g} {end:g}")
    if any((out / f).exists() for f in EXTRACT_FILES) and not args.force:
        raise TraceError(f"--out: '{out}' already holds an extract; pass --force to overwrite it")
    pools = [p.strip() for p in args.pools.split(",") if p.strip()]
    if not pools:
        raise TraceError(f"--pools: expected comma-separated pool names, got '{args.pools}'")
    counts = write_extract(data, out, pools, (start, end))
    size = sum((out / f).stat().st_size for f in EXTRACT_FILES)
    print(f"wrote {counts['windows']:,} windows and {counts['pdf_rows']:,} PDF rows "
          f"({size / 2**20:.1f} MiB) to {out}")
    return 0


def _trace_of_experiment(args: argparse.Namespace) -> Any:
    from tangram_sim.experiments.config import load_yaml
    from tangram_sim.experiments.runner import load_point_trace, prepare

    for option in ("models", "requests", "duration", "rate", "token_source"):
        if getattr(args, option) is not None:
            raise TraceError(f"--{option.replace('_', '-')}: not used with --from (the experiment sets it)")
    raw, base_dir = load_yaml(args.experiment)
    _, points = prepare(raw, base_dir, args.sets)
    if not 0 <= args.point < len(points):
        raise TraceError(f"--point: expected 0..{len(points) - 1} (the experiment has {len(points)} points)")
    return load_point_trace(points[args.point]["config"], str(base_dir) if base_dir else None)


def cmd_synth(args: argparse.Namespace) -> int:
    import numpy as np

    from tangram_sim.traces.formats import read_trace
    from tangram_sim.traces.synthetic import Diurnal, synthesize

    out = Path(args.out)
    suffix = out.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise TraceError(f"--out: expected a .csv or .parquet file name, got '{args.out}'")
    if args.experiment is not None:
        return _write(_trace_of_experiment(args), out, suffix, args.force)
    if args.sets or args.point:
        raise TraceError("--set/--point: only used with --from EXP.yaml")
    if args.models is None:
        raise TraceError("--models: required (or --from EXP.yaml)")
    if args.requests is None and args.duration is None:
        raise TraceError("--requests or --duration: one is required (or --from EXP.yaml)")
    if args.rate is None:
        raise TraceError("--rate: required (or --from EXP.yaml)")
    models = [m.strip() for m in args.models.split(",")]
    if not all(models):
        raise TraceError(f"--models: expected comma-separated non-empty names, got '{args.models}'")
    if len(set(models)) != len(models):
        raise TraceError(f"--models: names must be distinct, got '{args.models}'")
    if args.requests is not None and args.requests < 1:
        raise TraceError(f"--requests: expected an integer >= 1, got {args.requests}")
    diurnal = None
    if args.diurnal_amplitude is not None:
        diurnal = Diurnal.from_config(
            {"amplitude": args.diurnal_amplitude, "period_s": args.diurnal_period}, "--diurnal"
        )
    tokens = None
    if args.token_source:
        tokens = read_trace(args.token_source)[["input_tokens", "output_tokens"]]
    try:
        df = synthesize(
            models,
            np.random.default_rng(args.seed),
            rate=args.rate,
            n_requests=args.requests,
            duration_s=args.duration,
            arrival=args.arrival,
            cv=args.cv,
            zipf_alpha=args.alpha,
            diurnal=diurnal,
            input_mean=args.input_mean,
            output_mean=args.output_mean,
            token_table=tokens,
        )
    except TraceError as exc:  # name the option, not the Python parameter
        message = str(exc)
        for param, option in _SYNTH_OPTIONS.items():
            message = message.replace(f"synthesize.{param}:", f"{option}:")
        raise TraceError(message) from None
    return _write(df, out, suffix, args.force)


def _write(df: Any, out: Path, suffix: str, force: bool) -> int:
    if not out.parent.exists():
        raise TraceError(f"--out: folder '{out.parent}' does not exist")
    # The options are checked first (they are cheaper to fix); an existing file may be the user's
    # only copy of a real trace, so it is replaced only on request.
    if out.is_dir():
        raise TraceError(f"--out: '{out}' is a folder; expected a file name")
    if out.exists() and not force:
        raise TraceError(f"--out: '{out}' already exists; pass --force to overwrite it")
    if suffix == ".csv":
        df.to_csv(out, index=False)
    else:
        df.to_parquet(out, index=False)
    for note in df.attrs.get("notes", ()):
        print(f"note: {note}")
    print(f"wrote {len(df):,} requests over {df['arrival_s'].iloc[-1]:,.1f} s to {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `trace` group alone (`python -m tangram_sim.cli.trace_cmd inspect FILE`)."""
    parser = argparse.ArgumentParser(prog="tangram-sim")
    add_parser(parser.add_subparsers())
    try:
        args = parser.parse_args(["trace", *(sys.argv[1:] if argv is None else argv)])
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return int(args.func(args) or 0)
    except TangramError as exc:
        from tangram_sim.cli import one_line

        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:
        from tangram_sim.cli import _os_error, one_line

        print(f"error: {one_line(_os_error(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

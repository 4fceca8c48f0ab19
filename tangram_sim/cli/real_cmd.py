"""`tangram-sim real make-checkpoints|load|generate|replay|calibrate`: the real executor.

torch is imported inside the command functions only, so `--help` and the rest of the CLI work
without the `real` extra; running a command without it is a one-line error naming the extra.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from tangram_sim.errors import ConfigError

MB = 1e6


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "real", help="real executor: make checkpoints, load them into a device arena, generate"
    )
    sub = parser.add_subparsers(title="real commands", metavar="ACTION")
    parser.set_defaults(func=lambda args: _help(parser))

    mk = sub.add_parser(
        "make-checkpoints",
        help="write random-weight safetensors checkpoints of catalog models (HF layout)",
        description="Writes OUT/<name>/ with model-0000i-of-0000n.safetensors, the index and config.json; "
        "tensor fingerprints go to __metadata__['tangram.fingerprints'].",
    )
    mk.add_argument("--models", nargs="*", default=[], metavar="NAME", help="catalog model names")
    mk.add_argument("--out", required=True, metavar="DIR", help="folder that receives one folder per model")
    mk.add_argument(
        "--scale", choices=("tiny", "small", "full"), default="tiny",
        help="tiny: hidden 64, 2 layers, vocab 256; small: hidden 512, 4 layers, vocab 8192"
    )
    mk.add_argument(
        "--derive",
        action="append",
        default=[],
        metavar="NAME=BASE:FRACTION",
        help="a fine-tune sharing the embeddings and the first FRACTION of the layers of BASE (repeatable)",
    )
    mk.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the config's)")
    mk.add_argument("--seed", type=int, default=0, help="values are a function of seed and tensor identity")
    mk.add_argument("--shard-mb", type=float, default=None, help="max shard size (default: 2 shards or 5 GB)")
    mk.set_defaults(func=cmd_make_checkpoints)

    ld = sub.add_parser(
        "load",
        help="load checkpoints one after another into one device arena (reuse, compaction, eviction)",
        description="One single-token request per model, in turn, through the replay path (the simulator's "
        "lifecycle on one device arena, the `tangram` preset with the chosen policies): each model is "
        "started (missing units loaded, shared or retained ones reused) and ended again (units stay "
        "resident unless retention is none) when the next one's request comes.",
    )
    ld.add_argument("models", nargs="+", metavar="DIR", help="checkpoint folders, or a folder of them")
    ld.add_argument(
        "--verify", action="store_true", help="checksum every tensor on the device against the file"
    )
    _device_options(ld)
    ld.set_defaults(func=cmd_load)

    gen = sub.add_parser(
        "generate", help="load one checkpoint and run prefill + N decode tokens (greedy)",
        description="One request through the replay path (see `real load`); prefill and decode times are "
        "the replay's measured steps.",
    )
    gen.add_argument("model", metavar="DIR", help="checkpoint folder (llama, mistral, qwen2 or phi3)")
    gen.add_argument(
        "--prompt", default=None, help="comma-separated token ids (default: random, see --prompt-len)"
    )
    gen.add_argument("--prompt-len", type=int, default=16, help="length of the random prompt")
    gen.add_argument("--tokens", type=int, default=16, help="decode tokens after the first token")
    gen.add_argument("--seed", type=int, default=0, help="seed of the random prompt")
    _device_options(gen)
    gen.set_defaults(func=cmd_generate)

    rp = sub.add_parser(
        "replay",
        help="replay an experiment's trace on a real device with each system's policies",
        description="Replays the experiment's trace (arrivals divided by the time scale) on real devices, "
        "one arena per GPU, through the simulator's own request lifecycle (router, scheduler, retention, "
        "packing, KV, batching) on a wall clock, on checkpoints made at "
        "real.scale (or real.checkpoints / --checkpoints). Writes the layout of `tangram-sim run` "
        "(summary.csv, requests/timeline parquet, plots, report.md, run.json) plus memory.parquet (device memory "
        "readings), loads.parquet (where each cold start's time went), steps.parquet (every device step, "
        "measured), checkpoints/ and "
        "experiment.sim.yaml: the same experiment for `tangram-sim run --calibration`. The lag (how late "
        "events ran after their trace time) is reported; a replay that fell behind says so.",
    )
    rp.add_argument("experiment", help="experiment YAML (see experiments/replay-cpu.yaml)")
    rp.add_argument("--device", "--devices", dest="device", action="append", default=None, metavar="DEV",
                    help="cpu, cuda (every visible GPU) or cuda:N; a comma list or repeated for several "
                    "GPUs, e.g. cuda:0,cuda:1 or cpu,cpu (default: cuda when available)")
    rp.add_argument("--split", type=int, default=1, metavar="N",
                    help="carve each device into N arenas, each a GPU of the replay (default 1)")
    rp.add_argument("--out", default=None, help="output folder (default: results/<name>-replay)")
    rp.add_argument("--time-scale", type=float, default=None, metavar="X",
                    help="replay X times faster than the trace (default: real.time_scale, else 1)")
    rp.add_argument("--system", action="append", default=None, metavar="NAME",
                    help="replay only this system (repeatable; default: all)")
    rp.add_argument("--checkpoints", default=None, metavar="DIR",
                    help="folder of checkpoint folders named like the models (instead of making them)")
    rp.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="override a dotted key of the experiment (repeatable)")
    rp.add_argument("--no-plots", action="store_true", help="skip plots and report")
    rp.add_argument("--force", action="store_true",
                    help="empty --out first even if it holds something other than a replay of this experiment")
    rp.add_argument("--quiet", action="store_true", help="no progress bar or table")
    rp.set_defaults(func=cmd_replay)

    cal = sub.add_parser(
        "calibrate",
        help="measure a device for the simulator: bandwidths, load and engine overheads, prefill/decode",
        description="Measures host->device copies (pinned and pageable, by chunk size), device->device "
        "copies, instance starts under the experiment's policies (fitted to per-unit overhead + read "
        "bandwidth), the engine start, and per-model prefill/decode times, and writes a calibration YAML for "
        "`tangram-sim run --calibration`. Give the experiment (its models, systems, arena size and trace "
        "shape are measured), typically DIR/experiment.sim.yaml of a replay.",
    )
    cal.add_argument("experiment", help="experiment YAML (e.g. DIR/experiment.sim.yaml of a replay)")
    cal.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    cal.add_argument("--out", required=True, metavar="FILE", help="calibration YAML to write")
    cal.add_argument("--checkpoints", default=None, metavar="DIR",
                     help="folder of checkpoint folders named like the models (instead of making them)")
    cal.add_argument("--quick", action="store_true", help="fewer instance starts and smaller copies (CI)")
    cal.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                     help="override a dotted key of the experiment (repeatable)")
    cal.add_argument("--quiet", action="store_true", help="print only the result")
    cal.set_defaults(func=cmd_calibrate)


def _device_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument(
        "--capacity-gb",
        type=float,
        default=None,
        help="arena size in GB (default: 90%% of free memory on CUDA, 1.25x the models on the CPU)",
    )
    p.add_argument("--granularity", default="group", help="reuse units: model, group or tensor")
    p.add_argument(
        "--retention", default="tangram", help="retention policy (tangram, lru, lfu, gdsf, none, ...)"
    )
    p.add_argument(
        "--packing", default="pbp", help="packing policy (pbp, first-fit, compact-all, min-move-window)"
    )
    p.add_argument("--kv", default="elastic", help="KV policy: elastic or static")
    p.add_argument("--readers", type=int, default=None, help="reader threads (default: cores, 2..8)")
    p.add_argument("--chunk-mb", type=float, default=32, help="staging buffer size in MiB")
    p.add_argument(
        "--staging",
        choices=("auto", "always", "never"),
        default="auto",
        help="staging buffers: auto = on CUDA only (the CPU reads straight into the arena)",
    )


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _require() -> None:
    from tangram_sim.real import require_torch

    require_torch()


def cmd_make_checkpoints(args: argparse.Namespace) -> int:
    _require()
    from tangram_sim.real.checkpoints import make_checkpoints

    if not args.models and not args.derive:
        raise ConfigError("make-checkpoints: no models given, expected --models NAME... and/or --derive")
    shard = None if args.shard_mb is None else max(1, int(args.shard_mb * 2**20))
    written = make_checkpoints(
        args.models, args.out, args.scale, args.derive, dtype=args.dtype, seed=args.seed, shard_bytes=shard
    )
    for w in written:
        shared = f", {w.shared_bytes / MB:.2f} MB shared with {w.base}" if w.base else ""
        print(
            f"{w.path}: {w.spec.num_tensors} tensors, {w.nbytes / MB:.2f} MB {w.spec.dtype} in "
            f"{len(w.shards)} shards{shared} ({w.seconds:.2f} s)"
        )
    return 0


def _session(args: argparse.Namespace, ckpts: list[Any]) -> dict[str, Any]:
    """`run_requests` arguments from the common options: the system (the `tangram` preset with the
    chosen policies), the device and the arena (on the CPU by default every model fits at once)."""
    import torch

    from tangram_sim.real.session import cpu_capacity, system_for
    from tangram_sim.real.setup import default_capacity, resolve_device

    device = resolve_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.capacity_gb is not None:
        if not args.capacity_gb > 0:
            raise ConfigError(f"--capacity-gb {args.capacity_gb}, expected a positive number")
        capacity = int(args.capacity_gb * 1e9)
    elif device.type == "cpu":
        capacity = cpu_capacity({c.name: c for c in ckpts})
    else:
        capacity = default_capacity([device], "--capacity-gb")  # 90% of the card's free memory
    if not args.chunk_mb > 0:
        raise ConfigError(f"--chunk-mb {args.chunk_mb}, expected a positive number")
    system = system_for(args.granularity, args.retention, args.packing, args.kv)
    return dict(system=system, device=device, capacity=capacity, readers=args.readers,
                chunk_bytes=max(4096, int(args.chunk_mb * 2**20)), staging=args.staging)


def _row(cells: list[str], widths: list[int]) -> str:
    return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))


def _memory_line(result: Any) -> str:
    """The device's memory at the replay's last reading."""
    from tangram_sim.real.memory import MemoryReading

    last = result.memory.iloc[-1]
    numbers = ("total_bytes", "used_bytes", "free_bytes", "torch_allocated", "torch_reserved")
    return MemoryReading(str(last["device"]), str(last["source"]), *(int(last[c]) for c in numbers)).summary()


def cmd_load(args: argparse.Namespace) -> int:
    _require()
    from tangram_sim.real.loader import open_checkpoint
    from tangram_sim.real.session import run_requests
    from tangram_sim.real.setup import checkpoint_dirs

    ckpts = [open_checkpoint(p) for p in checkpoint_dirs(args.models)]
    seen: set[str] = set()
    for c in ckpts:
        if c.name in seen:
            raise ConfigError(f"{c.path}: model {c.name!r} is given twice, expected distinct checkpoint "
                              "folders")
        seen.add(c.name)
    options = _session(args, ckpts)
    # one single-token request per model, all at once: served in turn, each a cold start
    requests = [(c.name, [0], 1, 0.0) for c in ckpts]
    result = run_requests(ckpts, requests, verify=args.verify, **options)
    header = ["model", "needed MB", "loaded MB", "reused MB", "moved MB", "evicted MB", "load s", "GB/s",
              "total s"]
    widths = [max(12, *(len(c.name) for c in ckpts)), *(len(h) for h in header[1:])]
    print(f"arena: {options['capacity'] / MB:.1f} MB on {options['device']}, granularity {args.granularity}")
    print(_row(header, widths))
    loads = result.loads.set_index("rid")
    for rid, r in result.requests.iterrows():
        if r["outcome"] != "completed" or rid not in loads.index:
            print(_row([str(r["model"]), f"{r['bytes_needed'] / MB:.2f}", "-", "-", "-", "-", "-", "-", "-"],
                       widths) + f"  ({r['outcome']}{': ' + r['reason'] if r['reason'] else ''})")
            continue
        ld = loads.loc[rid]
        cells = [
            str(r["model"]),
            f"{r['bytes_needed'] / MB:.2f}",
            f"{r['bytes_loaded'] / MB:.2f}",
            f"{r['bytes_reused'] / MB:.2f}",
            f"{r['bytes_moved'] / MB:.2f}",
            f"{(r['bytes_evicted'] + r['bytes_extra_evicted']) / MB:.2f}",
            f"{ld['move_s'] + ld['read_s']:.3f}",
            f"{ld['read_gbps']:.2f}",
            f"{ld['total_s']:.3f}",
        ]
        print(_row(cells, widths))
    end = result.timeline.iloc[-1]
    resident = end["active_bytes"] + end["retained_bytes"]
    print(
        f"arena: resident {resident / MB:.2f} MB, free {end['free_bytes'] / MB:.2f} MB "
        f"(largest {end['largest_free_bytes'] / MB:.2f} MB), fragmentation {end['fragmentation']:.3f}"
        + (" (verified bit-identical)" if args.verify else "")
    )
    print(f"memory: {_memory_line(result)}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    _require()
    import torch

    from tangram_sim.real.loader import open_checkpoint
    from tangram_sim.real.session import run_requests

    ckpt = open_checkpoint(args.model)
    if args.tokens < 0:
        raise ConfigError(f"--tokens {args.tokens}, expected >= 0")
    vocab = int(ckpt.spec.arch.vocab_size or 0) if ckpt.spec.arch else 0
    if vocab <= 0:
        raise ConfigError(f"{ckpt.path}: vocabulary size unknown, expected a decoder checkpoint")
    if args.prompt:
        try:
            prompt = [int(t) for t in args.prompt.split(",") if t.strip()]
        except ValueError:
            raise ConfigError(f"--prompt {args.prompt!r}: expected comma-separated token ids") from None
        bad = [t for t in prompt if not 0 <= t < vocab]
        if not prompt or bad:
            raise ConfigError(f"--prompt {args.prompt!r}: expected token ids in [0, {vocab})")
    else:
        if args.prompt_len <= 0:
            raise ConfigError(f"--prompt-len {args.prompt_len}, expected a positive number")
        g = torch.Generator().manual_seed(args.seed)
        prompt = torch.randint(0, vocab, (args.prompt_len,), generator=g).tolist()
    options = _session(args, [ckpt])
    result = run_requests([ckpt], [(ckpt.name, prompt, args.tokens + 1, 0.0)], **options)
    r = result.requests.iloc[0]
    if r["outcome"] != "completed":
        raise ConfigError(f"{ckpt.name}: the request was {r['outcome']} ({r['reason']}), expected a larger "
                          "--capacity-gb or a shorter prompt")
    ld = result.loads.iloc[0]
    steps = result.steps
    prefill_s = float(steps.loc[steps["kind"] == "prefill", "seconds"].sum())
    decode = steps.loc[steps["kind"] == "decode", "seconds"]
    decode_s = float(decode.sum())
    load_s = float(ld["move_s"] + ld["read_s"])
    print(f"loaded {ckpt.name}: {ld['loaded_bytes'] / MB:.2f} MB in {load_s:.3f} s "
          f"({ld['read_gbps']:.2f} GB/s) on {options['device']}")
    print(f"prompt ({len(prompt)} tokens): {prompt}")
    print(f"tokens: {result.tokens[0]}")
    per = decode_s / len(decode) * 1e3 if len(decode) else 0.0
    print(f"prefill (first token): {prefill_s * 1e3:.2f} ms; decode: {len(decode)} tokens in "
          f"{decode_s * 1e3:.2f} ms ({per:.2f} ms/token)")
    return 0


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cmd_replay(args: argparse.Namespace) -> int:
    _require()
    from pathlib import Path

    from tangram_sim.real.replay import load_experiment, run_replay

    raw, base_dir = load_experiment(args.experiment)
    name = raw.get("name", Path(args.experiment).stem)
    out = Path(args.out) if args.out else Path("results") / f"{name}-replay"
    try:
        summary = run_replay(
            raw, base_dir, out, devices=args.device or [_default_device()], split=args.split,
            time_scale=args.time_scale,
            systems=args.system, checkpoints=args.checkpoints, sets=args.sets, progress=not args.quiet,
            plots=False if args.no_plots else None, force=args.force,
        )
    except KeyboardInterrupt:  # a replay is not resumed: the command that starts it over
        print(f"interrupted: {out}/ holds a partial replay; start it over with: tangram-sim real replay "
              f"{args.experiment} --out {out} --force", file=sys.stderr)
        return 130
    if not args.quiet:
        cols = [c for c in ("system", "requests", "completed", "rejected", "cold_starts", "mean_load_s",
                            "p50_ttft_s", "p99_ttft_s", "bytes_loaded", "full_hit_ratio", "lag_p99_s",
                            "replay_end_s")
                if c in summary.columns]
        print(summary[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        print(f"results in {out}/ (summary.csv, requests/timeline/memory/loads/steps parquet, replay.json"
              f"{'' if args.no_plots else ', plots/, report.md'})")
        print(f"simulate it: tangram-sim run {out}/experiment.sim.yaml --calibration CAL.yaml")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    _require()
    from tangram_sim.real.calibrate import calibrate_experiment
    from tangram_sim.real.replay import load_experiment

    raw, base_dir = load_experiment(args.experiment)
    report = calibrate_experiment(
        raw, base_dir, args.device or _default_device(), checkpoints=args.checkpoints, quick=args.quick,
        sets=args.sets, log=None if args.quiet else (lambda msg: print(msg, flush=True)),
    )
    path = report.write(args.out)
    c = report.calibration
    print(
        f"{path}: {c.device}; h2d {c.h2d_bps / 1e9:.2f} GB/s, d2d {c.d2d_bps / 1e9:.2f} GB/s, "
        f"read {c.read_bps / 1e9:.2f} GB/s, {c.unit_overhead_s * 1e6:.1f} us per unit, engine start "
        f"{c.engine_overhead_s * 1e3:.2f} ms, {len(c.models or {})} model(s) "
        f"({report.measurements['seconds']:.1f} s)"
    )
    return 0

"""Calibrate the simulator from replays on the device (`tangram-sim real calibrate`).

The simulator's time model has a handful of coefficients; each is fitted on what the replay itself
measures, so that a calibrated simulation predicts the replay rather than a datasheet. Calibration
replays small designed traces through the replay's own path (`real.replay.replay_trace`: the
lifecycle of `core` over `RealDevice`s, one arena per GPU of the experiment, each in its own process
when there are several), under each of the experiment's systems, and fits on the replays'
`loads` and `steps` tables:

- `load_overhead_s`, `unit_overhead_s` and the rate one arena's loads reach: least squares of each
  cold start's reads (timed apart from its compaction moves) on `load_overhead (if it reads anything)
  + units x unit_overhead + loaded bytes / rate`, the simulator's load formula, over the starts that
  ran alone; that rate becomes the GPU
  link's (`h2d_bps`, at most the copy benchmark's), and `read_bps`, the node storage that the arenas
  share, their aggregate as the starts that overlapped another arena's reached it (`fit_loads`);
- `engine_overhead_s`: the mean engine build of those starts;
- per model, `prefill_base_s + prefill_per_token_s x tokens` over its prefill steps (one per prefill
  group: the tokens of all its prompts) and `decode_base_s + decode_per_seq_s x (batch - 1) +
  decode_per_kv_token_s x KV tokens` over its decode steps: least squares with an intercept, which
  keeps the steps' mean;
- per model, with a system that executes while loading, each layer block's share of a prefill
  (`prefill_layer_shares`) from the first prefills it ran layer by layer, and the check of the load
  formula against when each layer's bytes were in (`real.layerfit`; residuals under
  `measurements.layers`);
- `layered_load_bps`, with a system that executes while loading: its starts' reads run beside the
  first prefill's compute, which on a CPU shares their cores and memory bandwidth (on the 2-core
  development VM such a start read at 3.0-4.6 GB/s against 5.5-5.7 GB/s for a serial one), so they
  get a rate of their own (`real.layerfit.fit_layered_rate`: their bytes over their read time less
  the serial formula's overheads) and the serial formula above is fitted on serial starts alone (a
  formula fitted over both over-predicted serial loads by 10% and under-predicted layered ones by
  as much, and the difference went straight into the reduction of TTFT that execute-while-load was
  predicted to bring);
- `d2d_bps`, at which the simulator charges compaction moves: the replays' bytes moved over their
  seconds moving (the copy benchmark's rate when fewer than three starts moved anything);
- `peer_bps`, at which it copies a unit from another GPU (a system whose source policy reads GPU
  copies, `real.peers`): the replays' bytes copied from other arenas over their seconds copying (unset
  when fewer than three starts copied anything);
- host->device copies by chunk size (on the CPU a memcpy: the cap of `h2d_bps`) and copies inside the
  device are copy benchmarks, kept under `measurements`.

The designed trace keeps what makes a step's time depend on its context: the experiment's arrival
process (its inter-arrival gaps, resampled), model shares and output lengths, so the arenas are busy
and idle, together or apart, as in the replay (two arenas of one host share its memory bandwidth and
caches; a step after an idle gap finds colder caches than one in a loop). What it designs: prompt
lengths cycle through the trace's percentiles (prefills of chosen lengths, each alone or grouped as
arrivals fall; the other half of them are resampled from the trace, so the fit keeps its mix), and a
closing phase sends each model bursts at chosen batch sizes (decode at chosen batch sizes). The
requests are drawn with their own seed, never the experiment's: a calibration is not fitted on the
requests it is then checked against.

The YAML written holds the `Calibration` fields `tangram-sim run --calibration` reads, plus every raw
figure and each fit's residual under `measurements:` (ignored by the simulator).
"""

from __future__ import annotations

import datetime as dt
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

from tangram_sim.arena import ARENA_ALIGNMENT as ALIGNMENT
from tangram_sim.real.backend import sync
from tangram_sim.real.fits import fit_calibration, fit_linear, fit_loads, fit_steps
from tangram_sim.real.loader import DEFAULT_CHUNK_BYTES, Checkpoint
from tangram_sim.real.memory import driver_info
from tangram_sim.real.replay import torch_threads
from tangram_sim.real.setup import resolve_device
from tangram_sim.sim.systems import SystemSpec, make_system
from tangram_sim.sim.timemodel import Calibration

__all__ = ["CalibrationReport", "calibrate", "calibrate_experiment", "fit_calibration", "fit_linear", "fit_loads",
           "fit_steps"]

MiB = 2**20
MAX_GAP_S = 0.1  # longer idle gaps cost no more (measured on a CPU VM), only calibration time


@dataclass(slots=True)
class CalibrationReport:
    calibration: Calibration  # what the simulator reads
    measurements: dict[str, Any] = field(default_factory=dict)  # raw figures and fit residuals

    def to_yaml(self) -> str:
        data = self.calibration.to_dict()
        data["measurements"] = _plain(self.measurements)
        return yaml.safe_dump(data, sort_keys=False, width=110)

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_yaml())
        return path


def _plain(x: Any) -> Any:
    """YAML-safe: numpy scalars to Python numbers, tuples to lists."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, str):
        return str(x)  # e.g. torch's TorchVersion
    return x


# ------------------------------------------------------------------ bandwidths
def _best_rate(fn: Callable[[], None], nbytes: int, dev: torch.device, repeats: int) -> float:
    fn()  # warm-up (first touch, pinned mappings, kernels)
    sync(dev)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(dev)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best if best > 0 else 0.0


def measure_h2d(dev: torch.device, chunks: Sequence[int], total: int, repeats: int = 3) -> dict[str, dict]:
    """Host->device bytes/s by host memory kind and chunk size (`total` bytes copied per run)."""
    out: dict[str, dict[int, float]] = {}
    kinds = (("pinned", True), ("pageable", False)) if dev.type == "cuda" else (("pageable", False),)
    dst = torch.empty(total, dtype=torch.uint8, device=dev)
    for kind, pin in kinds:
        src = torch.empty(total, dtype=torch.uint8, pin_memory=pin)
        src.fill_(1)
        out[kind] = {}
        for chunk in chunks:
            chunk = min(chunk, total)

            def copy(src: torch.Tensor = src, chunk: int = chunk, pin: bool = pin) -> None:
                for a in range(0, total, chunk):
                    dst[a : a + chunk].copy_(src[a : a + chunk], non_blocking=pin)

            out[kind][chunk] = _best_rate(copy, total, dev, repeats)
        del src
    return out


def measure_d2d(dev: torch.device, chunks: Sequence[int], total: int, repeats: int = 3) -> dict[int, float]:
    """Device-internal copy bytes/s by chunk size (compaction moves are such copies)."""
    buf = torch.empty(2 * total, dtype=torch.uint8, device=dev)
    buf.fill_(1)
    out: dict[int, float] = {}
    for chunk in chunks:
        chunk = min(chunk, total)

        def copy(chunk: int = chunk) -> None:
            for a in range(0, total, chunk):
                buf[total + a : total + a + chunk].copy_(buf[a : a + chunk])

        out[chunk] = _best_rate(copy, total, dev, repeats)
    return out


def _at_chunk(table: dict[int, float], chunk: int) -> float:
    """The figure at the chunk size closest to `chunk` (log scale)."""
    best = min(table, key=lambda c: abs(np.log(c) - np.log(chunk)))
    return table[best]


# ------------------------------------------------------------------ the designed trace
def design_trace(trace: pd.DataFrame | None, models: Sequence[str], *, n: int, batch_sizes: Sequence[int],
                 seed: int) -> pd.DataFrame:
    """The calibration trace (see module docstring): `n` requests following the experiment's arrival
    process, model shares and output lengths (resampled with `seed`), prompts cycling through the
    trace's percentiles, then for each model a burst at each of `batch_sizes`."""
    rng = np.random.default_rng([seed, 0xCA11])
    if trace is not None and len(trace) > 1:
        arrivals = trace["arrival_s"].to_numpy(float)
        gaps = np.diff(arrivals)
        shares = trace["model"].astype(str).value_counts(normalize=True)
        names = [m for m in shares.index if m in models] or list(models)
        p = np.array([shares.get(m, 0.0) for m in names])
        inputs = trace["input_tokens"].to_numpy(float)
        outputs = trace["output_tokens"].to_numpy(int)
        lengths = sorted({max(1, int(round(v))) for v in np.percentile(inputs, [5, 25, 50, 75, 95])})
        burst_len = max(1, int(np.median(inputs)))
        burst_out = int(min(64, max(4, np.median(outputs))))
    else:
        gaps = np.array([0.05])
        names, p = list(models), np.ones(len(models))
        outputs = np.array([8])
        lengths, burst_len, burst_out = [16, 64, 128, 256], 32, 8
    p = p / p.sum()
    picked = rng.choice(len(names), size=n, p=p)
    t = np.cumsum(rng.choice(gaps, size=n))
    # half the prompts at the trace's percentiles (prefills of chosen lengths, the fit's span), half
    # resampled from it (its own mix, so that the least squares keep the mean the replay pays)
    at = np.concatenate([rng.permutation(len(lengths)) for _ in range(-(-n // len(lengths)))])[:n]
    drawn = rng.choice(inputs, size=n) if trace is not None and len(trace) > 1 else np.array(lengths)[at]
    prompt = [lengths[at[i]] if i % 2 else max(1, int(drawn[i])) for i in range(n)]
    rows = [(float(t[i]), names[picked[i]], prompt[i], int(rng.choice(outputs))) for i in range(n)]
    # bursts: one model's requests at one instant; spaced so each batch mostly drains before the next
    gap = float(np.percentile(gaps, 90)) if len(gaps) else 0.05
    now = (t[-1] if n else 0.0) + 2 * gap
    for b in batch_sizes:
        for m in names:
            rows += [(now, m, burst_len, burst_out)] * b
            now += gap * (1 + b / 2)
    frame = pd.DataFrame(rows, columns=["arrival_s", "model", "input_tokens", "output_tokens"])
    frame = frame.sort_values("arrival_s", kind="stable").reset_index(drop=True)
    frame["arrival_s"] -= frame["arrival_s"].iloc[0]
    return frame

# ------------------------------------------------------------------ everything
@dataclass(slots=True)
class _Replays:
    loads: list[pd.DataFrame] = field(default_factory=list)
    steps: list[pd.DataFrame] = field(default_factory=list)
    layers: list[pd.DataFrame] = field(default_factory=list)  # execute-while-load first prefills
    per_system: dict[str, Any] = field(default_factory=dict)


def calibrate(
    ckpts: dict[str, Checkpoint],
    device: str | torch.device = "cpu",
    *,
    systems: Sequence[SystemSpec] | None = None,
    capacity: int | None = None,
    arenas: int = 1,
    trace: pd.DataFrame | None = None,
    quick: bool = False,
    loader: dict[str, Any] | None = None,
    threads: int | None = None,
    processes: bool | None = None,
    seed: int = 0,
    log: Callable[[str], Any] | None = None,
    keep: dict[str, Any] | None = None,
) -> CalibrationReport:
    """Measure everything the simulator's time model needs on `device` for these checkpoints, by
    replaying designed traces (see module docstring) under each of `systems` on `arenas` arenas of
    `capacity` bytes. `trace` (the experiment's, as the simulator sees it) shapes them; `quick` takes
    fewer requests. `keep`, when given, receives each system's designed trace and replay
    (`keep[name] = (trace, ReplayResult)`)."""
    from tangram_sim.real.replay import replay_trace

    dev = resolve_device(device)
    say = log or (lambda _msg: None)
    systems = list(systems or [make_system(p, p) for p in ("serverlessllm", "tangram")])
    loader = dict(loader or {})
    chunk = int(loader.get("chunk_bytes", DEFAULT_CHUNK_BYTES))
    if capacity is None:
        cuda_free = torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else 0
        total_bytes = sum(c.spec.weight_bytes for c in ckpts.values())
        capacity = int(0.9 * cuda_free / arenas) if cuda_free else int(total_bytes * 1.25)
    t_start = time.perf_counter()
    with torch_threads(threads):
        cuda = dev.type == "cuda"
        size = (256 if cuda else 32) * MiB if not quick else 16 * MiB
        chunks = [c * MiB for c in ((1, 4, 16, 64) if not quick else (1, 4, 16))]
        say(f"host->device copies ({size // MiB} MiB per run, chunks {', '.join(str(c // MiB) for c in chunks)} MiB)")
        h2d = measure_h2d(dev, chunks, size)
        h2d_bps = _at_chunk(h2d["pinned" if cuda else "pageable"], chunk)
        say("device->device copies")
        d2d = measure_d2d(dev, chunks, size)
        d2d_bps = max(d2d.values())
    max_batch = max(s.max_batch for s in systems)
    batch_sizes = [b for b in (1, 2, 4, 8, 16) if b <= max_batch] or [1]
    n = len(trace) if trace is not None and len(trace) else 200
    n = max(40, min(n, 120 if quick else 240))
    design = design_trace(trace, list(ckpts), n=n, batch_sizes=batch_sizes, seed=seed + 1)
    replays = _Replays()
    for system in systems:
        say(f"replay of {len(design)} designed requests under {system.name} on {arenas} arena(s) of "
            f"{capacity / 1e6:.2f} MB")
        r = replay_trace(ckpts, design, system, devices=[dev] * arenas, capacity=capacity, seed=seed + 1,
                         threads=threads, processes=processes, **loader)
        if keep is not None:
            keep[system.name] = (design, r)
        loads = r.loads.assign(system=system.name, load_s=r.loads["move_s"] + r.loads["copy_s"] + r.loads["read_s"],
                               layered=bool(system.execute_while_load))
        replays.loads.append(loads)
        replays.steps.append(r.steps.assign(system=system.name))
        if len(r.layers):
            replays.layers.append(r.layers.assign(system=system.name))
        replays.per_system[system.name] = {
            "requests": int(r.summary["requests"]), "cold_starts": int(r.summary["cold_starts"]),
            "mean_load_s": float(r.summary["mean_load_s"]), "p50_ttft_s": float(r.summary["p50_ttft_s"]),
            "lag_p99_s": float(r.summary["lag_p99_s"]), "wall_s": float(r.wall_s)}
    loads = pd.concat(replays.loads, ignore_index=True)
    steps = pd.concat(replays.steps, ignore_index=True)
    layers = pd.concat(replays.layers, ignore_index=True) if replays.layers else None
    info = driver_info(dev)
    cal, fits = fit_calibration(loads, steps, layers, ckpts, h2d_bps=h2d_bps, d2d_bps=d2d_bps, arenas=arenas,
                                label=f"{dev} ({info.get('card') or platform.machine()})")
    measurements = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "device_info": info,
        "seconds": time.perf_counter() - t_start,
        "quick": quick,
        "loader": dict(loader),
        "threads": threads if threads is not None else torch.get_num_threads(),
        "arenas": arenas,
        "design": {"requests": len(design), "batch_sizes": batch_sizes, "seed": seed + 1,
                   "prompt_tokens": sorted(int(v) for v in design["input_tokens"].unique())},
        "replays": replays.per_system,
        "h2d_bps_by_chunk": h2d,
        "h2d_copy_bps": float(h2d_bps),
        "device_load_bps": fits["device_load_bps"],
        "d2d_bps_by_chunk": d2d,
        "loads": {**fits["loads"], "capacity_bytes": capacity},
        "models": fits["models"],
    }
    for key in ("layers", "layered_loads"):
        if key in fits:
            measurements[key] = fits[key]
    return CalibrationReport(cal, measurements)


def calibrate_experiment(
    raw: dict[str, Any],
    base_dir: Path | None,
    device: str,
    *,
    checkpoints: str | Path | None = None,
    work_dir: Path | None = None,
    quick: bool = False,
    sets: Sequence[str] = (),
    log: Callable[[str], Any] | None = None,
) -> CalibrationReport:
    """Calibrate for an experiment: its models (checkpoint folders, or made at `real.scale` into
    `work_dir`), its systems, its arena size (cluster.gpu_memory_gib) and its trace."""
    import tempfile

    from tangram_sim.experiments.runner import prepare
    from tangram_sim.real.loader import open_checkpoint
    from tangram_sim.real.setup import _checkpoints, loader_options
    from tangram_sim.sim.hardware import GiB
    from tangram_sim.traces.spec import load_trace

    if checkpoints is not None:
        raw = {**raw, "real": {**(raw.get("real") or {}), "checkpoints": str(Path(checkpoints).resolve())}}
    _, points = prepare(raw, base_dir, sets)
    config = points[0]["config"]
    real = config.get("real") or {"scale": "tiny", "time_scale": 1.0}
    from tangram_sim.experiments.config import build_systems

    systems = build_systems(config)
    with tempfile.TemporaryDirectory(prefix="tangram-calibrate-") as tmp:
        paths = _checkpoints(config, base_dir, work_dir or Path(tmp), real)
        ckpts = {name: open_checkpoint(p) for name, p in paths.items()}
        mem = config["cluster"].get("gpu_memory_gib")
        capacity = None if mem is None else int(mem * GiB) - int(mem * GiB) % ALIGNMENT
        trace = load_trace(config["trace"], [m["name"] for m in config["models"]], config["seed"], base_dir)
        arenas = int(config["cluster"]["nodes"]) * int(config["cluster"]["gpus_per_node"])
        return calibrate(ckpts, device, systems=systems, capacity=capacity, arenas=arenas, trace=trace,
                         quick=quick, loader=loader_options(real), threads=real.get("threads"),
                         processes=real.get("processes"), seed=int(config["seed"]), log=log)

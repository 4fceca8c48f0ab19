"""Calibrate the simulator from measurements on one device (`tangram-sim real calibrate`).

The simulator's time model has a handful of coefficients; each is measured here the way the replay
will pay it, so that a calibrated simulation predicts the replay rather than a datasheet:

- `h2d_bps`: host->device copies (pinned and pageable, by chunk size; on the CPU a memcpy), the figure
  at the loader's chunk size; `d2d_bps`: copies inside the device (compaction);
- `read_bps` and `unit_overhead_s`: a least-squares fit of `RealGpu.start_instance` wall times to
  `units x unit_overhead + loaded bytes / read_bps + moved bytes / d2d_bps`, the simulator's load
  formula, over instance starts that follow the experiment's own policies, arena size and model mix;
- `engine_overhead_s`: the mean time to bind an engine to the arena views after such a start;
- per model, `prefill_base_s + prefill_per_token_s x tokens` at prompt lengths spread over the trace's,
  and `decode_base_s + decode_per_seq_s x (batch - 1) + decode_per_kv_token_s x KV tokens` at several
  batch sizes and KV lengths: least squares (on relative errors) over the wall time of
  `RealGpu.prefill` / `decode_step`.

Context matters as much as the operation: a start or a prefill timed in a tight loop of identical
calls finds warm caches that no replay gives it (on a CPU device it runs up to 2x faster). So each
start waits an idle gap drawn from the trace's inter-arrival times and is followed by an engine build,
a prefill and decode steps, as a cold start in the replay is; prefills are timed right after an
instance start and after such a gap; decode steps run back to back, as in a batch.

The YAML written holds the `Calibration` fields `tangram-sim run --calibration` reads, plus every raw
measurement under `measurements:` (ignored by the simulator) so a calibration can be audited.
"""

from __future__ import annotations

import datetime as dt
import gc
import platform
import random
import statistics
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
from tangram_sim.core.run import kv_policy as _kv_policy
from tangram_sim.errors import ConfigError
from tangram_sim.policies import PACKING, RETENTION
from tangram_sim.real.executor import RealGpu, resolve_device
from tangram_sim.real.loader import DEFAULT_CHUNK_BYTES, Checkpoint
from tangram_sim.real.memory import driver_info
from tangram_sim.real.replay import torch_threads
from tangram_sim.sim.systems import SystemSpec, make_system
from tangram_sim.sim.timemodel import Calibration, ModelCoefficients

__all__ = ["CalibrationReport", "calibrate", "calibrate_experiment", "fit_linear"]

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


def fit_linear(x: np.ndarray, y: np.ndarray, nonneg: bool = True,
               relative: bool = False) -> tuple[np.ndarray, float]:
    """Least squares y ~ x @ c (no implicit intercept), coefficients clipped to >= 0 by refitting
    without the negative ones (an active-set NNLS that is exact for the few columns used here).

    `relative` minimises relative rather than absolute errors, so that a convex curve (prefill of
    long prompts) does not pull the fit away from the short, common cases. Returns (c, relative RMS
    residual)."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    w = 1.0 / np.maximum(y, 1e-12) if relative else np.ones_like(y)
    active = list(range(x.shape[1]))
    coef = np.zeros(x.shape[1])
    while active:
        sol = np.linalg.lstsq(x[:, active] * w[:, None], y * w, rcond=None)[0]
        if not nonneg or (sol >= 0).all():
            coef[:] = 0
            coef[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    resid = y - x @ coef
    scale = float(np.sqrt(np.mean(y**2))) or 1.0
    return coef, float(np.sqrt(np.mean(resid**2)) / scale)


# ------------------------------------------------------------------ bandwidths
def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _best_rate(fn: Callable[[], None], nbytes: int, dev: torch.device, repeats: int) -> float:
    fn()  # warm-up (first touch, pinned mappings, kernels)
    _sync(dev)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(dev)
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


# ------------------------------------------------------------------ loads and engine starts
def _system_key(s: SystemSpec) -> tuple:
    return (s.granularity, s.min_unit_bytes, s.unit_divisor, s.retention, s.packing, s.kv, s.kv_fraction,
            s.kv_block_tokens)


def measure_loads(
    ckpts: dict[str, Checkpoint],
    dev: torch.device,
    systems: Sequence[SystemSpec],
    capacity: int,
    *,
    starts: int,
    weights: dict[str, float] | None = None,
    gaps: Sequence[float] = (),
    seed: int = 0,
    decode_steps: int = 4,
    loader: dict[str, Any] | None = None,
) -> pd.DataFrame:
    """Instance starts under each distinct policy set: one row per start (units, bytes, seconds).

    Models are drawn with the experiment's request shares; each start is followed by an engine build,
    a prefill and `decode_steps` decode steps (the trace's mean output length: the work an instance
    does), then the instance ends, as a cold start in the replay is. With `gaps` (the trace's
    inter-arrival times) every other start first waits one drawn at random: in a replay a start
    follows either another model's batch or idleness, and both leave colder caches than a tight loop
    of identical starts (on a CPU device up to 2x slower).
    """
    names = list(ckpts)
    w = [float((weights or {}).get(n, 1.0)) for n in names]
    rows = []
    seen: set[tuple] = set()
    for system in systems:
        key = _system_key(system)
        if key in seen:
            continue
        seen.add(key)
        rng = random.Random(seed)
        retention = RETENTION.create(system.retention) if system.retention != "next-use" else "lru"
        gpu = RealGpu(dev, capacity, system.granularity, retention, PACKING.create(system.packing),
                      _kv_policy(system), alignment=ALIGNMENT, min_unit_bytes=system.min_unit_bytes,
                      unit_divisor=system.unit_divisor, **(loader or {}))
        try:
            for i in range(starts + 2):
                name = rng.choices(names, w)[0]
                now = float(i)
                if gaps and i % 2:
                    _idle(rng.choice(gaps))
                stats = gpu.start_instance(ckpts[name], now=now)
                t1 = time.perf_counter()
                gpu.engine(name)
                t2 = time.perf_counter()
                step = gpu.prefill(name, [1] * 16, now=now)
                for _ in range(decode_steps):
                    gpu.decode_step(step.rids, now=now)
                gpu.end_instance(name)
                if i >= 2:  # the first starts warm the process up
                    # the device's part of the start, as the replay's device measures it: compaction
                    # copies and reads (the packing plan is the lifecycle's bookkeeping, not device time)
                    rows.append((system.name, name, stats.units_loaded, stats.loaded_bytes, stats.moved_bytes,
                                 stats.move_s + stats.load_s, t2 - t1))
        finally:
            gpu.close()
    return pd.DataFrame(rows, columns=["system", "model", "units_loaded", "loaded_bytes", "moved_bytes",
                                       "load_s", "engine_s"])


def _idle(seconds: float) -> None:
    """Wait like the replay does between events (sleep, then spin the last 2 ms)."""
    end = time.perf_counter() + seconds
    while True:
        left = end - time.perf_counter()
        if left <= 0:
            return
        if left > 0.002:
            time.sleep(left - 0.001)


def fit_loads(loads: pd.DataFrame, d2d_bps: float, h2d_bps: float) -> tuple[float, float, dict[str, Any]]:
    """(unit_overhead_s, read_bps, details) of the simulator's load formula over the measured starts.

    Moves are charged at the measured d2d rate; a fitted read rate above h2d is capped there, because
    the simulator streams loads at min(read, h2d), and the per-unit term is refitted under the cap.
    """
    y = loads["load_s"].to_numpy() - loads["moved_bytes"].to_numpy() / d2d_bps
    x = np.c_[loads["units_loaded"].to_numpy(float), loads["loaded_bytes"].to_numpy(float)]
    (unit, per_byte), rel = fit_linear(x, y)
    if per_byte <= 0 or 1.0 / per_byte > h2d_bps:
        per_byte = 1.0 / h2d_bps
        (unit,), rel = fit_linear(x[:, :1], y - x[:, 1] * per_byte)
    pred = x @ np.array([unit, per_byte]) + loads["moved_bytes"].to_numpy() / d2d_bps
    per_system = {}
    for name, idx in loads.groupby("system").groups.items():
        real = float(loads.loc[idx, "load_s"].mean())
        fitted = float(pred[loads.index.get_indexer(idx)].mean())
        per_system[name] = {"mean_load_s": real, "fit_mean_load_s": fitted, "starts": len(idx)}
    details = {"starts": len(loads), "rel_rms_residual": rel, "per_system": per_system}
    return float(unit), float(1.0 / per_byte), details


# ------------------------------------------------------------------ prefill and decode
def _positions(values: Sequence[float], lo: int, hi: int) -> list[int]:
    return sorted({int(min(hi, max(lo, round(v)))) for v in values})


def measure_model(
    ckpt: Checkpoint,
    dev: torch.device,
    system: SystemSpec,
    *,
    prompt_lengths: Sequence[int],
    batch_sizes: Sequence[int],
    kv_lengths: Sequence[int],
    repeats: int,
    steps: int,
    gaps: Sequence[float] = (),
    loader: dict[str, Any] | None = None,
) -> tuple[ModelCoefficients, dict[str, Any]]:
    """Prefill and decode wall times of one model on an arena of its own; the fitted coefficients.

    Prefills are timed in turn in the two situations a replay runs them in: right after an instance
    start (weights just loaded, engine just built) and after other work or idleness (with `gaps`, an
    idle gap drawn from the trace's inter-arrival times), never in a tight loop of identical prefills,
    whose warm caches no replay has; decode steps run back to back, as in a batch.
    """
    spec = ckpt.spec
    vocab = int(spec.arch.vocab_size) if spec.arch and spec.arch.vocab_size else 0
    if vocab <= 0:
        raise ConfigError(f"{ckpt.path}: vocabulary size unknown, expected a decoder checkpoint")
    longest = max(max(prompt_lengths), max(kv_lengths) + steps + 1)
    kv_bytes = spec.kv_bytes_per_token * (max(batch_sizes) * (longest + 2 * system.kv_block_tokens))
    capacity = spec.weight_bytes + kv_bytes + 2 * MiB
    # no retention: the "after a start" prefills follow a real load of the weights, as a cold start's
    gpu = RealGpu(dev, capacity, system.granularity, "none", "first-fit", "elastic", alignment=ALIGNMENT,
                  min_unit_bytes=system.min_unit_bytes, unit_divisor=system.unit_divisor, **(loader or {}))
    rng = np.random.default_rng(0)
    pick = random.Random(0)
    contexts = ("start", "idle") if gaps else ("start", "busy")
    name = ckpt.name
    prefill: list[tuple[int, float]] = []  # (prompt tokens, seconds)
    decode: list[tuple[int, int, float, float]] = []  # (batch, prompt tokens, KV tokens, seconds)
    try:
        gpu.start_instance(ckpt, now=0.0)
        gpu.engine(name)
        for _ in range(2):  # warm-up
            s = gpu.prefill(name, rng.integers(0, vocab, 16).tolist())
            gpu.decode_step(s.rids)
            gpu.finish(s.rids[0])
        for rep in range(repeats):
            for k, n in enumerate(prompt_lengths):
                prompt = rng.integers(0, vocab, n).tolist()
                context = contexts[(rep + k) % len(contexts)]
                if context == "start":
                    gpu.end_instance(name)
                    gpu.start_instance(ckpt, now=0.0)
                    gpu.engine(name)
                elif context == "idle":
                    _idle(pick.choice(gaps))
                t0 = time.perf_counter()
                s = gpu.prefill(name, prompt)
                prefill.append((n, time.perf_counter() - t0))
                gpu.finish(s.rids[0])
        for b in batch_sizes:
            for n in kv_lengths:
                rids = [gpu.prefill(name, rng.integers(0, vocab, n).tolist()).rids[0] for _ in range(b)]
                for k in range(steps):
                    t0 = time.perf_counter()
                    gpu.decode_step(rids)
                    decode.append((b, n, float(b * (n + k)), time.perf_counter() - t0))
                for r in rids:
                    gpu.finish(r)
    finally:
        gpu.close()
    p = np.array(prefill)
    (p_base, p_tok), p_rel = fit_linear(np.c_[np.ones(len(p)), p[:, 0]], p[:, 1], relative=True)
    d = np.array(decode)
    (d_base, d_seq, d_kv), d_rel = fit_linear(np.c_[np.ones(len(d)), d[:, 0] - 1, d[:, 2]], d[:, 3],
                                              relative=True)
    coeffs = ModelCoefficients(float(p_base), float(p_tok), float(d_base), float(d_seq), float(d_kv))
    prefill_by = {int(n): float(statistics.mean(t for m, t in prefill if m == n)) for n in prompt_lengths}
    decode_by = {
        f"batch {b}, prompt {n}": float(statistics.mean(t for bb, nn, _, t in decode if (bb, nn) == (b, n)))
        for b in batch_sizes
        for n in kv_lengths
    }
    details = {
        "prefill_mean_s_by_tokens": prefill_by,
        "prefill_rel_rms_residual": p_rel,
        "decode_mean_s_by_batch_kv": decode_by,
        "decode_rel_rms_residual": d_rel,
        "samples": {"prefill": len(prefill), "decode": len(decode)},
    }
    return coeffs, details


# ------------------------------------------------------------------ everything
def calibrate(
    ckpts: dict[str, Checkpoint],
    device: str | torch.device = "cpu",
    *,
    systems: Sequence[SystemSpec] | None = None,
    capacity: int | None = None,
    trace: pd.DataFrame | None = None,
    quick: bool = False,
    loader: dict[str, Any] | None = None,
    threads: int | None = None,
    log: Callable[[str], Any] | None = None,
) -> CalibrationReport:
    """Measure everything the simulator's time model needs on `device` for these checkpoints.

    `systems`, `capacity` and `trace` (the experiment's) make the load and compute measurements follow
    the experiment: its policies and arena size, its model mix, its prompt lengths and batch sizes.
    `quick` takes fewer samples (CI). Returns the calibration and the raw measurements.
    """
    dev = resolve_device(device)
    say = log or (lambda _msg: None)
    systems = list(systems or [make_system(p, p) for p in ("serverlessllm", "tangram")])
    loader = dict(loader or {})
    chunk = int(loader.get("chunk_bytes", DEFAULT_CHUNK_BYTES))
    total_bytes = sum(c.spec.weight_bytes for c in ckpts.values())
    if capacity is None:
        cuda_free = torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else 0
        capacity = int(0.9 * cuda_free) if cuda_free else int(total_bytes * 1.25)
    gc_was = gc.isenabled()
    gc.collect()
    gc.disable()  # as in the replay: no collection pauses inside the timed calls
    t_start = time.perf_counter()
    try:
        with torch_threads(threads):
            cuda = dev.type == "cuda"
            size = (256 if cuda else 32) * MiB if not quick else 16 * MiB
            chunks = [c * MiB for c in ((1, 4, 16, 64) if not quick else (1, 4, 16))]
            sizes = ", ".join(str(c // MiB) for c in chunks)
            say(f"host->device copies ({size // MiB} MiB per run, chunks {sizes} MiB)")
            h2d = measure_h2d(dev, chunks, size)
            h2d_bps = _at_chunk(h2d["pinned" if cuda else "pageable"], chunk)
            say("device->device copies")
            d2d = measure_d2d(dev, chunks, size)
            d2d_bps = max(d2d.values())

            weights = None
            gaps: list[float] = []
            work = 8  # decode steps after each start
            if trace is not None and len(trace):
                weights = trace["model"].astype(str).value_counts(normalize=True).to_dict()
                gaps = np.diff(trace["arrival_s"].to_numpy(float)).clip(0, MAX_GAP_S).tolist()
                work = int(min(64, max(1, round(float(trace["output_tokens"].mean())))))
            starts = 40 if quick else 120
            say(f"instance starts ({starts} per policy set, arena {capacity / 1e6:.2f} MB"
                + (f", after idle gaps of {np.mean(gaps) * 1e3:.1f} ms on average)" if gaps else ")"))
            loads = measure_loads(ckpts, dev, systems, capacity, starts=starts, weights=weights, gaps=gaps,
                                  decode_steps=work, loader=loader)
            unit_overhead, read_bps, load_fit = fit_loads(loads, d2d_bps, h2d_bps)
            engine = loads.groupby("model")["engine_s"].mean().to_dict()
            engine_overhead = float(loads["engine_s"].mean())

            if trace is not None and len(trace):
                inp = trace["input_tokens"].to_numpy(float)
                out = trace["output_tokens"].to_numpy(float)
                prompt_lengths = _positions(np.percentile(inp, [5, 25, 50, 75, 95]), 1, 4096)
                kv_lengths = _positions(np.percentile(inp + out / 2, [10, 50, 90]), 1, 4096)
            else:
                prompt_lengths, kv_lengths = [16, 64, 128, 256, 512], [32, 128, 512]
            max_batch = max(s.max_batch for s in systems)
            batch_sizes = [b for b in (1, 2, 4, 8, 16, 32, 64) if b <= max_batch] or [1]
            repeats, steps = 8, 8  # cheap next to the starts; fewer samples make the fits noisy
            models: dict[str, ModelCoefficients] = {}
            per_model: dict[str, Any] = {}
            for name, ckpt in ckpts.items():
                say(f"prefill and decode of {name} (prompts {prompt_lengths}, batches {batch_sizes}, "
                    f"KV {kv_lengths})")
                coeffs, details = measure_model(ckpt, dev, systems[-1], prompt_lengths=prompt_lengths,
                                                batch_sizes=batch_sizes, kv_lengths=kv_lengths,
                                                repeats=repeats, steps=steps, gaps=gaps, loader=loader)
                models[name] = coeffs
                per_model[name] = {**details, "engine_s": float(engine.get(name, engine_overhead))}
    finally:
        if gc_was:
            gc.enable()
    info = driver_info(dev)
    label = f"{dev} ({info.get('card') or platform.machine()})"
    cal = Calibration(device=label, h2d_bps=float(h2d_bps), d2d_bps=float(d2d_bps),
                      unit_overhead_s=unit_overhead, engine_overhead_s=engine_overhead, models=models,
                      read_bps=read_bps)
    measurements = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "device_info": info,
        "seconds": time.perf_counter() - t_start,
        "quick": quick,
        "loader": {k: v for k, v in loader.items()},
        "threads": threads if threads is not None else torch.get_num_threads(),
        "idle_gap_mean_s": float(np.mean(gaps)) if gaps else 0.0,
        "h2d_bps_by_chunk": h2d,
        "d2d_bps_by_chunk": d2d,
        "loads": {**load_fit, "capacity_bytes": capacity,
                  "mean_load_s": float(loads["load_s"].mean()),
                  "mean_units_loaded": float(loads["units_loaded"].mean()),
                  "mean_loaded_bytes": float(loads["loaded_bytes"].mean())},
        "models": per_model,
    }
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
        return calibrate(ckpts, device, systems=systems, capacity=capacity, trace=trace, quick=quick,
                         loader=loader_options(real), threads=real.get("threads"), log=log)

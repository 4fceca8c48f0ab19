"""An experiment made ready to replay: devices and arenas, checkpoints, the compressed trace, and
experiment.sim.yaml (the same experiment for `tangram-sim run`).

The trace is the experiment's own (`load_trace`), time-compressed by the time scale: arrivals are
divided by it and everything else runs as fast as the devices allow, so `experiment.sim.yaml` (the
checkpoints as models, one node with one GPU per replay arena of the arena's size, no host cache since
every real load reads the files, and the trace's `rate_scale` multiplied by the time scale) simulates
what was replayed.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from tangram_sim.arena import ARENA_ALIGNMENT
from tangram_sim.errors import CapacityError, ConfigError
from tangram_sim.experiments.config import build_systems, dump_yaml
from tangram_sim.models.catalog import list_models
from tangram_sim.real.checkpoints import SCALES, Derivation, make_checkpoint, make_derived_checkpoint
from tangram_sim.real.loader import DEFAULT_CHUNK_BYTES, Checkpoint, open_checkpoint
from tangram_sim.sim.hardware import GiB
from tangram_sim.sim.systems import SystemSpec
from tangram_sim.traces.spec import load_trace, resolve_path

__all__ = ["ReplaySetup", "check_fits", "checkpoint_dirs", "default_capacity", "loader_options", "prepare_replay",
           "replay_devices", "resolve_device"]


def resolve_device(device: str | torch.device) -> torch.device:
    """A usable torch device, or a one-line ConfigError (e.g. `cuda` on a machine without CUDA)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {device!r} is unknown, expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r}: CUDA is not available here, expected --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r}: only {torch.cuda.device_count()} CUDA devices")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise ConfigError(f"device {device!r}: expected cpu or cuda[:N]")
    return dev


def checkpoint_dirs(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Expand each path: a checkpoint folder as is, a folder of checkpoint folders to its children."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir() and not any(p.glob("*.safetensors")):
            children = sorted(c for c in p.iterdir() if c.is_dir() and any(c.glob("*.safetensors")))
            if children:
                out += children
                continue
        out.append(p)
    return out


@dataclass(slots=True)
class ReplaySetup:
    """An experiment made ready to replay: checkpoints on disk, the compressed trace, the systems."""

    config: dict[str, Any]  # validated config of the (single) point
    base_dir: Path | None  # where the experiment's relative paths resolve
    out_dir: Path  # results folder
    devices: list[torch.device]  # one per replay GPU (an arena); a card split N ways appears N times
    capacity: int  # bytes of each arena
    time_scale: float  # arrivals are divided by this
    ckpts: dict[str, Checkpoint]  # model name -> checkpoint
    trace: pd.DataFrame  # compressed trace (the simulator gets the same with rate_scale)
    systems: list[SystemSpec]  # systems to replay, in config order
    sim_config: dict[str, Any]  # experiment.sim.yaml
    real: dict[str, Any] = field(default_factory=dict)  # the `real:` section with defaults
    notes: list[str] = field(default_factory=list)  # what was changed to make it replayable


def _derivation(m: dict[str, Any], where: str) -> Derivation:
    d = m["derive"]
    if "share" in d:
        raise ConfigError(f"{where}.derive.share: the replay makes fine-tunes with share_first_layers only")
    return Derivation(m["name"], d["base"], float(d.get("share_first_layers", 0.5)))


def _reusable(folder: Path, provenance: dict[str, Any], dtype: str | None) -> bool:
    """A checkpoint made earlier with the same recipe (skips regenerating full-size weights)."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    if not any(folder.glob("*.safetensors")) or cfg.get("tangram_generated") != provenance:
        return False
    return dtype is None or cfg.get("torch_dtype") == dtype


def _checkpoints(config: dict[str, Any], base_dir: Path | None, ckpt_dir: Path,
                 real: dict[str, Any]) -> dict[str, Path]:
    """Model name -> checkpoint folder: given ones, a `real.checkpoints` folder, or made on the fly."""
    catalog = set(list_models())
    scale = real.get("scale", "tiny")
    if scale not in SCALES:
        raise ConfigError(f"real.scale: expected one of {', '.join(SCALES)}, got {scale!r}")
    dtype = real.get("dtype")
    folder = real.get("checkpoints")
    out: dict[str, Path] = {}
    for i, m in enumerate(config["models"]):
        where = f"models.{i}"
        name = m["name"]
        if m.get("tensor_parallel", 1) != 1:
            raise ConfigError(f"{where}.tensor_parallel: tensor-parallel replay is not supported, expected 1")
        if m.get("checkpoint"):
            out[name] = Path(m["checkpoint"])
        elif folder is not None:
            out[name] = Path(folder) / name
            if not out[name].is_dir():
                raise ConfigError(f"real.checkpoints: no folder {out[name]} for model {name!r}")
        elif "derive" in m:
            d = _derivation(m, where)
            prov = {"model": d.name, "scale": scale, "seed": 0, "base": d.base, "fraction": d.fraction}
            if d.base not in catalog:
                raise ConfigError(f"{where}.derive.base: {d.base!r} is not a catalog model to make")
            path = ckpt_dir / d.name
            if not _reusable(path, prov, _config_dtype(dtype)):
                make_derived_checkpoint(d, ckpt_dir, scale, dtype=dtype)
            out[name] = path
        elif name in catalog:
            prov = {"model": name, "scale": scale, "seed": 0, "base": None}
            path = ckpt_dir / name
            if not _reusable(path, prov, _config_dtype(dtype)):
                make_checkpoint(name, ckpt_dir, scale, dtype=dtype)
            out[name] = path
        else:
            p = Path(name).expanduser()
            p = p if p.is_absolute() or base_dir is None else base_dir / p
            if not p.is_dir():
                raise ConfigError(
                    f"{where}.name: {name!r} is neither a catalog model nor a checkpoint folder"
                )
            out[name] = p
    return out


def _config_dtype(dtype: str | None) -> str | None:
    if dtype is None:
        return None
    return {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}.get(dtype.lower(), dtype.lower())


def _sim_config(config: dict[str, Any], base_dir: Path | None, out_dir: Path, paths: dict[str, Path],
                capacity: int, gpus: int, time_scale: float, real: dict[str, Any]) -> dict[str, Any]:
    """The same experiment for `tangram-sim run`: checkpoints as models, one GPU per arena of its size,
    no host checkpoint cache (every real load reads the files), the compressed trace; the loader
    settings stay in `real:` so that `real calibrate` on this file loads the way the replay did."""
    cluster = copy.deepcopy(config["cluster"])
    cluster.update(nodes=1, gpus_per_node=gpus, gpu_memory_gib=capacity / GiB)
    cluster["tiers"] = {**cluster["tiers"], "host_cache_gib": 0.0, "ssd_holds_all": True}
    cluster["decode_admission"] = "step"  # the real engine admits arrivals when its decode step ends
    models = []
    for m in config["models"]:
        path = paths[m["name"]].resolve()
        try:
            rel = os.path.relpath(path, out_dir.resolve())
        except ValueError:  # another drive (Windows)
            rel = str(path)
        entry: dict[str, Any] = {"name": m["name"], "checkpoint": rel}
        if m.get("sensitivity", 1.0) != 1.0:
            entry["sensitivity"] = m["sensitivity"]
        models.append(entry)
    trace = copy.deepcopy(config["trace"])
    trace["rate_scale"] = float(trace.get("rate_scale", 1.0)) * time_scale
    for key in ("path", "token_source"):
        if trace.get(key):
            trace[key] = str(resolve_path(trace[key], base_dir, f"trace.{key}").resolve())
    description = (f"Simulation of the real replay of {config['name']} (time scale {time_scale:g}): "
                   "run with --calibration from `tangram-sim real calibrate`.")
    out = {
        "name": config["name"],
        "seed": config["seed"],
        "description": description,
        "cluster": cluster,
        "models": models,
        "trace": trace,
        "systems": copy.deepcopy(config["systems"]),
        "outputs": copy.deepcopy(config["outputs"]),
    }
    loader = {k: real[k] for k in ("readers", "chunk_mb", "staging", "threads", "processes")
              if real.get(k) is not None}
    if loader:
        out["real"] = loader
    return out


def replay_devices(devices: Sequence[str], split: int = 1) -> list[torch.device]:
    """One torch device per replay GPU: `cuda` alone means every visible card; `split` carves each
    device into that many arenas (for a replay of N GPUs on one card)."""
    if split < 1:
        raise ConfigError(f"--split {split}: expected a positive number of arenas per device")
    out: list[torch.device] = []
    for name in devices:
        for part in str(name).split(","):
            part = part.strip()
            if part == "cuda" and torch.cuda.is_available():
                out += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
            else:
                out.append(resolve_device(part))
    if not out:
        raise ConfigError("--devices: expected at least one device, e.g. cpu or cuda:0,cuda:1")
    return [d for d in out for _ in range(split)]


def default_capacity(devs: Sequence[torch.device], option: str) -> int:
    """Arena bytes when none is given: 90% of each card's free memory shared by the arenas carved out of
    it (the smallest share over the cards); the CPU has no such figure (a one-line error naming `option`)."""
    if any(d.type != "cuda" for d in devs):
        raise ConfigError(f"{option}: required for a replay on the CPU (the arena's size)")
    capacity = min(int(0.9 * torch.cuda.mem_get_info(d)[0]) // list(devs).count(d) for d in set(devs))
    return capacity - capacity % ARENA_ALIGNMENT


def prepare_replay(
    raw: dict[str, Any],
    base_dir: Path | None,
    out_dir: Path,
    *,
    devices: Sequence[str] = ("cpu",),
    split: int = 1,
    time_scale: float | None = None,
    systems: Sequence[str] | None = None,
    checkpoints: str | Path | None = None,
    sets: Sequence[str] = (),
    claim: Callable[[dict[str, Any], list[torch.device]], Any] | None = None,
) -> ReplaySetup:
    """Validate, make (or find) the checkpoints, build the compressed trace, write experiment.sim.yaml.

    `claim(config, devices)` is called once everything is validated and before anything is written
    into `out_dir` (the run directory's writer checks and claims the folder there); if it returns a
    writer, experiment.sim.yaml goes through its `write_text`."""
    from tangram_sim.experiments.runner import prepare

    devs = replay_devices(devices, split)
    if checkpoints is not None:
        raw = {**raw, "real": {**(raw.get("real") or {}), "checkpoints": str(Path(checkpoints).resolve())}}
    if time_scale is not None:
        if not time_scale > 0:
            raise ConfigError(f"--time-scale {time_scale}: expected a positive number")
        raw = {**raw, "real": {**(raw.get("real") or {}), "time_scale": float(time_scale)}}
    _, points = prepare(raw, base_dir, sets)
    if len(points) != 1:
        raise ConfigError(
            f"sweep: the replay runs one point, got {len(points)}; pick one with --set KEY=VALUE"
        )
    config = points[0]["config"]
    real = config.get("real") or {"scale": "tiny", "time_scale": 1.0}
    c = config["cluster"]
    notes = []
    if c["nodes"] * c["gpus_per_node"] != len(devs):
        notes.append(f"replaying on {len(devs)} device(s): cluster.nodes x gpus_per_node = "
                     f"{c['nodes']} x {c['gpus_per_node']} becomes 1 x {len(devs)} in experiment.sim.yaml")
    tiers = c.get("tiers") or {}
    if tiers.get("host_cache_gib"):
        notes.append("cluster.tiers.host_cache_gib: the replay reads every unit from its files; "
                     "experiment.sim.yaml has no host cache")
    all_systems = build_systems(config)
    if systems:
        names = [s.name for s in all_systems]
        missing = [s for s in systems if s not in names]
        if missing:
            raise ConfigError(
                f"--system {missing[0]!r}: not in the experiment, expected one of {', '.join(names)}"
            )
        keep = [i for i, s in enumerate(all_systems) if s.name in systems]
        config = {**config, "systems": [config["systems"][i] for i in keep]}
        all_systems = [all_systems[i] for i in keep]
    for system in all_systems:
        check_replayable(system)
    writer = claim(config, devs) if claim is not None else None
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = _checkpoints(config, base_dir, out_dir / "checkpoints", real)
    ckpts = {name: open_checkpoint(p) for name, p in paths.items()}
    if c.get("gpu_memory_gib") is not None:
        capacity = int(c["gpu_memory_gib"] * GiB)
        capacity -= capacity % ARENA_ALIGNMENT
    else:
        capacity = default_capacity(devs, "cluster.gpu_memory_gib")
    for d in {d for d in devs if d.type == "cuda"}:
        need = capacity * sum(1 for x in devs if x == d)
        free = torch.cuda.mem_get_info(d)[0]
        if need > free:
            raise CapacityError(f"cluster.gpu_memory_gib: {sum(1 for x in devs if x == d)} arena(s) of "
                                f"{capacity / GiB:.2f} GiB do not fit the {free / GiB:.2f} GiB free on {d}")
    check_fits(ckpts, capacity, max(s.kv_block_tokens for s in all_systems), "raise cluster.gpu_memory_gib")
    scale = float(real.get("time_scale", 1.0))
    sim = _sim_config(config, base_dir, out_dir, paths, capacity, len(devs), scale, real)
    trace = load_trace(sim["trace"], [m["name"] for m in config["models"]], config["seed"], base_dir)
    if writer is not None:
        writer.write_text("experiment.sim.yaml", dump_yaml(sim))
    else:
        (out_dir / "experiment.sim.yaml").write_text(dump_yaml(sim))
    return ReplaySetup(config, base_dir, out_dir, devs, capacity, scale, ckpts, trace, all_systems, sim, real,
                       notes)


def check_replayable(system: SystemSpec) -> None:
    """A ConfigError for what the real executor does not run: its runtime stage is its engine build, done
    on the critical path before the first compute, so it cannot be skipped, overlapped or restored; a
    multicast stream needs receivers that forward blocks as they arrive; a pipelined cold start's stages
    load, then compute (not layer by layer). (Units copied from other GPUs' arenas, the source policies, it
    runs: `real.peers`; pipelined cold starts: `real.pipelined`.)"""
    runtime = dict(system.startup_plan().stages)["runtime"]
    if runtime.mode != "serial":
        raise ConfigError(f"systems ({system.name}).startup.runtime: the real executor builds its engine (the "
                          f"runtime stage) serially and measures it; expected mode serial, got {runtime.mode!r}")
    if system.multicast != "none":
        raise ConfigError(f"systems ({system.name}): multicast {system.multicast} is not yet supported by the real "
                          "executor (a unit is read from the files or copied from one other arena); simulate it, "
                          "or set multicast none")
    if system.handoff != "none":
        raise ConfigError(f"systems ({system.name}): handoff {system.handoff} is not supported by the real executor "
                          "(a pass computes on one device); simulate it, or set handoff none")
    if system.pipeline != "none" and system.execute_while_load:
        raise ConfigError(f"systems ({system.name}): the real executor runs a pipelined cold start's stages each "
                          "loading, then computing (`real.pipelined`), not layer by layer; set "
                          "execute_while_load false or pipeline none")


def check_fits(ckpts: dict[str, Checkpoint], capacity: int, block_tokens: int, hint: str) -> None:
    """Every model's weights and one KV block fit an arena of `capacity` bytes, or a one-line
    CapacityError ending with `hint` (a replay's and `run_requests`' check before anything runs)."""
    for name, ck in ckpts.items():
        need = ck.spec.weight_bytes + ck.spec.kv_bytes_per_token * block_tokens
        if need > capacity:
            raise CapacityError(f"model {name}: its weights and one KV block ({need / GiB:.4f} GiB) do not fit "
                                f"an arena of {capacity / GiB:.4f} GiB; {hint}")


def loader_options(real: dict[str, Any]) -> dict[str, Any]:
    """Loader keyword arguments from the `real:` section (calibration uses the same)."""
    return {
        "readers": real.get("readers"),
        "chunk_bytes": max(4096, int(real.get("chunk_mb", DEFAULT_CHUNK_BYTES / 2**20) * 2**20)),
        "staging": real.get("staging", "auto"),
    }



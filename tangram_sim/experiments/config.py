"""Experiment YAML: schema, validation with dotted paths, sweep expansion, resolution to objects.

An experiment is a plain dict (what the YAML holds) until `resolve` turns one sweep point into the
objects the simulator takes. Keeping the raw dict lets a sweep or `--set` change any dotted key
(`cluster.gpus_per_node`, `trace.mapping.alpha`, `systems.1.overrides.keep_alive_s`) before the
point is validated, so every point gets the same checks and the same error messages.

Every number is checked to be finite and in its physical range (efficiencies in (0, 1], sizes and
bandwidths > 0, times >= 0, counts >= 1); an error names the dotted key, the range and the value. Files
and `--set` values are read as YAML 1.1 (PyYAML) plus one YAML 1.2 rule: `5e-2` and `1e9` are numbers.

Schema (defaults in brackets):

    name: str                              # required
    seed: int [0]
    description: str [""]
    cluster:
      nodes: int [1]
      gpus_per_node: int [1]
      gpu: a100-40gb | a100-80gb | h100-80gb | h200-141gb | l40-48gb | rtx4090-24gb | a10-24gb [a100-80gb]
      gpu_memory_gib: number [the GPU's memory]
      gpu_overrides: {memory_bytes|bf16_flops|hbm_bps|pcie_bps|d2d_bps: number} [{}]
      tiers: {host_cache_gib: 256, ssd_gbps: 6, network_gbps: 1.25, ssd_holds_all: true,
              unit_overhead_s: 0}
      compute_efficiency: number [0.5]     # roofline
      memory_efficiency: number [0.7]      # roofline
      decode_admission: fluid | step [fluid]  # an arrival joins a decoding batch at once (fluid), or
                                           # when the running decode step ends (step: an engine with
                                           # iteration-level scheduling, as the real replay runs)
      time_model:                          # optional: these linear costs replace the roofline, every model
        prefill_base_s: number [0]         #   per prefill iteration
        prefill_per_token_s: number [0]    #   per prompt token
        decode_base_s: number              #   per decode step (required, > 0)
        decode_per_seq_s: number [0]       #   per extra sequence in the batch
        decode_per_kv_token_s: number [0]  #   per live KV token a step reads
                                           # (a calibration file's coefficients win for its models)
      topology:                            # optional: links beyond each node's tiers (docs/topology.md)
        nvlink_gbps: number [none]         #   NVLink per GPU each way; none: peers copy over PCIe
        rdma: bool [false]                 #   NICs reach GPU memory: another node's GPU can be a source
        remote_store_gbps: number [none]   #   the shared remote store's limit; none: the NICs' alone
        nics_per_node: int [1]             #   NICs per node (<= gpus_per_node) at network_gbps each; local GPU i uses NIC i mod n
    models:                                # at least one
      - name: catalog name, or a config.json / .safetensors / checkpoint folder path
        sensitivity: number [1]
        tensor_parallel: int [1]
        derive: {base: NAME, share: [fnmatch patterns]} or {base: NAME, share_first_layers: 0.5}
        checkpoint: path                   # optional: a checkpoint folder holding this model's tensors
    trace: {kind: ..., ...}                # see tangram_sim.traces.spec
    systems:                               # at least one
      - {name: str, preset: serverlessllm | tangram | model-reuse | ..., overrides: {...}}
                                           # overrides: fields of a system; the policy fields (retention,
                                           # keep_alive, fairness, ...), their *_params and their defaults
                                           # are listed in tangram_sim/sim/systems.py
    sweep: {dotted.key: [values, ...]}     # optional grid
    slo:                                   # service-level objectives of the summary's SLO columns
      ttft_s: number [2]                   #   time to first token, seconds (> 0)
      tpot_s: number [0.2]                 #   time per output token after the first, seconds (> 0)
      models: {NAME: {ttft_s, tpot_s}}     #   optional per-model targets [the two above]; NAME as in
                                           #   models
    calibration: path                      # optional, from `tangram-sim real calibrate`
    plugins: [examples/my_policy.py, my_package.policies]   # optional: imported before anything is
                                           # validated, so the policies they register can be named in
                                           # systems; a .py path resolves against the YAML's folder
                                           # (then the current one), anything else is a module name
                                           # (docs/policies.md; tangram_sim.experiments.plugins)
    outputs: {requests: true, timeline: true, plots: true, sample_interval_s: auto}
    real:                                  # optional, read by `tangram-sim real replay|calibrate` only
      scale: tiny | small | full [tiny]    # size of the checkpoints made for catalog models
      dtype: float32 | bfloat16 | float16  # [the config's]
      checkpoints: path                    # use this folder of checkpoint folders instead of making them
      time_scale: number [1]               # replay arrivals this many times faster (trace rate_scale)
      readers: int, chunk_mb: number, staging: auto | always | never   # loader settings
      threads: int                         # torch intra-op threads while replaying [torch's default]
      lag_bound_s: number [0.05]           # a replay whose p99 lag exceeds this says it fell behind
      processes: bool                      # each arena's device work in a process of its own, pinned to
                                           # `threads` CPUs [when there are several arenas]

The `slo` defaults (the resolved config.yaml always states the SLO a run was measured against; the
column definitions are in `tangram_sim.core.slo`):

- `tpot_s: 0.2` is the chatbot TPOT SLO of HydraServe (Lou et al., "HydraServe: Minimizing Cold Start
  Latency for Serverless LLM Serving in Public Clouds", 2025: `chat_tpot = 200` ms in its artifact's
  `scripts/kubernetes/vllm/src/ModelInfo.py`), five tokens a second: a chatbot's decoding "only needs
  to match human reading speed" (the DistServe authors' blog post on hao-ai-lab.github.io).
- `ttft_s: 2` is our choice between the two kinds of TTFT SLO in that literature. Serving systems whose
  instances are warm ask for a fraction of a second (DistServe's chatbot: "under 0.2 seconds"), which
  no cold start meets; HydraServe's serverless chatbot SLOs (5x a reference TTFT of 1.5 s for 7B and
  2.4 s for 13B models: 7.5 s and 12 s, same file) include fetching the checkpoint over a cloud
  network. Here checkpoints come from host memory or a local SSD: a cold start of the catalog's 3-9B
  models that waits for nothing gives its first token in 0.5-1.1 s on average (the quickstart's
  ServerlessLLM, qwen2.5-3b to yi-9b), while waiting behind other models' cold starts soon takes a
  request past 2 s, so the target separates loading and retention policies. It is also the middle of
  the summary's fixed `slo_ttft_*` columns (0.5, 1, 2 and 5 s).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tangram_sim.errors import ConfigError, TangramError, shown

# the checks and the dotted keys live in their own modules; re-exported, callers import them from here
from tangram_sim.experiments.checks import (  # noqa: F401
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    UNIT_INTERVAL,
    check_keys,
    check_number,
    get_typed,
    key_text,
    num,
)
from tangram_sim.experiments.dotted import apply_point, parse_set, set_dotted  # noqa: F401

# YamlLoader and load_yaml are re-exported: callers read experiments through this module
from tangram_sim.experiments.yamlio import DuplicateKeyError, YamlLoader, load_yaml, yaml_load  # noqa: F401
from tangram_sim.sim.hardware import GPUS, TierSpec, gpu_spec
from tangram_sim.sim.systems import PRESETS, SystemSpec, make_system
from tangram_sim.topology import topology_from_config

GiB = 2**30
TOP_KEYS = ("name", "seed", "description", "cluster", "models", "trace", "systems", "sweep", "calibration",
            "outputs", "real", "plugins", "slo")
CLUSTER_KEYS = ("nodes", "gpus_per_node", "gpu", "gpu_memory_gib", "gpu_overrides", "tiers",
                "compute_efficiency", "memory_efficiency", "time_model", "decode_admission", "topology")
TIME_MODEL_KEYS = ("prefill_base_s", "prefill_per_token_s", "decode_base_s", "decode_per_seq_s",
                   "decode_per_kv_token_s")
DECODE_ADMISSION = ("fluid", "step")
TIER_KEYS = ("host_cache_gib", "ssd_gbps", "network_gbps", "ssd_holds_all", "unit_overhead_s")
MODEL_KEYS = ("name", "sensitivity", "tensor_parallel", "derive", "checkpoint")
SYSTEM_KEYS = ("name", "preset", "overrides")
OUTPUT_KEYS = ("requests", "timeline", "plots", "sample_interval_s")
SLO_KEYS = ("ttft_s", "tpot_s", "models")
SLO_TARGET_KEYS = ("ttft_s", "tpot_s")
REAL_KEYS = ("scale", "dtype", "checkpoints", "time_scale", "readers", "chunk_mb", "staging", "threads",
             "lag_bound_s", "processes")


# ------------------------------------------------------------------ sweeps
def sweep_points(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """The grid of the `sweep` section as a list of {dotted key: value} (one empty point if none)."""
    sweep = raw.get("sweep") or {}
    if not isinstance(sweep, dict):
        raise ConfigError("sweep: expected a mapping of dotted keys to lists of values")
    keys = list(sweep)
    for key in keys:
        values = sweep[key]
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep.{key}: expected a non-empty list of values")
        if key.split(".")[0] not in TOP_KEYS or key.split(".")[0] in ("sweep", "name", "plugins"):
            raise ConfigError(f"sweep.{key}: not a key an experiment can vary")
    return [dict(zip(keys, combo)) for combo in itertools.product(*(sweep[k] for k in keys))]



def _time_model(section: Any) -> dict[str, float]:
    """`cluster.time_model`: linear prefill/decode costs; decode steps must take time (> 0)."""
    where = "cluster.time_model"
    tm = check_keys(section, TIME_MODEL_KEYS, where)
    if tm.get("decode_base_s") is None:
        raise ConfigError(f"{where}.decode_base_s: required, expected a number > 0 (seconds per decode step)")
    return {key: num(tm, key, where, 0.0, POSITIVE if key == "decode_base_s" else NON_NEGATIVE)
            for key in TIME_MODEL_KEYS}


def build_calibration(config: dict[str, Any]) -> Any:
    """The run's Calibration: the calibration file's, plus `cluster.time_model` for the other models."""
    from tangram_sim.sim.timemodel import Calibration, with_coefficients

    calibration = Calibration.load(config["calibration"]) if config.get("calibration") else None
    tm = config["cluster"].get("time_model")
    if tm is None:
        return calibration
    return with_coefficients(calibration, tm, [m["name"] for m in config["models"]])


@dataclass(slots=True)
class ResolvedPoint:
    """One sweep point turned into simulator inputs (built in the process that simulates it)."""

    name: str  # experiment name
    seed: int  # experiment seed
    config: dict[str, Any]  # the validated raw config of this point (defaults filled in)
    base_dir: Path | None  # where relative paths resolve first


def validate(raw: dict[str, Any], base_dir: Path | None) -> dict[str, Any]:
    """Check every key and type of one (sweep-applied) config; returns it with defaults filled in."""
    check_keys(raw, TOP_KEYS, "experiment")
    out: dict[str, Any] = {}
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError("name: expected a non-empty string naming the experiment")
    out["name"] = name
    # numpy refuses negative seeds, so a negative one would fail later in a worker with a traceback
    seed = raw.get("seed")
    out["seed"] = 0 if seed is None else check_number(seed, "seed", NON_NEGATIVE, integer=True, minimum=0)
    out["description"] = get_typed(raw, "description", "experiment", str, "")
    if raw.get("plugins") is not None:  # imported first: systems may name the policies they register
        from tangram_sim.experiments.plugins import validate_plugins

        out["plugins"] = validate_plugins(raw["plugins"], base_dir)

    cl = check_keys(raw.get("cluster"), CLUSTER_KEYS, "cluster")
    cluster = {
        "nodes": num(cl, "nodes", "cluster", 1, integer=True),
        "gpus_per_node": num(cl, "gpus_per_node", "cluster", 1, integer=True),
        "gpu": get_typed(cl, "gpu", "cluster", str, "a100-80gb"),
        "gpu_memory_gib": num(cl, "gpu_memory_gib", "cluster", None),
        "gpu_overrides": get_typed(cl, "gpu_overrides", "cluster", dict, {}),
        "compute_efficiency": num(cl, "compute_efficiency", "cluster", 0.5, FRACTION),
        "memory_efficiency": num(cl, "memory_efficiency", "cluster", 0.7, FRACTION),
    }
    if cl.get("decode_admission") is not None:  # only when given: the default leaves configs as they were
        cluster["decode_admission"] = get_typed(cl, "decode_admission", "cluster", str, None)
        if cluster["decode_admission"] not in DECODE_ADMISSION:
            raise ConfigError(f"cluster.decode_admission: expected fluid or step, got {shown(cluster['decode_admission'])}")
    if cluster["gpu"] not in GPUS:
        raise ConfigError(f"cluster.gpu: unknown GPU {shown(cluster['gpu'])}; expected one of: {', '.join(GPUS)}")
    tiers = check_keys(cl.get("tiers"), TIER_KEYS, "cluster.tiers")
    cluster["tiers"] = {
        "host_cache_gib": num(tiers, "host_cache_gib", "cluster.tiers", 256.0, NON_NEGATIVE),
        "ssd_gbps": num(tiers, "ssd_gbps", "cluster.tiers", 6.0),
        "network_gbps": num(tiers, "network_gbps", "cluster.tiers", 1.25),
        "ssd_holds_all": get_typed(tiers, "ssd_holds_all", "cluster.tiers", bool, True),
        "unit_overhead_s": num(tiers, "unit_overhead_s", "cluster.tiers", 0.0, NON_NEGATIVE),
    }
    gpu_spec(cluster["gpu"], cluster["gpu_overrides"], cluster["gpu_memory_gib"])  # field checks
    if cl.get("topology") is not None:  # only when given: configs without it keep their hash
        spec = topology_from_config(cl["topology"])  # checks every key
        if spec.nics_per_node > cluster["gpus_per_node"]:  # more would carry nothing (and cost memory)
            raise ConfigError(f"cluster.topology.nics_per_node: expected an integer from 1 to gpus_per_node "
                              f"({cluster['gpus_per_node']}), got {spec.nics_per_node}")
        cluster["topology"] = dict(cl["topology"])
    if cl.get("time_model") is not None:  # only when given: configs without it keep their hash
        cluster["time_model"] = _time_model(cl["time_model"])
    out["cluster"] = cluster

    models = raw.get("models")
    if not isinstance(models, list) or not models:
        raise ConfigError("models: expected a non-empty list of models")
    out_models = []
    seen: set[str] = set()
    for i, m in enumerate(models):
        where = f"models.{i}"
        if isinstance(m, str):
            m = {"name": m}
        m = check_keys(m, MODEL_KEYS, where)
        mname = m.get("name")
        if not isinstance(mname, str) or not mname:
            raise ConfigError(f"{where}.name: expected a catalog model name or a checkpoint path")
        if len(mname) > 4096:  # longer than any path: neither a name nor a file
            raise ConfigError(f"{where}.name: expected a catalog model name or a checkpoint path, got "
                              f"{shown(mname)}")
        if mname in seen:
            raise ConfigError(f"{where}.name: model {shown(mname)} is listed twice")
        seen.add(mname)
        entry = {
            "name": mname,
            "sensitivity": num(m, "sensitivity", where, 1.0),
            "tensor_parallel": num(m, "tensor_parallel", where, 1, integer=True),
        }
        if m.get("derive") is not None:
            d = check_keys(m["derive"], ("base", "share", "share_first_layers"), f"{where}.derive")
            if not isinstance(d.get("base"), str):
                raise ConfigError(f"{where}.derive.base: expected the name of another model in models")
            if ("share" in d) == ("share_first_layers" in d):
                raise ConfigError(f"{where}.derive: give exactly one of share (patterns) or share_first_layers")
            if "share" in d and not (isinstance(d["share"], list) and all(isinstance(p, str) for p in d["share"])):
                raise ConfigError(f"{where}.derive.share: expected a list of tensor name patterns")
            if "share_first_layers" in d:
                d = {**d, "share_first_layers": check_number(
                    d["share_first_layers"], f"{where}.derive.share_first_layers", UNIT_INTERVAL)}
            entry["derive"] = dict(d)
        if m.get("checkpoint") is not None:
            if "derive" in entry:
                raise ConfigError(f"{where}.checkpoint: give either checkpoint or derive, not both")
            if not isinstance(m["checkpoint"], str) or not m["checkpoint"]:
                raise ConfigError(f"{where}.checkpoint: expected a checkpoint folder path")
            entry["checkpoint"] = str(_resolve_path(m["checkpoint"], base_dir, f"{where}.checkpoint"))
        out_models.append(entry)
    out["models"] = out_models
    # Resolve the models now (specs are cached): an unknown name or unreadable checkpoint then fails
    # before any job starts, with the key that names it, instead of once per job inside the workers.
    build_models(out, base_dir)

    trace = raw.get("trace")
    if not isinstance(trace, dict):
        raise ConfigError("trace: expected a mapping with at least `kind`")
    out["trace"] = trace

    systems = raw.get("systems")
    if not isinstance(systems, list) or not systems:
        raise ConfigError("systems: expected a non-empty list of {name, preset, overrides}")
    out_systems = []
    names: set[str] = set()
    for i, s in enumerate(systems):
        where = f"systems.{i}"
        s = check_keys(s, SYSTEM_KEYS, where)
        sname = get_typed(s, "name", where, str, None)
        preset = get_typed(s, "preset", where, str, "tangram")
        if sname is None:
            sname = preset
        if sname in names:
            raise ConfigError(f"{where}.name: system {shown(sname)} is listed twice")
        names.add(sname)
        if preset not in PRESETS:
            raise ConfigError(f"{where}.preset: unknown preset {shown(preset)}; expected one of: {', '.join(PRESETS)}")
        overrides = get_typed(s, "overrides", where, dict, {})
        make_system(sname, preset, overrides, where=where)  # type and policy-name checks
        out_systems.append({"name": sname, "preset": preset, "overrides": dict(overrides)})
    out["systems"] = out_systems

    calibration = raw.get("calibration")
    if calibration is not None:
        if not isinstance(calibration, str):
            raise ConfigError("calibration: expected a path to a calibration YAML")
        out["calibration"] = str(_resolve_path(calibration, base_dir, "calibration"))

    out["slo"] = _validate_slo(raw.get("slo"), [m["name"] for m in out_models])

    outputs = check_keys(raw.get("outputs"), OUTPUT_KEYS, "outputs")
    interval = outputs.get("sample_interval_s", "auto")
    if interval is None:
        interval = "auto"
    if interval != "auto":
        try:
            interval = check_number(interval, "outputs.sample_interval_s", NON_NEGATIVE)
        except ConfigError:
            raise ConfigError(f"outputs.sample_interval_s: expected auto or a number >= 0, got {shown(interval)}") from None
    out["outputs"] = {
        "requests": get_typed(outputs, "requests", "outputs", bool, True),
        "timeline": get_typed(outputs, "timeline", "outputs", bool, True),
        "plots": get_typed(outputs, "plots", "outputs", bool, True),
        "sample_interval_s": interval,
    }
    if raw.get("real") is not None:
        out["real"] = _validate_real(raw["real"], base_dir)
    return out


def _validate_slo(section: Any, model_names: list[str]) -> dict[str, Any]:
    """The `slo:` section with its defaults filled in: TTFT and TPOT targets in seconds (> 0), and the
    per-model ones, each defaulting to the global target, only when given."""
    from tangram_sim.core.slo import DEFAULT_TPOT_S, DEFAULT_TTFT_S

    slo = check_keys(section, SLO_KEYS, "slo")
    out: dict[str, Any] = {"ttft_s": num(slo, "ttft_s", "slo", DEFAULT_TTFT_S),
                           "tpot_s": num(slo, "tpot_s", "slo", DEFAULT_TPOT_S)}
    per_model = slo.get("models")
    if per_model is None:
        return out
    if not isinstance(per_model, dict):
        raise ConfigError(f"slo.models: expected a mapping of model names to {{ttft_s, tpot_s}}, got "
                          f"{shown(per_model)}")
    models: dict[str, dict[str, float]] = {}
    for name, targets in per_model.items():
        where = f"slo.models.{key_text(name)}"
        if name not in model_names:
            raise ConfigError(f"{where}: not a model of this experiment; expected one of: "
                              f"{', '.join(key_text(m) for m in model_names)}")
        t = check_keys(targets, SLO_TARGET_KEYS, where)
        models[name] = {key: num(t, key, where, out[key]) for key in SLO_TARGET_KEYS}
    out["models"] = models
    return out


def _validate_real(section: Any, base_dir: Path | None) -> dict[str, Any]:
    """The `real:` section (replay and calibration settings); the simulator ignores it."""
    real = check_keys(section, REAL_KEYS, "real")
    out: dict[str, Any] = {
        "scale": get_typed(real, "scale", "real", str, "tiny"),
        "time_scale": num(real, "time_scale", "real", 1.0),
    }
    if out["scale"] not in ("tiny", "small", "full"):
        raise ConfigError(f"real.scale: expected tiny, small or full, got {shown(out['scale'])}")
    for key in ("dtype", "checkpoints", "staging"):
        if real.get(key) is not None:
            out[key] = get_typed(real, key, "real", str, None)
    for key in ("readers", "threads"):
        if real.get(key) is not None:
            out[key] = num(real, key, "real", None, integer=True)
    if real.get("chunk_mb") is not None:
        out["chunk_mb"] = num(real, "chunk_mb", "real", None)
    if real.get("lag_bound_s") is not None:
        out["lag_bound_s"] = num(real, "lag_bound_s", "real", None)
    if real.get("processes") is not None:
        out["processes"] = get_typed(real, "processes", "real", bool, None)
    if out.get("staging", "auto") not in ("auto", "always", "never"):
        raise ConfigError(f"real.staging: expected auto, always or never, got {shown(out['staging'])}")
    if "checkpoints" in out:
        out["checkpoints"] = str(_resolve_path(out["checkpoints"], base_dir, "real.checkpoints"))
    return out


def _resolve_path(value: str, base_dir: Path | None, where: str) -> Path:
    if len(value) > 4096 or "\0" in value:  # no file system has such a path; do not build copies of it
        raise ConfigError(f"{where}: path not found: {shown(value)} (not a usable path)")
    p = Path(value).expanduser()
    if p.is_absolute():
        candidates = [p]
    else:
        candidates = ([base_dir / p] if base_dir is not None else []) + [Path.cwd() / p]
    for c in candidates:
        if c.exists():
            return c
    raise ConfigError(f"{where}: path not found: {shown(value)} (looked in {', '.join(str(c) for c in candidates)})")


# ------------------------------------------------------------------ building simulator inputs
def build_models(config: dict[str, Any], base_dir: Path | None) -> dict[str, Any]:
    """ModelChoice per model name (catalog, files, derived variants)."""
    from tangram_sim.models import derive_model, get_model, share_patterns_first_layers
    from tangram_sim.sim.simulate import ModelChoice

    specs: dict[str, Any] = {}
    pending = []
    for i, m in enumerate(config["models"]):
        if "derive" in m:
            pending.append((i, m))
            continue
        name = m["name"]
        if m.get("checkpoint"):
            spec = _named(get_model, m["checkpoint"], f"models.{i}.checkpoint")
            specs[name] = spec if spec.name == name else dataclasses.replace(spec, name=name)
            continue
        try:
            spec = get_model(name)
        except TangramError as exc:
            candidate = None
            try:
                candidate = _resolve_path(name, base_dir, f"models.{i}.name")
            except ConfigError:
                pass
            if candidate is None:
                raise ConfigError(f"models.{i}.name: {exc}") from None
            spec = _named(get_model, str(candidate), f"models.{i}.name")
        specs[name] = spec
    for i, m in pending:
        d = m["derive"]
        base = specs.get(d["base"])
        if base is None:
            raise ConfigError(f"models.{i}.derive.base: {shown(d['base'])} is not a (non-derived) model listed in models")
        try:
            share = d.get("share") or share_patterns_first_layers(base, d.get("share_first_layers", 0.5))
            specs[m["name"]] = derive_model(base, m["name"], share)
        except TangramError as exc:
            raise ConfigError(f"models.{i}.derive: {exc}") from None
    return {
        m["name"]: ModelChoice(specs[m["name"]], m["sensitivity"], m["tensor_parallel"]) for m in config["models"]
    }


def _named(load: Any, source: str, where: str) -> Any:
    """`load(source)` with its one-line error prefixed by the dotted key that named the source."""
    try:
        return load(source)
    except TangramError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def build_cluster(config: dict[str, Any]) -> Any:
    from tangram_sim.sim.simulate import ClusterSpec

    c = config["cluster"]
    t = c["tiers"]
    return ClusterSpec(
        nodes=c["nodes"],
        gpus_per_node=c["gpus_per_node"],
        gpu=gpu_spec(c["gpu"], c["gpu_overrides"], c["gpu_memory_gib"]),
        tiers=TierSpec(
            host_cache_bytes=int(t["host_cache_gib"] * GiB),
            ssd_bps=t["ssd_gbps"] * 1e9,
            network_bps=t["network_gbps"] * 1e9,
            ssd_holds_all=t["ssd_holds_all"],
            unit_overhead_s=t["unit_overhead_s"],
        ),
        compute_efficiency=c["compute_efficiency"],
        memory_efficiency=c["memory_efficiency"],
        decode_admission=c.get("decode_admission", "fluid"),
        topology=topology_from_config(c.get("topology")),
    )


def build_systems(config: dict[str, Any]) -> list[SystemSpec]:
    return [
        make_system(s["name"], s["preset"], s["overrides"], where=f"systems.{i}")
        for i, s in enumerate(config["systems"])
    ]


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=110)

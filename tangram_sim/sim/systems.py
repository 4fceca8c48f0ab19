"""Systems: named bundles of policy choices, with presets for the paper's comparisons.

A system's fields, as an experiment's `systems.N.overrides` sets them: each policy is a name in a
registry of `tangram_sim.policies` (docs/policies.md) and, for most kinds, a mapping of parameters:

    retention [tangram], retention_params {}
    packing [pbp]
    kv [elastic]                     # its parameters are the fields kv_fraction, kv_block_tokens
    scheduler [tangram-affinity], scheduler_params {}
    prefetch [none], prefetch_params {}
    keep_alive [fixed], keep_alive_params {}
                                     # fixed: an idle instance stays keep_alive_s [30];
                                     # histogram: Shahrad et al.'s hybrid histogram with pre-warming,
                                     # falling back to keep_alive_s; keep_alive_params (defaults):
                                     # bin_s 1, range_s 240, head 0.05, tail 0.99, margin 0.1,
                                     # cv_threshold 2, min_samples 10, oob_threshold 0.5,
                                     # oob_margin 0.15, history 10, prewarm true
                                     # (tangram_sim/policies/keep_alive.py)
    fairness [fixed], fairness_params {}
                                     # fixed: fairness_window_s [5]; adaptive: fairness_bound_s [60]
    preemption [newest | longest-context], preemption_params {}
    warm_routing [least-loaded], warm_routing_params {}   # least-loaded: under max_batch [32]
    source [tiers], source_params {}  # tiers | fastest | gpu-first (docs/topology.md)
    multicast [none], multicast_block_bytes [64 MiB]  # none | chain | binomial (docs/topology.md)
    pipeline [none], pipeline_params {}  # none | fixed (k [2]) | slo (ttft_s [2], max_k [4])
                                     # (docs/published-systems.md, HydraServe)

Parameters in `*_params` win over what the policy takes from the run (`tangram_sim.policies.needs`).
The other fields (granularity, units, batching, engine overhead) are commented on `SystemSpec`.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from tangram_sim.core.handoff import HANDOFF
from tangram_sim.core.startup import resolve_startup, runtime_from_engine_overhead
from tangram_sim.errors import ConfigError, shown
from tangram_sim.specs.system import MiB, SystemSpec, system_field_names
from tangram_sim.topology.multicast import MULTICAST

__all__ = ["PRESETS", "SystemSpec", "make_system", "system_field_names"]


PRESETS: dict[str, dict[str, Any]] = {
    # ServerlessLLM: whole-model loads, weights discarded at instance end, vLLM-style static KV,
    # storage-aware placement.
    "serverlessllm": dict(
        granularity="model", retention="none", packing="first-fit", kv="static", scheduler="sllm-storage-aware"
    ),
    # Tangram as its authors' store runs it: ~40 units per model (docs/tangram-authors.md).
    "tangram": dict(
        granularity="group", unit_divisor=40, retention="tangram", packing="pbp", kv="elastic",
        scheduler="tangram-affinity",
    ),
    # The same with block groups of >= 8 MiB (a few hundred units per model).
    "tangram-8mib": dict(
        granularity="group", min_unit_bytes=8 * MiB, unit_divisor=0, retention="tangram", packing="pbp",
        kv="elastic", scheduler="tangram-affinity",
    ),
    # The paper's breakdown, each stage adding one idea to the previous one (units as in `tangram`).
    "model-reuse": dict(
        granularity="model", retention="tangram", packing="pbp", kv="static", scheduler="sllm-storage-aware"
    ),
    "tensor-reuse": dict(
        granularity="group", unit_divisor=40, retention="tangram", packing="pbp", kv="static",
        scheduler="sllm-storage-aware",
    ),
    "tensor-reuse+elastic-kv": dict(
        granularity="group", unit_divisor=40, retention="tangram", packing="pbp", kv="elastic",
        scheduler="sllm-storage-aware",
    ),
    "tensor-reuse+elastic-kv+affinity": dict(
        granularity="group", unit_divisor=40, retention="tangram", packing="pbp", kv="elastic",
        scheduler="tangram-affinity",
    ),
    # Beyond Tangram (docs/beyond-tangram.md): whole models valued by decayed request rate per byte
    # (models the queue waits for kept longest), a home GPU per model (no duplicate copies while the
    # home has room), a fairness window that follows the queue's predicted waits (30 s bound), KV
    # that spares the weights the queue waits for, prefetch of the next likely model on idle links,
    # and a first prefill computed layer by layer as the layers land (execute-while-load: measured on
    # the seven plus-* points, p99 TTFT 0.1-10% lower, TTFT SLO attainment and goodput up or equal,
    # GPU-seconds per request equal or lower); Tangram's units and packing.
    "tangram-plus": dict(
        granularity="group", unit_divisor=40, retention="model-value", packing="pbp", kv="elastic-spare",
        scheduler="home-affinity", fairness="adaptive", fairness_bound_s=30.0, prefetch="next-model",
        execute_while_load=True,
    ),
    # Serverless vLLM, the baseline of Medusa's evaluation: ServerlessLLM's platform (whole-model loads,
    # weights freed at instance end, static KV, storage-aware placement) with vLLM's cold start as stages,
    # all serial, timed by the Medusa artifact (startup preset vllm-medusa-a100, docs/cold-start-stages.md).
    "serverless-vllm": dict(
        granularity="model", retention="none", packing="first-fit", kv="static", scheduler="sllm-storage-aware",
        startup={"preset": "vllm-medusa-a100"},
    ),
    # Medusa (ASPLOS'25): the same vLLM with KV-cache sizing and CUDA graphs materialised offline and
    # restored beside the load (restore times: the artifact's Qwen-4B breakdown, results-backup/
    # Figure8_Figure1: KV 0.016 s; graphs 0.277 s + their warm-up 0.280 s, docs/cold-start-stages.md).
    "medusa": dict(
        granularity="model", retention="none", packing="first-fit", kv="static", scheduler="sllm-storage-aware",
        startup={"preset": "vllm-medusa-a100", "kv_init": {"mode": "restore", "restore_s": 0.016},
                 "graph_capture": {"mode": "restore", "restore_s": 0.557}},
    ),
    # ServerlessLLM whose first prefill computes each layer once it has landed (execute-while-load).
    "serverlessllm-ewl": dict(
        granularity="model", retention="none", packing="first-fit", kv="static", scheduler="sllm-storage-aware",
        execute_while_load=True,
    ),
    # lambdaScale (arXiv 2502.09922, MLSys'26 as FaaScale): a model multicast over RDMA in blocks along a
    # binomial pipeline tree, from a node that holds it (a GPU copy when one is faster than the host tiers),
    # and each new instance computing layers as they land. Blocks of 1 GiB: its artifact cuts Llama-2
    # 7B/13B into 16 transfer blocks (0.8-1.6 GB). Its temporary cross-node pipelines are not modelled
    # (docs/published-systems.md).
    "lambdascale": dict(
        granularity="model", retention="none", packing="first-fit", kv="static", scheduler="sllm-storage-aware",
        source="fastest", multicast="binomial", multicast_block_bytes=1024 * MiB, execute_while_load=True,
    ),
    # BlitzScale (OSDI'25): parameters read over the GPU network from GPUs that hold the model (running
    # instances) before any host tier, cold starts of one model chained (each forwards what it has received),
    # ServerlessLLM's host caching behind them: its "fast scaling"; with its live scaling, `blitzscale-live`
    # (docs/published-systems.md).
    "blitzscale": dict(
        granularity="model", retention="none", packing="first-fit", kv="static", scheduler="sllm-storage-aware",
        source="gpu-first", multicast="chain",
    ),
    # BlitzScale with its live scaling (the artifact's impl_live_pro): while a new instance's layers land,
    # the running instance it loads from computes the layers it lacks (core.handoff), so it serves at once.
    "blitzscale-live": dict(
        granularity="model", retention="none", packing="first-fit", kv="static", scheduler="sllm-storage-aware",
        source="gpu-first", multicast="chain", execute_while_load=True, handoff="eager",
    ),
    # HydraServe (NSDI'26; first as ParaServe; docs/published-systems.md): ServerlessLLM's platform whose
    # cold start runs as the fewest pipeline stages (up to 4 GPUs) predicted to meet a 2 s TTFT, each
    # stage's GPU fetching only its layers with its runtime starting beside the fetch, then consolidating
    # onto one GPU; block groups of >= 8 MiB so that stages split at layer boundaries.
    "hydraserve": dict(
        granularity="group", min_unit_bytes=8 * MiB, unit_divisor=0, retention="none", packing="first-fit",
        kv="static", scheduler="sllm-storage-aware", startup={"runtime": "overlap"},
        pipeline="slo", pipeline_params={"ttft_s": 2.0, "max_k": 4},
    ),
}

_FIELD_TYPES = {
    "granularity": str,
    "min_unit_bytes": int,
    "unit_divisor": int,
    "retention": str,
    "retention_params": dict,
    "packing": str,
    "kv": str,
    "kv_fraction": float,
    "kv_block_tokens": int,
    "kv_chunk_blocks": int,
    "scheduler": str,
    "keep_alive_s": float,
    "keep_alive": str,
    "keep_alive_params": dict,
    "max_batch": int,
    "fairness_window_s": float,
    "fairness": str,
    "fairness_bound_s": float,
    "fairness_params": dict,
    "preemption": str,
    "preemption_params": dict,
    "warm_routing": str,
    "warm_routing_params": dict,
    "scheduler_params": dict,
    "engine_overhead_s": float,
    "prefill_batch": int,
    "prefetch": str,
    "prefetch_params": dict,
    "startup": dict,
    "execute_while_load": bool,
    "source": str,
    "source_params": dict,
    "multicast": str,
    "multicast_block_bytes": int,
    "pipeline": str,
    "pipeline_params": dict,
    "handoff": str,
}


# Range of each numeric field: ("min", x) for integers >= x; "time" (>= 0, finite); "fraction" (0, 1].
_FIELD_RANGES: dict[str, tuple[str, int]] = {
    "min_unit_bytes": ("min", 1),
    "unit_divisor": ("min", 0),  # 0: block groups of min_unit_bytes
    "kv_block_tokens": ("min", 1),
    "kv_chunk_blocks": ("min", 1),
    "multicast_block_bytes": ("min", 1),
    "max_batch": ("min", 1),
    "prefill_batch": ("min", 0),  # 0: every admitted request at once
    "keep_alive_s": ("time", 0),
    "fairness_window_s": ("time", 0),
    "fairness_bound_s": ("time", 0),
    "engine_overhead_s": ("time", 0),
    "kv_fraction": ("fraction", 0),
}


def make_system(name: str, preset: str = "tangram", overrides: dict[str, Any] | None = None,
                where: str = "systems") -> SystemSpec:
    """Preset + overrides, type- and range-checked; errors name `<where>.overrides.<key>`."""
    if preset not in PRESETS:
        raise ConfigError(f"{where}.preset: unknown preset {shown(preset)}; expected one of: {', '.join(PRESETS)}")
    if overrides is not None and not isinstance(overrides, dict):
        raise ConfigError(f"{where}.overrides: expected a mapping of system fields, got {shown(overrides)}")
    values: dict[str, Any] = dict(PRESETS[preset])
    for key, value in (overrides or {}).items():
        if key not in _FIELD_TYPES:
            raise ConfigError(
                f"{where}.overrides.{key}: unknown system field; expected one of: {', '.join(_FIELD_TYPES)}"
            )
        want = _FIELD_TYPES[key]
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            try:
                value = float(value)
            except OverflowError:  # an integer too large for a float: out of range below
                value = math.inf
        if not isinstance(value, want) or (isinstance(value, bool) and want is not bool):
            raise ConfigError(f"{where}.overrides.{key}: expected {want.__name__}, got {shown(value)}")
        problem = _out_of_range(key, value)
        if problem:
            raise ConfigError(f"{where}.overrides.{key}: expected {problem}, got {shown(value)}")
        values[key] = value
    spec = replace(SystemSpec(name=name), **values)
    _validate(spec, where)
    if "engine_overhead_s" in (overrides or {}) and not runtime_from_engine_overhead(spec.startup):
        raise ConfigError(f"{where}.overrides.engine_overhead_s: the startup stages set the runtime stage's time "
                          "(a preset or runtime.s); set one of the two")
    return spec


def _out_of_range(key: str, value: Any) -> str | None:
    """What `value` of field `key` should have been, or None when it is in range (NaN never is)."""
    if key not in _FIELD_RANGES:
        return None
    kind, low = _FIELD_RANGES[key]
    if kind == "min":
        return None if value >= low else f"an integer >= {low}"
    if kind == "time":
        return None if math.isfinite(value) and value >= 0 else "a number >= 0"
    return None if 0 < value <= 1 else "a number in (0, 1]"


def _validate(spec: SystemSpec, where: str) -> None:
    from tangram_sim.policies import KV, POLICY_FIELDS
    from tangram_sim.policies.needs import PLACEHOLDERS, RUN_ONLY, check_needs, policy_kwargs

    for kind in POLICY_FIELDS:
        if getattr(spec, kind.field) not in kind.registry:
            raise ConfigError(f"{where}.{kind.field}: {kind.registry.unknown(getattr(spec, kind.field))}")
    if spec.kv not in KV:
        raise ConfigError(f"{where}.kv: {KV.unknown(spec.kv)}")
    if spec.multicast not in MULTICAST:
        raise ConfigError(f"{where}.multicast: expected one of {', '.join(MULTICAST)}, got {shown(spec.multicast)}")
    if spec.handoff not in HANDOFF:
        raise ConfigError(f"{where}.handoff: expected one of {', '.join(HANDOFF)}, got {shown(spec.handoff)}")
    if spec.handoff != "none" and (not spec.execute_while_load or spec.pipeline != "none"):
        raise ConfigError(f"{where}.overrides.handoff: a live handoff serves a cold start while its layers land, "
                          "so it needs execute_while_load true and pipeline none")
    if spec.granularity not in ("model", "tensor", "group"):
        raise ConfigError(f"{where}.granularity: expected model, tensor or group, got {shown(spec.granularity)}")
    plan = resolve_startup(spec.startup, spec.engine_overhead_s, f"{where}.overrides.startup")
    if spec.execute_while_load and plan.post_s:
        late = next(n for n, st in plan.stages if st.mode == "serial" and st.s and n in ("kv_init", "graph_capture"))
        raise ConfigError(f"{where}.overrides.startup.{late}: serial after the weights, so nothing computes before "
                          "every layer has landed; with execute_while_load set it to overlap, restore or skip")
    if spec.prefetch != "none" and spec.retention == "none":
        raise ConfigError(f"{where}.overrides.prefetch: {shown(spec.prefetch)} needs a retention policy that keeps "
                          "weights, but retention none frees them when an instance ends")
    # Presets hold in-range values, so a field out of range here came from a SystemSpec built directly.
    for key in _FIELD_RANGES:
        problem = _out_of_range(key, getattr(spec, key))
        if problem:
            raise ConfigError(f"{where}.{key}: expected {problem}, got {getattr(spec, key)!r}")
    # Policy parameters are checked by building each policy once, with what it needs from the system and
    # placeholders for the run's facts; a policy that needs the trace is checked when the run builds it.
    names = system_field_names()

    def fact(need: str) -> Any:
        if need in PLACEHOLDERS:
            value = PLACEHOLDERS[need]
            return dict(value) if isinstance(value, dict) else value  # a policy may keep what it is given
        return getattr(spec, need)

    for kind in POLICY_FIELDS:
        name = getattr(spec, kind.field)
        params = getattr(spec, kind.params) if kind.params else {}
        key = kind.params or kind.field
        if not all(isinstance(k, str) for k in params):
            raise ConfigError(f"{where}.overrides.{key}: parameter names must be strings, got {list(params)!r}")
        try:
            needs = check_needs(kind.registry, name, names)
        except ConfigError as exc:
            raise ConfigError(f"{where}.{kind.field}: {exc}") from None
        if needs & RUN_ONLY:
            continue
        try:
            kind.registry.create(name, **policy_kwargs(needs, fact, params))
        except ConfigError as exc:
            raise ConfigError(f"{where}.overrides.{key}: {exc}") from None

"""A system: the named bundle of policy choices and engine figures one run uses (`sim.systems` has the
presets and the checks of an experiment's overrides)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from tangram_sim.core.startup import StartupPlan, resolve_startup

MiB = 2**20


@dataclass(slots=True, frozen=True)
class SystemSpec:
    name: str  # label in results
    granularity: str = "group"  # reuse unit: model | tensor | group
    min_unit_bytes: int = 8 * MiB  # group granularity: merge tensors until a unit is this large
    # group granularity, the Tangram store's rule when > 0: groups of >= min_unit_bytes across blocks,
    # merged until each unit is >= model weight bytes // unit_divisor (~N units); 0 = block groups
    unit_divisor: int = 0
    retention: str = "tangram"  # retention policy name ("none" frees weights when an instance ends)
    retention_params: dict[str, Any] = field(default_factory=dict)  # extra policy parameters
    packing: str = "pbp"  # packing policy name
    kv: str = "elastic"  # KV policy name
    kv_fraction: float = 0.9  # static KV: share of GPU memory reserved for weights + KV at start
    kv_block_tokens: int = 16  # tokens per KV block
    kv_chunk_blocks: int = 16  # blocks a request's KV grows by at once (bounds simulator events)
    scheduler: str = "tangram-affinity"  # placement of new instances
    keep_alive_s: float = 30.0  # an idle instance stays active this long (unless its GPU is needed);
    # the `fixed` keep-alive's window and the `histogram` one's fallback
    keep_alive: str = "fixed"  # keep-alive policy (policies.keep_alive): fixed | histogram (+ pre-warming)
    keep_alive_params: dict[str, Any] = field(default_factory=dict)  # extra keep-alive policy parameters
    max_batch: int = 32  # continuous batching limit per instance
    fairness_window_s: float = 5.0  # queued requests of the active model may overtake an older
    # request of another model (joining the running batch) only while that one has waited less
    fairness: str = "fixed"  # fairness policy (policies.lifecycle): fixed: the window above; adaptive:
    # the active model keeps admitting while the oldest other request's predicted wait (waited + drain of
    # the batch + its cold start) stays under
    fairness_bound_s: float = 60.0  # the adaptive mode's bound on that predicted wait
    fairness_params: dict[str, Any] = field(default_factory=dict)  # extra fairness policy parameters
    preemption: str = "newest"  # which running request gives its KV back (policies.lifecycle)
    preemption_params: dict[str, Any] = field(default_factory=dict)  # extra preemption policy parameters
    warm_routing: str = "least-loaded"  # which active instance an arrival joins (policies.warm_routing)
    warm_routing_params: dict[str, Any] = field(default_factory=dict)  # extra warm routing parameters
    scheduler_params: dict[str, Any] = field(default_factory=dict)  # extra scheduler parameters
    engine_overhead_s: float = 0.2  # instance start cost before weights load (runtime init, graphs)
    prefill_batch: int = 0  # requests prefilled together in one iteration: 0 = all admitted at once
    # (vLLM-like batched prefill); 1 = one by one, as the real executor's engine prefills
    prefetch: str = "none"  # prefetch policy: what an idle GPU loads before it is asked (none: nothing)
    prefetch_params: dict[str, Any] = field(default_factory=dict)  # extra prefetch policy parameters
    # A cold start's stages (core.startup): {preset: NAME, runtime|context|kv_init|graph_capture: MODE or
    # {mode: serial|overlap|skip|restore, s, restore_s}}; empty: runtime serial for engine_overhead_s
    startup: dict[str, Any] = field(default_factory=dict)
    source: str = "tiers"  # where each missing unit is read from (policies.source): tiers | fastest | gpu-first
    source_params: dict[str, Any] = field(default_factory=dict)  # extra source policy parameters
    multicast: str = "none"  # cold starts of one model overlapping in time: none | chain | binomial
    # (topology.multicast); each receiver forwards blocks of this many bytes as they arrive
    multicast_block_bytes: int = 64 * MiB
    # a cold start as pipeline stages on several GPUs, consolidated onto one later (policies.pipeline,
    # core.pipeline): none | fixed | slo
    pipeline: str = "none"
    pipeline_params: dict[str, Any] = field(default_factory=dict)  # extra pipeline policy parameters (k, ttft_s)
    execute_while_load: bool = False  # the first prefill computes layer i once layer i has landed (and
    # layer i-1 is done) instead of after the whole load (the modelled and the real device alike)
    # live layer handoff (core.handoff, BlitzScale's live autoscaling): none | eager | costed; while a cold
    # start's weights land, a running instance of the model computes the layers not landed yet (eager:
    # always, as BlitzScale; costed: when that saves more waiting than it adds to the source's requests)
    handoff: str = "none"

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def startup_plan(self, engine_overhead_s: float | None = None) -> StartupPlan:
        """The cold start's stages; `engine_overhead_s` (e.g. a calibration's) replaces the system's as the
        runtime stage's time where that time is the engine overhead (no preset, no runtime time given)."""
        overhead = self.engine_overhead_s if engine_overhead_s is None else engine_overhead_s
        return resolve_startup(self.startup, overhead)


def system_field_names() -> frozenset[str]:
    """The fields of a system a policy may name as a need (`policies.needs`)."""
    return frozenset(f.name for f in fields(SystemSpec))

"""The shared policy modules (pure Python: no SimPy, no torch), each a registry by name.

- retention: which resident reuse units are worth keeping (`RETENTION`)
- packing: where the missing units go in a fragmented arena (`PACKING`)
- kv: static reservation or on-demand KV blocks (`KV`)
- scheduler: which GPU gets a new instance (`SCHEDULER`)
- prefetch: which model an idle GPU loads before it is asked for (`PREFETCH`)
- keep-alive: how long an idle instance stays warm, and pre-warming (`KEEP_ALIVE`)
- fairness: when a running instance stops admitting past older requests of other models (`FAIRNESS`)
- preemption: which running request gives its KV back when the batch cannot grow (`PREEMPTION`)
- warm routing: which active instance, if any, an arrival joins before the scheduler (`WARM_ROUTING`)
- source: where each missing unit of a cold start is read from (`SOURCE`)
- pipeline: how many pipeline stages a cold start runs as (`PIPELINE`)

`POLICY_FIELDS` lists the kinds a system names by a field (all but KV, whose parameters are system
fields of their own), with the field of their parameters; what a policy may take from the run is
declared by the policy (`policies.needs`).
"""

from tangram_sim.policies.keep_alive import KEEP_ALIVE, KeepAlivePolicy, Windows
from tangram_sim.policies.kv import KV, KvPlan, KvPolicy, KvPool, execute_kv_plan, kv_block_bytes, plan_kv
from tangram_sim.policies.lifecycle import FAIRNESS, PREEMPTION, FairnessPolicy, PreemptionPolicy
from tangram_sim.policies.needs import PolicyField
from tangram_sim.policies.packing import PACKING, Move, PackingPlan, PackingPolicy, Placement, execute_plan
from tangram_sim.policies.pipeline import PIPELINE, PipelinePolicy
from tangram_sim.policies.prefetch import PREFETCH, PrefetchPolicy
from tangram_sim.policies.retention import RETENTION, RetentionPolicy
from tangram_sim.policies.scheduler import SCHEDULER, PlacementOption, Scheduler
from tangram_sim.policies.source import SOURCE, GpuCopy, SourcePolicy
from tangram_sim.policies.warm_routing import WARM_ROUTING, WarmInstance, WarmRoutingPolicy

# modules that add policies to the registries above
from tangram_sim.policies import home, model_retention  # noqa: E402, F401  isort: skip

POLICY_FIELDS: tuple[PolicyField, ...] = (
    PolicyField("retention", "retention_params", RETENTION),
    PolicyField("packing", None, PACKING),
    PolicyField("scheduler", "scheduler_params", SCHEDULER),
    PolicyField("prefetch", "prefetch_params", PREFETCH),
    PolicyField("keep_alive", "keep_alive_params", KEEP_ALIVE),
    PolicyField("fairness", "fairness_params", FAIRNESS),
    PolicyField("preemption", "preemption_params", PREEMPTION),
    PolicyField("warm_routing", "warm_routing_params", WARM_ROUTING),
    PolicyField("source", "source_params", SOURCE),
    PolicyField("pipeline", "pipeline_params", PIPELINE),
)

__all__ = [
    "FAIRNESS",
    "KEEP_ALIVE",
    "KV",
    "PACKING",
    "PIPELINE",
    "POLICY_FIELDS",
    "PREEMPTION",
    "PREFETCH",
    "RETENTION",
    "SCHEDULER",
    "SOURCE",
    "WARM_ROUTING",
    "FairnessPolicy",
    "GpuCopy",
    "KeepAlivePolicy",
    "KvPlan",
    "KvPolicy",
    "KvPool",
    "Move",
    "PackingPlan",
    "PackingPolicy",
    "Placement",
    "PlacementOption",
    "PipelinePolicy",
    "PolicyField",
    "PreemptionPolicy",
    "PrefetchPolicy",
    "RetentionPolicy",
    "Scheduler",
    "SourcePolicy",
    "WarmInstance",
    "WarmRoutingPolicy",
    "Windows",
    "execute_kv_plan",
    "execute_plan",
    "kv_block_bytes",
    "plan_kv",
]

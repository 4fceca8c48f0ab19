"""The four shared policy modules (pure Python: no SimPy, no torch), each a registry by name.

- retention: which resident reuse units are worth keeping (`RETENTION`)
- packing: where the missing units go in a fragmented arena (`PACKING`)
- kv: static reservation or on-demand KV blocks (`KV`)
- scheduler: which GPU gets a new instance (`SCHEDULER`)
- prefetch: which model an idle GPU loads before it is asked for (`PREFETCH`)
"""

from tangram_sim.policies.kv import KV, KvPlan, KvPolicy, KvPool, execute_kv_plan, kv_block_bytes, plan_kv
from tangram_sim.policies.packing import PACKING, Move, PackingPlan, PackingPolicy, Placement, execute_plan
from tangram_sim.policies.prefetch import PREFETCH, PrefetchPolicy
from tangram_sim.policies.retention import RETENTION, RetentionPolicy
from tangram_sim.policies.scheduler import SCHEDULER, PlacementOption, Scheduler

# modules that add policies to the registries above
from tangram_sim.policies import home, model_retention  # noqa: E402, F401  isort: skip

__all__ = [
    "KV",
    "PACKING",
    "PREFETCH",
    "RETENTION",
    "SCHEDULER",
    "KvPlan",
    "KvPolicy",
    "KvPool",
    "Move",
    "PackingPlan",
    "PackingPolicy",
    "Placement",
    "PlacementOption",
    "PrefetchPolicy",
    "RetentionPolicy",
    "Scheduler",
    "execute_kv_plan",
    "execute_plan",
    "kv_block_bytes",
    "plan_kv",
]

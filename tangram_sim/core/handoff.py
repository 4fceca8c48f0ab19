"""Live layer handoff (BlitzScale's live autoscaling, `handoff: live`): while a new instance's weights are
still landing, a running instance of the same model (the *source*) computes the layers the new one does
not hold yet, so the new instance serves at once instead of after its load.

With execute-while-load (which `handoff: live` requires), a cold start's layers land in compute order.
Every pass of the new instance before its last layer has landed - its first prefill, later prefills,
decode steps - computes on its own GPU the layers that have landed, in order, and at the first layer
that has not, hands the rest of the pass to the source: the activations of the pass's tokens cross the
GPU network to the source once (hidden size x 2 bytes per token at the link's rate alone, as a pipeline
hop, `core.pipeline`), the source computes the remaining layers and the head, and the sampled tokens
come back (a few bytes, not timed). BlitzScale's rule: a layer is computed where it is, never waited
for while the source has it.

The source is chosen at every pass: a GPU that runs an instance of the model on its own (not a
pipeline, not a tensor-parallel group, its own weights all landed), reachable over the GPU network (in
the node, or across nodes with RDMA: `TopologySpec.rdma`), the fastest link first, then the lowest GPU.
Without one, a pass waits for its layers as execute-while-load alone does. The source pays for the work:
the seconds it computes for the new instance are added to its own next prefill or decode (its GPU time,
`busy_s`, includes them), so an overloaded source slows down, as BlitzScale's does.

Left out: the KV of the layers the source computes is written there and would move to the new instance
when those layers land (it is booked on the new instance from the start, as for a one-GPU instance, and
its move is not timed); the source's own batch and the handed-off work do not overlap on its GPU (they
are run one after the other).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from tangram_sim.core.pipeline import ACTIVATION_BYTES, link_bps

if TYPE_CHECKING:
    from tangram_sim.core.device import LayerProgress
    from tangram_sim.core.worker import GpuWorker, Instance

__all__ = ["HANDOFF", "landed_prefix", "source"]

HANDOFF = ("none", "live")  # the values of `SystemSpec.handoff`


def source(worker: GpuWorker, inst: Instance) -> tuple[GpuWorker, float] | None:
    """The GPU whose running instance of `inst`'s model computes the layers `inst` lacks, and one token's
    activations' time to it (see the module docstring); None when there is none."""
    cluster = worker.cluster
    arch = inst.entry.spec.arch
    if arch is None or not arch.hidden_size:
        return None
    topology = cluster.topology
    node = topology.node_of(worker.gpu_id)
    best: tuple[float, int, GpuWorker] | None = None
    for w in cluster.warm_workers.get(inst.model, ()):
        other = w.instance
        if (w is worker or other is None or other.model != inst.model or len(other.group) != 1
                or other.stages is not None or (other.loading is not None and not other.loading.finished)):
            continue
        if topology.node_of(w.gpu_id) != node and not topology.spec.rdma:
            continue
        bps = link_bps(cluster, w.gpu_id, worker.gpu_id)
        if best is None or (-bps, w.gpu_id) < (-best[0], best[1]):
            best = (bps, w.gpu_id, w)
    if best is None:
        return None
    return best[2], arch.hidden_size * ACTIVATION_BYTES / best[0]


def landed_prefix(progress: LayerProgress) -> int:
    """How many layers, from the first, have landed (every one of them once the load has finished)."""
    pending = progress.pending
    if progress.finished or pending is None:
        return len(progress.ready)
    n = 0
    for p in pending:
        if p:
            break
        n += 1
    return n


def shares(flops: Sequence[int], local: int) -> float:
    """The share of a pass's work in its first `local` layers (by dense FLOPs per token)."""
    total = sum(flops)
    return sum(flops[:local]) / total if total else local / max(1, len(flops))

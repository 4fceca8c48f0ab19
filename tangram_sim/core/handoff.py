"""Live layer handoff (BlitzScale's live autoscaling, `handoff: eager | costed`): while a new instance's
weights are still landing, a running instance of the same model (the *source*) computes the layers the
new one does not hold yet, so the new instance may serve before its load ends.

With execute-while-load (which a handoff requires), a cold start's layers land in compute order.
Every pass of the new instance before its last layer has landed - its first prefill, later prefills,
decode steps - computes on its own GPU the layers that have landed, in order, and at the first layer
that has not, hands the rest of the pass to the source: the activations of the pass's tokens cross the
GPU network to the source once (hidden size x 2 bytes per token at the link's rate alone, as a pipeline
hop, `core.pipeline`), the source computes the remaining layers and the head, and the sampled tokens
come back (a few bytes, not timed). When to hand off is the system's rule: `eager`, BlitzScale's, hands
off at every layer not landed (a layer is computed where it is, never waited for); `costed` hands off
only when the waiting it saves the pass's requests exceeds what it adds to the source's
(`sim.handoff.worth`), so a load about to end is waited for and a busy source is not handed a long
prefill to spare milliseconds.

The source is chosen at every pass: a GPU that leads an instance of the model on as many GPUs (a
tensor-parallel group of the same degree, or one GPU; not a pipeline), its weights all landed, reachable
over the GPU network from the new instance's leader (in the node, or across nodes with RDMA:
`TopologySpec.rdma`); the least busy first (requests running and queued there: the work spreads over
the instances up), then the one with the fewest seconds of handed-off work still ahead of it (busy
instances all run a full batch; without this, 16 of the 22 choices of one burst went to the lowest GPU
of the node), then the fastest link, then the lowest GPU; the hop is timed between the leaders. An
instance still in its startup stages, or whose own layers still land, is no source.
Without one, a pass waits for its layers as execute-while-load alone does. The source pays for the work:
the seconds it computes for the new instance delay its own passes (the one under way, or the next; its
GPU time, `busy_s`, includes them), so an overloaded source slows down, as BlitzScale's does. A
prefill's layers cost the source their whole compute; a decode step's cost it what they add to its own
batch's step (`marginal_decode_s`: a decode step is mostly reading the weights, which its own step
reads anyway), or the whole of them when it has no batch.

Left out: the KV of the layers the source computes is written there and would move to the new instance
when those layers land (it is booked on the new instance from the start, as for a one-GPU instance, and
its move is not timed); the source's own batch and the handed-off work do not overlap on its GPU (they
are run one after the other).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from tangram_sim.core.pipeline import ACTIVATION_BYTES, link_bps

if TYPE_CHECKING:
    from tangram_sim.core.device import LayerProgress
    from tangram_sim.core.worker import GpuWorker, Instance
    from tangram_sim.specs.timemodel import TimeModel

__all__ = ["HANDOFF", "landed_prefix", "marginal_decode_s", "shares", "source"]

HANDOFF = ("none", "eager", "costed")  # the values of `SystemSpec.handoff`


def source(worker: GpuWorker, inst: Instance, owed: Callable[[GpuWorker], float] = lambda _w: 0.0
           ) -> tuple[GpuWorker, float] | None:
    """The GPU whose running instance of `inst`'s model computes the layers `inst` lacks, and one token's
    activations' time to it (see the module docstring); None when there is none. `owed`: the seconds of
    work a GPU has taken from new instances still ahead of it (the device's books)."""
    cluster = worker.cluster
    arch = inst.entry.spec.arch
    if arch is None or not arch.hidden_size:
        return None
    topology = cluster.topology
    node = topology.node_of(worker.gpu_id)
    best: tuple[float, int, GpuWorker] | None = None
    for w in cluster.warm_workers.get(inst.model, ()):
        other = w.instance
        # serving with every layer landed: an instance still in its startup stages has no `loading` yet (a
        # system with a handoff executes while loading, so every instance it started has one)
        if (w is worker or other is None or other.model != inst.model or len(other.group) != len(inst.group)
                or other.stages is not None or other.loading is None or not other.loading.finished):
            continue
        if topology.node_of(w.gpu_id) != node and not topology.spec.rdma:
            continue
        bps = link_bps(cluster, w.gpu_id, worker.gpu_id)
        rank = (len(other.running) + w.queued, owed(w), -bps, w.gpu_id)
        if best is None or rank < best[0]:
            best = (rank, bps, w)
    if best is None:
        return None
    return best[2], arch.hidden_size * ACTIVATION_BYTES / best[1]


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


def marginal_decode_s(time_model: TimeModel, src: GpuWorker, inst: Instance, n: int, kv_tokens: float) -> float:
    """What `n` sequences of `inst` (`kv_tokens` of KV) add to a decode step of the source's own batch."""
    spec, tp = inst.entry.spec, inst.tp
    own = src.instance
    running = own.running if own is not None else []
    if not running:
        return time_model.decode_step_s(spec, n, kv_tokens, tp)
    kv_own = sum(r.input_tokens + r.done_tokens for r in running)
    return (time_model.decode_step_s(spec, len(running) + n, kv_own + kv_tokens, tp)
            - time_model.decode_step_s(spec, len(running), kv_own, tp))

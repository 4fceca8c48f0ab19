"""Pipelined cold starts in the lifecycle: k GPUs each load one stage's layers, serve as a pipeline, then
the instance consolidates onto its leader (HydraServe; `policies.pipeline` has the arithmetic).

- Placement (`propose`, from `Cluster.route`): when the system's pipeline policy allows more than one
  stage and the scheduler's choice (the leader) is idle, the GPUs that are free (no queue, not held, no
  running batch; an idle instance of another model is ended by the placeholder, as for a tensor-parallel
  gang) are taken in one of two orders: the leader's node first (fast hops), or one GPU per node in turn
  (each node's NIC and storage link add their bandwidth). For each feasible k and order the chain rule
  (`policies.pipeline.pipelined_ttft_s`) predicts the TTFT of the request from the stages' missing bytes
  at their host source's rate alone (a node's storage link and the remote store shared by the stages
  that read through them), the layers' share of the prefill and the hops; each k keeps its better
  order, and the policy picks k. The instance
  is then a gang (`core.gang`) whose `Stages` say which units each GPU loads: a model's units go to the
  stage of the last layer they hold (units of no layer, e.g. a vision tower, to the first stage).
- Serving: the modelled device makes each stage's layers ready when its GPU has loaded them, so the first
  prefill follows the chain rule over stages and hops; every prefill and decode step adds each hop's
  activation transfer (hidden size x 2 bytes per token, bf16 activations) at the link's rate alone
  (`Stages.hop_s_per_token`). The whole model's KV is booked on the leader from the start (the room it
  needs once consolidated); the time model computes as on one GPU.
- Consolidation (`merge`, `consolidate`): once every stage has landed, the leader loads the other stages'
  units in the background (a packing plan like a cold start's, from its own sources). At the next
  iteration boundary after they land (or when the batch drains, which waits for them), the running
  requests' KV of the other stages' layers is moved to the leader (their bytes x the stages' share of
  the layers, each stage at its link's rate alone, in parallel: the batch pauses that long), the
  followers unpin their stages' units (kept for reuse or freed, as the retention policy says) and are
  released. KV is moved, not recomputed, as HydraServe does. When the leader has no room for the rest
  (a plan cannot be found), the instance stays a pipeline until it ends.

A model with tied embeddings (no lm_head tensor: the head multiplies by the token table) has the table's
units on its first stage (the embeddings) and on its last (the head), as a pipeline-parallel engine
loads them; the leader, which holds them already, does not load them again when it consolidates.

Accounting: a pipelined cold start's `bytes_needed` is its stages' bytes (the model's, plus the token
table once more for a tied model), `bytes_loaded + bytes_reused` over its stages; the consolidation's loads are the leader's own (they appear in the per-source byte
columns, `core.sources`, not in any request's `bytes_loaded`).
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

from tangram_sim.arena import Key
from tangram_sim.core.device import RankLoad
from tangram_sim.core.memory import Ask, acquire, commit
from tangram_sim.core.records import Gang, Request, Stages
from tangram_sim.models.layers import layer_blocks, unit_parts
from tangram_sim.models.spec import is_lm_head, is_lookup_table
from tangram_sim.policies.packing import Move
from tangram_sim.policies.pipeline import pipelined_ttft_s, split_layers, stage_sums

if TYPE_CHECKING:
    from tangram_sim.core.router import Cluster
    from tangram_sim.core.worker import GpuWorker, Instance

__all__ = ["consolidate", "hop_s", "link_bps", "merge", "propose"]

ACTIVATION_BYTES = 2  # bytes per hidden value crossing a stage boundary (bf16 activations)

# (starts, per stage: keys, (key, bytes) units, aligned sizes, bytes), or None when k stages cannot each
# hold a unit
Layout = tuple[tuple[int, ...], tuple[tuple[Key, ...], ...], tuple[tuple[tuple[Key, int], ...], ...],
               tuple[tuple[int, ...], ...], tuple[int, ...]]


def layout(cluster: Cluster, model: str, k: int) -> Layout | None:
    """The model's units split into `k` stages (cached per model and k)."""
    cache = cluster.pipeline_layouts
    if (model, k) in cache:
        return cache[(model, k)]
    entry = cluster.entries[model]
    blocks = layer_blocks(entry.spec)
    found: Layout | None = None
    if k <= len(blocks.nbytes):
        starts = split_layers(blocks.nbytes, k)
        members: list[list[int]] = [[] for _ in range(k)]
        for i, parts in enumerate(unit_parts(entry.spec, entry.units)):
            stage = bisect.bisect_right(starts, parts[-1][1]) - 1 if parts else 0
            members[stage].append(i)
        tensors = entry.spec.tensors
        if k > 1 and not any(is_lm_head(t.name) for t in tensors):
            # tied embeddings: the head, on the last stage, multiplies by the token table, which loads
            # with the embeddings on the first; the last stage loads the table's units too (as
            # pipeline-parallel engines do: vLLM's last rank reads embed_tokens for its lm_head)
            table = [i for i in members[0] if any(is_lookup_table(tensors[t].name) and "position" not in tensors[t].name
                                                   for t in entry.units[i].tensor_indices)]
            members[-1] = sorted({*members[-1], *table})
        if all(members):
            units, aligned = entry.rank_units[0], entry.rank_aligned[0]
            found = (starts,
                     tuple(tuple(units[i][0] for i in m) for m in members),
                     tuple(tuple(units[i] for i in m) for m in members),
                     tuple(tuple(aligned[i] for i in m) for m in members),
                     tuple(sum(units[i][1] for i in m) for m in members))
    cache[(model, k)] = found
    return found


def link_bps(cluster: Cluster, src: int, dst: int) -> float:
    """Rate alone of a GPU-to-GPU transfer: a peer link inside a node, else the GPUs' NICs (with RDMA,
    the whole remote-GPU path)."""
    topology = cluster.topology
    if topology.node_of(src) == topology.node_of(dst):
        return topology.source_bps("peer-gpu", dst, src)
    if topology.spec.rdma:
        return topology.source_bps("remote-gpu", dst, src)
    return min(topology.nic_out[topology.nic_of(src)].bps, topology.nic_in[topology.nic_of(dst)].bps)


def _free(worker: GpuWorker, model: str) -> bool:
    """May `worker` take a stage now: it waits for work (`GpuWorker.idle`) and has no instance, or an idle
    one of another model on its GPU alone (the placeholder ends it at once)."""
    inst = worker.instance
    return worker.idle() and (inst is None or (len(inst.group) == 1 and inst.model != model))


def propose(cluster: Cluster, req: Request, leader: GpuWorker) -> Gang | None:
    """The pipelined gang for `req`'s new instance led by `leader`, or None for an instance on one GPU."""
    policy = cluster.pipeline
    entry = cluster.entries[req.model]
    arch = entry.spec.arch
    if policy.max_k < 2 or entry.tp != 1 or arch is None or not arch.hidden_size or not _free(leader, req.model):
        return None
    topology = cluster.topology
    lead_node = topology.node_of(leader.gpu_id)
    free = [w for w in cluster.workers if w is not leader and _free(w, req.model)]
    # near: the leader's node first (fast hops); spread: one GPU per node in turn, the leader's node last
    # (each node's storage link and NIC add their bandwidth); each k takes the better prediction
    near = sorted(free, key=lambda w: (w.node.node_id != lead_node, w.instance is not None, w.gpu_id))
    seen: dict[int, int] = {lead_node: 1}
    turn: dict[GpuWorker, int] = {}
    for w in sorted(free, key=lambda w: (w.instance is not None, w.gpu_id)):
        turn[w] = seen.get(w.node.node_id, 0)
        seen[w.node.node_id] = turn[w] + 1
    spread = sorted(free, key=lambda w: (turn[w], w.instance is not None, w.gpu_id))
    token_bytes = arch.hidden_size * ACTIVATION_BYTES
    compute = cluster.time_model.prefill_layers_s(entry.spec, req.input_tokens, 1)
    options: list[tuple[int, float]] = []
    plans: dict[int, tuple[tuple[GpuWorker, ...], Layout, tuple[float, ...]]] = {}
    for k in range(1, min(policy.max_k, len(free) + 1) + 1):
        found = layout(cluster, req.model, k)
        if found is None:
            continue
        best: tuple[float, tuple[GpuWorker, ...], tuple[float, ...]] | None = None
        for order in (near, spread) if k > 1 else (near,):
            group = (leader, *order[:k - 1])
            ttft, hop_per_token = _predict(cluster, req, group, found, compute, token_bytes)
            if best is None or ttft < best[0]:
                best = (ttft, group, hop_per_token)
        assert best is not None
        options.append((k, best[0]))
        plans[k] = (best[1], found, best[2])
    if not options:
        return None
    k = policy.choose(options)
    if k == 1:
        return None
    group, (starts, keys, units, aligned, nbytes), hop_per_token = plans[k]
    n_layers = len(compute)
    bounds = [*starts, n_layers]
    stages = Stages(
        starts=starts, rank_keys=keys, rank_units=units, rank_aligned=aligned, rank_bytes=nbytes,
        hop_s_per_token=hop_per_token,
        kv_share=tuple((bounds[j + 1] - bounds[j]) / n_layers for j in range(k)),
        leader_bps=tuple(link_bps(cluster, w.gpu_id, leader.gpu_id) if j else 0.0 for j, w in enumerate(group)),
        merged=cluster.env.event(),
    )
    cluster.recorder.log(cluster.env.now, leader.gpu_id, "pipelined", req.rid, f"k={k}")
    return Gang(cluster.env, group, stages)


def _predict(cluster: Cluster, req: Request, group: tuple[GpuWorker, ...], found: Layout, compute: list[float],
             token_bytes: int) -> tuple[float, tuple[float, ...]]:
    """The chain rule's TTFT of `req` on stages `group` (module docstring), and each hop's time per token.

    A stage is ready once its missing units have arrived from where the node holds each (`core.sources`:
    its DRAM cache, else its SSD, else the remote store), one transfer per source in parallel as the
    modelled device runs them, all through the stage's PCIe link; the stages of one node share its SSD,
    those behind one NIC share it, and all k share the remote store's limit."""
    topology = cluster.topology
    k = len(group)
    starts, keys, units, _aligned, _nbytes = found
    per_node: dict[int, int] = {}
    per_nic: dict[int, int] = {}
    for w in group:
        per_node[w.node.node_id] = per_node.get(w.node.node_id, 0) + 1
        nic = topology.nic_of(w.gpu_id)
        per_nic[nic] = per_nic.get(nic, 0) + 1
    pcie = cluster.pcie_bps
    ready = []
    for j, w in enumerate(group):
        node = w.node
        cache, on_ssd, ssd_holds_all = node.cache, node.on_ssd, node.tiers.ssd_holds_all
        dram = ssd = remote = 0
        for (key, n), r in zip(units[j], w.arena.lookup_many(keys[j])):
            if r is not None:
                continue
            if key in cache:
                dram += n
            elif ssd_holds_all or key in on_ssd:
                ssd += n
            else:
                remote += n
        remote_bps = topology.nic_in[topology.nic_of(w.gpu_id)].bps / per_nic[topology.nic_of(w.gpu_id)]
        if topology.store is not None:
            remote_bps = min(remote_bps, topology.store.bps / k)
        seconds = max(dram / pcie, ssd / min(pcie, topology.ssd[node.node_id].bps / per_node[node.node_id]),
                      remote / min(pcie, remote_bps), (dram + ssd + remote) / pcie)
        ready.append(cluster.engine_overhead_s + seconds)
    hop_per_token = tuple(token_bytes / link_bps(cluster, group[j].gpu_id, group[j + 1].gpu_id)
                          for j in range(k - 1))
    hops = [h * req.input_tokens for h in hop_per_token]
    return pipelined_ttft_s(ready, stage_sums(compute, starts), hops), hop_per_token


def hop_s(stages: Stages, tokens: float) -> float:
    """The activations of `tokens` tokens crossing every hop once, each at its link's rate alone."""
    return sum(stages.hop_s_per_token) * tokens


def merge(leader: GpuWorker, inst: Instance):
    """The leader's background load of the other stages' units, once every stage has landed (a process);
    fires `inst.stages.merged` with whether they are now resident (pinned) on the leader."""
    stages = inst.stages
    assert stages is not None
    c = leader.cluster
    env = c.env
    loading = inst.loading
    if loading is not None and not loading.finished:
        yield loading.done
    own = set(stages.rank_keys[0])  # a tied model's token table is on the last stage and here already
    pairs = [(u, a) for j in range(1, len(stages.rank_units))
             for u, a in zip(stages.rank_units[j], stages.rank_aligned[j]) if u[0] not in own]
    units = [u for u, _a in pairs]
    aligned_sizes = [a for _u, a in pairs]
    arena = leader.arena
    found = arena.lookup_many([u[0] for u in units])
    missing = [u for u, r in zip(units, found) if r is None]
    reused = [u[0] for u, r in zip(units, found) if r is not None]
    aligned = sum(a for a, r in zip(aligned_sizes, found) if r is None)
    plan = acquire(leader, Ask("weights", units=missing, aligned=aligned, protect=reused), env.now)
    if plan is None:
        c.recorder.log(env.now, leader.gpu_id, "merge_skipped", inst.head.rid, inst.model)
        stages.merged.succeed(False)
        return
    moves: list[Move] = []
    commit(leader, plan, env.now, on_move=moves.append if plan.moved_bytes else None)
    arena.pin_many(reused)
    leader.compaction_bytes += plan.moved_bytes
    if missing:
        yield leader.device.load_units(RankLoad(leader, missing, moves, plan.moved_bytes))
        leader.node.after_load(missing)
        arena.finish_load_many([u[0] for u in missing], pin=True)
    c.recorder.log(env.now, leader.gpu_id, "merged", inst.head.rid, f"loaded={sum(n for _k, n in missing)}")
    stages.merged.succeed(True)


def consolidate(leader: GpuWorker, inst: Instance):
    """Wait for the merge, then move the running requests' KV of the other stages to the leader and free
    the followers (nothing when the merge found no room: the instance stays a pipeline)."""
    stages = inst.stages
    assert stages is not None
    if not stages.merged.triggered:
        yield stages.merged
    if not stages.merged.value:
        return
    c = leader.cluster
    env = c.env
    kv = sum(r.kv_bytes for r in inst.running)
    move_s = max((kv * share / bps for share, bps in zip(stages.kv_share[1:], stages.leader_bps[1:])), default=0.0)
    step = leader.device.consolidate(inst, move_s)  # the KV move (modelled), or what a real device does
    if step is not None:
        done, seconds = step
        yield done
        move_s = seconds()
        leader.busy_s += move_s
    now = env.now
    for rank, worker in enumerate(inst.group):
        if rank == 0:
            continue
        worker.held_s += now - inst.started
        unpinned = worker.arena.unpin_many(inst.rank_keys[rank])
        if not worker.retention.retains:
            worker.arena.evict_many(unpinned)
    followers = inst.group[1:]
    stages.consolidated = True
    inst.stages = None
    inst.group = inst.kv_group = (leader,)
    inst.rank_keys = inst.entry.rank_keys
    gang = inst.gang
    inst.gang = None
    assert gang is not None
    gang.released.succeed()
    c.recorder.log(now, leader.gpu_id, "consolidated", inst.head.rid, f"kv={kv} move_s={move_s:.6f}")
    for worker in (leader, *followers):
        c.recorder.sample(worker)

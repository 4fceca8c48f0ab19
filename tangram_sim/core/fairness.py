"""Admission fairness of a running instance: when must it stop admitting its own queued requests?

Each GPU starts instances in FCFS order, but the active instance may let its queued requests join
the batch past an older request of another model (the *blocker*), since a switch costs a cold start.
How long it may do so is the system's fairness policy (`FAIRNESS` in `policies.lifecycle`, which a plugin
may extend; one that `predicts` is handed the predicted rest of the blocker's wait computed here):

- `fixed`: while the blocker has waited less than `fairness_window_s` (`policies.lifecycle.must_yield`).
- `adaptive`: while the blocker's predicted wait stays under `fairness_bound_s`: what it has waited so
  far, plus the predicted time for the batch to drain with the candidate admitted (pending prefills,
  then the longest remaining decode at the batch's step time), plus its own cold start on this GPU
  (engine start + its missing bytes over PCIe, or over storage when the host cache lacks them; with
  execute-while-load the part of that load its prefill cannot hide). Under overload the active model keeps serving for as
  long as the bound allows instead of switching at every interleaved arrival; when the queue is short
  the blocker's wait stays small anyway.

The estimates come from the configured time model, engine overhead and PCIe bandwidth (as the
scheduler's do), so a simulation and a real replay decide alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from tangram_sim.core.records import Request
from tangram_sim.policies.scheduler import pipelined_load_s

if TYPE_CHECKING:
    from tangram_sim.core.worker import GpuWorker, Instance


def blocker(worker: GpuWorker, inst: Instance) -> Request | None:
    """The oldest request waiting on this instance's GPUs for something else than it."""
    best = None
    for w in inst.group:
        oldest = w.queues.head(exclude=inst.model if w is worker else None)
        if oldest is not None and (best is None or oldest.rid < best.rid):
            best = oldest
    return best


def stop_admitting(worker: GpuWorker, inst: Instance, candidate: Request, admitted: Sequence[Request]) -> bool:
    """Should the instance stop admitting `candidate` (its model's oldest queued request), with
    `admitted` already taken in this round?"""
    c = worker.cluster
    policy = c.fairness
    blk = blocker(worker, inst)
    now = c.env.now
    if not policy.predicts:
        return policy.must_yield(blk, candidate, now, 0.0)
    if blk is None or blk.rid > candidate.rid:
        return False  # no older blocker: nothing to predict (the prediction is the costly part)
    real = blk.slot_of if blk.slot_of is not None else blk
    predicted = drain_s(worker, inst, admitted, candidate) + switch_s(worker, real)
    return policy.must_yield(blk, candidate, now, predicted)


def drain_s(worker: GpuWorker, inst: Instance, admitted: Sequence[Request], candidate: Request) -> float:
    """Predicted seconds until the batch (running + admitted + candidate) has finished."""
    c = worker.cluster
    tm = c.time_model
    spec = inst.entry.spec
    tp = inst.tp
    pending = [*admitted, candidate]
    tokens = sum(r.input_tokens for r in pending)
    groups = -(-len(pending) // c.system.prefill_batch) if c.system.prefill_batch else 1
    prefill = groups * tm.prefill_s(spec, -(-tokens // groups), tp)
    longest = 0.0
    kv = 0.0
    batch = 0
    for r in (*inst.running, *pending):
        left = max(0.0, r.output_tokens - max(r.done_tokens, 1.0))
        longest = max(longest, left)
        kv += r.input_tokens + max(r.done_tokens, 1.0) + left / 2  # its mean context over the drain
        batch += 1
    return prefill + longest * tm.decode_step_s(spec, batch, kv, tp)


def switch_s(worker: GpuWorker, req: Request) -> float:
    """Predicted cold start of `req`'s model on this GPU: engine start + its missing bytes over PCIe,
    or over the slower storage link when the node's host cache does not hold the checkpoint (the
    scheduler's `estimated_load_s`); with execute-while-load, only the part of that load its prefill
    cannot hide (`pipelined_load_s`)."""
    c = worker.cluster
    missing = max(0, c.gpu_model_bytes[req.model] - worker.resident_bytes(req.model))
    node = worker.node
    entry = c.entries[req.model]
    bps = c.pcie_bps
    if not node.holds(entry, req.model):
        bps = min(bps, c.topology.storage_bps(node.node_id))
    if c.source.gpu_copies:  # a GPU copy faster than the host path sets the rate (the scheduler's rule)
        bps = max(bps, c.copy_bps(req.model, (worker,)))
    if c.pipeline_layers is not None:
        prefill = c.time_model.prefill_s(entry.spec, req.input_tokens, entry.tp)
        return c.engine_overhead_s + pipelined_load_s(missing / bps, prefill, c.pipeline_layers[req.model])
    return c.engine_overhead_s + missing / bps

"""Tensor-parallel gangs seen from a GPU: waiting at a gang's barrier, following a gang's instance,
cancelling a gang, and placing again what an ended gang instance leaves queued.

A gang is *pending* from its routing (`Cluster.route` gives the request a `Gang` and queues a
placeholder, `slot_of` set, on every follower) until its barrier fills, when the leader's cold start
begins and the request's `gang` is cleared (the instance keeps the gang), or until it is cancelled: the
leader admitted the request into an instance of its model already running on the same group, and the
followers' placeholders are dropped at once. So a request's `gang` is set exactly while it waits for an
instance start of its own; a tensor-parallel request without one queues on its leader for the
instance running there, and is placed again (`place_again`) if that instance ends first.

Order: each GPU starts instances in the order of its queues' heads (lowest rid). The members of a group
hold the same pending gangs of a model in the same order, since `route` queues a gang on all of them at
once, so they agree on which gang comes first. A request placed again keeps its rid, older than the
entries already queued, and may become the head of a GPU that already waits at another gang's barrier:
a waiting member therefore withdraws when its head changes, and no two members can wait at two gangs
for each other. Inconsistent gang state raises `LifecycleError`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tangram_sim.core.records import LifecycleError, Request

if TYPE_CHECKING:
    from tangram_sim.core.worker import GpuWorker


def join(worker: GpuWorker, head: Request):
    """Wait at the barrier of `head`'s pending gang; `head` is `worker`'s queue head (the leader's
    request or a follower's placeholder) and `worker` runs no instance. Returns the gang once every
    member has arrived, or None when another entry became the head first (`worker` withdrew)."""
    gang = head.gang
    if gang is None or gang.released.triggered:
        raise LifecycleError(f"gpu {worker.gpu_id}: request {head.rid} ({head.model}) has no pending gang")
    if worker.instance is not None or worker.held_by is not None:
        raise LifecycleError(f"gpu {worker.gpu_id}: joins the gang of request {head.rid} while busy")
    gang.arrive(worker)
    env = worker.cluster.env
    while not gang.ready.triggered:
        wake = worker._wake = env.event()
        worker._wake_any = True  # any arrival may be an older entry placed again
        yield gang.ready | wake
        worker._wake = None
        if not gang.ready.triggered and worker.queues.head() is not head:
            gang.withdraw(worker)
            return None
    return gang


def follow(worker: GpuWorker, slot: Request):
    """A follower's turn for a placeholder at its queue head: join the gang, then stay held by its
    leader until the instance ends."""
    gang = yield from join(worker, slot)
    if gang is None:
        return
    if worker._dequeue(slot.model) is not slot:
        raise LifecycleError(f"gpu {worker.gpu_id}: placeholder of request {slot.rid} left its queue")
    worker.held_by = gang.workers[0]
    worker.cluster.recorder.log(worker.cluster.env.now, worker.gpu_id, "gang_join", slot.rid, slot.model)
    yield gang.released
    worker.held_by = None


def cancel(leader: GpuWorker, req: Request) -> None:
    """`req` had a pending gang but joins the instance of its model already running on its group: drop
    the gang and its placeholders (the followers are held by that instance, none has arrived)."""
    gang = req.gang
    inst = leader.instance
    if gang is None or inst is None or inst.group != gang.workers or gang.arrived or gang.released.triggered:
        raise LifecycleError(f"gpu {leader.gpu_id}: cannot cancel the gang of request {req.rid} ({req.model})")
    req.gang = None
    gang.released.succeed()
    for follower in gang.workers[1:]:
        queues = follower.queues
        found = False
        for _ in range(queues.count_for(req.model)):  # rotate the model's queue once, dropping the slot
            slot = queues.pop(req.model)
            if slot.slot_of is req:
                found = True
            else:
                queues.push(slot)
        if not found:
            raise LifecycleError(f"gpu {follower.gpu_id}: no placeholder of request {req.rid} ({req.model})")


def place_again(leader: GpuWorker, model: str) -> None:
    """The gang instance of `model` on `leader` ended: its requests queued for it (no pending gang of
    their own) are routed again, in queue order; those with a pending gang stay, in order."""
    queues = leader.queues
    orphans: list[Request] = []
    kept: list[Request] = []
    for _ in range(queues.count_for(model)):
        req = queues.pop(model)
        (orphans if req.gang is None else kept).append(req)
    for req in kept:
        queues.push(req)
    if not queues.count:
        leader.tail_model = None
    for req in orphans:
        leader.cluster.route(req, replace=True)


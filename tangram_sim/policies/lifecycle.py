"""The per-GPU request lifecycle rules that the simulator and the real replay share.

Both drivers keep one FCFS queue per model on each GPU and decide the same three things: which
request starts the next instance (the oldest queued, whatever its model), when the running instance
must stop admitting its own queued requests (an older request of another model has waited a whole
fairness window), and which running request gives its KV back when the batch cannot grow (the
newest, never the last one left). Keeping those rules here, over plain objects with `rid`, `model` and
`arrival`, is what keeps the simulator's predictions and the replay's measurements comparable.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from typing import Generic, Protocol, TypeVar

__all__ = ["ModelQueues", "Queued", "must_yield", "must_yield_predicted", "preemption_victim"]


class Queued(Protocol):
    """What the rules read of a request: its trace row (FCFS order), model and arrival time."""

    rid: int
    model: str
    arrival: float


R = TypeVar("R", bound=Queued)


class ModelQueues(Generic[R]):
    """One GPU's queued requests, one deque per model in arrival order.

    Per-model deques let an instance admit its own model's requests in O(1) while older requests of
    other models wait; the global FCFS order is recovered from the heads (rids are arrival order).
    """

    __slots__ = ("_by_model", "count")

    def __init__(self) -> None:
        self._by_model: dict[str, deque[R]] = {}  # model -> its queued requests, oldest first
        self.count = 0  # requests in all queues

    def __len__(self) -> int:
        return self.count

    def __bool__(self) -> bool:
        return self.count > 0

    def __iter__(self) -> Iterator[R]:
        """Every queued request, model by model (not in FCFS order)."""
        for queue in self._by_model.values():
            yield from queue

    def _queue(self, model: str) -> deque[R]:
        queue = self._by_model.get(model)
        if queue is None:
            queue = self._by_model[model] = deque()
        return queue

    def push(self, req: R) -> None:
        """A new arrival: behind every queued request of its model."""
        self._queue(req.model).append(req)
        self.count += 1

    def push_front(self, req: R) -> None:
        """A preempted request: back at the head of its model's queue, to be recomputed first."""
        self._queue(req.model).appendleft(req)
        self.count += 1

    def first(self, model: str) -> R | None:
        """The oldest queued request of `model` (None when it has none)."""
        queue = self._by_model.get(model)
        return queue[0] if queue else None

    def pop(self, model: str) -> R:
        """Remove and return the oldest queued request of `model` (it must have one)."""
        req = self._by_model[model].popleft()
        self.count -= 1
        return req

    def count_for(self, model: str) -> int:
        queue = self._by_model.get(model)
        return len(queue) if queue else 0

    def oldest_arrivals(self) -> dict[str, float]:
        """Model -> arrival of its oldest queued request, for every model with one queued."""
        return {model: queue[0].arrival for model, queue in self._by_model.items() if queue}

    def head(self, exclude: str | None = None) -> R | None:
        """The oldest queued request (lowest rid), leaving out model `exclude`; None when none."""
        best = None
        for model, queue in self._by_model.items():
            if queue and model != exclude and (best is None or queue[0].rid < best.rid):
                best = queue[0]
        return best


def must_yield(blocker: Queued | None, candidate: Queued, now: float, fairness_window_s: float) -> bool:
    """Should the running instance stop admitting `candidate` (its own model's oldest queued request)?

    Yes when `blocker`, the oldest queued request for something else on this GPU, arrived before the
    candidate and has waited at least `fairness_window_s`: plain FCFS would switch models at every
    interleaved arrival and pay a cold start each time; never yielding would starve other models.
    """
    return (
        blocker is not None
        and blocker.rid < candidate.rid
        and now - blocker.arrival >= fairness_window_s
    )


def must_yield_predicted(blocker: Queued | None, candidate: Queued, now: float, predicted_s: float,
                         bound_s: float) -> bool:
    """The adaptive rule: stop admitting `candidate` once `blocker` (older, of another model) would wait
    at least `bound_s` in all: what it has waited so far plus `predicted_s`, the predicted rest of its
    wait (the batch's drain with the candidate admitted, then its own cold start)."""
    return (
        blocker is not None
        and blocker.rid < candidate.rid
        and now - blocker.arrival + predicted_s >= bound_s
    )


def preemption_victim(running: Sequence[R], growing: R | None = None) -> R | None:
    """The running request that gives its KV back when the batch cannot grow.

    The newest in admission order (it has the least work to recompute), other than `growing` (the
    request that needs the memory, when there is one); None when only one request is running, which
    the caller then rejects, since preempting it would free memory for nobody.
    """
    if len(running) <= 1:
        return None
    for req in reversed(running):
        if req is not growing:
            return req
    return None

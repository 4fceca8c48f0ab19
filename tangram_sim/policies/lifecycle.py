"""The per-GPU request lifecycle rules that the simulator and the real replay share.

Both drivers keep one FCFS queue per model on each GPU and decide the same three things: which
request starts the next instance (the oldest queued, whatever its model), when the running instance
must stop admitting its own queued requests (an older request of another model has waited a whole
fairness window), and which running request gives its KV back when the batch cannot grow (the
newest, never the last one left). Keeping those rules here, over plain objects with `rid`, `model` and
`arrival`, is what keeps the simulator's predictions and the replay's measurements comparable.

The last two are policies chosen by a system (registries, like retention's):

- `FAIRNESS` (system field `fairness`): `fixed` (default) stops admitting once the blocker has waited
  `fairness_window_s` (`must_yield`); `adaptive` once its predicted wait reaches `fairness_bound_s`
  (`must_yield_predicted`; the lifecycle predicts the rest of its wait, `core.fairness`).
- `PREEMPTION` (system field `preemption`): `newest` (default) gives back the newest request's KV
  (`preemption_victim`); `longest-context` the request holding the most KV (longest prompt + generated
  tokens; ties: the newest), so one preemption frees the most memory at the price of more recompute.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from typing import ClassVar, Generic, Protocol, TypeVar

from tangram_sim.policies.params import non_negative
from tangram_sim.registry import Registry

__all__ = [
    "FAIRNESS",
    "PREEMPTION",
    "AdaptiveFairness",
    "FairnessPolicy",
    "FixedFairness",
    "LongestContextPreemption",
    "ModelQueues",
    "NewestPreemption",
    "PreemptionPolicy",
    "Queued",
    "Running",
    "must_yield",
    "must_yield_predicted",
    "preemption_victim",
]


class Queued(Protocol):
    """What the rules read of a request: its trace row (FCFS order), model and arrival time."""

    rid: int
    model: str
    arrival: float


class Running(Queued, Protocol):
    """What a preemption rule may read of a running request besides: its prompt and generated tokens."""

    input_tokens: int
    done_tokens: float


R = TypeVar("R", bound=Queued)
P = TypeVar("P", bound=Running)


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


class FairnessPolicy:
    """When must the running instance stop admitting its own queued requests? (`must_yield`)"""

    needs: ClassVar[frozenset[str]] = frozenset()  # what the run passes it (`policies.needs`)
    predicts: ClassVar[bool] = False  # True: the lifecycle predicts the blocker's remaining wait for it

    def must_yield(self, blocker: Queued | None, candidate: Queued, now: float, predicted_s: float) -> bool:
        """Stop admitting `candidate` (its model's oldest queued request) because of `blocker` (the
        oldest queued request for something else on the instance's GPUs, None when there is none)?
        `predicted_s` is the predicted rest of the blocker's wait when the policy `predicts` (0 else)."""
        raise NotImplementedError


FAIRNESS = Registry[FairnessPolicy]("fairness policy")


@FAIRNESS.register("fixed")
class FixedFairness(FairnessPolicy):
    """Yield once the blocker has waited the system's `fairness_window_s`."""

    needs: ClassVar[frozenset[str]] = frozenset({"fairness_window_s"})

    def __init__(self, fairness_window_s: float = 5.0) -> None:
        self.window_s = non_negative("fairness", "fairness_window_s", fairness_window_s)

    def must_yield(self, blocker: Queued | None, candidate: Queued, now: float, predicted_s: float) -> bool:
        return must_yield(blocker, candidate, now, self.window_s)


@FAIRNESS.register("adaptive")
class AdaptiveFairness(FairnessPolicy):
    """Yield once the blocker's wait so far plus its predicted rest reach the system's `fairness_bound_s`."""

    needs: ClassVar[frozenset[str]] = frozenset({"fairness_bound_s"})
    predicts: ClassVar[bool] = True

    def __init__(self, fairness_bound_s: float = 60.0) -> None:
        self.bound_s = non_negative("fairness", "fairness_bound_s", fairness_bound_s)

    def must_yield(self, blocker: Queued | None, candidate: Queued, now: float, predicted_s: float) -> bool:
        return must_yield_predicted(blocker, candidate, now, predicted_s, self.bound_s)


class PreemptionPolicy:
    """Which running request gives its KV back when the batch cannot grow? (`victim`)"""

    needs: ClassVar[frozenset[str]] = frozenset()  # what the run passes it (`policies.needs`)

    def victim(self, running: Sequence[P], growing: P | None = None) -> P | None:
        """A request of `running` (in admission order) other than `growing`, or None: then the caller
        rejects `growing`, alone and still too large. Return None when only one request runs."""
        raise NotImplementedError


PREEMPTION = Registry[PreemptionPolicy]("preemption policy")


@PREEMPTION.register("newest")
class NewestPreemption(PreemptionPolicy):
    """The newest in admission order (`preemption_victim`): it has the least work to recompute."""

    def victim(self, running: Sequence[P], growing: P | None = None) -> P | None:
        return preemption_victim(running, growing)


@PREEMPTION.register("longest-context")
class LongestContextPreemption(PreemptionPolicy):
    """The request with the longest context (prompt + generated tokens), which holds the most KV: one
    preemption frees the most memory, so fewer requests are interrupted, though each recomputes more.
    Ties: the newest."""

    def victim(self, running: Sequence[P], growing: P | None = None) -> P | None:
        if len(running) <= 1:
            return None
        best = None
        best_tokens = -1.0
        for req in reversed(running):  # newest first: a tie keeps the newer one
            if req is growing:
                continue
            tokens = req.input_tokens + req.done_tokens
            if tokens > best_tokens:
                best, best_tokens = req, tokens
        return best

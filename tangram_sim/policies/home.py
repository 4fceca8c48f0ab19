"""Home-GPU placement: each model has a home GPU, so hot models are not copied onto every GPU.

Affinity and TTFT rules place a model wherever it is cheapest right now; with a few GPUs that means
both GPUs end up holding copies of the same hot models, and the bytes that a second copy takes are
bytes of other models that must be reloaded. `home-affinity` partitions the models over the GPUs by
popularity and size, and sends a model's new instances to its home:

- **Popularity**: exponentially decayed request counts (half-life `half_life_s`), fed by `observe`
  for every request the router sees (warm or not).
- **Partition** (greedy, deterministic): models by decayed share, descending (ties by name), each to
  one GPU whose unassigned room still holds its bytes; that GPU's room shrinks by them and its
  assigned share grows by the model's. With `balance: load` (the default) the GPU is the one with the
  smallest assigned share, the model's current home counting `stick_share` less (so homes do not move
  when shares merely reorder; ties: most room, then GPU id). With `balance: room` it is the current
  home while the model fits there, else the GPU with the largest fraction of its capacity unassigned.
  A model that fits nowhere any more goes to the GPU with the most room left (its current home on a
  tie), so when the weights do not all fit, the least popular models are the ones that share an
  overfull GPU. A model whose share exceeds `hot_share` gets ceil(share / hot_share) homes (at most
  every GPU), each taking its part of the share; the default 1.0 gives every model one home.
- **Re-partition**: a model seen for the first time is placed around the current homes (no other
  model moves); every model is placed again when a GPU is seen for the first time and, checked every
  `check_every` requests, when the decayed shares have drifted from those of the last partition by
  more than `drift` (total variation distance, 0..1).
- **Spill**: a request goes to its home (the home with the lowest predicted TTFT when it has several)
  unless that TTFT is more than `spill_slack_s` (default 3 s) worse than the best TTFT anywhere
  (TTFT = queue wait + load of the missing bytes + prefill, the `ttft-aware` estimate); then it goes
  to the best one. A GPU away from home that already holds the whole model (a copy left from an
  earlier spill or partition) takes the request as soon as its TTFT is lower than the home's: it
  loads nothing and makes no new copy. A request reaches the scheduler only when no warm instance of its model can take
  it (`core.router`), so a busy home is what makes a spill.

Defaults: `half_life_s` 600, `check_every` 20, `drift` 0.1, `spill_slack_s` 3.0, `hot_share` 1.0,
`stick_share` 0.5, `balance` load. Parameters come from the system's `scheduler_params`.

Instances of tensor-parallel models (options of several GPUs) are placed by the TTFT estimate alone;
their bytes are not part of the partition.
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Mapping, Sequence

from tangram_sim.errors import ConfigError
from tangram_sim.policies.decay import DecayedCounts
from tangram_sim.policies.scheduler import SCHEDULER, PlacementOption, Scheduler, TtftAwareScheduler, _argmin

__all__ = ["HomeAffinityScheduler", "partition"]


def partition(
    shares: Mapping[str, float],
    sizes: Mapping[str, int],
    capacity: Mapping[int, int],
    *,
    hot_share: float = 1.0,
    stick_share: float = 0.5,
    balance: str = "load",
    previous: Mapping[str, tuple[int, ...]] | None = None,
    keep: Collection[str] = (),
) -> dict[str, tuple[int, ...]]:
    """Home GPU(s) of every model of `shares`: the greedy rule of the module docstring.

    `shares` are popularity shares (any non-negative weights), `sizes` bytes per GPU, `capacity` the
    GPUs' arena bytes, `previous` the homes so far; the models of `keep` keep theirs (the others are
    placed around them). Models that fit nowhere any more get the GPU with the most room left.
    """
    gpus = sorted(capacity)
    if not gpus:
        return {}
    room = {g: float(capacity[g]) for g in gpus}
    load = dict.fromkeys(gpus, 0.0)
    previous = previous or {}
    homes: dict[str, tuple[int, ...]] = {}
    for model in sorted(shares, key=lambda m: (m not in keep, -shares[m], m)):
        share = shares[model]
        size = sizes.get(model, 0)
        before = previous.get(model, ())
        if model in keep and before and all(g in room for g in before):
            for g in before:
                room[g] -= size
                load[g] += share / len(before)
            homes[model] = before
            continue
        copies = 1
        if hot_share < 1.0 and share > hot_share:
            copies = min(len(gpus), math.ceil(share / hot_share))

        def rank(g: int, before: tuple[int, ...] = before, size: int = size) -> tuple:
            stays = g in before
            free = -room[g] / max(capacity[g], 1)  # most capacity-weighted room first
            if room[g] < size:  # fits nowhere: most room, then the previous home
                return (1, free, not stays, load[g], g)
            if balance == "load":  # least assigned share, the previous home counting stick_share less
                return (0, load[g] - (stick_share if stays else 0.0), free, g)
            return (0, not stays, free, load[g], g)

        chosen: list[int] = []
        for _ in range(copies):
            g = min((g for g in gpus if g not in chosen), key=rank)
            chosen.append(g)
            room[g] -= size
            load[g] += share / copies
        homes[model] = tuple(sorted(chosen))
    return homes


def _number(name: str, x: object, *, low: float, integer: bool = False, high: float = math.inf) -> float:
    ok = isinstance(x, int) if integer else isinstance(x, int | float)
    if isinstance(x, bool) or not ok or not (low <= x <= high) or not math.isfinite(x):  # type: ignore[operator]
        want = "an integer" if integer else "a number"
        rng = f">= {low:g}" if high == math.inf else f"in [{low:g}, {high:g}]"
        raise ConfigError(f"scheduler parameter {name} must be {want} {rng}, got {x!r}")
    return float(x)  # type: ignore[arg-type]


@SCHEDULER.register("home-affinity")
class HomeAffinityScheduler(Scheduler):
    """Each model's instances go to its home GPU unless another GPU is clearly faster (module docstring)."""

    def __init__(
        self,
        half_life_s: float = 600.0,
        check_every: int = 20,
        drift: float = 0.1,
        spill_slack_s: float = 3.0,
        hot_share: float = 1.0,
        stick_share: float = 0.5,
        balance: str = "load",
    ) -> None:
        self.half_life_s = _number("half_life_s", half_life_s, low=1e-9)
        self.check_every = int(_number("check_every", check_every, low=1, integer=True))
        self.drift = _number("drift", drift, low=0.0, high=1.0)
        self.spill_slack_s = _number("spill_slack_s", spill_slack_s, low=0.0)
        self.hot_share = _number("hot_share", hot_share, low=1e-9, high=1.0)
        self.stick_share = _number("stick_share", stick_share, low=0.0, high=1.0)
        if balance not in ("load", "room"):
            raise ConfigError(f"scheduler parameter balance must be load or room, got {balance!r}")
        self.balance = balance
        self.decayed = DecayedCounts(self.half_life_s)  # requests per model
        self.sizes: dict[str, int] = {}  # model -> bytes per GPU
        self.capacity: dict[int, int] = {}  # GPU -> arena bytes
        self.homes: dict[str, tuple[int, ...]] = {}  # model -> home GPU(s)
        self.gang_models: set[str] = set()  # tensor-parallel models: placed by TTFT, no home
        self.shares_at_partition: dict[str, float] = {}
        self.now = 0.0  # time of the latest request observed
        self.since_check = 0  # requests observed since the drift was last checked
        self.partitions = 0  # partitions made (the first included)
        self.spills = 0  # instances placed away from their model's home

    def observe(self, model: str, gpu_bytes: int, now: float) -> None:
        self.decayed.bump(model, now)
        self.sizes[model] = gpu_bytes
        self.now = max(self.now, now)
        self.since_check += 1

    def home_of(self, model: str) -> tuple[int, ...]:
        """The model's home GPUs (none before it is first placed)."""
        return self.homes.get(model, ())

    def shares(self, now: float | None = None) -> dict[str, float]:
        """Decayed popularity shares at `now` (default: the latest request)."""
        if now is None:
            now = self.now
        weights = {m: self.decayed.count(m, now) for m in self.decayed}
        total = sum(weights.values())
        if total <= 0.0:
            return dict.fromkeys(weights, 0.0)
        return {m: w / total for m, w in weights.items()}

    def _repartition(self, keep: Collection[str] = ()) -> None:
        shares = self.shares()
        mine = {m: x for m, x in shares.items() if m not in self.gang_models}
        self.homes = partition(mine, self.sizes, self.capacity, hot_share=self.hot_share,
                               stick_share=self.stick_share, balance=self.balance, previous=self.homes,
                               keep=keep)
        self.shares_at_partition = shares
        self.partitions += 1

    def _maybe_repartition(self, model: str) -> None:
        if model not in self.homes:  # a new model finds a home around the others'
            self._repartition(keep=tuple(self.homes))
            return
        if self.since_check < self.check_every:
            return
        self.since_check = 0
        shares = self.shares()
        old = self.shares_at_partition
        moved = 0.5 * sum(abs(shares.get(m, 0.0) - old.get(m, 0.0)) for m in sorted(shares.keys() | old.keys()))
        if moved > self.drift:
            self._repartition()

    def _choose(self, model: str, options: Sequence[PlacementOption], rng: random.Random) -> int:
        ttft = TtftAwareScheduler.estimated_ttft_s
        if any(len(o.gpus) != 1 for o in options):
            self.gang_models.add(model)
            return _argmin(options, ttft)
        new_gpu = False
        for o in options:
            cap = o.capacity_bytes or o.free_bytes + o.resident_bytes
            if self.capacity.get(o.gpus[0]) != cap:
                new_gpu = new_gpu or o.gpus[0] not in self.capacity
                self.capacity[o.gpus[0]] = cap
        if model not in self.decayed:  # placed without being observed (a driver that does not tell)
            self.observe(model, options[0].model_bytes, self.now)
        if new_gpu:
            self.homes = {}
        self._maybe_repartition(model)
        home = self.homes[model]
        at_home = [i for i, o in enumerate(options) if o.gpus[0] in home]
        best = _argmin(options, ttft)
        if not at_home:
            return best
        best_home = min(at_home, key=lambda i: (ttft(options[i]), -options[i].free_bytes, i))
        # A GPU that already holds the whole model serves it without a load and without a new copy:
        # any gain in TTFT is worth taking. Elsewhere a spill costs a load and a duplicate, so it must
        # gain more than the slack.
        held = [i for i, o in enumerate(options) if i not in at_home and o.resident_bytes >= o.model_bytes]
        if held:
            best_held = min(held, key=lambda i: (ttft(options[i]), i))
            if ttft(options[best_held]) < ttft(options[best_home]):
                self.spills += 1
                return best_held
        if ttft(options[best_home]) > ttft(options[best]) + self.spill_slack_s:
            self.spills += 1
            return best
        return best_home

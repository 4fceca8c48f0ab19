"""Retention scoring: which resident reuse units are worth keeping in idle GPU memory.

Every policy answers one question, `value(region, now)`: how much is it worth to keep this unit
resident? Eviction takes candidates in ascending value (ties by region offset, so runs are
reproducible). Policies only keep their own small bookkeeping (access counts, times); they never touch
the arena. The simulator calls `record_access` once per request and `value` once per candidate, so both
are O(units of the request) and O(owners of the unit) respectively.
"""

from __future__ import annotations

import bisect
import math
import operator
from collections.abc import Iterable, Mapping, Sequence
from typing import ClassVar

from tangram_sim.arena.arena import Key, Region
from tangram_sim.policies.decay import DecayedCounts
from tangram_sim.policies.params import positive, sensitivities
from tangram_sim.registry import Registry

__all__ = [
    "RETENTION",
    "DecayedFrequencyRetention",
    "GdsfRetention",
    "LfuRetention",
    "LruRetention",
    "NextUseRetention",
    "NoRetention",
    "RetentionPolicy",
    "TangramRetention",
]


class RetentionPolicy:
    """The one contract every retention policy honours (see the module docstring)."""

    needs: ClassVar[frozenset[str]] = frozenset()  # what the run passes it (`policies.needs`)
    retains: ClassVar[bool] = True  # False: weights are discarded when an instance's keep-alive ends
    uses_queue: bool = False  # True: `observe_queue` is called before every eviction order (a policy may
    # set it per instance, as model-value does from its `queue_aware` parameter)

    def record_access(self, model: str, unit_keys: Sequence[Key], now: float) -> None:
        """A request for `model`, whose weights are these reuse units, arrived at `now`."""

    def on_evict(self, key: Key, now: float) -> None:
        """The unit `key` was evicted at `now` (GDSF inflates its clock here)."""

    def on_evict_many(self, keys: Iterable[Key], now: float) -> None:
        """`on_evict` of each key in order: a cold start evicts hundreds of units, and most policies
        keep nothing per unit, so for them (no `on_evict` of their own) this does not even loop."""
        if type(self).on_evict is not RetentionPolicy.on_evict:
            for key in keys:
                self.on_evict(key, now)

    def observe_queue(self, oldest: Mapping[str, float], now: float) -> None:
        """The GPU's queue at `now`, before an eviction order is asked for (only when `uses_queue`):
        model -> arrival of its oldest waiting request, for every model with one waiting. A waiting
        request is a known future need, which a rate estimate only guesses at."""

    def value(self, region: Region, now: float) -> float:
        """Worth of keeping this resident unit at `now`; higher means keep longer."""
        raise NotImplementedError

    def eviction_order(self, candidates: Iterable[Region], now: float) -> list[Key]:
        """Keys of `candidates` in ascending value; ties by offset, then input order (stable sort)."""
        value = self.value
        scored = [(value(r, now), r.offset, i, r) for i, r in enumerate(candidates)]
        scored.sort(key=lambda t: (t[0], t[1], t[2]))  # never compares regions or keys
        return [t[3].key for t in scored]


def _positive(name: str, x: object) -> float:
    return positive("retention", name, x)


def _sensitivity(sensitivity: object) -> dict[str, float]:
    return sensitivities("retention", sensitivity)


RETENTION = Registry[RetentionPolicy]("retention policy")
_offset = operator.attrgetter("offset")
_key = operator.attrgetter("key")


@RETENTION.register("tangram")
class TangramRetention(RetentionPolicy):
    """Tangram's rule: reload cost (size / PCIe bandwidth) weighted by how often its models are used.

    value = size / host_to_gpu_bps * sum over owner models m of access_share(m) * sensitivity(m), with
    all-time counts (no decay), so a unit shared by several models is worth the sum of their shares.
    """

    needs: ClassVar[frozenset[str]] = frozenset({"h2d_bps", "sensitivity"})  # the run's PCIe, models' weights

    def __init__(self, host_to_gpu_bps: float | None = None, sensitivity: Mapping[str, float] | None = None,
                 h2d_bps: float = 25e9) -> None:
        # `host_to_gpu_bps` (a parameter of the system) wins over `h2d_bps` (the run's configured PCIe)
        self.host_to_gpu_bps = _positive("host_to_gpu_bps", h2d_bps if host_to_gpu_bps is None else host_to_gpu_bps)
        self.sensitivity = _sensitivity(sensitivity)  # model -> weight (default 1)
        self.counts: dict[str, int] = {}  # model -> requests seen
        self.total = 0  # requests seen, all models

    def record_access(self, model: str, unit_keys: Sequence[Key], now: float) -> None:
        self.counts[model] = self.counts.get(model, 0) + 1
        self.total += 1

    def access_share(self, model: str) -> float:
        return self.counts.get(model, 0) / self.total if self.total else 0.0

    def _weights(self, now: float) -> tuple[dict[str, float], float]:
        """Per-model access weight (count x sensitivity) and the total count they are shares of."""
        sens = self.sensitivity
        return {m: c * sens.get(m, 1.0) for m, c in self.counts.items()}, float(self.total)

    def value(self, region: Region, now: float) -> float:
        weights, total = self._weights(now)
        if total <= 0.0:
            return 0.0
        weight = sum(weights.get(m, 0.0) for m in region.owners)
        return region.size / self.host_to_gpu_bps * weight / total

    def eviction_order(self, candidates: Iterable[Region], now: float) -> list[Key]:
        """Same order as the base class, computed per class of units instead of per unit, because
        simulators rank hundreds of units at every cold start: units of equal size and owner set (the
        units of a model share one set) have equal value, so each class is valued once, the classes
        are sorted by value, and units are sorted by offset only within a class (or classes of equal
        value)."""
        weights, total = self._weights(now)
        if total <= 0.0:
            return super().eviction_order(candidates, now)
        bw = self.host_to_gpu_bps
        cands = list(candidates)
        # id(owners) -> size -> the class's units in input order; they keep the owner set alive, so
        # its id cannot be reused for another set during the call.
        classes: dict[int, dict[int, list[Region]]] = {}
        # the class of the previous unit (units come in runs of one class) and its members
        owners: object = None
        size = -1
        members: list[Region] = []
        for r in cands:
            if r.owners is not owners or r.size != size:
                owners, size = r.owners, r.size
                by_size = classes.get(id(owners))
                if by_size is None:
                    by_size = classes[id(owners)] = {}
                members = by_size.get(size)
                if members is None:
                    members = by_size[size] = []
            members.append(r)
        valued = []
        for owners_id, by_size in classes.items():
            weight = sum(weights.get(m, 0.0) for m in next(iter(by_size.values()))[0].owners)
            for size, members in by_size.items():
                valued.append((size / bw * weight / total, len(valued), (owners_id, size), members))
        valued.sort()  # by value; the position keeps the tuples from comparing the rest
        order: list[Key] = []
        i = 0
        while i < len(valued):
            j = i + 1
            while j < len(valued) and valued[j][0] == valued[i][0]:
                j += 1
            if j == i + 1:  # one class: by offset; the sort is stable, so ties keep input order
                order += map(_key, sorted(valued[i][3], key=_offset))
            else:  # classes of equal value interleave by offset, then input position
                group = {cls for _, _, cls, _ in valued[i:j]}
                ranked = sorted(
                    (r.offset, n, r.key) for n, r in enumerate(cands) if (id(r.owners), r.size) in group
                )
                order += [key for _, _, key in ranked]
            i = j
        return order


@RETENTION.register("decayed-frequency")
class DecayedFrequencyRetention(TangramRetention):
    """The Tangram rule with exponentially decayed counts, so a model that went quiet loses its share.

    Counts are stored as (value at time t); reading them at `now` multiplies by 2 ** (-(now - t) / half
    life). Model counts and the total decay alike, so only the share changes with recent traffic.
    """

    def __init__(
        self,
        host_to_gpu_bps: float | None = None,
        sensitivity: Mapping[str, float] | None = None,
        half_life_s: float = 600.0,
        h2d_bps: float = 25e9,
    ) -> None:
        super().__init__(host_to_gpu_bps, sensitivity, h2d_bps)
        self.half_life_s = _positive("half_life_s", half_life_s)
        self.decayed = DecayedCounts(self.half_life_s)  # model -> decayed count
        self.decayed_total = DecayedCounts(self.half_life_s)  # "" -> decayed count of all models

    def record_access(self, model: str, unit_keys: Sequence[Key], now: float) -> None:
        super().record_access(model, unit_keys, now)
        self.decayed.bump(model, now)
        self.decayed_total.bump("", now)

    def access_share(self, model: str, now: float | None = None) -> float:
        if now is None:
            now = self.decayed_total.get("", (0.0, 0.0))[1]
        total = self.decayed_total.count("", now)
        return self.decayed.count(model, now) / total if total > 0 else 0.0

    def _weights(self, now: float) -> tuple[dict[str, float], float]:
        sens = self.sensitivity
        weights = {m: self.decayed.count(m, now) * sens.get(m, 1.0) for m in self.decayed}
        return weights, self.decayed_total.count("", now)  # 0 when nothing seen or all decayed away


@RETENTION.register("lru")
class LruRetention(RetentionPolicy):
    """Least recently used: a unit is as recent as the last request of any model that uses it."""

    def __init__(self) -> None:
        self.last: dict[Key, float] = {}  # unit key -> time of its last access

    def record_access(self, model: str, unit_keys: Sequence[Key], now: float) -> None:
        last = self.last
        for key in unit_keys:
            last[key] = now

    def value(self, region: Region, now: float) -> float:
        return self.last.get(region.key, -math.inf)


@RETENTION.register("lfu")
class LfuRetention(RetentionPolicy):
    """Least frequently used, all-time counts per unit (a shared unit counts every owner's requests)."""

    def __init__(self) -> None:
        self.count: dict[Key, int] = {}  # unit key -> accesses

    def record_access(self, model: str, unit_keys: Sequence[Key], now: float) -> None:
        count = self.count
        for key in unit_keys:
            count[key] = count.get(key, 0) + 1

    def value(self, region: Region, now: float) -> float:
        return float(self.count.get(region.key, 0))


@RETENTION.register("gdsf")
class GdsfRetention(RetentionPolicy):
    """GreedyDual-Size-Frequency: H = L + freq * cost / size, cost = 1, L = H of the last eviction.

    L makes old, once-popular units age out: every eviction raises the floor that fresh accesses start
    from. The size is only known to `value`, so H is computed there from the L snapshot taken at the
    unit's last access; the last H computed for a unit is what `on_evict` inflates L to. Evicted units
    forget their frequency, as in the original algorithm.
    """

    def __init__(self) -> None:
        self.clock = 0.0  # L, the inflation value
        self.freq: dict[Key, int] = {}  # unit key -> accesses since it was last evicted
        self.base: dict[Key, float] = {}  # unit key -> L at its last access
        self.last_h: dict[Key, float] = {}  # unit key -> H computed by the latest `value` call

    def record_access(self, model: str, unit_keys: Sequence[Key], now: float) -> None:
        freq, base, clock = self.freq, self.base, self.clock
        for key in unit_keys:
            freq[key] = freq.get(key, 0) + 1
            base[key] = clock

    def value(self, region: Region, now: float) -> float:
        key = region.key
        h = self.base.get(key, self.clock) + self.freq.get(key, 0) / region.size
        self.last_h[key] = h
        return h

    def on_evict(self, key: Key, now: float) -> None:
        h = self.last_h.pop(key, None)
        if h is None:  # evicted without being scored: it had at least the floor value
            h = self.base.get(key, self.clock)
        self.clock = max(self.clock, h)
        self.freq.pop(key, None)
        self.base.pop(key, None)


@RETENTION.register("next-use")
class NextUseRetention(RetentionPolicy):
    """Next-use heuristic with knowledge of the future (simulation only): evict first the unit whose
    owners' next request arrives farthest in the future.

    value = -(earliest arrival after `now` of a request of any owner model, from the whole trace);
    -inf when never requested again. It is Belady's rule applied to reuse units, and it is a heuristic,
    not a bound: Belady's rule is optimal for equal-size items fetched one at a time, while here units
    differ in size (the rule ignores sizes), a cold start needs all of a model's units at once, and a
    request that arrives while its model is warm needs no load at all. LFU beats it on some traces. The
    fewest bytes a retention policy could load on a run's schedule are bounded by the summary's
    `io_reduction_bound` (`core.bound`); the exact optimum of small cases is
    `tangram_sim.analysis.optimum`.

    A cursor per model caches the answer, so scoring many candidates at one `now` is O(1) per owner;
    only a new `now` costs one bisect per model.
    """

    needs: ClassVar[frozenset[str]] = frozenset({"arrivals"})  # the trace's future

    def __init__(self, arrivals: Mapping[str, Sequence[float]]) -> None:
        self.future: dict[str, list[float]] = {m: sorted(ts) for m, ts in arrivals.items()}
        self._cursor: dict[str, int] = {}  # model -> index of its first arrival > last `now` asked

    def next_access(self, model: str, now: float) -> float:
        """First arrival of `model` strictly after `now` (inf when none)."""
        times = self.future.get(model)
        if not times:
            return math.inf
        i = self._cursor.get(model, 0)
        if (i > 0 and times[i - 1] > now) or (i < len(times) and times[i] <= now):
            i = bisect.bisect_right(times, now)  # time moved past the cursor (or went backwards)
        self._cursor[model] = i
        return times[i] if i < len(times) else math.inf

    def value(self, region: Region, now: float) -> float:
        nxt = min((self.next_access(m, now) for m in region.owners), default=math.inf)
        return -nxt


RETENTION.renamed("belady", "next-use")


@RETENTION.register("none")
class NoRetention(RetentionPolicy):
    """ServerlessLLM's behaviour: nothing is retained, weights go when the keep-alive ends."""

    retains: ClassVar[bool] = False

    def value(self, region: Region, now: float) -> float:
        return 0.0

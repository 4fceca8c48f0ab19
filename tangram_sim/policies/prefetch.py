"""Prefetch: which model an idle GPU loads before it is asked for, and what that load may displace.

A GPU whose queue is empty (idle, or an instance idling in keep-alive) has a PCIe link with nothing
to do. A prefetch policy looks at plain data about that GPU and answers one question: which model's
missing units should it load now, if any, and which resident units may that load evict? The lifecycle
(`core.prefetch`) loads the chosen units one by one and stops at once when a request arrives.

Every policy sees, per candidate model, its value on this GPU, the bytes of it that are missing and
could be prefetched, whether this GPU is one of its homes and whether it has queued requests; and the
GPU's free bytes and its evictable (resident, unpinned) units grouped by owner set, each group with
its value. Values are the `model-value` retention's (`policies.model_retention`): a model's decayed
request rate on this GPU times its sensitivity, a unit worth the sum of its owners' values, so a
prefetch never displaces what that retention policy would keep in preference to the prefetched
model. The policy keeps its own decayed counts (`observe`, one call per request routed to the GPU),
whatever the system's retention policy; prefetches are not requests and are never counted.

- `none`: never prefetches (the default; the lifecycle then builds nothing at all).
- `next-model`: the candidate with the highest value (the model most likely to be requested next on
  this GPU) among those with bytes missing, no queued request, a value > 0 and, with `home_only` (the
  default) and a scheduler that assigns homes (`home-affinity`), whose home is this GPU; it takes the
  first such model, in descending value (ties by name), whose missing bytes fit in the free bytes
  plus the evictable groups it may displace: those valued below `evict_below` times its value (1.0:
  any less valuable group), none of whose owners has queued requests and which are not its own.
  Pinned units are never offered (an active instance holds them).

Parameters (`prefetch_params`): `half_life_s` (600) of the decayed counts, `home_only` (true),
`evict_below` (1.0; 0 prefetches into free memory only), `sensitivity` (the experiment's models'
`sensitivity`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

from tangram_sim.errors import ConfigError
from tangram_sim.policies.decay import DecayedCounts
from tangram_sim.policies.params import positive, sensitivities
from tangram_sim.registry import Registry

__all__ = [
    "PREFETCH",
    "NextModelPrefetch",
    "NoPrefetch",
    "PrefetchCandidate",
    "PrefetchChoice",
    "PrefetchPolicy",
    "ResidentGroup",
]


@dataclass(slots=True, frozen=True)
class PrefetchCandidate:
    """A model that could be prefetched onto this GPU."""

    model: str
    value: float  # worth of one resident byte of it on this GPU (decayed rate x sensitivity)
    missing_bytes: int  # arena bytes of its units not resident here that a prefetch could load
    home: bool | None  # this GPU is one of its homes (None: the scheduler assigns no homes)
    queued: bool = False  # it has requests queued on this GPU


@dataclass(slots=True, frozen=True)
class ResidentGroup:
    """The evictable units of this GPU that have one owner set."""

    owners: frozenset[str]  # models whose weights include these units
    value: float  # worth of one byte of them: the sum of the owners' values
    nbytes: int  # arena bytes they hold
    queued: bool = False  # one of the owners has requests queued on this GPU


@dataclass(slots=True, frozen=True)
class PrefetchChoice:
    model: str  # the model whose missing units to load
    evictable: frozenset[frozenset[str]]  # owner sets of the groups its load may evict


class PrefetchPolicy:
    """The contract of every prefetch policy (see the module docstring)."""

    needs: ClassVar[frozenset[str]] = frozenset()  # what the run passes it (`policies.needs`)

    def observe(self, model: str, now: float) -> None:
        """A request for `model` was routed to this GPU at `now`."""

    def value(self, model: str, now: float) -> float:
        """Worth of one resident byte of `model` on this GPU at `now`."""
        return 0.0

    def choose(self, candidates: Sequence[PrefetchCandidate], free_bytes: int,
               groups: Sequence[ResidentGroup]) -> PrefetchChoice | None:
        """The model to prefetch now and the groups it may displace, or None. `candidates` are the
        models with a value > 0 on this GPU (the others are not worth a prefetch)."""
        return None


PREFETCH = Registry[PrefetchPolicy]("prefetch policy")


@PREFETCH.register("none")
class NoPrefetch(PrefetchPolicy):
    """Never prefetches."""


@PREFETCH.register("next-model")
class NextModelPrefetch(PrefetchPolicy):
    """The most valuable model with bytes missing, over free memory and less valuable units only."""

    needs: ClassVar[frozenset[str]] = frozenset({"sensitivity"})  # the models' weights

    def __init__(self, half_life_s: float = 600.0, home_only: bool = True, evict_below: float = 1.0,
                 sensitivity: Mapping[str, float] | None = None) -> None:
        if not isinstance(home_only, bool):
            raise ConfigError(f"prefetch parameter home_only must be true or false, got {home_only!r}")
        if isinstance(evict_below, bool) or not (isinstance(evict_below, int | float) and 0 <= evict_below <= 1):
            raise ConfigError(f"prefetch parameter evict_below must be a number in [0, 1], got {evict_below!r}")
        self.half_life_s = positive("prefetch", "half_life_s", half_life_s)
        self.home_only = home_only
        self.evict_below = float(evict_below)
        self.sensitivity = sensitivities("prefetch", sensitivity)  # model -> weight (default 1)
        self.decayed = DecayedCounts(self.half_life_s)  # requests per model routed to this GPU

    def observe(self, model: str, now: float) -> None:
        self.decayed.bump(model, now)

    def value(self, model: str, now: float) -> float:
        return self.decayed.rate(model, now) * self.sensitivity.get(model, 1.0)

    def choose(self, candidates: Sequence[PrefetchCandidate], free_bytes: int,
               groups: Sequence[ResidentGroup]) -> PrefetchChoice | None:
        eligible = [
            c for c in candidates
            if c.missing_bytes > 0 and c.value > 0 and not c.queued and not (self.home_only and c.home is False)
        ]
        eligible.sort(key=lambda c: (-c.value, c.model))
        for c in eligible:
            limit = c.value * self.evict_below
            below = [g for g in groups if g.value < limit and not g.queued and c.model not in g.owners]
            if c.missing_bytes <= free_bytes + sum(g.nbytes for g in below):
                return PrefetchChoice(c.model, frozenset(g.owners for g in below))
        return None

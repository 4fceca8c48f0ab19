"""Keep-alive: how long an idle instance stays warm, and whether its model is loaded again before the
next request is expected (pre-warming).

When an instance has nothing left to do (its GPU's queue is empty), the lifecycle (`core.keepalive`)
asks the system's keep-alive policy for two windows of its model, counted from that moment, the end of
its use:

- `prewarm_s` = 0: the instance stays active for `keep_alive_s` (a request for another model queued on
  its GPU still ends it at once, whatever the policy says);
- `prewarm_s` > 0: the instance ends now (its weights are unpinned and, with a retaining system, stay
  resident while nothing needs their memory); after `prewarm_s` the model's units that were evicted
  meanwhile are loaded again on that GPU (a pre-warm, through the prefetch path, `core.prefetch`), and
  the model counts as expected for `keep_alive_s` more: no other pre-warm displaces its units then. A
  GPU that cannot pre-warm (a system that frees weights, `retention: none`; a tensor-parallel model;
  `prewarm: false`) keeps the instance active for `prewarm_s + keep_alive_s` instead.

The lifecycle also tells the policy every idle time of a model (`record_idle`): the time from the end
of its last use (the moment no request of the model was in flight anywhere in the cluster) to its next
arrival. Arrivals while a request of the model is in flight are not idle times.

- `fixed` (default): `prewarm_s` = 0, `keep_alive_s` = the system's `keep_alive_s`, for every model
  (the lifecycle's behaviour before keep-alive was a policy).
- `histogram`: the hybrid histogram policy of Shahrad et al., "Serverless in the Wild" (USENIX ATC'20),
  per model (the paper's application). Idle times go into a histogram of `bin_s` bins over
  [0, `range_s`) (the paper: 1-minute bins over 4 hours, against Azure's 20-minute fixed keep-alive;
  here 1 s over 240 s by default: the same 240 bins, for this simulator's seconds-scale gaps and its
  30 s default keep-alive). From it, by precedence:

  1. fewer than `min_samples` idle times (ours: with a handful of samples any histogram looks
     concentrated, so the paper's CV test below would trust it): the fixed keep-alive, (0,
     `keep_alive_s`);
  2. at least `oob_threshold` of the idle times beyond the range ("out of bounds"): the paper
     forecasts the next idle time with an ARIMA model; here the forecast is the median of the model's
     last `history` idle times (ours: robust to one outlier, deterministic, no time-series dependency,
     and with the few idle times a run of this simulator sees per model an ARIMA fit is not reliable);
     pre-warm at forecast x (1 - `oob_margin`), keep alive for forecast x 2 `oob_margin` (the paper's
     15% margin: the model is loaded from 0.85 to 1.15 x the forecast);
  3. the coefficient of variation of the bin counts (population) below `cv_threshold` (the paper's 2):
     the histogram is not representative (idle times spread over the range); the fixed keep-alive
     (the paper falls back to a keep-alive of the whole range with no pre-warm; set `keep_alive_s` to
     `range_s` for that);
  4. otherwise the histogram: `head` (5th) and `tail` (99th) percentiles of the idle times, as bins;
     pre-warm at the head bin's lower edge minus `margin` (10%), keep the model loaded until the tail
     bin's upper edge plus `margin`: `prewarm_s` = head_edge x (1 - margin), `keep_alive_s` =
     tail_edge x (1 + margin) - `prewarm_s`. A head in the first bin gives `prewarm_s` = 0: keep alive
     from the end of use.

  Percentiles are those of the in-range idle times (the out-of-range ones are counted apart).

What is modelled of a pre-warm: the model's weights, not the serving engine. A pre-warmed request is a
cold start that finds its units resident (it pays `engine_overhead_s`, like any full hit); a warm
request is one that found its instance still active. A pre-warm loads what a prefetch may load (on
the modelled device, units held in the node's DRAM cache) and is cancelled by any request to its GPU,
like a prefetch; its bytes are counted in the summary's prefetch columns.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass
from typing import ClassVar

from tangram_sim.errors import ConfigError
from tangram_sim.policies.params import count, flag, fraction, non_negative, positive
from tangram_sim.registry import Registry

__all__ = ["KEEP_ALIVE", "FixedKeepAlive", "HistogramKeepAlive", "IdleHistogram", "KeepAlivePolicy", "Windows"]


@dataclass(frozen=True, slots=True)
class Windows:
    """A keep-alive decision, counted from the end of a use (see the module docstring)."""

    prewarm_s: float  # 0: keep the instance; > 0: end it, load the model again this long after the end
    keep_alive_s: float  # how long the model stays warm: from the end (prewarm 0) or from the pre-warm


class KeepAlivePolicy:
    """The contract of every keep-alive policy (see the module docstring). One per cluster."""

    needs: ClassVar[frozenset[str]] = frozenset()  # what the run passes it (`policies.needs`)
    prewarms: bool = False  # it may answer prewarm_s > 0 (the run then lets every GPU pre-warm)

    def record_idle(self, model: str, idle_s: float) -> None:
        """A request for `model` arrived `idle_s` seconds after the end of its last use."""

    def windows(self, model: str, now: float) -> Windows:
        """The windows of `model`, whose use ends at `now`."""
        raise NotImplementedError


KEEP_ALIVE = Registry[KeepAlivePolicy]("keep-alive policy")


@KEEP_ALIVE.register("fixed")
class FixedKeepAlive(KeepAlivePolicy):
    """Every idle instance stays active for the system's `keep_alive_s`; no pre-warming."""

    needs: ClassVar[frozenset[str]] = frozenset({"keep_alive_s"})

    def __init__(self, keep_alive_s: float = 30.0) -> None:
        self.keep_alive_s = non_negative("keep-alive", "keep_alive_s", keep_alive_s)
        self._windows = Windows(0.0, self.keep_alive_s)

    def windows(self, model: str, now: float) -> Windows:
        return self._windows


class IdleHistogram:
    """One model's idle times: counts in `n_bins` bins of `bin_s` seconds, how many fell beyond them,
    and the last `history` idle times (in range or not)."""

    __slots__ = ("bin_s", "counts", "n_in", "sum_sq", "oob", "recent")

    def __init__(self, bin_s: float, n_bins: int, history: int) -> None:
        self.bin_s = bin_s
        self.counts = [0] * n_bins
        self.n_in = 0  # idle times in range
        self.sum_sq = 0  # sum of the squared counts (the CV in O(1))
        self.oob = 0  # idle times >= n_bins x bin_s
        self.recent: deque[float] = deque(maxlen=history)

    def add(self, idle_s: float) -> None:
        self.recent.append(idle_s)
        i = int(idle_s // self.bin_s)
        if i >= len(self.counts):
            self.oob += 1
            return
        c = self.counts[i]
        self.counts[i] = c + 1
        self.n_in += 1
        self.sum_sq += 2 * c + 1  # (c + 1)^2 - c^2

    @property
    def total(self) -> int:
        return self.n_in + self.oob

    def oob_share(self) -> float:
        return self.oob / self.total if self.total else 0.0

    def cv(self) -> float:
        """Coefficient of variation of the bin counts (population standard deviation / mean); 0 empty."""
        if not self.n_in:
            return 0.0
        n = len(self.counts)
        mean = self.n_in / n
        return math.sqrt(max(0.0, self.sum_sq / n - mean * mean)) / mean

    def percentile_bin(self, q: float) -> int:
        """The first bin at which the cumulative count reaches q x the in-range count (at least one)."""
        rank = max(1, math.ceil(q * self.n_in - 1e-9))
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank:
                return i
        return len(self.counts) - 1


@KEEP_ALIVE.register("histogram")
class HistogramKeepAlive(KeepAlivePolicy):
    """The hybrid histogram policy of Shahrad et al. (ATC'20); see the module docstring."""

    needs: ClassVar[frozenset[str]] = frozenset({"keep_alive_s"})

    def __init__(self, keep_alive_s: float = 30.0, bin_s: float = 1.0, range_s: float = 240.0,
                 head: float = 0.05, tail: float = 0.99, margin: float = 0.1, cv_threshold: float = 2.0,
                 min_samples: int = 10, oob_threshold: float = 0.5, oob_margin: float = 0.15,
                 history: int = 10, prewarm: bool = True) -> None:
        kind = "keep-alive"
        self.keep_alive_s = non_negative(kind, "keep_alive_s", keep_alive_s)  # the fallback window
        self.bin_s = positive(kind, "bin_s", bin_s)
        self.range_s = positive(kind, "range_s", range_s)
        self.n_bins = round(self.range_s / self.bin_s)
        if self.n_bins < 1:
            raise ConfigError(f"keep-alive parameter range_s must be at least one bin_s ({self.bin_s}), "
                              f"got {range_s!r}")
        self.head = fraction(kind, "head", head, high_open=True)
        self.tail = fraction(kind, "tail", tail)
        if not self.head < self.tail:
            raise ConfigError(f"keep-alive parameters head and tail must have head < tail, got {head!r} and {tail!r}")
        self.margin = fraction(kind, "margin", margin, low_open=False, high_open=True)
        self.cv_threshold = non_negative(kind, "cv_threshold", cv_threshold)
        self.min_samples = count(kind, "min_samples", min_samples)
        self.oob_threshold = fraction(kind, "oob_threshold", oob_threshold)
        self.oob_margin = fraction(kind, "oob_margin", oob_margin, low_open=False, high_open=True)
        self.history = count(kind, "history", history)
        self.prewarms = flag(kind, "prewarm", prewarm)
        self.fallback = Windows(0.0, self.keep_alive_s)
        self.idle: dict[str, IdleHistogram] = {}  # model -> its idle times
        self._windows: dict[str, Windows] = {}  # model -> windows since its last idle time

    def record_idle(self, model: str, idle_s: float) -> None:
        hist = self.idle.get(model)
        if hist is None:
            hist = self.idle[model] = IdleHistogram(self.bin_s, self.n_bins, self.history)
        hist.add(max(0.0, idle_s))
        self._windows.pop(model, None)

    def pattern(self, model: str) -> str:
        """Which rule decides `model`'s windows: few, out-of-range, uncertain or histogram."""
        hist = self.idle.get(model)
        if hist is None or hist.total < self.min_samples:
            return "few"
        if hist.oob_share() >= self.oob_threshold:
            return "out-of-range"
        if hist.cv() < self.cv_threshold:
            return "uncertain"
        return "histogram"

    def windows(self, model: str, now: float) -> Windows:
        w = self._windows.get(model)
        if w is None:
            w = self._windows[model] = self._compute(model)
        return w

    def _compute(self, model: str) -> Windows:
        pattern = self.pattern(model)
        hist = self.idle.get(model)
        if hist is None or pattern in ("few", "uncertain"):
            return self.fallback
        if pattern == "out-of-range":
            forecast = statistics.median(hist.recent)
            return Windows(forecast * (1 - self.oob_margin), forecast * 2 * self.oob_margin)
        prewarm = hist.percentile_bin(self.head) * self.bin_s * (1 - self.margin)
        until = (hist.percentile_bin(self.tail) + 1) * self.bin_s * (1 + self.margin)
        return Windows(prewarm, until - prewarm)

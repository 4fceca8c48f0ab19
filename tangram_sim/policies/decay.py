"""Exponentially decayed request counts, shared by the policies that predict reuse from recent traffic."""

from __future__ import annotations

import math


class DecayedCounts(dict[str, tuple[float, float]]):
    """model -> (count, time it was valid at); a count halves every `half_life_s` seconds. Stored lazily:
    reading it at `now` applies the decay since its time, so a bump is O(1) and idle models cost nothing."""

    def __init__(self, half_life_s: float) -> None:
        super().__init__()
        self.half_life_s = half_life_s

    def bump(self, model: str, now: float) -> None:
        """One more request for `model` at `now`."""
        count, t = self.get(model, (0.0, now))
        self[model] = (count * 2.0 ** (-(now - t) / self.half_life_s) + 1.0, now)

    def count(self, model: str, now: float) -> float:
        """`model`'s decayed count at `now` (0 for a model never seen)."""
        entry = self.get(model)
        if entry is None:
            return 0.0
        count, t = entry
        return count * 2.0 ** (-(now - t) / self.half_life_s)

    def rate(self, model: str, now: float) -> float:
        """Predicted requests per second: the decayed count over the mean lifetime of a count."""
        return self.count(model, now) * math.log(2) / self.half_life_s

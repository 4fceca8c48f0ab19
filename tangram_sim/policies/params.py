"""Checks of the parameters policies share (a system's `retention_params`, `prefetch_params`,
`keep_alive_params`, ...): one ConfigError line naming the policy kind, the parameter and what was
expected."""

from __future__ import annotations

import math
from collections.abc import Mapping

from tangram_sim.errors import ConfigError


def positive(kind: str, name: str, x: object) -> float:
    """A finite number > 0 (not a bool), as a float."""
    if isinstance(x, bool) or not (isinstance(x, int | float) and x > 0 and math.isfinite(x)):
        raise ConfigError(f"{kind} parameter {name} must be a positive number, got {x!r}")
    return float(x)


def sensitivities(kind: str, sensitivity: object) -> dict[str, float]:
    """Per-model weights: a mapping of model -> finite number >= 0 (None: every model weighs 1)."""
    if sensitivity is None:
        return {}
    if not isinstance(sensitivity, Mapping):
        raise ConfigError(f"{kind} parameter sensitivity must be a mapping, got {sensitivity!r}")
    out: dict[str, float] = {}
    for model, s in sensitivity.items():
        if isinstance(s, bool) or not (isinstance(s, int | float) and s >= 0 and math.isfinite(s)):
            raise ConfigError(f"{kind} sensitivity of {model!r} must be a number >= 0, got {s!r}")
        out[model] = float(s)
    return out



def non_negative(kind: str, name: str, x: object) -> float:
    """A finite number >= 0 (not a bool), as a float."""
    if isinstance(x, bool) or not (isinstance(x, int | float) and x >= 0 and math.isfinite(x)):
        raise ConfigError(f"{kind} parameter {name} must be a number >= 0, got {x!r}")
    return float(x)


def fraction(kind: str, name: str, x: object, *, low_open: bool = True, high_open: bool = False) -> float:
    """A number in the unit interval, (0, 1] by default (`low_open`, `high_open` choose the ends)."""
    ok = isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
    if ok:
        ok = (x > 0 if low_open else x >= 0) and (x < 1 if high_open else x <= 1)
    if not ok:
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise ConfigError(f"{kind} parameter {name} must be a number in {interval}, got {x!r}")
    return float(x)


def count(kind: str, name: str, x: object, minimum: int = 1) -> int:
    """An integer >= `minimum` (not a bool)."""
    if isinstance(x, bool) or not isinstance(x, int) or x < minimum:
        raise ConfigError(f"{kind} parameter {name} must be an integer >= {minimum}, got {x!r}")
    return x


def flag(kind: str, name: str, x: object) -> bool:
    if not isinstance(x, bool):
        raise ConfigError(f"{kind} parameter {name} must be true or false, got {x!r}")
    return x

"""Checks of the parameters policies share (a system's `retention_params`, `prefetch_params`): one
ConfigError line naming the policy kind, the parameter and what was expected."""

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


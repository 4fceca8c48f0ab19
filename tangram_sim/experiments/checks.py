"""The checks every experiment key goes through: known keys, types, finite numbers in their range.

Each raises a one-line `ConfigError` naming the dotted key, what was expected and what was found.
"""

from __future__ import annotations

import math
from typing import Any

from tangram_sim.errors import ConfigError, shown

__all__ = ["FRACTION", "NON_NEGATIVE", "POSITIVE", "UNIT_INTERVAL", "check_keys", "check_number", "get_typed",
           "key_text", "num"]


def check_keys(section: Any, allowed: tuple[str, ...], where: str) -> dict[str, Any]:
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(section).__name__}")
    for key in section:
        if key not in allowed:
            raise ConfigError(f"{where}.{key_text(key)}: unknown key; expected one of: {', '.join(allowed)}")
    return section


def key_text(key: Any) -> str:
    """A key as an error names it: a very long one is cut."""
    text = str(key)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"


def get_typed(section: dict[str, Any], key: str, where: str, kind: type | tuple[type, ...], default: Any) -> Any:
    """A non-numeric key (string, flag, mapping), type-checked; numbers go through `num`."""
    value = section.get(key, default)
    if value is None:
        return default
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        raise ConfigError(f"{where}.{key}: expected {kind_name(kind)}, got {shown(value)}")
    return value


# Ranges a number may be asked to lie in; `check_number` names them in its errors.
POSITIVE = "positive"  # > 0: sizes, bandwidths, rates, scale factors
NON_NEGATIVE = "non-negative"  # >= 0: times, cache sizes
FRACTION = "fraction"  # (0, 1]: efficiencies, shares of memory
UNIT_INTERVAL = "unit-interval"  # [0, 1]
_RANGES = {POSITIVE: "a positive value", NON_NEGATIVE: ">= 0", FRACTION: "in (0, 1]", UNIT_INTERVAL: "in [0, 1]"}


def check_number(value: Any, where: str, bound: str, *, integer: bool = False, minimum: int = 1) -> Any:
    """`value` as a finite number in range `bound`, else a one-line ConfigError naming `where`.

    Integers are checked against `minimum` instead (counts >= 1, seeds >= 0). NaN and infinity are
    refused everywhere: a NaN efficiency or delay runs "successfully" and fills the summary with NaN.
    """
    if integer:
        what = f"an integer >= {minimum}"
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{where}: expected {what}, got {shown(value)}{_string_hint(value)}")
        return value
    what = "a positive value" if bound == POSITIVE else f"a number {_RANGES[bound]}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where}: expected {_number_kind(bound)}, got {shown(value)}{_string_hint(value)}")
    try:
        number = float(value)
    except OverflowError:  # an integer too large for a float
        number = math.inf
    ok = math.isfinite(number) and {
        POSITIVE: number > 0,
        NON_NEGATIVE: number >= 0,
        FRACTION: 0 < number <= 1,
        UNIT_INTERVAL: 0 <= number <= 1,
    }[bound]
    if not ok:
        raise ConfigError(f"{where}: expected {what}, got {shown(value)}")
    return number


def _number_kind(bound: str) -> str:
    return "a number > 0" if bound == POSITIVE else f"a number {_RANGES[bound]}"


def _string_hint(value: Any) -> str:
    """Why a number written as a string was refused (the loader already reads bare `5e-2` as a number)."""
    if isinstance(value, str) and len(value) < 100:
        try:
            float(value)
        except ValueError:
            return ""
        return " (a quoted string; write the number without quotes)"
    return ""


def num(section: dict[str, Any], key: str, where: str, default: Any, bound: str = POSITIVE, *,
         integer: bool = False, minimum: int = 1) -> Any:
    """A numeric key of `section` checked with `check_number`, or `default` when absent or null."""
    value = section.get(key)
    if value is None:
        return default
    return check_number(value, f"{where}.{key}", bound, integer=integer, minimum=minimum)


def kind_name(kind: type | tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a mapping",
             list: "a list"}
    if isinstance(kind, tuple):
        return " or ".join(names.get(k, k.__name__) for k in kind)
    return names.get(kind, kind.__name__)

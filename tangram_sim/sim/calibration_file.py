"""Reading a calibration YAML (`tangram-sim real calibrate`) with the experiment loader's rules.

Every number is finite and in range (bandwidths `*_bps` > 0, times `*_s` >= 0, a decode step > 0),
errors name the dotted key (`models.qwen2.5-3b.decode_base_s`), an unknown key is an error, and the
file goes through the experiment loader's YAML limits (size, duplicate keys, aliases; `1e300` is a
number). The keys allowed are the fields of `Calibration` and `ModelCoefficients` themselves, so a
field added there is read without an edit here; `measurements:` (what calibrate measured, for audit)
is free-form and ignored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tangram_sim.errors import ConfigError

__all__ = ["FREE_FORM", "read_calibration", "uncovered_models"]

FREE_FORM = ("measurements",)  # top-level sections kept for people, not read by the simulator


def _bound(name: str) -> str:
    from tangram_sim.experiments.config import NON_NEGATIVE, POSITIVE

    return POSITIVE if name.endswith("_bps") or name == "decode_base_s" else NON_NEGATIVE


def _number(value: Any, where: str, name: str) -> float:
    from tangram_sim.experiments.config import check_number

    return float(check_number(value, where, _bound(name)))


def read_calibration(path: str | Path) -> Any:
    """The `Calibration` of a file; one-line ConfigError naming the file and key otherwise."""
    from tangram_sim.experiments.yamlio import read_yaml_file
    from tangram_sim.sim.timemodel import Calibration, ModelCoefficients

    path = Path(path)
    raw = read_yaml_file(path, "calibration")
    if not isinstance(raw, dict):
        got = "an empty file" if raw is None else type(raw).__name__
        raise ConfigError(f"{path}: expected a mapping of calibration keys (device, h2d_bps, models, ...), "
                          f"got {got}")
    fields = {f.name: f for f in dataclasses.fields(Calibration)}
    allowed = [*fields, *FREE_FORM]
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in allowed:
            raise ConfigError(f"{path}: {_key(key)}: unknown key; expected one of: {', '.join(allowed)}")
        if key in FREE_FORM:
            continue
        if key == "device":
            values[key] = "unknown" if value is None else _text(value, path, key)
        elif key == "models":
            values[key] = _models(value, path, ModelCoefficients)
        elif value is not None:
            values[key] = _number(value, f"{path}: {key}", key)
    values.setdefault("device", "unknown")
    values.setdefault("models", {})
    return Calibration(**values)


def _shares(value: Any, where: str) -> tuple[float, ...]:
    """A list of numbers >= 0, not all zero (a prefill's share per layer block)."""
    from tangram_sim.errors import shown

    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: expected a list of shares >= 0 (one per layer block), got {shown(value)}")
    shares = tuple(_number(v, f"{where}[{i}]", "share") for i, v in enumerate(value))
    if sum(shares) <= 0:
        raise ConfigError(f"{where}: expected shares that are not all zero")
    return shares


def _key(key: Any) -> str:
    text = str(key)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"


def _text(value: Any, path: Path, key: str) -> str:
    from tangram_sim.errors import shown

    if not isinstance(value, str):
        raise ConfigError(f"{path}: {key}: expected a string, got {shown(value)}")
    return value


def _models(section: Any, path: Path, coefficients: type) -> dict[str, Any]:
    from tangram_sim.errors import shown

    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: models: expected a mapping of model name to coefficients, got "
                          f"{shown(section)}")
    fields = dataclasses.fields(coefficients)
    names = [f.name for f in fields]
    required = [f.name for f in fields if f.default is dataclasses.MISSING]
    out = {}
    for name, coeffs in section.items():
        where = f"{path}: models.{_key(name)}"
        if not isinstance(coeffs, dict):
            raise ConfigError(f"{where}: expected a mapping of {', '.join(names)}, got {shown(coeffs)}")
        for key in coeffs:
            if key not in names:
                raise ConfigError(f"{where}.{_key(key)}: unknown key; expected one of: {', '.join(names)}")
        missing = [k for k in required if coeffs.get(k) is None]
        if missing:
            raise ConfigError(f"{where}.{missing[0]}: required, expected a number "
                              f"{'> 0' if _bound(missing[0]) == 'positive' else '>= 0'}")
        out[str(name)] = coefficients(**{k: _shares(v, f"{where}.{k}") if k == "prefill_layer_shares"
                                         else _number(v, f"{where}.{k}", k)
                                         for k, v in coeffs.items() if v is not None})
    return out


def uncovered_models(calibration: Any, models: Iterable[str], time_model: Mapping[str, Any] | None) -> list[str]:
    """The models an experiment uses that neither the calibration's coefficients nor the experiment's
    `cluster.time_model` cover (they would be timed by the roofline)."""
    if time_model is not None:
        return []
    measured = set((calibration.models or {}) if calibration is not None else {})
    return [m for m in models if m not in measured]

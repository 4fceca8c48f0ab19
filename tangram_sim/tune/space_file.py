"""SPACE.yaml: what `tangram-sim tune` may change in the trial system (and the cluster), checked up front.

    base: tangram              # the preset trials start from, or the name of a system of the experiment
    system: tuned              # name of the trial system [tuned]
    overrides: {max_batch: 16} # fixed system fields of every trial [{}]
    params:                    # at least one: a system field, FIELD.NAME of a dict field
                               # (retention_params.half_life_s), or cluster.KEY
      retention: {choices: [tangram, lru, lfu, gdsf]}
      scheduler: {choices: all, exclude: [random]}     # all: every registered name, now (names
                                                       # excluded but not registered are ignored);
                                                       # multicast: all is none, chain, binomial;
                                                       # handoff: none, eager, costed
      keep_alive_s: {low: 5, high: 120, log: true}     # float fields: rounded to `digits` [3] significant digits
      unit_divisor: {choices: [0, 20, 40, 80]}
      max_batch: {low: 8, high: 64, step: 8}           # int fields: integers
      cluster.gpu_memory_gib: {low: 24, high: 80, type: float}
      keep_alive: {choices: [fixed, histogram]}
      keep_alive_params.range_s: {low: 60, high: 960, log: true, when: histogram}
                               # when: a policy parameter searched beside its policy field; trials
                               # of another policy leave it out (the sampler still draws it)
      handoff: {choices: all, when: {execute_while_load: true, pipeline: none}}
                               # when {FIELD: VALUE or [VALUES]}: a key simulated only where each
                               # system field named (searched, else the base's) takes one of them;
                               # elsewhere the base's value stands

The system fields and the policy names come from `SystemSpec` and the policy registries at run time (with
the experiment's `plugins` imported), so fields and policies added later can be searched without a
change here. Every choice and both ends of every range are validated as a system or an experiment
would be; errors are one line naming the dotted key (`space.yaml: params.retention.choices: ...`).
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

from tangram_sim.errors import ConfigError
from tangram_sim.tune.space import (
    DEFAULT_DIGITS,
    Param,
    Space,
    named_fields,
    policy_registries,
    system_fields,
)

TOP_KEYS = ("base", "system", "overrides", "params")
PARAM_KEYS = ("choices", "exclude", "low", "high", "log", "step", "type", "digits", "when")


def load_space(path: str | Path, experiment: Any) -> Space:
    """Read and validate SPACE.yaml against `experiment` (an `api.Experiment`, its overrides applied)."""
    from tangram_sim.experiments.config import yaml_load

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"{path}: space file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        data = yaml_load(text)
    except Exception as exc:  # yaml.YAMLError: where and what, on one line
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: malformed YAML: {getattr(exc, 'problem', None) or exc}") from None
    try:
        return parse_space(data, experiment, path)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def parse_space(data: Any, experiment: Any, path: Path | None = None) -> Space:
    """Validate a space given as a mapping (the content of SPACE.yaml)."""
    from tangram_sim.sim.systems import PRESETS

    if not isinstance(data, dict):
        raise ConfigError("expected a mapping with base and params")
    for key in data:
        if key not in TOP_KEYS:
            raise ConfigError(f"{key}: unknown key; expected one of: {', '.join(TOP_KEYS)}")
    config = experiment.config()  # imports the experiment's plugins: their policies count below
    base = data.get("base", "tangram")
    systems = {s["name"]: s for s in config["systems"]}
    if not isinstance(base, str):
        raise ConfigError(f"base: expected a preset or a system name, got {base!r}")
    if base in systems:
        preset, base_overrides = systems[base]["preset"], dict(systems[base]["overrides"])
    elif base in PRESETS:
        preset, base_overrides = base, {}
    else:
        raise ConfigError(f"base: {base!r} is neither a preset ({', '.join(PRESETS)}) nor a system of the "
                          f"experiment ({', '.join(systems)})")
    name = data.get("system", "tuned")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"system: expected a name for the trial system, got {name!r}")
    fixed = data.get("overrides") or {}
    if not isinstance(fixed, dict):
        raise ConfigError(f"overrides: expected a mapping of system fields, got {fixed!r}")
    base_overrides.update(fixed)
    _check_system(preset, base_overrides, "overrides")
    params = data.get("params")
    if not isinstance(params, dict) or not params:
        raise ConfigError("params: expected a mapping of at least one dotted key to {choices} or {low, high}")
    fields = system_fields()
    parsed = []
    for key, spec in params.items():
        key = str(key)
        if key in fixed:
            raise ConfigError(f"params.{key}: also fixed in overrides; search it or fix it, not both")
        parsed.append(_parse_param(key, spec, fields, preset, base_overrides, experiment))
    _check_conditions(parsed)
    return Space(base=base, preset=preset, base_overrides=base_overrides, system=name, params=tuple(parsed),
                 path=path)


def _parse_param(key: str, spec: Any, fields: dict[str, Any], preset: str, base_overrides: dict[str, Any],
                 experiment: Any) -> Param:
    where = f"params.{key}"
    head = key.split(".")[0]
    dicts = [f for f, kind in fields.items() if _is_dict(kind)]
    if head == "cluster" and "." in key:
        target = "cluster"
    elif head in dicts and key.count(".") == 1:
        target = "params"
    elif key in fields and key not in dicts:
        target = "system"
    else:
        names = [f for f in fields if f not in dicts]
        raise ConfigError(f"{where}: not a system field, {'.NAME, '.join(dicts)}.NAME or cluster.KEY; system "
                          f"fields: {', '.join(names)}")
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected {{choices: [...]}} or {{low: ..., high: ...}}, got {spec!r}")
    for k in spec:
        if k not in PARAM_KEYS:
            raise ConfigError(f"{where}.{k}: unknown key; expected one of: {', '.join(PARAM_KEYS)}")
    when = _parse_when(key, spec.get("when"), where, target, fields, preset, base_overrides)
    # every value is checked as a trial that simulates it would run: under the first value of each condition
    conditioned = {field: values[0] for field, values in
                   Param(key, "categorical", when=when).conditions().items()}

    def check(value: Any, at: str) -> None:
        if target == "cluster":
            try:
                experiment.with_overrides({key: value})
            except ConfigError as exc:
                raise ConfigError(f"{where}.{at}: {value!r}: {exc}") from None
        else:
            overrides = {**base_overrides, **conditioned}
            if target == "params":
                field, name = key.split(".", 1)
                overrides[field] = {**(overrides.get(field) or {}), name: value}
                policy = field.removesuffix("_params")
                try:
                    _check_system(preset, overrides, f"{where}.{at}")
                except ConfigError as exc:  # a parameter of another policy than the base system's
                    raise ConfigError(f"{exc} (checked with the base system's {policy}: fix the {policy} "
                                      "that takes it under overrides)") from None
                return
            overrides[key] = value
            _check_system(preset, overrides, f"{where}.{at}")

    if "choices" in spec:
        if any(k in spec for k in ("low", "high", "log", "step", "type", "digits")):
            raise ConfigError(f"{where}: give choices, or a range (low, high), not both")
        choices = _choices(key, spec, where, target)
        for value in choices:
            check(value, "choices")
        return Param(key, "categorical", choices=tuple(choices), when=when)
    if "exclude" in spec:
        raise ConfigError(f"{where}.exclude: only with choices: all")
    if "low" not in spec or "high" not in spec:
        raise ConfigError(f"{where}: expected choices, or both low and high")
    low, high = spec["low"], spec["high"]
    for at, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
            raise ConfigError(f"{where}.{at}: expected a number, got {value!r}")
    kind = _range_kind(key, spec, fields, target, low, high, where)
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{where}.log: expected true or false, got {log!r}")
    if not low < high:
        raise ConfigError(f"{where}: expected low < high, got low {low!r} and high {high!r}")
    if log and low <= 0:
        raise ConfigError(f"{where}.low: a log range needs low > 0, got {low!r}")
    step = spec.get("step")
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, int | float) or not step > 0:
            raise ConfigError(f"{where}.step: expected a number > 0, got {step!r}")
        if log and (kind == "float" or step != 1):
            raise ConfigError(f"{where}.step: not with log: true")
        if kind == "int" and int(step) != step:
            raise ConfigError(f"{where}.step: expected an integer for an integer field, got {step!r}")
    digits = spec.get("digits", DEFAULT_DIGITS if kind == "float" else None)
    if digits is not None and (isinstance(digits, bool) or not isinstance(digits, int) or not 1 <= digits <= 17):
        raise ConfigError(f"{where}.digits: expected an integer from 1 to 17, got {digits!r}")
    if kind == "int":
        if int(low) != low or int(high) != high:
            raise ConfigError(f"{where}: an integer field needs integer low and high, got {low!r}, {high!r}")
        low, high, step = int(low), int(high), int(step) if step is not None else None
    else:
        low, high = float(low), float(high)
        step = float(step) if step is not None else None
    for at, value in (("low", low), ("high", high)):
        check(value, at)
    return Param(key, kind, low=low, high=high, log=log, step=step, digits=digits if kind == "float" else None,
                 when=when)


def _parse_when(key: str, when: Any, where: str, target: str, fields: dict[str, Any], preset: str,
                base_overrides: dict[str, Any]) -> str | dict[str, tuple[Any, ...]] | None:
    """`when` as Param takes it: a policy name (FIELD_params.NAME), or {system field: (values, ...)}."""
    if when is None:
        return None
    if isinstance(when, str):
        field = key.split(".", 1)[0].removesuffix("_params")
        registry = policy_registries().get(field) if target == "params" else None
        if registry is None:
            raise ConfigError(f"{where}.when: a policy name only for a policy's parameter (FIELD_params.NAME); "
                              "elsewhere {FIELD: VALUE or [VALUES]}")
        if when not in registry:
            raise ConfigError(f"{where}.when: expected a {field} policy: {', '.join(registry.names())}; "
                              f"got {when!r}")
        return when
    if target == "cluster":
        raise ConfigError(f"{where}.when: not for a cluster key (every trial simulates it)")
    if not isinstance(when, dict) or not when:
        raise ConfigError(f"{where}.when: expected a policy name or {{FIELD: VALUE or [VALUES]}}, got {when!r}")
    parsed: dict[str, tuple[Any, ...]] = {}
    for field, values in when.items():
        at = f"{where}.when.{field}"
        if field not in fields or _is_dict(fields[field]):
            names = [f for f in fields if not _is_dict(fields[f])]
            raise ConfigError(f"{at}: not a system field; expected one of: {', '.join(names)}")
        if field == key:
            raise ConfigError(f"{at}: a key cannot be conditioned on itself")
        values = values if isinstance(values, list) else [values]
        if not values or not all(v is None or isinstance(v, str | int | float | bool) for v in values):
            raise ConfigError(f"{at}: expected a value or a non-empty list of values, got {when[field]!r}")
        parsed[field] = tuple(values)
    first = {field: values[0] for field, values in parsed.items()}
    for field, values in parsed.items():  # each value beside the others' first ones, as a trial combines them
        for value in values:
            _check_system(preset, {**base_overrides, **first, field: value}, f"{where}.when.{field}")
    return parsed


def _check_conditions(params: list[Param]) -> None:
    """Refuse a cycle of conditions (a `when` that, through others, names its own key)."""
    searched = {p.key: p for p in params}

    def visit(key: str, path: tuple[str, ...]) -> None:
        for field in searched[key].conditions():
            if field in path:
                cycle = " -> ".join((*path[path.index(field):], field))
                raise ConfigError(f"params.{path[0]}.when: the conditions form a cycle ({cycle})")
            if field in searched:
                visit(field, (*path, field))

    for p in params:
        visit(p.key, (p.key,))


def _is_dict(kind: Any) -> bool:
    return kind is dict or typing.get_origin(kind) is dict


def _choices(key: str, spec: dict[str, Any], where: str, target: str) -> list[Any]:
    choices = spec["choices"]
    exclude = spec.get("exclude", [])
    if choices == "all":
        named = named_fields()
        registry = named.get(key) if target == "system" else None
        if registry is None:
            raise ConfigError(f"{where}.choices: 'all' needs a policy field ({', '.join(named)})")
        if not isinstance(exclude, list) or not all(isinstance(n, str) for n in exclude):
            raise ConfigError(f"{where}.exclude: expected a list of names, got {exclude!r}")
        # names not registered are left out silently: a space outlives a policy renamed or removed
        choices = [n for n in registry if n not in exclude]
    elif "exclude" in spec:
        raise ConfigError(f"{where}.exclude: only with choices: all")
    if not isinstance(choices, list) or not choices:
        raise ConfigError(f"{where}.choices: expected a non-empty list (or all, for a policy field)")
    seen = []
    for value in choices:
        if not (value is None or isinstance(value, str | int | float | bool)):
            raise ConfigError(f"{where}.choices: expected numbers, strings or booleans, got {value!r}")
        if value in seen:
            raise ConfigError(f"{where}.choices: {value!r} is listed twice")
        seen.append(value)
    return seen


def _range_kind(key: str, spec: dict[str, Any], fields: dict[str, Any], target: str, low: Any, high: Any,
                where: str) -> str:
    given = spec.get("type")
    if given is not None and given not in ("int", "float"):
        raise ConfigError(f"{where}.type: expected int or float, got {given!r}")
    if target == "system":
        field = fields[key]
        if field not in (int, float):
            raise ConfigError(f"{where}: {key} is not a number field; give choices instead of a range")
        kind = "int" if field is int else "float"
        if given is not None and given != kind:
            raise ConfigError(f"{where}.type: {key} is a {kind} field")
        return kind
    if given is not None:
        return given
    return "int" if isinstance(low, int) and isinstance(high, int) else "float"


def _check_system(preset: str, overrides: dict[str, Any], where: str) -> None:
    """make_system's checks, its message with `where` in front of the part after the key it names."""
    from tangram_sim.sim.systems import make_system

    try:
        make_system("trial", preset, overrides, where="trial")
    except ConfigError as exc:
        message = str(exc)
        if message.startswith("trial") and ": " in message:
            message = message.split(": ", 1)[1]
        raise ConfigError(f"{where}: {message}") from None

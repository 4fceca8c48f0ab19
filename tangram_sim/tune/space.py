"""A search space of `tangram-sim tune`: the keys searched (`Param`) and how a trial's values become
the trial system (`Space`); which system fields and policy registries there are, read at run time.
SPACE.yaml and its checks: `tangram_sim.tune.space_file`.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_DIGITS = 3


@dataclass(frozen=True)
class Param:
    """One searched key: categorical choices, or a float/int range."""

    key: str  # "retention", "retention_params.half_life_s" (a key of a dict field) or "cluster.gpu_memory_gib"
    kind: str  # categorical | float | int
    choices: tuple[Any, ...] = ()
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    digits: int | None = None  # floats: significant digits of the value simulated
    # when a trial simulates this key; otherwise the base system's value stands (the sampler still draws it,
    # so every trial has the same distributions). A policy name, for FIELD_params.NAME only: the policy of
    # FIELD that takes it; or {FIELD: (VALUE, ...)}: each named system field (searched, else the base's) takes
    # one of its values (`handoff` only where `execute_while_load` is true and `pipeline` none)
    when: str | Mapping[str, tuple[Any, ...]] | None = None

    @property
    def on_cluster(self) -> bool:
        return self.key.startswith("cluster.")

    def distribution(self) -> Any:
        """The Optuna distribution of this key."""
        import optuna

        if self.kind == "categorical":
            return optuna.distributions.CategoricalDistribution(list(self.choices))
        if self.kind == "int":
            return optuna.distributions.IntDistribution(int(self.low), int(self.high), log=self.log,
                                                        step=int(self.step or 1))
        return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def value(self, sampled: Any) -> Any:
        """The value a trial simulates: floats rounded to `digits` significant digits."""
        if self.kind == "float" and self.digits and self.step is None:
            return float(f"{float(sampled):.{self.digits}g}")
        if self.kind == "int":
            return int(sampled)
        return sampled

    def match(self, value: Any) -> tuple[bool, Any]:
        """(whether this key can take `value`, the value as the sampler gives it: the matching choice)."""
        if self.kind == "categorical":
            for choice in self.choices:
                if choice == value and (type(choice) is type(value) or (
                        isinstance(value, int | float) and isinstance(choice, int | float)
                        and not isinstance(value, bool) and not isinstance(choice, bool))):
                    return True, choice
            return False, None
        if isinstance(value, bool) or not isinstance(value, int | float) or not self.low <= value <= self.high:
            return False, None
        if self.kind == "int" and int(value) != value:
            return False, None
        if self.step is not None:
            steps = (value - self.low) / self.step
            if abs(steps - round(steps)) > 1e-9:
                return False, None
        return True, int(value) if self.kind == "int" else float(value)

    @property
    def policy_field(self) -> str | None:
        """The policy field a policy's parameter depends on (`keep_alive` for keep_alive_params.*)."""
        return self.key.split(".", 1)[0].removesuffix("_params") if isinstance(self.when, str) else None

    def conditions(self) -> dict[str, tuple[Any, ...]]:
        """`when` as {system field: the values under which a trial simulates this key}; {} = always."""
        if self.when is None:
            return {}
        if isinstance(self.when, str):
            return {self.policy_field: (self.when,)}
        return {field: tuple(values) for field, values in self.when.items()}

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if isinstance(self.when, str):
            out["when"] = self.when
        elif self.when:
            out["when"] = {field: list(values) for field, values in self.when.items()}
        if self.kind == "categorical":
            return {"choices": list(self.choices), **out}
        out.update({"low": self.low, "high": self.high, "type": self.kind})
        if self.log:
            out["log"] = True
        if self.step is not None:
            out["step"] = self.step
        if self.digits is not None:
            out["digits"] = self.digits
        return out


@dataclass(frozen=True)
class Space:
    """A validated search space."""

    base: str  # as written: a preset or a system of the experiment
    preset: str  # the preset trials start from
    base_overrides: dict[str, Any]  # the base system's overrides plus the space's fixed ones
    system: str  # name of the trial system
    params: tuple[Param, ...]
    path: Path | None = None

    def distributions(self) -> dict[str, Any]:
        return {p.key: p.distribution() for p in self.params}

    def values(self, sampled: Mapping[str, Any]) -> dict[str, Any]:
        """What a trial simulates for the sampled parameters, by key."""
        return {p.key: p.value(sampled[p.key]) for p in self.params}

    def system_entry(self, values: Mapping[str, Any], name: str | None = None) -> dict[str, Any]:
        """The trial system as an experiment's `systems` entry (preset + overrides)."""
        overrides = dict(self.base_overrides)
        for p in self.params:
            if p.on_cluster or not self.applies(p, values):
                continue
            if "." in p.key:  # a parameter of a policy: `retention_params.half_life_s`
                field, param = p.key.split(".", 1)
                overrides[field] = {**(overrides.get(field) or {}), param: values[p.key]}
            else:
                overrides[p.key] = values[p.key]
        return {"name": name or self.system, "preset": self.preset, "overrides": overrides}

    def applies(self, param: Param, values: Mapping[str, Any]) -> bool:
        """Whether a trial with these values simulates `param`: each field its `when` names takes one of the
        values given there, as the trial simulates it (searched and simulated, else the base system's).
        The space file refuses cycles of conditions."""
        return all(holds(self._simulated(field, values), allowed)
                   for field, allowed in param.conditions().items())

    def _simulated(self, field: str, values: Mapping[str, Any]) -> Any:
        searched = next((p for p in self.params if p.key == field), None)
        if searched is not None and field in values and self.applies(searched, values):
            return values[field]
        return self._base_policy(field)

    def _base_policy(self, field: str) -> Any:
        from tangram_sim.sim.systems import PRESETS, SystemSpec

        if field in self.base_overrides:
            return self.base_overrides[field]
        return PRESETS[self.preset].get(field, getattr(SystemSpec(name=self.system), field))

    def cluster_values(self, values: Mapping[str, Any]) -> dict[str, Any]:
        return {p.key: values[p.key] for p in self.params if p.on_cluster}

    def experiment_overrides(self, values: Mapping[str, Any], name: str | None = None) -> dict[str, Any]:
        """The dotted keys that turn the experiment into this trial's: one system, these cluster keys."""
        return {"systems": [self.system_entry(values, name)], **self.cluster_values(values)}

    def base_values(self, config: Mapping[str, Any]) -> dict[str, Any] | None:
        """The base system (and the experiment's cluster) as values of the space, or None when one of
        them lies outside it (a choice not listed, a number out of range)."""
        from tangram_sim.sim.systems import make_system

        spec = make_system(self.system, self.preset, self.base_overrides)
        values: dict[str, Any] = {}
        for p in self.params:
            head, _, rest = p.key.partition(".")
            if p.on_cluster:
                value: Any = config
                for part in p.key.split("."):
                    value = value.get(part) if isinstance(value, Mapping) else None
            elif not all(holds(getattr(spec, f), allowed) for f, allowed in p.conditions().items()):
                value = p.choices[0] if p.kind == "categorical" else p.low  # not simulated: any value
            elif rest:
                value = (getattr(spec, head, None) or {}).get(rest)
            else:
                value = getattr(spec, p.key)
            ok, values[p.key] = p.match(value)
            if not ok:
                return None
        return values

    def to_dict(self) -> dict[str, Any]:
        return {"base": self.base, "system": self.system, "overrides": dict(self.base_overrides),
                "params": {p.key: p.to_dict() for p in self.params}}


def holds(value: Any, allowed: tuple[Any, ...]) -> bool:
    """Whether `value` is one of `allowed` (a boolean is not the number 1 or 0 here)."""
    return any(value == a and isinstance(value, bool) == isinstance(a, bool) for a in allowed)


# ------------------------------------------------------------------ run-time facts
def system_fields() -> dict[str, Any]:
    """SystemSpec's fields (but `name`) and their types, as the installed version defines them."""
    from tangram_sim.sim.systems import SystemSpec

    hints = typing.get_type_hints(SystemSpec)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(SystemSpec) if f.name != "name"}


def policy_registries() -> dict[str, Any]:
    """The policy registries by the system field that names their policies (RETENTION -> retention),
    found in `tangram_sim.policies` and its modules, so a registry added there appears here too."""
    from tangram_sim import policies
    from tangram_sim.registry import Registry

    found: dict[str, Any] = {}
    modules = [policies]
    for info in pkgutil.iter_modules(policies.__path__):
        try:
            modules.append(importlib.import_module(f"{policies.__name__}.{info.name}"))
        except ImportError:  # a module that needs an optional dependency
            continue
    for module in modules:
        for attr, value in vars(module).items():
            if isinstance(value, Registry) and attr.isupper():
                found.setdefault(attr.lower(), value)
    return found


def named_fields() -> dict[str, tuple[str, ...]]:
    """The names each field with a fixed set of names can take, for `choices: all`: the policy registries'
    names, and fields whose names are not a registry (`multicast`: none, chain, binomial; `handoff`: none,
    eager, costed)."""
    from tangram_sim.core.handoff import HANDOFF
    from tangram_sim.topology.multicast import MULTICAST

    names = {field: tuple(registry.names()) for field, registry in policy_registries().items()}
    names.setdefault("multicast", tuple(MULTICAST))
    names.setdefault("handoff", tuple(HANDOFF))
    return names

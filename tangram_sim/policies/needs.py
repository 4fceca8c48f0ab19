"""What a policy takes from the run: declared by the policy, not injected by the lifecycle by name.

A policy class may declare `needs`, a frozenset of names; when a run builds the policy
(`core.run.build_policies`) it passes each need as a keyword argument of that name, next to the
system's parameters for the policy (`retention_params`, `keep_alive_params`, ...), which win over a
need of the same name (so an experiment can still pin a value). This holds for every registered
policy, plugins included, of every kind that has a system field (`POLICY_FIELDS`). A need is one of:

- `h2d_bps`: the host-to-GPU (PCIe) bandwidth the run configures, bytes/s (tangram's cost rule);
- `sensitivity`: model -> its `sensitivity` in the experiment (a model not listed weighs 1);
- `arrivals`: model -> the arrival times of all its requests in the trace, ascending (knowledge of the
  future: the `next-use` heuristic; simulation-only in spirit, a replay has it from its trace too);
- `trace`: the trace itself, a DataFrame with `arrival_s`, `model`, `input_tokens`, `output_tokens`;
- the name of a field of the system (`keep_alive_s`, `fairness_window_s`, `max_batch`, ...): its value,
  so that the old system fields keep configuring the policies that replaced hard-wired rules.

An unknown need is a ConfigError naming the policy. `arrivals` and `trace` exist only once a run has
read its trace, so the validation of a system does not build a policy that needs them (its parameters
are checked when the run builds it); every other policy is built once at validation, with the system's
own fields and placeholders for the run's facts (`PLACEHOLDERS`), so bad parameters fail early.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tangram_sim.errors import ConfigError, shown
from tangram_sim.registry import Registry

__all__ = ["PLACEHOLDERS", "RUN_FACTS", "RUN_ONLY", "PolicyField", "check_needs", "policy_kwargs"]

RUN_FACTS: dict[str, str] = {
    "h2d_bps": "the configured host-to-GPU bandwidth, bytes/s",
    "sensitivity": "model -> sensitivity",
    "arrivals": "model -> its arrival times in the trace, ascending",
    "trace": "the trace (arrival_s, model, input_tokens, output_tokens)",
}
RUN_ONLY = frozenset({"arrivals", "trace"})  # known only once a run has read its trace
# What validation passes for the run's other facts (the values a policy defaults to without a run).
PLACEHOLDERS: dict[str, Any] = {"h2d_bps": 25e9, "sensitivity": {}}


@dataclass(frozen=True, slots=True)
class PolicyField:
    """A policy kind chosen by a system field: `field` names the policy in `registry`, `params` (when
    the kind has one) is the field holding its keyword parameters."""

    field: str  # e.g. "keep_alive"
    params: str | None  # e.g. "keep_alive_params"
    registry: Registry[Any]


def check_needs(registry: Registry[Any], name: str, system_fields: Iterable[str]) -> frozenset[str]:
    """The needs of policy `name`, each either a run fact or one of `system_fields`; else ConfigError."""
    needs = registry.needs(name)
    unknown = sorted(needs - RUN_FACTS.keys() - set(system_fields))
    if unknown:
        raise ConfigError(f"{registry.kind} {shown(name)} needs {', '.join(map(repr, unknown))}, which a run does "
                          f"not provide; a policy may need {', '.join(RUN_FACTS)} or a system field")
    return needs


def policy_kwargs(needs: Iterable[str], fact: Callable[[str], Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of a policy: `fact(need)` for each need, then its parameters (which win)."""
    kwargs = {need: fact(need) for need in sorted(needs)}
    kwargs.update(params)
    return kwargs

"""Dotted keys of an experiment (`cluster.gpus_per_node`, `systems.1.overrides.keep_alive_s`): set by
`--set KEY=VALUE` and by sweep points on the raw dict, before the point is validated."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import yaml

from tangram_sim.errors import ConfigError, shown
from tangram_sim.experiments.yamlio import DuplicateKeyError, yaml_load

__all__ = ["apply_point", "parse_set", "set_dotted"]


def _parse_key(dotted: str) -> list[str | int]:
    parts: list[str | int] = []
    for part in dotted.split("."):
        if not part:
            raise ConfigError(f"bad dotted key {shown(dotted)}")
        parts.append(int(part) if part.isdigit() else part)
    return parts


def set_dotted(config: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.0.c` in a nested dict/list config, creating mappings on the way."""
    parts = _parse_key(dotted)
    node: Any = config
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        where = ".".join(map(str, parts[: i + 1]))
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                raise ConfigError(f"{dotted}: {where} is not an existing list item")
            node = node[part]
        else:
            if not isinstance(node, dict):
                raise ConfigError(f"{dotted}: {where} is inside a value that is not a mapping")
            if node.get(part) is None:
                node[part] = [] if isinstance(nxt, int) else {}
            node = node[part]
    last = parts[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or last >= len(node):
            raise ConfigError(f"{dotted}: not an existing list item")
        node[last] = value
    else:
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: the parent is not a mapping")
        node[last] = value


def parse_set(assignment: str) -> tuple[str, Any]:
    """`key=value` from the command line; the value is parsed as YAML (numbers, lists, booleans)."""
    if "=" not in assignment:
        raise ConfigError(f"--set {shown(assignment)}: expected KEY=VALUE")
    key, text = assignment.split("=", 1)
    try:
        value = yaml_load(text)
    except DuplicateKeyError as exc:
        raise ConfigError(f"--set {key.strip()}: {exc.problem}") from None
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def apply_point(raw: dict[str, Any], point: Mapping[str, Any]) -> dict[str, Any]:
    config = copy.deepcopy(raw)
    config.pop("sweep", None)
    for key, value in point.items():
        set_dotted(config, key, value)
    return config

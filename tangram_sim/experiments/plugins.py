"""User modules an experiment imports before it is validated (`plugins:`), so that the policies they
register by name (retention, packing, KV, scheduler, prefetch, keep-alive, fairness, preemption, warm
routing: every registry of `tangram_sim.policies`) can be chosen in `systems`. A plugin policy declares
what it takes from the run with `needs` (`tangram_sim.policies.needs`), like the built-in ones.

An entry is either a Python file (it ends in `.py` or holds a `/`), resolved against the experiment's
folder first and then the current folder, or a dotted module name (imported normally; a module next
to the experiment YAML is found too). Importing is idempotent per process: a file is loaded once under
a name derived from its absolute path, so validating every sweep point, or a worker process that
simulates one job, never registers a policy twice.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from tangram_sim.errors import ConfigError

_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def is_file_entry(entry: str) -> bool:
    """Whether a `plugins` entry names a Python file rather than a dotted module."""
    return entry.endswith(".py") or "/" in entry or "\\" in entry


def validate_plugins(section: Any, base_dir: Path | None) -> list[str]:
    """Check the `plugins` list, import every entry, and return it with files as absolute paths."""
    from tangram_sim.experiments.config import _resolve_path

    if section is None:
        return []
    if not isinstance(section, list):
        raise ConfigError("plugins: expected a list of Python files or dotted module names")
    resolved = []
    for i, entry in enumerate(section):
        where = f"plugins.{i}"
        if not isinstance(entry, str) or not entry.strip():
            raise ConfigError(f"{where}: expected a Python file or a dotted module name, got {entry!r}")
        if is_file_entry(entry):
            path = _resolve_path(entry, base_dir, where)
            if not path.is_file():
                raise ConfigError(f"{where}: {entry!r} is not a file; expected a Python file")
            resolved.append(str(path.resolve()))
        elif _MODULE_NAME.match(entry):
            resolved.append(entry)
        else:
            raise ConfigError(f"{where}: {entry!r} is neither a .py file nor a dotted module name")
    load_plugins(resolved, base_dir)
    return resolved


def load_plugins(entries: Sequence[str], base_dir: Path | str | None = None) -> list[ModuleType]:
    """Import validated `plugins` entries (absolute files or module names); errors are one line."""
    modules = []
    for i, entry in enumerate(entries):
        where = f"plugins.{i}"
        try:
            if is_file_entry(entry):
                modules.append(_load_file(Path(entry)))
            else:
                modules.append(_load_module(entry, Path(base_dir) if base_dir else None))
        except ConfigError:
            raise
        except Exception as exc:  # the user's module failed to import: say which, in one line
            detail = " ".join(str(exc).split())
            raise ConfigError(f"{where}: cannot import {entry!r}: {type(exc).__name__}: {detail}") from None
    return modules


def _load_file(path: Path) -> ModuleType:
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    stem = re.sub(r"\W", "_", path.stem)
    name = f"_tangram_plugin_{stem}_{digest}"
    module = sys.modules.get(name)
    if module is not None:
        return module
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{path}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it: dataclasses and pickling look modules up by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _load_module(name: str, base_dir: Path | None) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        top = name.split(".")[0]
        if base_dir is None or exc.name != top:
            raise
    sys.path.insert(0, str(base_dir))  # a module next to the experiment YAML
    try:
        return importlib.import_module(name)
    finally:
        try:
            sys.path.remove(str(base_dir))
        except ValueError:
            pass

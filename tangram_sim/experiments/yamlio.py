"""Reading YAML the way experiment files, `--set` values, calibration files and search spaces are read.

YAML 1.1 (PyYAML's safe loader) plus one YAML 1.2 rule (`5e-2` and `1e9` are numbers), and limits that
keep a hostile or mistaken file from exhausting memory before any key is checked:

- a file larger than `MAX_FILE_BYTES` is refused before it is parsed (an experiment names its data
  files; it does not hold them);
- a key given twice in one mapping is refused (YAML would keep the last value without a word);
- aliases (`*name`) repeat a node without copying it, so a few lines can stand for billions of values
  (`&a [*a0, *a0, ...]` nested): the document's size with every alias expanded is counted (cheaply, on
  the shared structure) and refused above `MAX_VALUES`, as is an alias inside its own anchor.

Errors are one line naming the file (and line) and what was expected.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from tangram_sim.errors import ConfigError

__all__ = ["MAX_FILE_BYTES", "MAX_VALUES", "DuplicateKeyError", "YamlLoader", "check_expansion", "load_yaml",
           "read_yaml_file", "yaml_load"]

MAX_FILE_BYTES = 8 * 2**20  # an experiment or calibration file; traces are separate files
MAX_VALUES = 1_000_000  # values of a document with its aliases expanded


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping names one key twice."""


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader that also reads exponent forms without a dot (`5e-2`, `1e9`, `1.5e3`) as floats,
    and refuses a key given twice in one mapping.

    PyYAML implements YAML 1.1, whose floats need a dot and a signed exponent, so `5e-2` would arrive
    as the string '5e-2' and fail a number check; YAML 1.2 and most other readers take it as a number.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden below
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: PyYAML's own error follows
                    continue
                if first is not None:
                    raise DuplicateKeyError(
                        "while reading a mapping", node.start_mark,
                        f"duplicate key {_short(key)} (first at line {first.line + 1}); give each key once",
                        key_node.start_mark)
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:50] + "...'"


def yaml_load(text: str) -> Any:
    """Parse YAML text the way experiment files and `--set` values are read (see `YamlLoader`); aliases
    are checked with `check_expansion`."""
    data = yaml.load(text, Loader=YamlLoader)  # noqa: S506 - a SafeLoader subclass
    check_expansion(data)
    return data


def check_expansion(data: Any, where: str = "YAML", limit: int = MAX_VALUES) -> int:
    """The number of values of `data` with shared (aliased) parts counted each time they appear;
    ConfigError above `limit` or when a part contains itself. Linear in the distinct nodes."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: Any) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ConfigError(f"{where}: an alias (*name) inside its own anchor (&name) makes an endless value")
        active.add(key)
        children = list(node.keys()) + list(node.values()) if isinstance(node, dict) else node
        total = 1
        for child in children:
            total += size(child)
            if total > limit:
                break
        active.discard(key)
        sizes[key] = total
        return total

    total = _iterative(size, data)
    if total > limit:
        raise ConfigError(f"{where}: with its aliases (*name) expanded the document holds more than {limit:,} "
                          "values; write the values out, or fewer of them")
    return total


def _iterative(size: Any, data: Any) -> int:
    import sys

    depth = sys.getrecursionlimit()
    try:
        sys.setrecursionlimit(max(depth, 20_000))
        return size(data)
    except RecursionError:
        raise ConfigError("YAML: nested too deeply (thousands of levels); expected an experiment") from None
    finally:
        sys.setrecursionlimit(depth)


def read_yaml_file(path: str | Path, what: str = "experiment") -> Any:
    """Read, decode and parse a YAML file with the limits above; one-line ConfigError otherwise."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES and path.is_file():
            raise ConfigError(f"{path}: {size / 2**20:.1f} MiB; an {what} file holds at most "
                              f"{MAX_FILE_BYTES // 2**20} MiB (put data in a trace file and name it)")
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder; expected an {what} YAML file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8-sig")  # a leading BOM is fine
    except UnicodeDecodeError as exc:  # e.g. `tangram-sim run trace.parquet`
        raise ConfigError(
            f"{path}: not a UTF-8 text file (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            f"expected an {what} YAML"
        ) from None
    try:
        raw = yaml.load(text, Loader=YamlLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"{path}{where}: malformed YAML: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply; expected an {what} YAML") from None
    check_expansion(raw, str(path))
    return raw


def load_yaml(path: str | Path) -> tuple[dict[str, Any], Path]:
    """Read an experiment file; returns the raw dict and the folder relative paths resolve against."""
    path = Path(path)
    raw = read_yaml_file(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of experiment keys at the top level")
    return raw, path.resolve().parent

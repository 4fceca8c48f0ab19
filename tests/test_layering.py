"""The package's layering, read from the source: the lifecycle (`core`) and the plain descriptions it
uses (`specs`, `topology`) import neither driver (`sim`, `real`); `specs` and `topology` need no SimPy."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tangram_sim"


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (inside functions and TYPE_CHECKING blocks too),
    relative imports resolved against the file's package."""
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def offending(folder: str, banned: tuple[str, ...]) -> list[str]:
    out = []
    for path in sorted((PACKAGE / folder).rglob("*.py")):
        for module in sorted(imported_modules(path)):
            if any(module == b or module.startswith(b + ".") for b in banned):
                out.append(f"{path.relative_to(PACKAGE.parent)} imports {module}")
    return out


@pytest.mark.parametrize("folder, banned", [
    ("core", ("tangram_sim.sim", "tangram_sim.real", "torch")),
    ("specs", ("tangram_sim.sim", "tangram_sim.real", "torch", "simpy")),
    ("topology", ("tangram_sim.sim", "tangram_sim.real", "tangram_sim.core", "torch", "simpy")),
    ("policies", ("tangram_sim.sim", "tangram_sim.real", "tangram_sim.core", "torch", "simpy")),
])
def test_layer_imports_no_driver(folder: str, banned: tuple[str, ...]) -> None:
    assert (PACKAGE / folder).is_dir()
    assert offending(folder, banned) == []


def test_the_scan_sees_imports(tmp_path: Path) -> None:
    """The scanner finds a driver import hidden in a function and a relative one."""
    sample = PACKAGE / "core" / "run.py"
    assert "tangram_sim.specs.system" in imported_modules(sample)
    assert any(m.startswith("tangram_sim.policies") for m in imported_modules(sample))
    relative = PACKAGE / "sim" / "device.py"
    assert "tangram_sim.core.links" in imported_modules(relative)

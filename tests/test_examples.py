"""docs/policies.md and examples/: the example policies run end to end through the Python API, and the
guide's Python snippets run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tangram_sim import load_experiment
from tangram_sim.policies import PACKING, RETENTION, SCHEDULER

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs/policies.md"
EXAMPLE = ROOT / "examples/my-policy.yaml"


def python_blocks(text: str) -> list[tuple[str, str]]:
    """(info string, code) of every ```python block of a Markdown text."""
    return [(m.group(1).strip(), m.group(2)) for m in re.finditer(r"^```python([^\n]*)\n(.*?)^```", text,
                                                                    re.DOTALL | re.MULTILINE)]


def test_the_example_policies_run_against_tangram(tmp_path: Path) -> None:
    exp = load_experiment(EXAMPLE)
    assert exp.config()["plugins"] == [str(ROOT / "examples/my_policy.py")]  # resolved next to the YAML
    assert "largest-first" in RETENTION and "most-free" in SCHEDULER and "compact-if-fragmented" in PACKING
    result = exp.run(out=tmp_path / "run", progress=False)
    summary = result.summary.set_index("system")
    assert list(summary.index) == ["tangram", "largest-first", "all-three"]
    assert (summary["completed"] == 300).all()
    # the policy changes what is kept: another eviction order, other bytes loaded
    assert summary.loc["largest-first", "bytes_loaded"] != summary.loc["tangram", "bytes_loaded"]
    again = load_experiment(EXAMPLE).run(out=tmp_path / "again", progress=False)  # loaded once per process
    assert (tmp_path / "again/summary.csv").read_bytes() == (tmp_path / "run/summary.csv").read_bytes()
    assert set(again.requests["system"]) == set(summary.index)


def test_the_guide_shows_the_example_module_as_it_is() -> None:
    shown = [code for info, code in python_blocks(GUIDE.read_text()) if info == "examples/my_policy.py"]
    assert shown == [(ROOT / "examples/my_policy.py").read_text()]


def test_the_guide_api_snippets_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # the guide's paths are relative to the repository
    snippets = [code for info, code in python_blocks(GUIDE.read_text()) if not info]
    assert snippets, "the guide shows the API"
    namespace: dict = {}
    for code in snippets:
        exec(compile(code, str(GUIDE), "exec"), namespace)  # noqa: S102 - the guide's own code
    result = namespace["result"]
    try:
        assert list(result.summary["requests"]) == [150, 150, 150]
        assert set(namespace["cold_share"].index) == {"tangram", "largest-first", "all-three"}
    finally:
        import shutil

        shutil.rmtree(result.out_dir)

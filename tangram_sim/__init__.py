"""tangram-sim: serverless LLM cold starts, simulated and measured.

The policy modules (`tangram_sim.policies`), the memory arena (`tangram_sim.arena`) and the model
catalog (`tangram_sim.models`) are pure Python and shared by the SimPy simulator and the real
torch executor. The Python API (`tangram_sim.api`: `load_experiment`, `Experiment`, `Result`) is
importable from here; it is loaded on first use, so `import tangram_sim` stays light.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Experiment", "Result", "__version__", "load_experiment"]

_API = ("Experiment", "Result", "load_experiment")


def __getattr__(name: str) -> Any:
    if name in _API:
        from tangram_sim import api

        return getattr(api, name)
    raise AttributeError(f"module 'tangram_sim' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])

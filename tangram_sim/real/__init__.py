"""The real executor: the shared arena and policies driving actual copies into one device buffer.

Needs the `real` extra (torch, safetensors, nvidia-ml-py). Importing this package is cheap and works
without it; the names below import their torch modules on first use, and a missing torch is a
one-line TangramError rather than an ImportError deep in a traceback.

- `checkpoints`: random-weight safetensors checkpoints of catalog models (tiny or full size)
- `device_arena`: `Arena` offsets mapped onto one `torch.empty(capacity, uint8)` buffer
- `loader`: reader threads + staging buffers + side-stream copies; checkpoints and unit layouts
- `engine`: a minimal Llama-style decoder bound to arena views, paged KV in arena blocks
- `backend`, `device`: the torch side of one replay GPU and the lifecycle's device over it;
  `peers`: units copied from another arena's buffer (the source policies); `prefetching`: a
  prefetched unit's read
- `replay`: traces replayed by the simulator's lifecycle (`core`) on real devices; `session`: a few
  requests on one device through it (`real load`, `real generate`, the loader benchmark)
- `setup`: devices, arenas and checkpoints of a replay (`resolve_device`, `checkpoint_dirs`)
- `memory`: NVML / torch / host memory readings
"""

from __future__ import annotations

import importlib
from typing import Any

from tangram_sim.errors import TangramError

MISSING_EXTRA = "the real executor needs the 'real' extra: pip install -e '.[real]'"

_EXPORTS = {
    "resolve_device": "setup",
    "checkpoint_dirs": "setup",
    "run_requests": "session",
    "replay_trace": "replay",
    "ReplayResult": "replay",
    "DeviceArena": "device_arena",
    "Loader": "loader",
    "LoadResult": "loader",
    "Segment": "loader",
    "Checkpoint": "loader",
    "open_checkpoint": "loader",
    "CausalLM": "engine",
    "EngineConfig": "engine",
    "PagedKv": "kvcache",
    "build_engine": "engine",
    "MemoryReading": "memory",
    "read_memory": "memory",
    "driver_info": "memory",
    "make_checkpoints": "checkpoints",
    "make_checkpoint": "checkpoints",
    "make_derived_checkpoint": "checkpoints",
    "make_synthetic_checkpoint": "checkpoints",
    "parse_derive": "checkpoints",
}

__all__ = ["MISSING_EXTRA", "require_torch", *_EXPORTS]


def require_torch() -> None:
    """Raise the one-line TangramError when the `real` extra is not installed."""
    try:
        import safetensors  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        raise TangramError(MISSING_EXTRA) from None


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    require_torch()
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)

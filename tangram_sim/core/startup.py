"""A cold start's non-weight work as named stages, each run serially, beside the weights, skipped or
restored (`SystemSpec.startup`; sourced presets and figures in docs/cold-start-stages.md).

An engine's cold start is, in order: `runtime` (process or container start, imports), `context` (the
device context), `weights` (the load itself: compaction copies and the bytes over the links, which the
device models), `kv_init` (KV cache sizing - vLLM profiles a forward pass, compiling the model on the
way - and allocation), `graph_capture` (CUDA graphs). Each stage but `weights` has a mode:

- `serial`: on the critical path at its place. A stage before the weights precedes the load (the
  loader runs in the runtime and needs a device context); one after needs the weights' data (profiling
  and graph warm-up run the model), so it follows the whole load.
- `overlap`: runs beside the load, from the moment the load starts, on one lane in stage order (work
  on the host, or on addresses rather than bytes); the load does not slow down.
- `skip`: takes nothing (a pre-warmed pool, a forked runtime).
- `restore`: materialised offline and restored at `restore_s` instead of its own time (Medusa's KV
  sizes and CUDA graphs, a checkpointed process). A restored stage keeps its dependency on what comes
  before the weights (a restored runtime still precedes the loader), but no longer needs the weights'
  data, so a restored `kv_init` or `graph_capture` runs on the lane beside the load.

So a cold start beginning at t0 has its stages before the weights until t0 + `pre_s`; the load from
there; the lane from there until + `lane_s`; the stages after the weights from max(load end, lane end)
until + `post_s`, when a serial engine serves. An engine that executes while loading
(`execute_while_load`) computes as soon as its compute gate, t0 + `pre_s` + `lane_s`, has passed and
the layers it needs have landed; a stage that must follow the whole load would make that pointless,
so such a system may have no `post_s`.

An empty `startup` is the single stage the simulator always had: `runtime`, serial, for the system's
`engine_overhead_s` (or a calibration's), everything else skipped; the committed results rely on it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tangram_sim.errors import ConfigError, shown

STAGES = ("runtime", "context", "weights", "kv_init", "graph_capture")  # the order of a cold start
BEFORE_WEIGHTS = ("runtime", "context")
AFTER_WEIGHTS = ("kv_init", "graph_capture")
MODES = ("serial", "overlap", "skip", "restore")
_FIELDS = ("mode", "s", "restore_s")


@dataclass(frozen=True, slots=True)
class Stage:
    mode: str = "skip"  # one of MODES
    s: float = 0.0  # its own time, seconds (serial or overlap)
    restore_s: float = 0.0  # restore mode: seconds to restore its materialised state

    @property
    def cost_s(self) -> float:
        """Seconds it takes in its mode."""
        if self.mode == "skip":
            return 0.0
        return self.restore_s if self.mode == "restore" else self.s


# Published breakdowns (docs/cold-start-stages.md says where each figure comes from and how it maps onto
# the stages). The weights' own time is the simulator's (bytes over links), so it is not in them.
STARTUP_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # vLLM serving Llama-3.1-8B-Instruct on an L40S, nothing cached (Tensorfuse, 2025-09-01): init engine
    # and imports 94 s; torch.compile (Dynamo 10 s + graph compilation 42 s), which vLLM runs in the
    # profiling pass that sizes the KV cache, 52 s; CUDA graph capture 54 s.
    "vllm-l40s-llama8b-cold": {
        "runtime": {"mode": "serial", "s": 94.0}, "context": {"mode": "serial", "s": 0.0},
        "kv_init": {"mode": "serial", "s": 52.0}, "graph_capture": {"mode": "serial", "s": 54.0},
    },
    # The same with vLLM's caches kept across pods (torch.compile artifacts, flashinfer, capture sizes cut
    # to 1-64): init engine and imports 34 s; Dynamo 10 s + compilation 13 s; graph capture 7 s.
    "vllm-l40s-llama8b-cached": {
        "runtime": {"mode": "serial", "s": 34.0}, "context": {"mode": "serial", "s": 0.0},
        "kv_init": {"mode": "serial", "s": 23.0}, "graph_capture": {"mode": "serial", "s": 7.0},
    },
    # vLLM (the 2024 version Medusa builds on) as the Medusa artifact measured it on ten 0.5-14B models,
    # A100, weights from Optane SSDs through SPDK (thustorage/Medusa, results-backup/Figure2: each stage's
    # share of the loading phase x its total, averaged over the ten models): runtime = the process's init
    # 0.652 s + tokenizer 0.271 s + model construction 0.825 s; KV profiling and allocation 0.590 s; CUDA
    # graph capture 1.000 s. The `medusa` system preset restores the last two.
    "vllm-medusa-a100": {
        "runtime": {"mode": "serial", "s": 1.748}, "context": {"mode": "serial", "s": 0.0},
        "kv_init": {"mode": "serial", "s": 0.590}, "graph_capture": {"mode": "serial", "s": 1.000},
    },
}


@dataclass(frozen=True, slots=True)
class StartupPlan:
    """A system's stages resolved to the three spans of a cold start (see the module docstring)."""

    stages: tuple[tuple[str, Stage], ...]  # the configurable stages, in STAGES order
    pre_s: float  # serial or restored stages before the weights, back to back
    lane_s: float  # overlapped stages, and restored stages after the weights, beside the load
    post_s: float  # serial stages after the weights

    @property
    def fixed_s(self) -> float:
        """What the stages add to a cold start's load when the lane hides behind it (the estimate)."""
        return self.pre_s + self.post_s if self.post_s else self.pre_s

    @property
    def gate_s(self) -> float:
        """Seconds after the cold start began before an execute-while-load engine may compute."""
        return self.pre_s + self.lane_s if self.lane_s else self.pre_s

    def without(self, name: str) -> StartupPlan:
        """The same plan with stage `name` skipped (the real executor performs and measures its runtime
        stage itself, so only the others are charged their stated times)."""
        return _plan(tuple((n, Stage() if n == name else st) for n, st in self.stages))


def _sum(values: list[float]) -> float:
    """Sum of the non-zero values, so that one stage's time comes out unchanged (x, not 0.0 + x)."""
    nonzero = [v for v in values if v]
    return math.fsum(nonzero) if len(nonzero) > 1 else (nonzero[0] if nonzero else 0.0)


def _time(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: expected a number >= 0, got {shown(value)}")
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"{where}: expected a number >= 0, got {shown(value)}")
    return value


def runtime_from_engine_overhead(startup: Mapping[str, Any]) -> bool:
    """Whether the runtime stage's time is the system's `engine_overhead_s` (no preset, no runtime time)."""
    runtime = startup.get("runtime")
    return "preset" not in startup and not (isinstance(runtime, Mapping) and "s" in runtime)


def resolve_startup(startup: Mapping[str, Any], engine_overhead_s: float, where: str = "startup") -> StartupPlan:
    """The plan of a system's `startup` mapping: `{preset: NAME, STAGE: MODE or {mode, s, restore_s}}`;
    stages not named keep the preset's (or the default: runtime serial for `engine_overhead_s`, the rest
    skipped). Raises ConfigError naming `<where>.<key>`."""
    if not isinstance(startup, Mapping):
        raise ConfigError(f"{where}: expected a mapping of stages, got {shown(startup)}")
    unknown = [k for k in startup if k not in (*STAGES, "preset")]
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key; expected preset or a stage: {', '.join(STAGES)}")
    base: dict[str, Stage] = {"runtime": Stage("serial", engine_overhead_s)}
    if "preset" in startup:
        name = startup["preset"]
        if name not in STARTUP_PRESETS:
            raise ConfigError(f"{where}.preset: unknown preset {shown(name)}; expected one of: "
                              f"{', '.join(STARTUP_PRESETS)}")
        base = {k: Stage(**v) for k, v in STARTUP_PRESETS[name].items()}
    weights = startup.get("weights", "serial")
    if weights not in ("serial", {"mode": "serial"}):
        raise ConfigError(f"{where}.weights: the weights stage is the load itself (its time is the bytes over "
                          f"the links) and always serial; got {shown(weights)}")
    stages = []
    for name in STAGES:
        if name == "weights":
            continue
        stage = base.get(name, Stage())
        value = startup.get(name)
        if value is not None:
            stage = _stage(value, stage, f"{where}.{name}")
        stages.append((name, stage))
    return _plan(tuple(stages))


def _plan(stages: tuple[tuple[str, Stage], ...]) -> StartupPlan:
    pre = [st.cost_s for n, st in stages if n in BEFORE_WEIGHTS and st.mode in ("serial", "restore")]
    lane = [st.cost_s for n, st in stages
            if st.mode == "overlap" or (n in AFTER_WEIGHTS and st.mode == "restore")]
    post = [st.cost_s for n, st in stages if n in AFTER_WEIGHTS and st.mode == "serial"]
    return StartupPlan(stages, _sum(pre), _sum(lane), _sum(post))


def _stage(value: Any, base: Stage, where: str) -> Stage:
    if isinstance(value, str):
        value = {"mode": value}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mode ({', '.join(MODES)}) or {{mode, s, restore_s}}, "
                          f"got {shown(value)}")
    unknown = [k for k in value if k not in _FIELDS]
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key; expected one of: {', '.join(_FIELDS)}")
    mode = value.get("mode", base.mode)
    if mode not in MODES:
        raise ConfigError(f"{where}.mode: expected one of {', '.join(MODES)}, got {shown(mode)}")
    s = _time(value["s"], f"{where}.s") if "s" in value else base.s
    if mode == "restore" and "restore_s" not in value and base.mode != "restore":
        raise ConfigError(f"{where}.restore_s: a restored stage states what restoring costs (seconds)")
    restore = _time(value["restore_s"], f"{where}.restore_s") if "restore_s" in value else base.restore_s
    return Stage(mode, s, restore)

"""A few requests on one device through the replay path: what `real load`, `real generate`, the loader
benchmark and the tests run.

`run_requests` turns a list of requests (model, prompt token ids, output tokens, arrival) into a trace
and hands it to `real.replay.replay_trace`: the simulator's lifecycle (`core`) over one `RealDevice`,
so every cold start, reuse, eviction, compaction and KV grant is the lifecycle's own and nothing here
decides anything. With `system_for`'s systems, requests arriving together are served in the order
given; on one device a request of another model ends the idle instance at once, so models given in
turn are cold-started in turn.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import pandas as pd
import torch

from tangram_sim.errors import ConfigError
from tangram_sim.models.units import GRANULARITIES
from tangram_sim.real.loader import DEFAULT_CHUNK_BYTES, Checkpoint
from tangram_sim.real.replay import ReplayResult, replay_trace
from tangram_sim.real.setup import check_fits, default_capacity, resolve_device
from tangram_sim.sim.systems import SystemSpec, make_system

__all__ = ["Request", "cpu_capacity", "run_requests", "system_for"]

Request = tuple[str, Sequence[int], int, float]  # model, prompt token ids, output tokens, arrival (s)


def system_for(granularity: str = "group", retention: str = "tangram", packing: str = "pbp",
               kv: str = "elastic", **overrides: Any) -> SystemSpec:
    """The `tangram` preset with these policies (names checked by the system's own validation);
    `overrides` are further system fields (e.g. keep_alive_s, kv_block_tokens, min_unit_bytes).

    The fairness window is 0 unless overridden: a queued request of the active model never overtakes
    an older request of another model, so requests that arrive together are served in their order."""
    if granularity not in GRANULARITIES:
        raise ConfigError(f"granularity {granularity!r} is unknown, expected one of "
                          f"{', '.join(GRANULARITIES)}")
    fields = dict(granularity=granularity, retention=retention, packing=packing, kv=kv, fairness_window_s=0.0)
    fields.update(overrides)
    return make_system("real", "tangram", fields, where="real")


def cpu_capacity(ckpts: Mapping[str, Checkpoint]) -> int:
    """The default arena on the CPU: every model's weights x 1.25 + 64 MiB."""
    return int(sum(c.spec.weight_bytes for c in ckpts.values()) * 1.25) + 64 * 2**20


def run_requests(
    ckpts: Mapping[str, Checkpoint] | Sequence[Checkpoint],
    requests: Sequence[Request],
    system: SystemSpec,
    *,
    device: str | torch.device = "cpu",
    capacity: int | None = None,
    verify: bool = False,
    threads: int | None = None,
    keep_alive_s: float | None = None,
    readers: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    staging: str = "auto",
    warmup: bool = False,
    progress: Callable[[int], Any] | None = None,
) -> ReplayResult:
    """Replay `requests` (rid = position) under `system` on one arena of `capacity` bytes on `device`
    (default: `cpu_capacity` on the CPU, 90% of free memory on CUDA); see module docstring.

    A model whose weights and one KV block exceed the arena is a CapacityError before anything runs.
    `keep_alive_s` replaces the system's; `warmup` runs the backend's warm-up first (off by default:
    the first cold start then pays the page cache and the kernels, as a first start does); `progress(i)`
    is called once request i is routed (every request when there are at most 200)."""
    if not isinstance(ckpts, Mapping):
        ckpts = {c.name: c for c in ckpts}
    if not requests:
        raise ConfigError("no requests to run, expected at least one")
    dev = resolve_device(device)
    if capacity is None:
        capacity = cpu_capacity(ckpts) if dev.type != "cuda" else default_capacity([dev], "capacity")
    if keep_alive_s is not None:
        if not keep_alive_s >= 0:
            raise ConfigError(f"keep_alive_s {keep_alive_s}: expected a number >= 0")
        system = replace(system, keep_alive_s=float(keep_alive_s))
    check_fits(dict(ckpts), capacity, system.kv_block_tokens, "expected a larger capacity")
    models, prompts, rows = set(ckpts), {}, []
    for rid, (model, prompt, output_tokens, arrival_s) in enumerate(requests):
        if model not in models:
            raise ConfigError(f"request {rid}: model {model!r} has no checkpoint")
        if not prompt or output_tokens < 1:
            raise ConfigError(f"request {rid}: expected a non-empty prompt and at least one output token")
        prompts[rid] = [int(t) for t in prompt]
        rows.append((float(arrival_s), model, len(prompt), int(output_tokens)))
    trace = pd.DataFrame(rows, columns=["arrival_s", "model", "input_tokens", "output_tokens"])
    return replay_trace(dict(ckpts), trace, system, devices=[dev], capacity=capacity, prompts=prompts,
                        verify=verify, threads=threads, warmup=warmup, processes=False,
                        readers=readers, chunk_bytes=chunk_bytes, staging=staging, progress=progress)

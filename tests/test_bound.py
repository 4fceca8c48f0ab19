"""The unlimited-memory bound on weight reuse (`core.bound`): hand-built tables, simulated runs of
several presets (in memory and streamed), and every committed summary.csv that carries it."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pandas as pd
import pytest

from tangram_sim.analysis.optimum import unlimited_memory_loads
from tangram_sim.analysis.schedule import gpu_schedules, unit_sizes
from tangram_sim.core.bound import BOUND_COLUMNS, bound_metrics, first_load_bytes
from tangram_sim.core.metrics import REQUEST_COLUMNS, summarize
from tangram_sim.core.records import ModelEntry
from tangram_sim.models import derive_model, get_model, share_patterns_first_layers
from tangram_sim.sim.hardware import TierSpec, gpu_spec
from tangram_sim.sim.simulate import ClusterSpec, ModelChoice, simulate
from tangram_sim.sim.systems import make_system

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5  # summary.csv keeps 6 significant digits


def entry(keys: list[list[str]], nbytes: list[int]) -> ModelEntry:
    """A hand-made model: `keys[rank]` its unit shards on each rank, each shard `nbytes[i]` bytes."""
    tp = len(keys)
    return ModelEntry(spec=None, units=(), tp=tp,  # type: ignore[arg-type]
                      rank_keys=tuple(tuple(k) for k in keys), rank_bytes=(tuple(nbytes),) * tp, rank_aligned=(tuple(nbytes),) * tp,
                      nbytes=sum(nbytes) * tp, sensitivity=1.0)


ENTRIES = {
    "base": entry([["s", "b"]], [10, 5]),
    "ft": entry([["s", "f"]], [10, 3]),  # shares s with base
    "big": entry([["g/0"], ["g/1"]], [7]),  # tensor parallel 2: rank 1 on the next GPU
}


def table(rows: list[tuple[float, str, int, bool, str]]) -> pd.DataFrame:
    """(arrival, model, gpu, cold, outcome) rows; cold starts start when they arrive."""
    frame = pd.DataFrame({c: [0] * len(rows) for c in REQUEST_COLUMNS})
    for col, values in zip(("arrival_s", "model", "gpu", "cold", "outcome"), zip(*rows)):
        frame[col] = list(values)
    frame["rid"] = range(len(rows))
    frame["queue_s"] = 0.0
    frame["bytes_needed"] = [ENTRIES[m].nbytes if o == "completed" or c else 0 for _, m, _, c, o in rows]
    return frame


def test_each_unit_loads_once_per_gpu_at_its_first_cold_start() -> None:
    rows = [
        (0.0, "base", 0, True, "completed"),  # s + b
        (1.0, "base", 0, False, "completed"),  # warm
        (2.0, "ft", 0, True, "completed"),  # f only: s is shared with base
        (3.0, "base", 0, True, "completed"),  # all seen on GPU 0
        (4.0, "ft", 1, True, "rejected"),  # s + f on GPU 1, its request rejected afterwards
        (5.0, "big", 0, True, "completed"),  # g/0 on GPU 0, g/1 on GPU 1
        (6.0, "ft", 1, True, "completed"),  # already loaded by the rejected one
        (7.0, "big", 0, True, "completed"),
    ]
    frame = table(rows)
    assert first_load_bytes(frame, ENTRIES).tolist() == [15, 0, 3, 0, 13, 14, 0, 0]
    m = bound_metrics(frame, ENTRIES)
    cold_needed = 15 + 13 + 15 + 13 + 14 + 13 + 14
    assert m["io_reduction_bound"] == pytest.approx(1 - (15 + 3 + 13 + 14) / cold_needed, rel=1e-15)
    done_needed = 15 + 15 + 13 + 15 + 14 + 13 + 14
    assert m["request_bytes_from_gpu_bound"] == pytest.approx(1 - (15 + 3 + 14) / done_needed, rel=1e-15)
    # the order is the start time, not the row order
    shuffled = frame.iloc[::-1].reset_index(drop=True)
    assert first_load_bytes(shuffled, ENTRIES).tolist() == [15, 0, 3, 0, 13, 14, 0, 0][::-1]


def test_summarize_adds_the_bound_beside_its_counterparts() -> None:
    frame = table([(0.0, "base", 0, True, "completed"), (1.0, "base", 0, True, "completed")])
    frame["bytes_loaded"] = [15, 5]
    frame["bytes_reused"] = frame["bytes_needed"] - frame["bytes_loaded"]
    plain = summarize(frame, 0.0, 0)
    assert not set(BOUND_COLUMNS) & set(plain)
    s = summarize(frame, 0.0, 0, ENTRIES)
    keys = list(s)
    assert keys.index("io_reduction_bound") == keys.index("io_reduction") + 1
    assert s["io_reduction"] == pytest.approx(1 - 20 / 30) and s["io_reduction_bound"] == pytest.approx(0.5)
    assert s["request_bytes_from_gpu_bound"] == pytest.approx(0.5)
    empty = summarize(table([]), 0.0, 0, ENTRIES)
    assert (empty["io_reduction_bound"], empty["request_bytes_from_gpu_bound"]) == (0.0, 0.0)


def check_bounds(s: dict | pd.Series, tol: float = 1e-12) -> None:
    assert s["io_reduction_bound"] <= 1 + tol
    assert s["request_bytes_from_gpu_bound"] <= 1 + tol
    if not pd.isna(s.get("io_reduction_with_prefetch", math.nan)):
        # A cold start may reuse a unit that a prefetch loaded, not a cold start: what the bound limits
        # is every byte that crossed PCIe, cold starts' and prefetches' (core.metrics).
        assert -tol <= s["io_reduction"] and s["io_reduction_with_prefetch"] <= s["io_reduction_bound"] + tol
        return
    assert -tol <= s["io_reduction"] <= s["io_reduction_bound"] + tol
    assert s["request_bytes_from_gpu"] <= s["request_bytes_from_gpu_bound"] + tol


@pytest.fixture(scope="module")
def workload() -> tuple[dict[str, ModelChoice], pd.DataFrame, ClusterSpec]:
    """Five models on 4 GPUs: a tensor-parallel one (each rank on its own GPU) and a fine-tune sharing
    half its base's layers."""
    llama = get_model("llama-3-8b")
    ft = derive_model(llama, "llama-3-8b-ft", share_patterns_first_layers(llama, 0.5))
    models = {"llama-2-70b": ModelChoice(get_model("llama-2-70b"), tensor_parallel=2),
              "llama-3-8b": ModelChoice(llama), "qwen2.5-3b": ModelChoice(get_model("qwen2.5-3b")),
              "llama-3-8b-ft": ModelChoice(ft), "phi-3-mini-4k": ModelChoice(get_model("phi-3-mini-4k"))}
    names = ["llama-2-70b", "llama-3-8b", "qwen2.5-3b", "llama-3-8b-ft", "phi-3-mini-4k", "qwen2.5-3b",
             "llama-3-8b"]
    rows = [(1.5 * i, names[(i * 3) % 7], 200 + 50 * (i % 7), 5 + i % 30) for i in range(160)]
    trace = pd.DataFrame(rows, columns=["arrival_s", "model", "input_tokens", "output_tokens"])
    return models, trace, ClusterSpec(1, 4, gpu_spec("a100-80gb"), TierSpec())


@pytest.mark.parametrize("preset, overrides", [
    ("serverlessllm", {}), ("model-reuse", {}), ("tensor-reuse", {}), ("tangram", {}),
    ("tangram", {"retention": "next-use"}), ("tangram", {"retention": "lfu"}),
    ("tangram", {"retention": "model-value", "prefetch": "next-model"}),
])
def test_simulated_runs_stay_within_their_bound(workload, tmp_path, preset: str, overrides: dict) -> None:
    models, trace, cluster = workload
    system = make_system(preset, preset, {"keep_alive_s": 5.0, **overrides})
    res = simulate(models, trace, cluster, system)
    s = res.summary
    check_bounds(s)
    assert s["cold_starts"] > 100 and s["io_reduction_bound"] < 1
    # from first principles: each GPU loads each distinct unit shard it ever needs once
    from tangram_sim.core.records import build_entries

    entries = build_entries({n: (c.spec, c.sensitivity, c.tensor_parallel) for n, c in models.items()}, system,
                            cluster.alignment)
    sizes = unit_sizes(entries)
    schedules = gpu_schedules(res.requests, entries)
    assert len(schedules) == 4  # every GPU started something, the TP model's second ranks included
    total = sum(unlimited_memory_loads([keys for _, keys in sched], sizes) for sched in schedules.values())
    assert s["io_reduction_bound"] == pytest.approx(1 - total / s["bytes_needed"], rel=1e-12)
    if preset == "serverlessllm":  # nothing retained: the bound is where retention could take it
        assert s["io_reduction"] == 0.0 < s["io_reduction_bound"]
    streamed = simulate(models, trace, cluster, system, requests_path=tmp_path / "r.parquet")
    assert streamed.summary == s


def test_prefetch_runs_stay_within_their_bound_counting_every_byte_that_crossed_pcie() -> None:
    names = ["llama-3-8b", "yi-9b", "qwen2.5-3b", "phi-3-mini-4k"]  # 47.5 GB on 2 x 20 GiB
    models = {n: ModelChoice(get_model(n)) for n in names}
    rng = random.Random(5)
    rows = [(8.0 * i + rng.random(), rng.choices(names, weights=[4, 2, 1, 1])[0], 100 + 30 * (i % 5), 5 + i % 20)
            for i in range(150)]
    trace = pd.DataFrame(rows, columns=["arrival_s", "model", "input_tokens", "output_tokens"])
    system = make_system("p", "tangram", {"retention": "model-value", "prefetch": "next-model"})
    s = simulate(models, trace, ClusterSpec(1, 2, gpu_spec("a100-80gb", memory_gib=20), TierSpec()), system).summary
    assert s["prefetched_bytes"] > 0 and s["prefetch_used_bytes"] > 0
    check_bounds(s)
    crossed = s["bytes_loaded"] + s["prefetched_bytes"] + s["prefetch_cancelled_bytes"]
    assert s["io_reduction_with_prefetch"] == pytest.approx(1 - crossed / s["bytes_needed"], rel=1e-12)


def committed_summaries() -> list[Path]:
    return sorted((ROOT / "results").glob("*/summary.csv"))


@pytest.mark.parametrize("path", committed_summaries(), ids=lambda p: p.parent.name)
def test_committed_results_stay_within_their_bound(path: Path) -> None:
    summary = pd.read_csv(path)
    missing = [c for c in BOUND_COLUMNS if c not in summary.columns]
    if missing:
        pytest.skip(f"{path.parent.name}/summary.csv predates the bound columns ({', '.join(missing)})")
    for _, row in summary.iterrows():
        check_bounds(row, TOL)

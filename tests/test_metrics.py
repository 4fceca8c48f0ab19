"""The summary's two families of weight-loading metrics: per cold start and per request (the Tangram
authors' count, where a warm request is a full hit that loads nothing), and the byte accounting that
makes the per-request ones computable."""

from __future__ import annotations

import pandas as pd
import pytest

from tangram_sim.core.metrics import REQUEST_COLUMNS, accounting_problems, per_request_metrics, summarize
from tangram_sim.core.records import Request
from tangram_sim.models import get_model
from tangram_sim.sim.hardware import TierSpec, gpu_spec
from tangram_sim.sim.simulate import ClusterSpec, ModelChoice, simulate
from tangram_sim.sim.systems import make_system

PER_REQUEST = ("request_resident_ratio", "request_bytes_from_gpu", "mean_load_per_request_s")

# (cold, outcome, bytes_needed, bytes_loaded, load_s): model a holds 100 bytes, model b 200
ROWS = [
    (True, "completed", 100, 40, 1.0),  # cold start that loaded 40 of 100 bytes
    (False, "completed", 100, 0, 0.0),  # warm
    (False, "completed", 100, 0, 0.0),  # warm
    (True, "completed", 200, 0, 0.5),  # cold full hit (its compaction copies took 0.5 s)
    (False, "completed", 200, 0, 0.0),  # warm
    (False, "rejected", 0, 0, 0.0),  # rejected before it was admitted: never served, no bytes
    (True, "rejected", 100, 100, 1.5),  # a cold start whose request was then rejected
]


def table(rows: list[tuple[bool, str, int, int, float]]) -> pd.DataFrame:
    frame = pd.DataFrame({c: [0] * len(rows) for c in REQUEST_COLUMNS})
    for col, values in zip(("cold", "outcome", "bytes_needed", "bytes_loaded", "load_s"), zip(*rows)):
        frame[col] = list(values)
    frame["rid"] = range(len(rows))
    frame["bytes_reused"] = frame["bytes_needed"] - frame["bytes_loaded"]
    frame["ttft_s"] = [1.0 if o == "completed" else float("nan") for o in frame["outcome"]]
    frame["e2e_s"] = frame["ttft_s"]
    frame["reason"] = ["kv-capacity" if o == "rejected" else "" for o in frame["outcome"]]
    return frame


def test_per_request_metrics_of_a_hand_built_table() -> None:
    s = summarize(table(ROWS), gpu_busy_s=0.0, compaction_bytes=0)
    # per request, over the 5 completed: 3 warm + 1 cold full hit resident; 40 of 700 model bytes loaded;
    # 1.5 s of loading over 5 requests
    assert s["request_resident_ratio"] == pytest.approx(4 / 5, abs=0)
    assert s["request_bytes_from_gpu"] == pytest.approx(1 - 40 / 700, rel=1e-15)
    assert s["mean_load_per_request_s"] == pytest.approx(1.5 / 5, rel=1e-15)
    # per cold start, unchanged: the 3 cold starts, the rejected one included
    assert s["cold_starts"] == 3
    assert (s["bytes_needed"], s["bytes_loaded"], s["bytes_reused"]) == (400, 140, 260)
    assert s["io_reduction"] == pytest.approx(1 - 140 / 400, rel=1e-15)
    assert s["full_hit_ratio"] == pytest.approx(1 / 3, rel=1e-15)
    assert s["mean_load_s"] == pytest.approx(3.0 / 3, rel=1e-15)


def test_per_request_metrics_without_completed_requests_are_zero() -> None:
    for rows in ([], [r for r in ROWS if r[1] == "rejected"]):
        assert per_request_metrics(table(rows)) == dict.fromkeys(PER_REQUEST, 0.0)
    s = summarize(table([]), 0.0, 0)
    assert all(s[k] == 0.0 for k in PER_REQUEST)


def test_a_warm_only_table_is_fully_resident() -> None:
    m = per_request_metrics(table([(False, "completed", 100, 0, 0.0)] * 4))
    assert m == {"request_resident_ratio": 1.0, "request_bytes_from_gpu": 1.0, "mean_load_per_request_s": 0.0}


def _request(cold: bool, outcome: str, needed: int, loaded: int, reused: int) -> Request:
    r = Request(0, 0.0, "m", 10, 2)
    r.cold, r.outcome, r.reason = cold, outcome, "kv-capacity" if outcome == "rejected" else ""
    r.bytes_needed, r.bytes_loaded, r.bytes_reused = needed, loaded, reused
    return r


def test_accounting_checks_warm_requests_too() -> None:
    assert accounting_problems([_request(False, "completed", 100, 0, 100)], 1) == []
    assert accounting_problems([_request(False, "rejected", 0, 0, 0)], 1) == []  # never admitted
    (problem,) = accounting_problems([_request(False, "completed", 100, 0, 90)], 1)
    assert "loaded 0 + reused 90 != needed 100" in problem
    (problem,) = accounting_problems([_request(False, "completed", 0, 0, 0)], 1)
    assert "without its model's bytes" in problem


@pytest.mark.parametrize("preset", ["tangram", "serverlessllm"])
def test_every_served_request_records_its_model_bytes(preset: str) -> None:
    """Warm requests reuse all their model's bytes, tensor-parallel ones included; the resident requests
    are the warm ones plus the cold full hits."""
    big = get_model("llama-2-70b")
    names = ["llama-2-70b", "llama-3-8b", "qwen2.5-3b", "llama-3-8b", "qwen2.5-3b"]
    models = {"llama-2-70b": ModelChoice(big, tensor_parallel=2), "llama-3-8b": ModelChoice(get_model("llama-3-8b")),
              "qwen2.5-3b": ModelChoice(get_model("qwen2.5-3b"))}
    rows = [(1.5 * i, names[(i * 3) % 5], 200 + 50 * (i % 7), 5 + i % 30) for i in range(120)]
    trace = pd.DataFrame(rows, columns=["arrival_s", "model", "input_tokens", "output_tokens"])
    c = ClusterSpec(1, 4, gpu_spec("a100-80gb"), TierSpec())
    res = simulate(models, trace, c, make_system(preset, preset, {"keep_alive_s": 5.0}))
    r, s = res.requests, res.summary
    done = r[r.outcome == "completed"]
    warm = done[~done.cold]
    assert len(warm) > 0 and (warm.bytes_loaded == 0).all() and (warm.load_s == 0).all()
    assert (done.bytes_loaded + done.bytes_reused == done.bytes_needed).all()
    # each model's bytes are the same for every request of it, warm or cold (all ranks for a TP model)
    per_model = done.groupby("model")["bytes_needed"]
    assert (per_model.nunique() == 1).all() and (per_model.min() > 0).all()
    assert per_model.min()["llama-2-70b"] >= big.weight_bytes
    assert (warm.bytes_reused == warm.bytes_needed).all()
    resident = len(warm) + int((done.cold & (done.bytes_loaded == 0)).sum())
    assert s["request_resident_ratio"] == resident / len(done)
    assert s["request_bytes_from_gpu"] == 1 - done.bytes_loaded.sum() / done.bytes_needed.sum()
    assert s["mean_load_per_request_s"] == pytest.approx(done.load_s.sum() / len(done), rel=1e-12)
    # every warm request counts as resident, so the per-request view never sees less reuse than cold starts
    assert s["request_resident_ratio"] >= s["full_hit_ratio"] * s["cold_starts"] / s["completed"]
    assert s["request_bytes_from_gpu"] >= s["io_reduction"]
    if preset == "serverlessllm":  # no reuse across instances: resident means warm
        assert s["full_hit_ratio"] == 0.0 and s["request_resident_ratio"] == len(warm) / len(done)

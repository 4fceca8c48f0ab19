"""Figures, report and `tangram-sim plot` on fabricated run directories (no simulator involved)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from tangram_sim.cli import main
from tangram_sim.core.metrics import per_request_metrics
from tangram_sim.core.slo import Slo, slo_metrics
from tangram_sim.errors import TangramError
from tangram_sim.plots import FIGURES, load_run, render_all, write_report
from tangram_sim.rundir import adopt_legacy

MODELS = {"qwen2.5-3b": 6.17e9, "llama-3-8b": 16.06e9, "yi-9b": 17.66e9}
CAPACITY = 40 * 2**30
ALL_FIGURES = {spec.file for spec in FIGURES}


def _requests(rng: np.random.Generator, system: str, point: int, n: int, reuse: float, *,
              no_cold: bool, rejected: bool) -> pd.DataFrame:
    models = rng.choice(list(MODELS), size=n, p=[0.5, 0.3, 0.2])
    needed = np.array([MODELS[m] for m in models], dtype=np.int64)
    cold = np.zeros(n, bool) if no_cold else rng.random(n) < 0.6
    loaded = np.where(cold, (needed * (1 - reuse * rng.random(n))).astype(np.int64), 0)
    loaded[cold & (rng.random(n) < reuse / 2)] = 0  # some full hits
    load_s = np.where(cold, 0.05 + loaded / 25e9, 0.0)
    queue_s = rng.exponential(0.3, n)
    prefill = rng.uniform(0.02, 0.2, n)
    ttft = queue_s + load_s + prefill
    outcome = np.where(rng.random(n) < 0.05, "rejected", "completed")
    if rejected:
        outcome[:] = "rejected"
    reason = np.where(outcome == "rejected", rng.choice(["kv-capacity", "queue-timeout"], n), "")
    return pd.DataFrame({
        "system": system, "point": point, "rid": np.arange(n), "arrival_s": np.sort(rng.uniform(0, 600, n)),
        "model": models, "input_tokens": rng.integers(16, 2048, n), "output_tokens": rng.integers(16, 512, n),
        "gpu": rng.integers(0, 2, n), "cold": cold, "queue_s": queue_s, "load_s": load_s,
        "bytes_needed": needed, "bytes_loaded": loaded,  # a warm request reuses all its model's bytes
        "bytes_reused": needed - loaded, "bytes_moved": np.zeros(n, np.int64),
        "startup_s": load_s, "overlap_s": np.zeros(n), "ttft_s": np.where(outcome == "completed", ttft, np.nan),
        "e2e_s": np.where(outcome == "completed", ttft + rng.uniform(1, 5, n), np.nan),
        "waited_for_kv_s": np.zeros(n), "preemptions": np.zeros(n, np.int64), "outcome": outcome,
        "reason": reason,
    })


def _summary_row(req: pd.DataFrame, per_request: bool = True) -> dict[str, Any]:
    done = req[req["outcome"] == "completed"]
    cold = req[req["cold"]]
    needed, loaded = int(cold["bytes_needed"].sum()), int(cold["bytes_loaded"].sum())
    ttft = done["ttft_s"]
    row = {
        "requests": len(req), "completed": len(done), "rejected": int((req["outcome"] == "rejected").sum()),
        "cold_starts": len(cold), "mean_ttft_s": ttft.mean(), "p50_ttft_s": ttft.quantile(0.5),
        "p90_ttft_s": ttft.quantile(0.9), "p99_ttft_s": ttft.quantile(0.99),
        "mean_load_s": cold["load_s"].mean() if len(cold) else 0.0,
        "p99_load_s": cold["load_s"].quantile(0.99) if len(cold) else 0.0,
        "mean_queue_s": req["queue_s"].mean(), "mean_e2e_s": done["e2e_s"].mean(),
        "bytes_needed": needed, "bytes_loaded": loaded, "bytes_reused": needed - loaded,
        "io_reduction": 1 - loaded / needed if needed else 0.0,
        "full_hit_ratio": float((cold["bytes_loaded"] == 0).mean()) if len(cold) else 0.0,
        **(per_request_metrics(req) if per_request else {}),
        "compaction_bytes": 0, "gpu_busy_s": 100.0, "waited_for_kv_s": 0.0, "preemptions": 0,
    }
    for target in (0.5, 1, 2, 5):
        row[f"slo_ttft_{target:g}s"] = float((ttft <= target).sum() / len(req))
    if per_request:  # the SLO and cost columns are newer still
        row.update(slo_metrics(req, Slo(), gpu_held_s=1200.0))
    row["sim_end_s"] = 650.0
    return row


def _timeline(rng: np.random.Generator, system: str, point: int, gpus: int) -> pd.DataFrame:
    frames = []
    for gpu in range(gpus):
        t = np.sort(rng.uniform(0, 650, 120))
        parts = rng.dirichlet([2, 3, 1, 0.3, 2], len(t)) * CAPACITY
        active, retained, kv, loading, free = (parts[:, i].astype(np.int64) for i in range(5))
        free = CAPACITY - active - retained - kv - loading
        largest = (free * rng.uniform(0.3, 1.0, len(t))).astype(np.int64)
        frames.append(pd.DataFrame({
            "system": system, "point": point, "time_s": t, "gpu": gpu, "active_model": "llama-3-8b",
            "active_bytes": active, "retained_bytes": retained, "kv_bytes": kv, "loading_bytes": loading,
            "free_bytes": free, "largest_free_bytes": largest, "fragmentation": 1 - largest / free,
        }))
    return pd.concat(frames, ignore_index=True)


def make_run(root: Path, systems: list[str], *, sweep: dict[str, list[Any]] | None = None, n: int = 150,
             no_cold: tuple[str, ...] = (), all_rejected: tuple[str, ...] = (), parquet: bool = True,
             name: str = "fixture-exp", per_request: bool = True) -> Path:
    """Fabricate what `tangram-sim run` writes: config.yaml, summary.csv and the two parquet files
    (per_request=False: a summary.csv written before the per-request metrics existed, and so before the
    SLO and cost columns)."""
    rng = np.random.default_rng(0)
    sweep = sweep or {}
    keys = list(sweep)
    grid = [dict(zip(keys, combo)) for combo in _product([sweep[k] for k in keys])]
    config = {
        "name": name, "seed": 7, "description": "Fabricated run for the plot tests.",
        "cluster": {"nodes": 1, "gpus_per_node": 2, "gpu": "a100-80gb", "gpu_memory_gib": 40.0},
        "models": [{"name": m, "sensitivity": 1.0} for m in MODELS],
        "trace": {"kind": "synthetic", "n_requests": n, "rate": 0.25},
        "systems": [{"name": s, "preset": s, "overrides": {}} for s in systems],
    }
    if per_request:
        config["slo"] = {"ttft_s": 2.0, "tpot_s": 0.2}
    if sweep:
        config["sweep"] = sweep
    rows, requests, timelines = [], [], []
    for point, values in enumerate(grid):
        for i, system in enumerate(systems):
            reuse = i / max(1, len(systems) - 1) * (0.5 + 0.1 * point)
            req = _requests(rng, system, point, n, reuse, no_cold=system in no_cold,
                            rejected=system in all_rejected)
            requests.append(req)
            timelines.append(_timeline(rng, system, point, gpus=2))
            rows.append({"system": system, "point": point, **values, **_summary_row(req, per_request)})
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    pd.DataFrame(rows).to_csv(root / "summary.csv", index=False, float_format="%.6g")
    if parquet:
        pd.concat(requests, ignore_index=True).to_parquet(root / "requests.parquet", index=False)
        pd.concat(timelines, ignore_index=True).to_parquet(root / "timeline.parquet", index=False)
    adopt_legacy(root)  # a finished run: plot and the report refuse folders without a complete run.json
    return root


def _product(lists: list[list[Any]]) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = [()]
    for values in lists:
        out = [prefix + (v,) for prefix in out for v in values]
    return out


def _assert_pngs(paths: list[Path], expected: set[str]) -> None:
    assert {p.name for p in paths} == expected
    for path in paths:
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", path
        assert len(data) > 10_000, f"{path.name} is only {len(data)} bytes"


def _assert_report(run_dir: Path, systems: list[str], pngs: list[Path]) -> str:
    text = (run_dir / "report.md").read_text()
    assert text.startswith("# ")
    for system in systems:
        assert system in text
    for png in pngs:
        assert f"](plots/{png.name})" in text
    return text


# ------------------------------------------------------------------ rendering and report
def test_no_sweep_with_a_system_without_cold_starts(tmp_path: Path) -> None:
    systems = ["serverlessllm", "warm-pool", "tangram"]
    run_dir = make_run(tmp_path / "run", systems, no_cold=("warm-pool",))
    pngs = render_all(run_dir)
    _assert_pngs(pngs, ALL_FIGURES - {"sweep.png"})
    report = write_report(run_dir)
    assert report == run_dir / "report.md"
    text = _assert_report(run_dir, systems, pngs)
    assert text.startswith("# fixture-exp")
    assert "a100-80gb" in text and "llama-3-8b" in text and "synthetic" in text
    assert "**tangram** vs serverlessllm: mean load" in text and "p50 TTFT" in text
    assert "kv-capacity" in text  # rejection reasons are listed
    assert "| system |" in text and "GB" in text and "%" in text
    assert text.count("*Figure ") == len(pngs)
    # weight loading two ways, each labelled and explained
    assert "### Weight loading per cold start" in text
    assert "### Weight loading per request (the Tangram authors' metrics)" in text
    assert "| bytes from GPU | resident |" in text and "| I/O reduction | full hits |" in text
    for term in ("**I/O reduction**", "**full hits**", "**bytes from GPU**", "**resident**", "**mean load**"):
        assert term in text
    assert "mean load per cold start" in text and "mean load per request" in text
    assert "Bottom, per completed request" in text  # the I/O figure's caption names both rows
    # service level and cost, against the configured SLO, each column explained
    assert "### Service level and cost" in text and "SLO: TTFT <= 2 s, TPOT <= 0.2 s" in text
    assert "| TTFT SLO met | TPOT SLO met | goodput (req/s) | GPU time held (s) | GPU-s per request |" in text
    for term in ("**TTFT / TPOT SLO met**", "**goodput**", "**GPU time held**", "**mean overlap**"):
        assert term in text


def test_a_summary_without_per_request_metrics_still_draws_and_says_so(tmp_path: Path) -> None:
    """A run directory written before the per-request metrics existed: the per-cold-start panels only."""
    run_dir = make_run(tmp_path / "old", ["serverlessllm", "tangram"], per_request=False,
                       sweep={"cluster.gpus_per_node": [1, 2]}, n=60)
    pngs = render_all(run_dir)
    _assert_pngs(pngs, ALL_FIGURES - {"slo_cost.png"})
    write_report(run_dir)
    text = _assert_report(run_dir, ["serverlessllm", "tangram"], pngs)
    assert "Not in this run's summary.csv" in text and "| I/O reduction | full hits |" in text
    assert text.count("Not in this run's summary.csv") == 2  # the per-request and the service tables
    assert "| TTFT SLO met |" not in text
    assert "mean load per request" not in text and "Bottom, per completed request" not in text


def test_weight_loading_figures_show_both_ways_of_counting(tmp_path: Path) -> None:
    from tangram_sim.plots.figures import breakdown, io_reduction, sweep_lines
    from tangram_sim.plots.service import slo_cost

    new = load_run(make_run(tmp_path / "new", ["a", "b"], sweep={"cluster.gpus_per_node": [1, 2]}, n=60))
    old = load_run(make_run(tmp_path / "old", ["a", "b"], sweep={"cluster.gpus_per_node": [1, 2]}, n=60,
                            per_request=False))

    def titles(fig: Any) -> list[str]:
        return [ax.get_title() for ax in fig.axes if ax.get_visible()]

    assert titles(io_reduction(new)) == [
        "I/O reduction per cold start\n(% of needed bytes reused)",
        "full hits per cold start\n(% of cold starts that loaded nothing)",
        "bytes from GPU per request\n(% of model bytes not loaded)",
        "resident per request\n(% of requests whose model was resident)",
    ]
    assert len(titles(io_reduction(old))) == 2
    assert titles(breakdown(new)) == ["mean load per cold start", "mean load per request", "p50 TTFT"]
    assert titles(breakdown(old)) == ["mean load per cold start", "p50 TTFT"]
    assert titles(sweep_lines(new)) == [
        "mean load time per cold start", "I/O reduction per cold start", "p50 TTFT",
        "mean load time per request", "bytes from GPU per request", "resident per request",
        "TTFT SLO attainment", "goodput", "GPU time per request",
    ]
    assert titles(sweep_lines(old)) == ["mean load time per cold start", "I/O reduction per cold start", "p50 TTFT"]
    assert titles(slo_cost(new)) == ["TTFT SLO attainment", "TPOT SLO attainment", "goodput",
                                     "GPU time per request"]
    assert slo_cost(old) is None


def test_sweep_draws_sensitivity_lines_and_panels(tmp_path: Path) -> None:
    systems = ["serverlessllm", "tangram"]
    run_dir = make_run(tmp_path / "sweep", systems, sweep={"cluster.gpus_per_node": [1, 2, 4]}, n=120)
    pngs = render_all(run_dir)
    _assert_pngs(pngs, ALL_FIGURES)
    write_report(run_dir)
    text = _assert_report(run_dir, systems, pngs)
    assert "gpus_per_node=4" in text  # per-point comparison lines
    assert "cluster.gpus_per_node" in text


def test_two_key_sweep_and_all_rejected_system(tmp_path: Path) -> None:
    systems = ["sllm", "broken", "tangram"]
    sweep = {"trace.mapping.alpha": [0.5, 2.0], "cluster.nodes": [1, 2]}
    run_dir = make_run(tmp_path / "two", systems, sweep=sweep, n=80, all_rejected=("broken",))
    pngs = render_all(run_dir)
    assert (run_dir / "plots" / "sweep.png") in pngs
    _assert_pngs(pngs, ALL_FIGURES)
    write_report(run_dir)
    text = _assert_report(run_dir, systems, pngs)
    assert "**broken**: 320 rejected of 320" in text
    assert "p50 TTFT n/a (no completed requests)" in text


def test_summary_only_run_skips_request_figures(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "bare", ["a", "b"], parquet=False)
    pngs = render_all(run_dir)
    _assert_pngs(pngs, {"breakdown.png", "io_reduction.png", "slo_cost.png"})
    write_report(run_dir)
    text = _assert_report(run_dir, ["a", "b"], pngs)
    assert "requests.parquet" in text


def test_stale_figures_are_removed(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "stale", ["a", "b"], parquet=False)
    (run_dir / "plots").mkdir()
    (run_dir / "plots" / "sweep.png").write_bytes(b"old")
    render_all(run_dir)
    assert not (run_dir / "plots" / "sweep.png").exists()


def test_load_run_orders_systems_as_configured(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "order", ["zeta", "alpha", "mid"], parquet=False)
    run = load_run(run_dir)
    assert run.systems == ["zeta", "alpha", "mid"]
    assert len(set(map(tuple, run.colors.values()))) == 3


# ------------------------------------------------------------------ errors and CLI
def test_load_run_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(TangramError, match="not a directory"):
        load_run(tmp_path / "missing")
    with pytest.raises(TangramError, match="no run.json"):
        load_run(tmp_path)
    with pytest.raises(TangramError, match="summary.csv"):
        load_run(tmp_path, require_complete=False)
    run_dir = make_run(tmp_path / "bad", ["a"], parquet=False)
    (run_dir / "config.yaml").write_text("name: [unclosed\n")
    with pytest.raises(TangramError, match="config.yaml"):
        load_run(run_dir)


def test_cli_plot_missing_dir_returns_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere"
    assert main(["plot", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and str(missing) in err and len(err.strip().splitlines()) == 1


def test_cli_plot_redraws(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = make_run(tmp_path / "cli", ["a", "b"], parquet=False)
    assert main(["plot", str(run_dir)]) == 0
    assert (run_dir / "report.md").is_file()
    assert "report.md" in capsys.readouterr().out

"""Fidelity tables, `tangram-sim compare`, and the calibration plumbing of the simulator (no device)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tangram_sim.cli import main
from tangram_sim.core.metrics import REQUEST_COLUMNS
from tangram_sim.errors import TangramError
from tangram_sim.models import get_model
from tangram_sim.real.fidelity import compare_runs, fidelity_table, format_table
from tangram_sim.rundir import adopt_legacy
from tangram_sim.sim.hardware import TierSpec, gpu_spec
from tangram_sim.sim.simulate import ClusterSpec, ModelChoice, simulate
from tangram_sim.sim.systems import make_system
from tangram_sim.sim.timemodel import Calibration

LLAMA = get_model("llama-3-8b")


def requests(system: str, load: list[float], ttft: list[float], loaded: list[int]) -> pd.DataFrame:
    """A request table of len(load) requests; a request is cold when its load time is > 0."""
    n = len(load)
    rows = {c: [0] * n for c in REQUEST_COLUMNS}
    rows.update(rid=list(range(n)), model=["m"] * n, cold=[x > 0 for x in load], load_s=load, ttft_s=ttft,
                bytes_loaded=loaded, queue_s=[0.0] * n, outcome=["completed"] * n, reason=[""] * n)
    frame = pd.DataFrame(rows)
    frame.insert(0, "point", 0)
    frame.insert(0, "system", system)
    return frame


def test_errors_are_relative_except_the_full_hit_ratio() -> None:
    real = requests("tangram", [1.0, 2.0, 0.0, 3.0], [2.0, 3.0, 1.0, 4.0], [10, 20, 0, 0])
    sim = requests("tangram", [1.1, 2.2, 0.0, 3.3], [2.0, 3.0, 1.0, 4.0], [10, 20, 0, 10])
    t = fidelity_table(sim, real).iloc[0]
    assert t["mean_load_s_real"] == pytest.approx(2.0) and t["mean_load_s_err"] == pytest.approx(0.1)
    assert t["p50_ttft_s_err"] == pytest.approx(0.0)
    assert t["bytes_loaded_err"] == pytest.approx(40 / 30 - 1)
    # real: 1 of 3 cold starts loaded nothing; sim: none did -> -1/3 in points, not a ratio of ratios
    assert t["full_hit_ratio_err"] == pytest.approx(-1 / 3)
    assert t["load_s_corr"] == pytest.approx(1.0) and t["cold_match"] == 1.0


def test_per_request_metrics_are_compared_too() -> None:
    """The Tangram authors' per-request figures: load time with warm requests at 0 (relative error),
    resident share and bytes from GPU (differences in points)."""
    real = requests("tangram", [1.0, 0.0, 0.0, 2.0], [2.0] * 4, [10, 0, 0, 0])
    sim = requests("tangram", [1.0, 0.0, 1.0, 2.0], [2.0] * 4, [10, 0, 10, 10])
    for frame in (real, sim):
        frame["bytes_needed"] = 10
        frame["bytes_reused"] = frame["bytes_needed"] - frame["bytes_loaded"]
    t = fidelity_table(sim, real).iloc[0]
    assert t["mean_load_per_request_s_real"] == pytest.approx(0.75) and t["mean_load_per_request_s_sim"] == 1.0
    assert t["mean_load_per_request_s_err"] == pytest.approx(1 / 3)
    # real: 2 warm + 1 cold full hit of 4 resident, 10 of 40 bytes loaded; sim: 1 warm, 30 of 40 loaded
    assert t["request_resident_ratio_real"] == 0.75 and t["request_resident_ratio_err"] == pytest.approx(-0.5)
    assert t["request_bytes_from_gpu_real"] == 0.75 and t["request_bytes_from_gpu_err"] == pytest.approx(-0.5)


def test_compare_cli_writes_csv_and_plot_and_checks_the_tolerance(tmp_path: Path) -> None:
    sim_dir, real_dir = tmp_path / "sim", tmp_path / "real"
    for d, scale in ((sim_dir, 1.3), (real_dir, 1.0)):
        d.mkdir()
        frame = pd.concat([
            requests("serverlessllm", [scale * x for x in (1.0, 2.0, 3.0)], [2.0, 3.0, 4.0], [5, 5, 5]),
            requests("tangram", [scale * x for x in (0.5, 1.0, 0.0)], [2.0, 3.0, 1.0], [5, 0, 0]),
        ])
        frame.to_parquet(d / "requests.parquet")
        adopt_legacy(d, kind="run" if d == sim_dir else "replay")  # compare needs a complete run.json
    assert main(["compare", str(sim_dir), str(real_dir), "--tolerance", "0.5"]) == 0
    out = tmp_path / "compare" / "sim-vs-real"  # beside the runs, never into one
    table = pd.read_csv(out / "fidelity.csv")
    assert list(table["system"]) == ["serverlessllm", "tangram"]
    assert table["mean_load_s_err"].to_numpy() == pytest.approx([0.3, 0.3])
    assert (out / "fidelity.png").stat().st_size > 10_000
    assert not (sim_dir / "fidelity.csv").exists() and not (real_dir / "fidelity.csv").exists()
    assert main(["compare", str(sim_dir), str(real_dir), "--tolerance", "0.1", "--out",
                 str(tmp_path / "f"), "--no-plot"]) == 1  # 30% is not within 10%
    assert not (tmp_path / "f" / "fidelity.png").exists()


def test_runs_of_different_requests_are_refused(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    requests("tangram", [1.0, 2.0], [1.0, 1.0], [1, 1]).to_parquet(a / "requests.parquet")
    requests("tangram", [1.0, 2.0, 3.0], [1.0, 1.0, 1.0], [1, 1, 1]).to_parquet(b / "requests.parquet")
    adopt_legacy(a), adopt_legacy(b, kind="replay")
    with pytest.raises(TangramError, match="different requests"):
        compare_runs(a, b)
    requests("other", [1.0, 2.0], [1.0, 1.0], [1, 1]).to_parquet(b / "requests.parquet")
    with pytest.raises(TangramError, match="no system is in both runs"):
        compare_runs(a, b)
    with pytest.raises(TangramError, match="no run.json"):
        compare_runs(a, tmp_path / "a" / "..")
    (a / "requests.parquet").unlink()
    with pytest.raises(TangramError, match="no requests.parquet"):
        compare_runs(a, b)
    assert main(["compare", str(a), str(tmp_path / "missing")]) == 2


def test_format_table_names_every_metric_every_gpu_and_the_lag() -> None:
    from tangram_sim.real.fidelity import Fidelity, gpu_table

    real = requests("tangram", [1.0, 2.0], [2.0, 3.0], [10, 20])
    real["gpu"] = [0, 1]
    sim = real.copy()
    sim["gpu"] = [0, 0]  # the simulation routed both to GPU 0
    table = fidelity_table(sim, real)
    table["lag_p50_s"], table["lag_p99_s"], table["lag_max_s"], table["lag_bound_s"] = 0.001, 0.02, 0.03, 0.005
    text = format_table(Fidelity(table, Path("sim"), Path("real"), gpu_table(sim, real, table)))
    for label in ("mean load time (per cold start)", "p50 TTFT", "bytes loaded", "full-hit ratio (per cold start)",
                  "mean load time (per request)", "resident ratio (per request)", "bytes from GPU (per request)",
                  "load time correlation"):
        assert label in text
    assert "+0.0%" in text
    assert "gpu 0: requests 2 / 1, cold starts 2 / 1" in text and "gpu 1: requests 0 / 1" in text
    assert "p99 20.00 ms" in text and "WARNING: the replay fell behind" in text


def test_calibrated_read_bandwidth_bounds_loads_from_storage() -> None:
    """read_bps replaces the SSD tier, so a load streams at min(read_bps, h2d_bps)."""
    trace = pd.DataFrame([(0.0, "llama-3-8b", 100, 1)],
                         columns=["arrival_s", "model", "input_tokens", "output_tokens"])
    cluster = ClusterSpec(1, 1, gpu_spec("a100-80gb", memory_gib=40), TierSpec(host_cache_bytes=0))
    system = make_system("t", "tangram")
    models = {"llama-3-8b": ModelChoice(LLAMA)}
    for read, h2d, rate in ((2e9, 20e9, 2e9), (50e9, 10e9, 10e9)):
        cal = Calibration(device="test", h2d_bps=h2d, read_bps=read, unit_overhead_s=0.0,
                          engine_overhead_s=0.0)
        row = simulate(models, trace, cluster, system, calibration=cal).requests.iloc[0]
        assert row.load_s == pytest.approx(LLAMA.weight_bytes / rate, rel=1e-9)
        assert row.startup_s == 0.0


def test_calibration_yaml_round_trips_read_bps(tmp_path: Path) -> None:
    cal = Calibration(device="cpu", h2d_bps=1e10, read_bps=3e9, unit_overhead_s=1e-4, engine_overhead_s=2e-3)
    path = tmp_path / "cal.yaml"
    import yaml

    path.write_text(yaml.safe_dump({**cal.to_dict(), "measurements": {"anything": [1, 2]}}))
    back = Calibration.load(path)
    assert back.read_bps == 3e9 and back.h2d_bps == 1e10 and back.engine_overhead_s == 2e-3


def test_fit_linear_recovers_coefficients_and_keeps_them_non_negative() -> None:
    pytest.importorskip("torch")
    from tangram_sim.real.calibrate import fit_linear

    rng = np.random.default_rng(0)
    x = np.c_[np.ones(50), rng.uniform(1, 100, 50)]
    y = x @ np.array([0.5, 0.01])
    coef, rel = fit_linear(x, y)
    assert coef == pytest.approx([0.5, 0.01]) and rel < 1e-9
    coef, _ = fit_linear(x, y, relative=True)
    assert coef == pytest.approx([0.5, 0.01])
    # y falls with x: the negative slope is dropped and the intercept refitted to the mean
    coef, _ = fit_linear(x, 10 - x[:, 1] * 0.01)
    assert coef[1] == 0.0 and coef[0] == pytest.approx(float(np.mean(10 - x[:, 1] * 0.01)))
    assert not math.isnan(coef[0])


def test_compare_reports_bytes_per_source_from_both_summaries(tmp_path: Path) -> None:
    from tangram_sim.core.sources import SOURCE_COLUMNS

    dirs = {}
    for side, (ssd, peer) in (("sim", (40, 60)), ("real", (50, 50))):
        d = dirs[side] = tmp_path / side
        d.mkdir()
        requests("tangram-peers", [1.0, 2.0], [2.0, 3.0], [ssd, peer]).to_parquet(d / "requests.parquet")
        row = {"system": "tangram-peers", **dict.fromkeys(SOURCE_COLUMNS, 0)}
        row.update(bytes_from_ssd=ssd, bytes_from_peer_gpu=peer)
        pd.DataFrame([row]).to_csv(d / "summary.csv", index=False)
        adopt_legacy(d, kind="run" if side == "sim" else "replay")
    fid = compare_runs(dirs["sim"], dirs["real"])
    t = fid.table.iloc[0]
    assert t["bytes_from_ssd_err"] == pytest.approx(-0.2) and t["bytes_from_peer_gpu_err"] == pytest.approx(0.2)
    assert "bytes_from_dram_sim" not in fid.table  # no side read from it
    assert "ssd 0.00 / 0.00 MB (-20.0%), peer_gpu 0.00 / 0.00 MB (+20.0%)" in format_table(fid)


def test_a_calibrated_peer_rate_times_copies_from_another_gpu() -> None:
    from tangram_sim.topology import TopologySpec

    qwen = get_model("qwen2.5-3b")
    cluster = ClusterSpec(1, 2, gpu_spec("a100-80gb", {"pcie_bps": 25e9}, 40), TierSpec(ssd_bps=6e9),
                          topology=TopologySpec())
    t = pd.DataFrame([(0.0, "q", 100, 3000), (5.0, "q", 100, 4)],
                     columns=["arrival_s", "model", "input_tokens", "output_tokens"])
    system = make_system("s", "tangram", {"max_batch": 1, "source": "gpu-first"})
    for cal, bps in ((None, 25e9), (Calibration(device="test", peer_bps=3e9), 3e9)):
        res = simulate({"q": ModelChoice(qwen)}, t, cluster, system, calibration=cal)
        second = res.requests.iloc[1]
        assert second.gpu == 1 and res.summary["bytes_from_peer_gpu"] == qwen.weight_bytes
        assert second.load_s == pytest.approx(qwen.weight_bytes / bps, rel=1e-9)  # PCIe both ways, or measured
    assert Calibration(device="x", peer_bps=3e9).to_dict()["peer_bps"] == 3e9


def test_replay_spread_measures_replays_against_each_other_and_the_simulation(tmp_path: Path) -> None:
    """Three replays of one trace and one simulation: the spread is the farthest replay from the
    replays' median, the simulation's error is against that median, and `within_10` counts the
    replays the simulation is within 10% of."""
    from tangram_sim.real.fidelity import format_spread, replay_spread

    sim_dir = tmp_path / "sim"
    sim_dir.mkdir()
    requests("tangram", [1.0, 2.0, 3.0], [2.0, 2.0, 2.0], [5, 5, 5]).to_parquet(sim_dir / "requests.parquet")
    adopt_legacy(sim_dir)
    dirs = []
    for i, scale in enumerate((1.0, 1.05, 1.3)):
        d = tmp_path / f"replay-{i}"
        d.mkdir()
        requests("tangram", [scale * x for x in (1.0, 2.0, 3.0)], [2.0 * scale] * 3, [5, 5, 5]).to_parquet(
            d / "requests.parquet")
        adopt_legacy(d, kind="replay")
        dirs.append(d)
    table = replay_spread(sim_dir, dirs).set_index("metric")
    load = table.loc["mean_load_s"]
    assert [load[f"replay_{i}"] for i in (1, 2, 3)] == pytest.approx([2.0, 2.1, 2.6])
    assert load["median"] == pytest.approx(2.1) and load["spread"] == pytest.approx(0.5 / 2.1)
    assert load["sim_err_median"] == pytest.approx(2.0 / 2.1 - 1)
    assert load["within_10"] == 2 and load["replays"] == 3  # 0% and -4.8% in, -23% out
    assert table.loc["p99_ttft_s", "sim_err_median"] == pytest.approx(2.0 / 2.1 - 1)
    text = format_spread(replay_spread(sim_dir, dirs))
    assert "mean load time (per cold start)" in text and "2 of 3" in text and "23.8%" in text
    with pytest.raises(TangramError, match="expected two or more"):
        replay_spread(sim_dir, dirs[:1])
    # the same from the command line: `compare SIM REPLAY --also REPLAY ...` writes spread.csv beside
    # fidelity.csv and prints the table
    out = tmp_path / "cmp"
    assert main(["compare", str(sim_dir), str(dirs[0]), "--also", str(dirs[1]), "--also", str(dirs[2]),
                 "--out", str(out), "--no-plot"]) == 0
    written = pd.read_csv(out / "spread.csv")
    assert len(written) == 4 and set(written["replays"]) == {3}
    assert main(["compare", str(sim_dir), str(dirs[0]), "--also", str(tmp_path / "nowhere"), "--out",
                 str(tmp_path / "cmp2"), "--no-plot"]) == 2  # a user error: one line naming the folder

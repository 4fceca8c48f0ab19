"""What results/README.md claims of tangram-plus holds in the committed plus-* summaries.

The summaries change only when someone re-runs the experiments (`experiments/run_all.sh`); a policy
change that loses a claimed win then fails here instead of leaving the README wrong."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

RESULTS = Path(__file__).resolve().parent.parent / "results"
SUBJECT = "tangram-plus"

# experiment -> its sweep column and the points where results/README.md claims the lowest p50 TTFT
# and a p99 TTFT at most 2% above tangram's (ServeGen at 0.4 req/s: the median request is warm in
# every retaining system, and the README reports the tie and the p99 as they are)
POINTS = {
    "plus-azure-conv": ("trace.rate_scale", [0.05, 1.0]),
    "plus-azure-code": ("trace.rate_scale", [0.05, 1.0]),
    "plus-servegen": ("trace.target_rps", [1.0]),
    "plus-synthetic-skew": (None, [None]),
}


# the one point where results/README.md reports that tangram-plus does not load least per cold start: on
# ServeGen at 1 req/s LFU Tangram loads 4.3% less (execute-while-load leaves fewer, longer runs there),
# while tangram-plus's load per request is still the lowest
NOT_LOWEST_PER_COLD_START = {("plus-servegen", 1.0)}


def _points(name: str) -> list[tuple[object, pd.DataFrame]]:
    path = RESULTS / name / "summary.csv"
    if not path.exists():
        pytest.skip(f"{name}: no committed summary")
    summary = pd.read_csv(path)
    column, _ = POINTS[name]
    if column is None:
        return [(None, summary)]
    return [(value, g) for value, g in summary.groupby(column)]


@pytest.mark.parametrize("name", sorted(POINTS))
def test_tangram_plus_has_the_lowest_load_per_cold_start_and_per_request(name: str) -> None:
    for point, g in _points(name):
        plus = g[g.system == SUBJECT].iloc[0]
        base = g[(g.system != SUBJECT) & ~g.system.str.startswith("+")]
        assert {"serverlessllm", "tangram", "ttft-aware", "next-use"} <= set(base.system)
        assert plus.mean_load_per_request_s < base.mean_load_per_request_s.min(), (name, point)
        if (name, point) in NOT_LOWEST_PER_COLD_START:  # loses, as reported, by less than 5%
            assert base.mean_load_s.min() < plus.mean_load_s < 1.05 * base.mean_load_s.min(), (name, point)
        else:
            assert plus.mean_load_s < base.mean_load_s.min(), (name, point)


@pytest.mark.parametrize("name", sorted(POINTS))
def test_tangram_plus_p50_and_p99_where_claimed(name: str) -> None:
    column, claimed = POINTS[name]
    for point, g in _points(name):
        if point not in claimed:
            continue
        plus = g[g.system == SUBJECT].iloc[0]
        base = g[(g.system != SUBJECT) & ~g.system.str.startswith("+")]
        tangram = base[base.system == "tangram"].iloc[0]
        assert plus.p50_ttft_s < base.p50_ttft_s.min(), (name, point)
        assert plus.p99_ttft_s <= 1.02 * tangram.p99_ttft_s, (name, point)


def test_where_the_working_set_nearly_fits_loads_are_2_5x_faster_than_serverlessllm() -> None:
    for point, g in _points("plus-azure-code"):
        plus = g[g.system == SUBJECT].iloc[0]
        sllm = g[g.system == "serverlessllm"].iloc[0]
        assert sllm.mean_load_s / plus.mean_load_s >= 2.5, point


def _plus_seeds():
    import importlib.util

    spec = importlib.util.spec_from_file_location("plus_seeds", RESULTS.parent / "experiments" / "plus_seeds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plus_seeds_checks_hand_made_points() -> None:
    def row(system: str, load: float, p50: float, p99: float, per_request: float = 1.0) -> dict:
        return {"experiment": "e", "point": 0, "seed": 1, "system": system, "mean_load_s": load,
                "p50_ttft_s": p50, "p99_ttft_s": p99, "mean_load_per_request_s": per_request}

    rows = [row("serverlessllm", 1.0, 5.0, 10.0), row("tangram", 0.5, 2.0, 10.0), row("lfu", 0.4, 1.0, 9.0),
            row("+stage", 0.1, 0.1, 0.1), row(SUBJECT, 0.3, 1.0, 10.2, 0.5)]
    rows += [{**r, "seed": 2} for r in rows[:-1]] + [row(SUBJECT, 0.45, 0.9, 10.3) | {"seed": 2}]
    checks = _plus_seeds().checks(pd.DataFrame(rows)).set_index("seed")
    # seed 1: below lfu's load, p50 tied with lfu's, p99 2% above tangram's (the limit); the "+stage"
    # breakdown row is not a baseline
    assert checks.loc[1, "load_win"] and not checks.loc[1, "p50_win"] and checks.loc[1, "p50_tie"]
    assert checks.loc[1, "p99_ok"] and checks.loc[1, "load_per_request_win"]
    assert checks.loc[1, "best_load_baseline"] == "lfu"
    assert checks.loc[1, "speedup_vs_serverlessllm"] == pytest.approx(1.0 / 0.3)
    # seed 2: lfu loads less, p50 below, p99 3% above tangram's, load per request tied
    assert not checks.loc[2, "load_win"] and checks.loc[2, "p50_win"] and not checks.loc[2, "p99_ok"]
    assert not checks.loc[2, "load_per_request_win"]


def test_committed_plus_seeds_checks_follow_from_its_summary() -> None:
    folder = RESULTS / "plus-seeds"
    if not (folder / "summary.csv").exists():
        pytest.skip("no committed plus-seeds run")
    summary = pd.read_csv(folder / "summary.csv")
    expected = _plus_seeds().checks(summary).reset_index(drop=True)
    committed = pd.read_csv(folder / "checks.csv")
    pd.testing.assert_frame_equal(committed, expected, check_dtype=False)
    # seed 7 is the committed experiments' seed: its rows are theirs
    for name in POINTS:
        mine = summary[(summary.experiment == name) & (summary.seed == 7)].drop(columns=["experiment", "seed"])
        theirs = pd.read_csv(RESULTS / name / "summary.csv")
        theirs = theirs[~theirs.system.str.startswith("+")]
        pd.testing.assert_frame_equal(mine.reset_index(drop=True)[theirs.columns], theirs.reset_index(drop=True),
                                      check_dtype=False)


def test_the_medusa_figures_in_the_readme_follow_from_the_committed_run() -> None:
    """results/README.md's Medusa table: loading, cold start and p99 TTFT against serverless-vllm."""
    import importlib.util

    run = RESULTS / "medusa-sharegpt"
    if not (run / "summary.csv").exists():
        pytest.skip("medusa-sharegpt: no committed summary")
    spec = importlib.util.spec_from_file_location("medusa_summary", RESULTS.parent / "experiments/medusa_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    table = module.table(run).set_index(["rate", "system"])
    claimed = {2: (-0.431, -0.361, -0.384), 10: (-0.442, -0.368, -0.353)}  # loading, cold start, p99 TTFT
    for rate, (loading, cold_start, p99) in claimed.items():
        row = table.loc[(rate, "medusa")]
        assert (round(row["loading_change"], 3), round(row["cold_start_change"], 3),
                round(row["p99_ttft_change"], 3)) == (loading, cold_start, p99)
    # every model's tail improves at both rates, not only the mean
    summary = pd.read_csv(run / "summary.csv").set_index(["point", "system"])["p99_ttft_s"].unstack()
    assert (summary["medusa"] < summary["serverless-vllm"]).all()


def test_the_hydraserve_figures_in_the_readme_follow_from_the_committed_run() -> None:
    """results/README.md's HydraServe table: cold-start speedup and TTFT SLO gain ranges per baseline."""
    import importlib.util

    run = RESULTS / "hydraserve-azure-functions"
    if not (run / "summary.csv").exists():
        pytest.skip("hydraserve-azure-functions: no committed summary")
    spec = importlib.util.spec_from_file_location("hydraserve_summary",
                                                  RESULTS.parent / "experiments/hydraserve_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    table = module.table(run)
    claimed = {"serverlessllm": ((1.12, 1.25), (1.01, 1.02)), "serverless-vllm": ((1.79, 2.15), (1.06, 1.15))}
    for baseline, ((lo, hi), (slo_lo, slo_hi)) in claimed.items():
        rows = table[table.baseline == baseline]
        assert (round(rows.cold_start_speedup.min(), 2), round(rows.cold_start_speedup.max(), 2)) == (lo, hi)
        assert (round(rows.ttft_slo_gain.min(), 2), round(rows.ttft_slo_gain.max(), 2)) == (slo_lo, slo_hi)
    assert (table.cold_start_speedup > 1).all() and (table.ttft_slo_gain > 1).all()


def test_the_blitzscale_live_figures_in_the_readme_follow_from_the_committed_run() -> None:
    """results/README.md's live-scaling section: the eager handoff against execute-while-load alone (p99
    lower at code 1x, 41-131% higher at code 4x), the costed rule apart from execute-while-load at 2 of 12
    points (both at most 2% worse), and the best tail against serverlessllm (-46%)."""
    run = RESULTS / "blitzscale-azure-live"
    if not (run / "summary.csv").exists():
        pytest.skip("blitzscale-azure-live: no committed summary")
    s = pd.read_csv(run / "summary.csv")
    s["trace"] = s["trace.path"].str.extract(r"_(code|conv)\.csv")[0]
    p99 = s.pivot_table(index=["trace", "trace.rate_scale", "models"], columns="system", values="p99_ttft_s")
    assert len(p99) == 12
    costed = p99["blitzscale-costed"] / p99["blitzscale-ewl"] - 1
    assert (costed != 0).sum() == 2 and costed.min() == 0 and round(100 * costed.max(), 1) == 2.0
    means = s.groupby("system")[["p99_ttft_s", "mean_ttft_s"]].mean()
    assert (means.loc["blitzscale-costed"] / means.loc["blitzscale-ewl"] - 1).abs().max() < 0.01
    change = p99["blitzscale-live"] / p99["blitzscale-ewl"] - 1
    assert (change.loc["code", 1.0] < 0).all()
    code4 = change.loc["code", 4.0]
    assert (round(100 * code4.min()), round(100 * code4.max())) == (41, 131)
    vs_sllm = p99["blitzscale-live"] / p99["serverlessllm"] - 1
    assert (round(100 * vs_sllm.min()), round(100 * vs_sllm.max())) == (-46, 78)

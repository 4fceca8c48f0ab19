"""ServeGen client-pool workloads: hand-computed windows on a tiny data folder, the shipped extract,
determinism and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tangram_sim.cli import main
from tangram_sim.errors import TraceError
from tangram_sim.traces import load_trace
from tangram_sim.traces.servegen_data import load_pool, parse_pdf, write_extract
from tangram_sim.traces.servegen_pool import generate, power_law_shares, split_clients

ROOT = Path(__file__).resolve().parents[1]
EXTRACT = ROOT / "traces" / "servegen"
PAPER_POOLS = {
    "m-small": ["qwen2.5-3b", "phi-3-mini-4k"],
    "m-mid": ["llama-3-8b", "yi-9b"],
    "m-large": ["qwen2.5-14b", "gpt-neox-20b"],
    "mm-image": ["llava-1.5-7b"],
    "deepseek-r1": ["deepseek-r1-distill-qwen-14b"],
}
PAPER_MODELS = [m for ms in PAPER_POOLS.values() for m in ms]

# Rates are binary fractions so that rate x 600 is exact: 1/64 -> 9.375 -> ceil 10 -> 9 arrivals.
R1, R3, R2 = 1 / 64, 3 / 64, 1 / 32


def _row(ts: int, rate: float) -> str:
    return f"{ts},{rate},1.0,Gamma,0.5,2.0" if rate else f"{ts},0,0,,0,0"


def _write_pool(root: Path) -> Path:
    """Four windows (0, 600, 1200, 1800 s) of three clients; client 2 has no dataset file."""
    pool = root / "language" / "m-test"
    pool.mkdir(parents=True)
    rates = {0: [R1, R2, R2, 0], 1: [R3, 0, 0, R3], 2: [0, 0, 0, R3]}
    for c, rs in rates.items():
        (pool / f"chunk-{c}-trace.csv").write_text("\n".join(_row(600 * i, r) for i, r in enumerate(rs)) + "\n")
    (pool / "chunk-0-dataset.json").write_text(json.dumps({
        "0": {"input_tokens": "{100: 0.5, 200: 0.5}", "output_tokens": "{10: 0.5, 20: 0.5}"},
        "600": {"input_tokens": "{150: 1.0}", "output_tokens": "{15: 1.0}"},
        "1200": {"input_tokens": "{}", "output_tokens": "{15: 1.0}"},  # empty field: entry skipped
    }))
    (pool / "chunk-1-dataset.json").write_text(json.dumps(
        {"0": {"input_tokens": "{300: 1.0}", "output_tokens": "{30: 1.0}"}}
    ))
    mm = root / "multimodal" / "mm-test"
    mm.mkdir(parents=True)
    (mm / "chunk-0-trace.csv").write_text(_row(0, R3) + "\n" + _row(600, 0) + "\n")
    one = "{0: 1.0}"
    (mm / "chunk-0-dataset.json").write_text(json.dumps({"0": {
        "text_tokens": "{10: 1.0}", "image_tokens": "{100: 1.0}", "audio_tokens": one, "video_tokens": one,
        "image_count": "{2: 1.0}", "audio_count": one, "video_count": one, "output_tokens": "{5: 1.0}",
    }}))
    return root


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    return _write_pool(tmp_path / "servegen")


def _in(df: pd.DataFrame, lo: float, hi: float) -> pd.DataFrame:
    return df[(df["arrival_s"] >= lo) & (df["arrival_s"] < hi)]


def test_windows_rates_rescaling_and_lengths_by_hand(data: Path) -> None:
    df = generate(data, {"m-test": ["a"]}, (0, 2400), seed=3)
    # native rates: ceil(rate x 600) - 1 arrivals per client and window (the last lands on the end)
    w = [_in(df, 600 * i, 600 * (i + 1)) for i in range(4)]
    assert [len(x) for x in w] == [9 + 28, 18, 18, 28 + 28]
    assert df["arrival_s"].is_monotonic_increasing
    # window 0: client 0 samples {100, 200} x {10, 20} with one uniform (pairs move together), client 1
    # is always (300, 30)
    pairs = set(map(tuple, w[0][["input_tokens", "output_tokens"]].to_numpy().tolist()))
    assert pairs <= {(100, 10), (200, 20), (300, 30)}
    assert (w[0]["input_tokens"] == 300).sum() == 28
    # window 1: client 0's entry at 600 s; window 2: the 1,200 s entry has an empty field, so 600 s again
    assert set(w[1]["input_tokens"]) == {150} and set(w[2]["input_tokens"]) == {150}
    # window 3: client 2 has no dataset file; the only active client with data is client 1
    assert set(w[3]["input_tokens"]) == {300} and set(w[3]["output_tokens"]) == {30}
    assert any("1 of 3 clients have no dataset file" in n for n in df.attrs["notes"])
    assert any("28 of the 129 generated requests drew token lengths from a pool mixture" in n for n in df.attrs["notes"])


def test_target_rate_splits_among_active_clients_by_rate(data: Path) -> None:
    # span [0, 1200): mean native rate (R1 + R3 + R2) x 600 / 1200 = 3/64; target 6/64 doubles it
    df = generate(data, {"m-test": ["a"]}, (0, 1200), seed=0, target_rps=6 / 64)
    # client targets 2/64 and 6/64 -> 18.75 -> 18 and 56.25 -> 56; window 1: 4/64 -> 37.5 -> 37
    assert [len(_in(df, 0, 600)), len(_in(df, 600, 1200))] == [18 + 56, 37]


def test_span_cuts_windows_and_times_start_at_the_span(data: Path) -> None:
    df = generate(data, {"m-test": ["a"]}, (300, 900), seed=0)
    # window 0 keeps 300 s: client rates x 300 s -> ceil(4.6875) - 1 = 4 and ceil(14.06) - 1 = 14;
    # window 1 keeps 300 s of client 0 at R2: ceil(9.375) - 1 = 9
    assert [len(_in(df, 0, 300)), len(_in(df, 300, 600))] == [4 + 14, 9]


def test_multimodal_input_adds_one_sample_per_counted_item(data: Path) -> None:
    df = generate(data, {"mm-test": ["v"]}, (0, 600), seed=0)
    assert len(df) == 28 and set(df["input_tokens"]) == {10 + 2 * 100} and set(df["output_tokens"]) == {5}


def test_two_models_split_whole_clients_and_rates_by_rank(data: Path) -> None:
    assert np.allclose(power_law_shares(3, 0), [1 / 3] * 3)
    assert np.allclose(power_law_shares(2, 1), [2 / 3, 1 / 3])
    features = np.array([[10.0, 0, 0, 0, 0, 0], [1.0, 0, 0, 0, 0, 0], [5.0, 0, 0, 0, 0, 0]])
    # heaviest first (targets 10.67 and 5.33): client 0 -> model 0; client 2 (5) -> model 1; client 1 (1)
    # -> model 0 (11 vs 10.67 and 5 vs 5.33 is closer than 10 and 6)
    assert split_clients(features, np.array([0, 1, 2]), power_law_shares(2, 1)).tolist() == [0, 0, 1]
    df = generate(EXTRACT, {"m-mid": ["x", "y"]}, (0, 600), seed=0, alpha=1.0)
    counts = df["model"].value_counts()
    assert counts["x"] / counts["y"] == pytest.approx(2.0, rel=0.03)


def test_same_seed_same_requests_and_pool_order_does_not_matter() -> None:
    a = generate(EXTRACT, PAPER_POOLS, (0, 3600), seed=5, target_rps=0.4)
    b = generate(EXTRACT, dict(reversed(list(PAPER_POOLS.items()))), (0, 3600), seed=5, target_rps=0.4)
    pd.testing.assert_frame_equal(a, b)
    c = generate(EXTRACT, PAPER_POOLS, (0, 3600), seed=6, target_rps=0.4)
    assert not a["arrival_s"].head(50).equals(c["arrival_s"].head(50))


def test_extract_reads_like_the_data_folder(data: Path, tmp_path: Path) -> None:
    write_extract(data, tmp_path / "x", ["m-test", "mm-test"], (0, 2400))
    for pool in ("m-test", "mm-test"):
        span = (0, 2400) if pool == "m-test" else (0, 1200)
        a = generate(data, {pool: ["a", "b"]}, span, seed=1, alpha=2.0)
        b = generate(tmp_path / "x", {pool: ["a", "b"]}, span, seed=1, alpha=2.0)
        pd.testing.assert_frame_equal(a, b)
    assert load_pool(tmp_path / "x", "m-test", (0, 2400)).has_file.tolist() == [True, True, False]


def test_paper_workload_shape_from_the_shipped_extract() -> None:
    df = load_trace({"kind": "servegen-pool", "data": str(EXTRACT), "pools": PAPER_POOLS, "target_rps": 0.4,
                     "max_requests": 1000}, PAPER_MODELS, seed=0)
    assert len(df) == 1000
    share = df["model"].value_counts(normalize=True)
    assert share["llama-3-8b"] + share["yi-9b"] == pytest.approx(0.54, abs=0.06)  # m-mid's native share
    assert share.get("llava-1.5-7b", 0) < 0.01
    assert (df["input_tokens"] >= 1).all() and (df["output_tokens"] >= 1).all()


def _spec(**kw: object) -> dict:
    return {"kind": "servegen-pool", "data": str(EXTRACT), "pools": {"m-mid": ["a", "b"]}, **kw}


@pytest.mark.parametrize(
    "spec, models, message",
    [
        (_spec(data="/no/such/folder"), ["a", "b"], "trace.data: not found: '/no/such/folder'"),
        (_spec(pools={"m-huge": ["a", "b"]}), ["a", "b"], "trace.pools.m-huge: unknown pool;"),
        (_spec(span=[0, 200000]), ["a", "b"], "trace.span: ends at 200000 s, after the end of pool m-mid's data"),
        (_spec(span=[90000, 95000]), ["a", "b"], "trace.span: [90000, 95000] is outside the data of pool m-mid"),
        (_spec(span=[600, 0]), ["a", "b"], "trace.span: expected [start, end] seconds with 0 <= start < end"),
        (_spec(pools={"m-mid": []}), ["a", "b"], "trace.pools.m-mid: expected a non-empty list of model names"),
        (_spec(pools={}), ["a", "b"], "trace.pools: expected a mapping pool -> model names"),
        (_spec(pools={"m-mid": ["a", "z"]}), ["a", "b"], "trace.pools.m-mid: 'z' is not one of the models"),
        (_spec(pools={"m-mid": ["a"], "m-small": ["a"]}), ["a"], "trace.pools.m-small: 'a' is already in pool m-mid"),
        (_spec(), ["a", "b", "c"], "trace.pools: model 'c' is in no pool"),
        (_spec(target_rps=0), ["a", "b"], "trace.target_rps: expected a number > 0"),
        (_spec(alpha=-1), ["a", "b"], "trace.alpha: expected a number >= 0"),
        (_spec(path="x.csv"), ["a", "b"], "trace.path: not used by kind 'servegen-pool'"),
    ],
)
def test_bad_specs_fail_with_one_line(spec: dict, models: list[str], message: str) -> None:
    with pytest.raises(TraceError) as err:
        load_trace(spec, models, seed=0)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_files_name_the_file(data: Path) -> None:
    csv = data / "language" / "m-test" / "chunk-0-trace.csv"
    csv.write_text("0,0.1,1.0,Gamma,0.5,2.0\n600,abc,1.0,Gamma,0.5,2.0\n")
    with pytest.raises(TraceError, match=r"chunk-0-trace.csv:2: expected"):
        generate(data, {"m-test": ["a"]}, (0, 600), seed=0)
    with pytest.raises(TraceError, match="field input_tokens: expected numbers"):
        parse_pdf("{1: x}", "f.json: entry 0, field input_tokens")


def test_trace_synth_from_an_experiment_writes_its_requests(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    exp = tmp_path / "exp.yaml"
    exp.write_text(
        "name: sg\nseed: 0\ncluster: {nodes: 1, gpus_per_node: 2, gpu: a100-80gb, gpu_memory_gib: 40}\n"
        "models: [" + ", ".join(f"{{name: {m}}}" for m in PAPER_MODELS) + "]\n"
        f"trace: {{kind: servegen-pool, data: {EXTRACT}, target_rps: 0.4, max_requests: 300, pools: "
        + json.dumps(PAPER_POOLS) + "}\nsystems: [{name: tangram, preset: tangram}]\n"
    )
    out = tmp_path / "t.parquet"
    assert main(["trace", "synth", "--from", str(exp), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "no dataset file" in printed.out and "wrote 300 requests" in printed.out
    expected = load_trace(
        {"kind": "servegen-pool", "data": str(EXTRACT), "pools": PAPER_POOLS, "target_rps": 0.4,
         "max_requests": 300}, PAPER_MODELS, seed=0)
    got = pd.read_parquet(out)
    assert np.allclose(got["arrival_s"], expected["arrival_s"]) and got["model"].tolist() == expected["model"].tolist()
    assert main(["trace", "synth", "--from", str(exp), "--out", str(tmp_path / "u.csv"),
                 "--set", "trace.pools.m-mid=[]"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: trace.pools.m-mid")


def test_run_prints_and_records_the_trace_notes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    exp = tmp_path / "exp.yaml"
    exp.write_text(
        "name: sg\nseed: 0\ncluster: {nodes: 1, gpus_per_node: 1, gpu: a100-80gb, gpu_memory_gib: 40}\n"
        "models: [{name: qwen2.5-3b}, {name: phi-3-mini-4k}]\noutputs: {plots: false}\n"
        f"trace: {{kind: servegen-pool, data: {EXTRACT}, target_rps: 0.2, max_requests: 60, "
        "pools: {m-small: [qwen2.5-3b, phi-3-mini-4k]}}\nsystems: [{name: tangram, preset: tangram}]\n"
    )
    assert main(["run", str(exp), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "note: trace: m-small: 5 of 43 clients have no dataset file" in err
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert any("no dataset file" in n for n in record["meta"]["trace_notes"])

"""Traces: every reader, malformed input, mappings, synthesis, windows, load_trace and the trace CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tangram_sim.cli import trace_cmd
from tangram_sim.errors import TraceError
from tangram_sim.traces import (
    apply_mapping,
    detect_format,
    load_trace,
    read_azure_functions,
    read_azure_functions_2021,
    read_azure_llm,
    read_burstgpt,
    read_servegen,
    read_table,
    read_trace,
    synthesize,
    validate_trace,
    window,
)

ROOT = Path(__file__).resolve().parents[1]
TRACES = ROOT / "traces"
CONV = TRACES / "azure_llm_2023" / "AzureLLMInferenceTrace_conv.csv"
CODE = TRACES / "azure_llm_2023" / "AzureLLMInferenceTrace_code.csv"
SAMPLES = TRACES / "samples"
AZ_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens"


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def assert_canonical(df: pd.DataFrame) -> None:
    assert list(df.columns) == ["arrival_s", "model", "input_tokens", "output_tokens"]
    assert df["arrival_s"].dtype == np.float64
    assert df["input_tokens"].dtype == np.int64 and df["output_tokens"].dtype == np.int64
    assert df["arrival_s"].iloc[0] == 0.0
    assert bool(np.all(np.diff(df["arrival_s"].to_numpy()) >= 0))
    assert int(df["input_tokens"].min()) >= 1 and int(df["output_tokens"].min()) >= 1
    assert df.index.equals(pd.RangeIndex(len(df)))


# ---------------------------------------------------------------------------------------------- readers


def test_shipped_azure_llm_traces_load_with_all_rows() -> None:
    conv = read_azure_llm(CONV)
    code = read_azure_llm(CODE)
    assert len(conv) == 19_366 and len(code) == 8_819
    for df in (conv, code):
        assert_canonical(df)
        assert df["model"].isna().all()
        assert df.attrs["skipped_rows"] == 0
    # 2023-11-16 18:17:03.9799600 -> 18:17:04.0319600: the 7-digit fractions are kept exactly.
    assert code["arrival_s"].iloc[1] == pytest.approx(0.052, abs=1e-7)
    assert code["input_tokens"].iloc[:2].tolist() == [4808, 3180]
    assert code["output_tokens"].iloc[:2].tolist() == [10, 8]
    assert conv["arrival_s"].iloc[-1] == pytest.approx(3501.72, abs=0.01)


def test_azure_llm_2024_mixed_timestamps(tmp_path: Path) -> None:
    sample = read_azure_llm(SAMPLES / "azure_llm_2024_sample.csv")
    assert_canonical(sample)
    assert sample["arrival_s"].tolist()[:4] == pytest.approx([0.0, 0.00993, 0.254153, 1.0])
    # Naive times are UTC and offsets are honoured, so the +02:00 row is 1 s after the first one.
    p = write(
        tmp_path,
        "mixed.csv",
        f"{AZ_HEADER}\n2024-05-10 00:00:00,5,6\n"
        "2024-05-10 02:00:01+02:00,7,8\n2024-05-10 00:00:00.5+00:00,9,10\n",
    )
    df = read_azure_llm(p)
    assert df["arrival_s"].tolist() == pytest.approx([0.0, 0.5, 1.0])
    assert df["input_tokens"].tolist() == [5, 9, 7]


@pytest.mark.parametrize(
    ("body", "line", "column", "shown"),
    [
        ("2023-11-16 18:17:03.9799600,10,5\n2023-11-16 18:17:04.0,1x,5\n", 3, "ContextTokens", "1x"),
        ("2023-11-16 18:17:03.9799600,10,5\n2023-11-16 18:17:04.0,10,-5\n", 3, "GeneratedTokens", "-5"),
        ("2023-11-16 18:17:03.9799600,10,5\n2023-11-16 18:17:04.0,10,0\n", 3, "GeneratedTokens", "0"),
        ("2023-11-16 18:17:03.9799600,2.5,5\n", 2, "ContextTokens", "2.5"),
        (
            "2023-11-16 18:17:03.9799600,10,5\n2023-13-16 18:17:04.0,10,5\n",
            3,
            "TIMESTAMP",
            "2023-13-16 18:17:04.0",
        ),
        ("yesterday,10,5\n", 2, "TIMESTAMP", "yesterday"),
        ("2023-11-16 18:17:03.9799600,10,5\n\n2023-11-16 18:17:04.0,10\n", 4, "GeneratedTokens", ""),
    ],
)
def test_malformed_azure_row_names_file_line_and_column(
    tmp_path: Path, body: str, line: int, column: str, shown: str
) -> None:
    p = write(tmp_path, "t.csv", f"{AZ_HEADER}\n{body}")
    with pytest.raises(TraceError) as info:
        read_azure_llm(p)
    message = str(info.value)
    assert message.startswith(f"{p}:{line}: column '{column}': expected ")
    assert message.endswith(f"got '{shown}'")
    assert "\n" not in message


def test_missing_column_empty_file_and_structural_errors(tmp_path: Path) -> None:
    missing = write(tmp_path, "m.csv", "TIMESTAMP,ContextTokens\n2023-11-16 18:17:03,10\n")
    with pytest.raises(TraceError, match=rf"^{missing}:1: missing column 'GeneratedTokens'"):
        read_azure_llm(missing)
    empty = write(tmp_path, "e.csv", "")
    with pytest.raises(TraceError, match=rf"^{empty}:1: empty file"):
        read_azure_llm(empty)
    header_only = write(tmp_path, "h.csv", f"{AZ_HEADER}\n")
    with pytest.raises(TraceError, match=rf"^{header_only}:2: no requests"):
        read_azure_llm(header_only)
    extra = write(tmp_path, "x.csv", f"{AZ_HEADER}\n2023-11-16 18:17:03,1,2\n2023-11-16 18:17:04,1,2,3\n")
    with pytest.raises(TraceError, match=rf"^{extra}:3: expected 3 comma-separated fields"):
        read_azure_llm(extra)
    binary = tmp_path / "b.csv"
    binary.write_bytes(
        f"{AZ_HEADER}\n2023-11-16 18:17:03,1,2\n2023-11-16 18:17:04,1\xff,2\n".encode("latin-1")
    )
    with pytest.raises(TraceError, match=rf"^{binary}:3: not UTF-8"):
        read_azure_llm(binary)
    with pytest.raises(TraceError, match="file not found"):
        read_azure_llm(tmp_path / "nope.csv")


def test_first_error_in_file_order_wins(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        "t.csv",
        f"{AZ_HEADER}\n2023-11-16 18:17:03,1,2\n2023-11-16 18:17:04,1,2,3\n2023-11-16 18:17:05,x,2\n",
    )
    with pytest.raises(TraceError, match=r":3: expected 3"):
        read_azure_llm(p)
    p = write(tmp_path, "u.csv", f"{AZ_HEADER}\n2023-11-16 18:17:03,x,2\n2023-11-16 18:17:04,1,2,3\n")
    with pytest.raises(TraceError, match=r":2: column 'ContextTokens'"):
        read_azure_llm(p)


def test_skip_bad_rows_counts_every_kind_of_bad_row(tmp_path: Path) -> None:
    rows = [
        "2023-11-16 18:17:03.0,10,5",
        "2023-11-16 18:17:04.0,x,5",  # bad number
        "2023-11-16 18:17:05.0,10,-1",  # negative
        "not a time,10,5",  # bad timestamp
        "2023-11-16 18:17:06.0,10,5,9",  # extra field
        "",  # blank: ignored, not counted
        "2023-11-16 18:17:07.0,20,6",
    ]
    p = write(tmp_path, "t.csv", AZ_HEADER + "\n" + "\n".join(rows) + "\n")
    df = read_azure_llm(p, skip_bad_rows=True)
    assert df.attrs["skipped_rows"] == 4
    assert df["input_tokens"].tolist() == [10, 20]
    assert df["arrival_s"].tolist() == [0.0, 4.0]
    all_bad = write(tmp_path, "bad.csv", f"{AZ_HEADER}\nx,1,1\n")
    with pytest.raises(TraceError, match="1 bad rows skipped"):
        read_azure_llm(all_bad, skip_bad_rows=True)


def test_servegen_reader_and_model_ids(tmp_path: Path) -> None:
    df = read_servegen(SAMPLES / "servegen_sample.txt", model_ids=["m0", "m1", "m2", "m3"])
    assert_canonical(df)
    assert len(df) == 24 and df["model"].iloc[0] == "m3"
    assert df["input_tokens"].iloc[0] == 5796
    assert set(df["model"]) <= {"m0", "m1", "m2", "m3"}
    raw = read_servegen(SAMPLES / "servegen_sample.txt")
    assert raw["model"].iloc[0] == "3"
    p = write(tmp_path, "s.txt", "0.036303 3 12796 1962\n\n  0.5\t1  7 8\n0.4 0 1 2\n")
    df = read_servegen(p, model_ids={3: "big", 1: "small", 0: "tiny"})
    assert df["model"].tolist() == ["big", "tiny", "small"]  # sorted by time
    assert df["arrival_s"].tolist() == pytest.approx([0.0, 0.363697, 0.463697])
    with pytest.raises(TraceError, match=rf"^{p}:1: column 'model_id': expected a model id in 0..1, got '3'"):
        read_servegen(p, model_ids=["a", "b"])
    assert read_servegen(p, model_ids=["a", "b"], skip_bad_rows=True).attrs["skipped_rows"] == 1
    bad = write(tmp_path, "b.txt", "0.1 0 10 5\n0.2 0 10 abc\n")
    with pytest.raises(TraceError, match=rf"^{bad}:2: column 'output_tokens'.*got 'abc'"):
        read_servegen(bad)


def test_azure_functions_2019_expands_minutes_deterministically(tmp_path: Path) -> None:
    path = SAMPLES / "azure_functions_2019_sample.csv"
    raw = pd.read_csv(path)
    counts = raw[[str(m) for m in range(1, 1441)]].to_numpy()
    a = read_azure_functions(path, rng=np.random.default_rng(1))
    b = read_azure_functions(path, rng=np.random.default_rng(1))
    c = read_azure_functions(path, rng=np.random.default_rng(2))
    assert_canonical(a)
    pd.testing.assert_frame_equal(a, b)
    assert not a["arrival_s"].equals(c["arrival_s"])
    assert len(a) == counts.sum()
    per_function = a["model"].value_counts()
    expected = dict(zip(raw["HashFunction"], counts.sum(axis=1)))
    assert per_function.to_dict() == expected
    # Arrivals stay inside their minute: the per-minute histogram equals the file's counts.
    u = read_azure_functions(path, rng=np.random.default_rng(1), spread="uniform")
    for df in (a, u):
        minute = ((df["arrival_s"] + df.attrs["start_offset_s"]) // 60).astype(int)
        assert np.bincount(minute, minlength=1440).tolist() == counts.sum(axis=0).tolist()
        assert 0 <= df.attrs["start_offset_s"] < 60  # the first function fires in minute 1
    top = read_azure_functions(path, top_functions=2)
    busiest = raw["HashFunction"].to_numpy()[np.argsort(-counts.sum(axis=1))[:2]]
    assert set(top["model"]) == set(busiest) and top.attrs["functions"] == 2
    window_only = read_azure_functions(path, minutes=(31, 40))
    assert len(window_only) == counts[:, 30:40].sum()
    fn = raw["HashFunction"].iloc[3]
    named = read_azure_functions(path, function_models={fn: "llama"})
    assert set(named["model"]) == {"llama"} and len(named) == counts[3].sum()
    with pytest.raises(TraceError, match="function_models: function 'nope'"):
        read_azure_functions(path, function_models={"nope": "llama"})


def test_azure_functions_uniform_spread_is_even_within_minute(tmp_path: Path) -> None:
    header = "HashOwner,HashApp,HashFunction,Trigger," + ",".join(str(m) for m in range(1, 1441))
    zeros = ["0"] * 1440
    one = zeros.copy()
    one[0], one[2] = "4", "3"
    p = write(tmp_path, "f.csv", f"{header}\no,a,fa,http,{','.join(one)}\n")
    df = read_azure_functions(p, spread="uniform", rng=np.random.default_rng(0))
    t = df["arrival_s"].to_numpy()
    assert len(t) == 7
    assert np.allclose(np.diff(t[:4]), 15.0)  # 4 requests evenly spaced in minute 1
    assert np.allclose(np.diff(t[4:]), 20.0)  # 3 in minute 3
    absolute = t + df.attrs["start_offset_s"]
    assert absolute[0] < 15.0 and 120.0 <= absolute[4] < 140.0  # minute 3 starts 120 s after minute 1
    table = pd.DataFrame({"input_tokens": [100, 200], "output_tokens": [1, 2]})
    tok = read_azure_functions(p, rng=np.random.default_rng(0), token_table=table)
    pairs = set(zip(tok["input_tokens"], tok["output_tokens"]))
    assert pairs <= {(100, 1), (200, 2)}
    fixed = read_azure_functions(p, input_tokens=7, output_tokens=9)
    assert set(fixed["input_tokens"]) == {7} and set(fixed["output_tokens"]) == {9}
    bad = one.copy()
    bad[16] = "-2"
    q = write(tmp_path, "g.csv", f"{header}\no,a,fa,http,{','.join(one)}\no,a,fb,http,{','.join(bad)}\n")
    with pytest.raises(TraceError, match=rf"^{q}:3: column '17': expected integer >= 0, got '-2'"):
        read_azure_functions(q)
    assert read_azure_functions(q, skip_bad_rows=True).attrs["skipped_rows"] == 1


def test_function_2021_burstgpt_and_table_readers(tmp_path: Path) -> None:
    f21 = read_azure_functions_2021(SAMPLES / "azure_functions_2021_sample.csv")
    raw = pd.read_csv(SAMPLES / "azure_functions_2021_sample.csv")
    start = (raw["end_timestamp"] - raw["duration"]).sort_values().to_numpy()
    assert f21["arrival_s"].to_numpy() == pytest.approx(start - start[0])
    assert f21["model"].value_counts().to_dict() == raw["func"].value_counts().to_dict()
    burst = read_burstgpt(SAMPLES / "burstgpt_sample.csv")
    assert_canonical(burst)
    assert set(burst["model"]) <= {"ChatGPT", "GPT-4"} and len(burst) == 12
    canon = read_table(SAMPLES / "canonical_sample.csv")
    assert_canonical(canon)
    assert len(canon) == 20 and canon["model"].iloc[0] == "llama-3-8b"
    pq = tmp_path / "t.parquet"
    canon.assign(extra=1).to_parquet(pq)
    pd.testing.assert_frame_equal(read_table(pq), canon, check_dtype=False)
    no_model = write(tmp_path, "n.csv", "arrival_s,input_tokens,output_tokens,note\n0.5,3,4,x\n0.25,5,6,y\n")
    df = read_table(no_model)
    assert df["model"].isna().all() and df["input_tokens"].tolist() == [5, 3]
    missing = write(tmp_path, "m.csv", "arrival_s,model,input_tokens\n0,a,1\n")
    with pytest.raises(TraceError, match="missing column 'output_tokens'"):
        read_table(missing)
    canon.drop(columns="output_tokens").to_parquet(tmp_path / "m.parquet")
    with pytest.raises(TraceError, match="missing column 'output_tokens'"):
        read_table(tmp_path / "m.parquet")
    zero = canon.copy()
    zero.loc[3, "output_tokens"] = 0
    zero.to_parquet(tmp_path / "z.parquet")
    with pytest.raises(TraceError, match=r"z.parquet: row 4: column 'output_tokens'.*got '0'"):
        read_table(tmp_path / "z.parquet")
    assert read_table(tmp_path / "z.parquet", skip_bad_rows=True).attrs["skipped_rows"] == 1


def test_format_detection() -> None:
    expected = {
        "azure_functions_2019_sample.csv": "azure-functions",
        "azure_functions_2021_sample.csv": "azure-functions-2021",
        "azure_llm_2024_sample.csv": "azure-llm",
        "burstgpt_sample.csv": "burstgpt",
        "canonical_sample.csv": "table",
        "servegen_sample.txt": "servegen",
    }
    for name, fmt in expected.items():
        assert detect_format(SAMPLES / name) == fmt
        assert read_trace(SAMPLES / name).attrs["format"] == fmt
    assert detect_format(CONV) == "azure-llm"


def test_unknown_format_is_an_error(tmp_path: Path) -> None:
    p = write(tmp_path, "x.csv", "a,b\n1,2\n")
    with pytest.raises(TraceError, match=rf"^{p}:1: cannot tell the trace format"):
        detect_format(p)
    with pytest.raises(TraceError, match="format: expected"):
        read_trace(SAMPLES / "canonical_sample.csv", "csv")


def test_validate_trace_normalises_and_names_bad_cells() -> None:
    df = pd.DataFrame(
        {
            "extra": [1, 2, 3],
            "arrival_s": [5.0, 3.0, 4.0],
            "input_tokens": [1, 2, 3],
            "output_tokens": [4.0, 5.0, 6.0],
            "model": ["a", "b", "c"],
        }
    )
    out = validate_trace(df, "mine")
    assert_canonical(out)
    assert out["arrival_s"].tolist() == [0.0, 1.0, 2.0]
    assert out["model"].tolist() == ["b", "c", "a"] and out["output_tokens"].tolist() == [5, 6, 4]
    with pytest.raises(
        TraceError, match=r"^mine: row 2: column 'input_tokens': expected integer >= 1, got '0'"
    ):
        validate_trace(df.assign(input_tokens=[1, 0, 3]), "mine")
    with pytest.raises(TraceError, match=r"^mine: row 3: column 'arrival_s'"):
        validate_trace(df.assign(arrival_s=[0.0, 1.0, np.nan]), "mine")
    with pytest.raises(TraceError, match=r"^mine: missing column 'output_tokens'"):
        validate_trace(df.drop(columns="output_tokens"), "mine")
    with pytest.raises(TraceError, match="model"):
        validate_trace(df.drop(columns="model"), "mine", require_model=True)
    assert validate_trace(df.drop(columns="model"), "mine")["model"].isna().all()


@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=50))
def test_validate_trace_invariants(times: list[float]) -> None:
    n = len(times)
    out = validate_trace(
        pd.DataFrame(
            {"arrival_s": times, "input_tokens": np.arange(1, n + 1), "output_tokens": np.ones(n, dtype=int)}
        ),
        "x",
    )
    assert_canonical(out)
    assert sorted(out["input_tokens"].tolist()) == list(range(1, n + 1))


# ---------------------------------------------------------------------------------------------- mapping


def _empty_trace(n: int) -> pd.DataFrame:
    return validate_trace(
        pd.DataFrame({"arrival_s": np.arange(n, dtype=float), "input_tokens": 1, "output_tokens": 1}), "t"
    )


def test_mapping_distributions() -> None:
    models = ["a", "b", "c", "d"]
    df = _empty_trace(20_000)
    uniform = apply_mapping(df, models, {"kind": "zipf", "alpha": 0.0}, np.random.default_rng(0))
    share = uniform["model"].value_counts(normalize=True)
    assert set(share.index) == set(models) and all(abs(share[m] - 0.25) < 0.02 for m in models)
    skewed = apply_mapping(df, models, {"kind": "zipf", "alpha": 12.0}, np.random.default_rng(0))
    assert skewed["model"].value_counts(normalize=True)["a"] > 0.99
    zipf1 = apply_mapping(df, models, {"kind": "zipf", "alpha": 1.0}, np.random.default_rng(0))
    share = zipf1["model"].value_counts(normalize=True)
    harmonic = sum(1 / k for k in range(1, 5))
    assert share["a"] == pytest.approx(1 / harmonic, abs=0.02)
    assert share["d"] == pytest.approx(0.25 / harmonic, abs=0.02)
    rr = apply_mapping(_empty_trace(10), models, {"kind": "round-robin"}, np.random.default_rng(0))
    assert rr["model"].tolist() == ["a", "b", "c", "d", "a", "b", "c", "d", "a", "b"]
    w = apply_mapping(df, models, {"kind": "weights", "weights": {"b": 3, "d": 1}}, np.random.default_rng(0))
    share = w["model"].value_counts(normalize=True)
    assert set(share.index) == {"b", "d"} and share["b"] == pytest.approx(0.75, abs=0.02)
    assert df["model"].isna().all()  # the input is not modified


def test_zipf_shuffle_is_a_seeded_permutation() -> None:
    models = [f"m{i}" for i in range(8)]
    df = _empty_trace(5_000)
    spec = {"kind": "zipf", "alpha": 3.0, "shuffle": True}
    tops = {
        apply_mapping(df, models, spec, np.random.default_rng(s))["model"].value_counts().index[0]
        for s in range(12)
    }
    assert len(tops) > 1
    a = apply_mapping(df, models, spec, np.random.default_rng(5))
    b = apply_mapping(df, models, spec, np.random.default_rng(5))
    assert a["model"].tolist() == b["model"].tolist()


def test_label_mapping_keeps_each_label_on_one_model() -> None:
    labels = ["zeta"] * 50 + ["beta"] * 30 + ["alpha"] * 20 + ["mu"] * 10
    df = validate_trace(
        pd.DataFrame({"arrival_s": np.arange(110.0), "model": labels, "input_tokens": 1, "output_tokens": 1}),
        "t",
    )
    out = apply_mapping(df, ["x", "y", "z"], {"kind": "round-robin"}, np.random.default_rng(0))
    pairs = set(zip(df["model"], out["model"]))
    assert pairs == {("zeta", "x"), ("beta", "y"), ("alpha", "z"), ("mu", "x")}  # busiest label first
    per_request = apply_mapping(
        df, ["x", "y"], {"kind": "round-robin"}, np.random.default_rng(0), per="request"
    )
    assert per_request["model"].tolist()[:3] == ["x", "y", "x"]


@pytest.mark.parametrize(
    ("mapping", "field"),
    [
        ({"kind": "popular"}, "trace.mapping.kind"),
        ({"alpha": 1.0}, "trace.mapping.kind"),
        ({"kind": "zipf", "alpha": -1}, "trace.mapping.alpha"),
        ({"kind": "zipf", "skew": 1}, "trace.mapping.skew"),
        ({"kind": "zipf", "shuffle": "yes"}, "trace.mapping.shuffle"),
        ({"kind": "weights", "weights": {"zzz": 1}}, "trace.mapping.weights.zzz"),
        ({"kind": "weights", "weights": {"a": 0}}, "trace.mapping.weights"),
        ({"kind": "round-robin", "alpha": 1}, "trace.mapping.alpha"),
        ("zipf", "trace.mapping"),
    ],
)
def test_bad_mapping_names_the_field(mapping: object, field: str) -> None:
    with pytest.raises(TraceError, match=rf"^{field}:"):
        apply_mapping(_empty_trace(3), ["a", "b"], mapping, np.random.default_rng(0))


# -------------------------------------------------------------------------------------------- synthetic


def test_synthesize_is_deterministic_and_hits_the_rate() -> None:
    models = ["a", "b", "c"]
    a = synthesize(models, np.random.default_rng(3), n_requests=20_000, rate=10.0)
    b = synthesize(models, np.random.default_rng(3), n_requests=20_000, rate=10.0)
    c = synthesize(models, np.random.default_rng(4), n_requests=20_000, rate=10.0)
    assert_canonical(a)
    pd.testing.assert_frame_equal(a, b)
    assert not a["arrival_s"].equals(c["arrival_s"])
    assert len(a) == 20_000
    rate = (len(a) - 1) / a["arrival_s"].iloc[-1]
    assert rate == pytest.approx(10.0, rel=0.03)
    gaps = np.diff(a["arrival_s"].to_numpy())
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)
    assert a["input_tokens"].mean() == pytest.approx(1024, rel=0.06)
    assert a["output_tokens"].mean() == pytest.approx(256, rel=0.06)
    assert a["model"].value_counts(normalize=True).min() > 0.3  # alpha=0: uniform
    # Token settings draw from their own stream: the arrivals do not move.
    d = synthesize(models, np.random.default_rng(3), n_requests=20_000, rate=10.0, input_mean=50.0)
    assert d["arrival_s"].equals(a["arrival_s"]) and d["model"].equals(a["model"])


def test_synthesize_gamma_cv_duration_zipf_and_diurnal() -> None:
    rng = np.random.default_rng(0)
    g = synthesize(["a", "b"], rng, n_requests=20_000, rate=5.0, arrival="gamma", cv=2.0)
    gaps = np.diff(g["arrival_s"].to_numpy())
    assert gaps.std() / gaps.mean() == pytest.approx(2.0, rel=0.1)
    assert 1 / gaps.mean() == pytest.approx(5.0, rel=0.1)
    d = synthesize(["a", "b", "c"], np.random.default_rng(1), duration_s=2_000.0, rate=4.0, zipf_alpha=2.0)
    assert d["arrival_s"].iloc[-1] < 2_000.0 and len(d) == pytest.approx(8_000, rel=0.05)
    share = d["model"].value_counts(normalize=True)
    assert share["a"] > share["b"] > share["c"]
    assert share["a"] == pytest.approx(1 / (1 + 1 / 4 + 1 / 9), abs=0.03)
    di = synthesize(
        ["a"],
        np.random.default_rng(2),
        duration_s=4_000.0,
        rate=5.0,
        diurnal={"amplitude": 0.8, "period_s": 1_000.0},
    )
    phase = (di["arrival_s"].to_numpy() % 1_000.0) / 1_000.0
    high, low = np.sum(phase < 0.5), np.sum(phase >= 0.5)  # sin > 0 in the first half period
    assert high > 3 * low
    assert len(di) / 4_000.0 == pytest.approx(5.0, rel=0.1)
    table = pd.DataFrame({"input_tokens": [11, 22], "output_tokens": [1, 2]})
    t = synthesize(["a"], np.random.default_rng(0), n_requests=100, rate=1.0, token_table=table)
    assert set(zip(t["input_tokens"], t["output_tokens"])) == {(11, 1), (22, 2)}


def test_synthesize_rejects_bad_parameters() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(TraceError, match="synthesize.rate"):
        synthesize(["a"], rng, n_requests=10, rate=0.0)
    with pytest.raises(TraceError, match="synthesize.arrival"):
        synthesize(["a"], rng, n_requests=10, rate=1.0, arrival="weibull")
    with pytest.raises(TraceError, match="n_requests or duration_s"):
        synthesize(["a"], rng, rate=1.0)
    with pytest.raises(TraceError, match="diurnal.amplitude"):
        synthesize(["a"], rng, n_requests=10, rate=1.0, diurnal={"amplitude": 2})


# ----------------------------------------------------------------------------------------------- window


def test_window_cuts_shifts_and_scales() -> None:
    df = validate_trace(
        pd.DataFrame(
            {"arrival_s": np.arange(10, dtype=float) * 2, "input_tokens": range(1, 11), "output_tokens": 1}
        ),
        "t",
    )
    w = window(df, start_s=3.0, duration_s=10.0)
    assert w["input_tokens"].tolist() == [3, 4, 5, 6, 7]  # arrivals 4, 6, 8, 10, 12 in [3, 13)
    assert w["arrival_s"].tolist() == [0.0, 2.0, 4.0, 6.0, 8.0]
    w = window(df, start_s=3.0, duration_s=10.0, max_requests=2, rate_scale=4.0)
    assert w["input_tokens"].tolist() == [3, 4] and w["arrival_s"].tolist() == [0.0, 0.5]
    assert_canonical(window(df, max_requests=3))
    with pytest.raises(TraceError, match=r"^window: no requests in \[100 s"):
        window(df, start_s=100.0)
    with pytest.raises(TraceError, match=r"^window.rate_scale"):
        window(df, rate_scale=0)
    with pytest.raises(TraceError, match=r"^window.max_requests"):
        window(df, max_requests=0)


@given(
    st.floats(0, 30),
    st.one_of(st.none(), st.floats(0.5, 30)),
    st.one_of(st.none(), st.integers(1, 12)),
    st.floats(0.1, 10),
)
def test_window_properties(
    start: float, duration: float | None, max_requests: int | None, scale: float
) -> None:
    df = validate_trace(
        pd.DataFrame({"arrival_s": np.arange(20, dtype=float), "input_tokens": 1, "output_tokens": 1}), "t"
    )
    try:
        w = window(df, start, duration, max_requests, scale)
    except TraceError:
        assert start > 19 or (duration is not None and np.ceil(start) >= start + duration)
        return
    assert_canonical(w)
    assert max_requests is None or len(w) <= max_requests
    if duration is not None:
        assert w["arrival_s"].iloc[-1] * scale < duration


# ----------------------------------------------------------------------------------------------- spec


def test_load_trace_resolves_relative_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "t.csv").write_text("arrival_s,model,input_tokens,output_tokens\n0,a,1,1\n1,b,2,2\n")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "t.csv").write_text("arrival_s,model,input_tokens,output_tokens\n0,a,1,1\n")
    (cwd / "only_cwd.csv").write_text("arrival_s,model,input_tokens,output_tokens\n0,b,1,1\n")
    monkeypatch.chdir(cwd)
    spec = {"kind": "table", "path": "t.csv"}
    assert len(load_trace(spec, ["a", "b"], 0, base_dir=exp)) == 2  # experiment folder first
    assert len(load_trace(spec, ["a", "b"], 0)) == 1
    assert load_trace({"kind": "table", "path": "only_cwd.csv"}, ["b"], 0, base_dir=exp)[
        "model"
    ].tolist() == ["b"]
    with pytest.raises(TraceError, match=r"^trace.path: file not found: 'missing.csv'"):
        load_trace({"kind": "table", "path": "missing.csv"}, ["a"], 0, base_dir=exp)


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (
            {"kind": "azure-llm", "path": str(CONV), "mapping": {"kind": "round-robin"}, "rate": 3},
            "trace.rate",
        ),
        ({"kind": "synthetic", "n_requests": 5, "rate": 1, "spread": "poisson"}, "trace.spread"),
        ({"kind": "synthetic", "n_requests": 5, "rate": 1, "path": "x.csv"}, "trace.path"),
        ({"kind": "nope"}, "trace.kind"),
        ({"path": str(CONV)}, "trace.kind"),
        ({"kind": "azure-llm", "path": str(CONV)}, "trace.mapping"),
        (
            {"kind": "azure-llm", "path": str(CONV), "mapping": {"kind": "round-robin"}, "max_requests": 0},
            "trace.max_requests",
        ),
        (
            {"kind": "azure-llm", "path": str(CONV), "mapping": {"kind": "round-robin"}, "start_s": "soon"},
            "trace.start_s",
        ),
        ({"kind": "synthetic", "n_requests": 5, "rate": -1}, "trace.rate"),
        (
            {"kind": "synthetic", "n_requests": 5, "rate": 1, "diurnal": {"amplitude": 3}},
            "trace.diurnal.amplitude",
        ),
        (
            {"kind": "servegen", "path": str(SAMPLES / "servegen_sample.txt"), "model_ids": 3},
            "trace.model_ids",
        ),
        (
            {"kind": "azure-functions", "path": str(SAMPLES / "azure_functions_2019_sample.csv")},
            "trace.mapping",
        ),
        ({"kind": "burstgpt", "path": str(SAMPLES / "burstgpt_sample.csv")}, "trace"),
        (
            {
                "kind": "azure-functions",
                "path": str(SAMPLES / "azure_functions_2019_sample.csv"),
                "mapping": {"kind": "round-robin"},
                "minutes": [5, 2],
            },
            "trace.minutes",
        ),
    ],
)
def test_load_trace_errors_name_the_key(spec: dict, field: str) -> None:
    with pytest.raises(TraceError, match=rf"^{field}:"):
        load_trace(spec, ["a", "b"], 0)


def test_load_trace_each_kind_is_reproducible() -> None:
    models = ["a", "b", "c", "d"]
    specs = [
        {
            "kind": "azure-llm",
            "path": str(CODE),
            "mapping": {"kind": "zipf", "alpha": 1.0},
            "start_s": 60,
            "duration_s": 600,
            "max_requests": 500,
            "rate_scale": 2.0,
        },
        {"kind": "servegen", "path": str(SAMPLES / "servegen_sample.txt")},
        {
            "kind": "servegen",
            "path": str(SAMPLES / "servegen_sample.txt"),
            "model_ids": {0: "a", 1: "b", 2: "c", 3: "d"},
        },
        {
            "kind": "azure-functions",
            "path": str(SAMPLES / "azure_functions_2019_sample.csv"),
            "mapping": {"kind": "round-robin"},
            "token_source": str(CODE),
            "top_functions": 3,
            "spread": "uniform",
            "minutes": [1, 120],
        },
        {
            "kind": "azure-functions-2021",
            "path": str(SAMPLES / "azure_functions_2021_sample.csv"),
            "mapping": {"kind": "weights", "weights": {"a": 1, "b": 1}},
        },
        {
            "kind": "burstgpt",
            "path": str(SAMPLES / "burstgpt_sample.csv"),
            "mapping": {"kind": "round-robin"},
        },
        {"kind": "table", "path": str(SAMPLES / "canonical_sample.csv"), "mapping": {"kind": "zipf"}},
        {
            "kind": "synthetic",
            "n_requests": 300,
            "rate": 2.0,
            "arrival": "gamma",
            "cv": 3.0,
            "alpha": 1.0,
            "diurnal": {"amplitude": 0.5, "period_s": 60},
            "token_source": str(CONV),
        },
    ]
    for spec in specs:
        a = load_trace(spec, models, seed=7)
        b = load_trace(spec, models, seed=7)
        assert_canonical(a)
        pd.testing.assert_frame_equal(a, b)
        assert set(a["model"]) <= set(models), spec
    w = load_trace(specs[0], models, seed=7)
    assert len(w) == 500 and w.attrs["source"] == str(CODE)
    full = read_azure_llm(CODE)
    cut = full[full["arrival_s"] >= 60]
    expected = (cut["arrival_s"].iloc[:500] - cut["arrival_s"].iloc[0]).to_numpy() / 2.0
    assert w["arrival_s"].to_numpy() == pytest.approx(expected)
    assert w["input_tokens"].tolist() == cut["input_tokens"].iloc[:500].tolist()
    other = load_trace(specs[0], models, seed=8)
    assert not other["model"].equals(w["model"]) and other["arrival_s"].equals(w["arrival_s"])
    fn = load_trace(specs[3], models, seed=7)
    assert set(fn["input_tokens"]) <= set(full["input_tokens"])
    sg = load_trace(specs[1], models, seed=0)
    assert sg["model"].iloc[0] == "d"  # default model_ids: id i -> models[i]; first id is 3


def test_mapping_stream_does_not_move_synthetic_arrivals() -> None:
    from tangram_sim.traces import spec as spec_module

    streams = ("STREAM_SYNTH", "STREAM_SPREAD", "STREAM_TOKENS", "STREAM_MAPPING")
    assert len({getattr(spec_module, name) for name in streams}) == len(streams)
    base = {"kind": "synthetic", "n_requests": 200, "rate": 3.0}
    plain = load_trace(base, ["a", "b"], seed=1)
    mapped = load_trace({**base, "mapping": {"kind": "round-robin"}}, ["a", "b"], seed=1)
    assert plain["arrival_s"].equals(mapped["arrival_s"])
    assert mapped["model"].tolist()[:4] == ["a", "b", "a", "b"]


def test_load_trace_skip_bad_rows(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        "t.csv",
        f"{AZ_HEADER}\n2023-11-16 18:17:03,1,2\n2023-11-16 18:17:04,0,2\n2023-11-16 18:17:05,3,4\n",
    )
    spec = {"kind": "azure-llm", "path": str(p), "mapping": {"kind": "round-robin"}}
    with pytest.raises(TraceError, match=":3: column 'ContextTokens'"):
        load_trace(spec, ["a"], 0)
    df = load_trace(spec, ["a"], 0, skip_bad_rows=True)
    assert len(df) == 2 and df.attrs["skipped_rows"] == 1


# ----------------------------------------------------------------------------------------------- CLI


def test_cli_inspect_text_and_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert trace_cmd.main(["inspect", str(CONV)]) == 0
    out = capsys.readouterr().out
    assert "19,366" in out and "azure-llm" in out and "p99" in out
    assert trace_cmd.main(["inspect", str(SAMPLES / "canonical_sample.csv"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    canon = pd.read_csv(SAMPLES / "canonical_sample.csv")
    assert info["rows"] == 20 and info["skipped_rows"] == 0
    assert info["models"] == canon["model"].value_counts().to_dict()
    assert info["input_tokens"]["mean"] == pytest.approx(canon["input_tokens"].mean())
    assert info["input_tokens"]["p50"] == pytest.approx(canon["input_tokens"].median())
    assert info["mean_rate_rps"] == pytest.approx(19 / canon["arrival_s"].iloc[-1])
    bad = write(tmp_path, "bad.txt", "0.1 0 10 5\n0.2 0 x 5\n0.3 1 10 5\n")
    assert trace_cmd.main(["inspect", str(bad)]) == 2
    assert f"error: {bad}:2: column 'input_tokens'" in capsys.readouterr().err
    assert trace_cmd.main(["inspect", str(bad), "--skip-bad-rows", "--format", "servegen", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["skipped_rows"] == 1 and info["rows"] == 2 and info["models"] == {"0": 1, "1": 1}


def test_cli_synth_writes_a_canonical_trace(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "s.csv"
    argv = [
        "synth",
        "--out",
        str(out),
        "--models",
        "a,b,c",
        "--requests",
        "500",
        "--rate",
        "4",
        "--arrival",
        "gamma",
        "--cv",
        "2",
        "--alpha",
        "1.0",
        "--seed",
        "3",
    ]
    assert trace_cmd.main(argv) == 0
    assert "500 requests" in capsys.readouterr().out
    df = read_table(out)
    assert_canonical(df)
    assert len(df) == 500 and set(df["model"]) == {"a", "b", "c"}
    expected = synthesize(
        ["a", "b", "c"],
        np.random.default_rng(3),
        n_requests=500,
        rate=4.0,
        arrival="gamma",
        cv=2.0,
        zipf_alpha=1.0,
    )
    pd.testing.assert_frame_equal(df, expected, check_dtype=False)
    pq = tmp_path / "s.parquet"
    assert trace_cmd.main([*argv[:1], "--out", str(pq), *argv[3:]]) == 0
    pd.testing.assert_frame_equal(read_table(pq), df, check_dtype=False)
    assert (
        trace_cmd.main(
            ["synth", "--out", str(tmp_path / "s.txt"), "--models", "a", "--requests", "5", "--rate", "1"]
        )
        == 2
    )
    assert "error: --out" in capsys.readouterr().err
    assert (
        trace_cmd.main(["synth", "--out", str(out), "--models", "a", "--requests", "5", "--rate", "0"]) == 2
    )
    assert "error: --rate" in capsys.readouterr().err


def test_cli_group_plugs_into_a_parent_parser() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    trace_cmd.add_parser(parser.add_subparsers())
    args = parser.parse_args(["trace", "inspect", str(CONV), "--format", "azure-llm"])
    assert args.func is trace_cmd.cmd_inspect and args.format == "azure-llm"

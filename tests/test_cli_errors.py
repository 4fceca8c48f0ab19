"""User mistakes on the command line end in one `error:` line and exit status 2, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

import tangram_sim.experiments
from tangram_sim.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "experiments/quickstart.yaml"
LONG = "a" * 300  # one path component over the 255 bytes most file systems allow


def run_quickstart(tmp_path: Path, *sets: str, extra: tuple[str, ...] = ()) -> list[str]:
    argv = ["run", str(QUICKSTART), "--out", str(tmp_path / "out"), "--quiet", "--no-plots", "--jobs", "1",
            "--set", "trace.max_requests=5"]
    for s in sets:
        argv += ["--set", s]
    return argv + list(extra)


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("systems.0.overrides={keep_alive_s: .nan}", "systems.0.overrides.keep_alive_s: expected a number >= 0, got nan"),
        ("cluster.compute_efficiency=.nan", "cluster.compute_efficiency: expected a number in (0, 1], got nan"),
        ("cluster.gpu_memory_gib=.nan", "cluster.gpu_memory_gib: expected a positive value, got nan"),
        ("cluster.tiers.ssd_gbps=.nan", "cluster.tiers.ssd_gbps: expected a positive value, got nan"),
        ("cluster.tiers.host_cache_gib=.nan", "cluster.tiers.host_cache_gib: expected a number >= 0, got nan"),
        ("cluster.tiers.host_cache_gib=-5", "cluster.tiers.host_cache_gib: expected a number >= 0, got -5"),
        ("cluster.tiers.unit_overhead_s=-100", "cluster.tiers.unit_overhead_s: expected a number >= 0, got -100"),
        ("cluster.compute_efficiency=50", "cluster.compute_efficiency: expected a number in (0, 1], got 50"),
        ("models.2.name=llama-9", "models.2.name: unknown model 'llama-9'"),
    ],
)
def test_issue_cases_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], assignment: str,
                                         message: str) -> None:
    assert main(run_quickstart(tmp_path, assignment)) == 2
    assert one_error_line(capsys).startswith(f"error: {message}")


@pytest.mark.parametrize("jobs", ["0", "-3"])
def test_jobs_below_one_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], jobs: str) -> None:
    assert main([*run_quickstart(tmp_path), "--jobs", jobs]) == 2
    assert one_error_line(capsys) == f"error: --jobs: expected an integer >= 1, got {jobs}"


def test_exponent_number_from_set_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(run_quickstart(tmp_path, "cluster.compute_efficiency=5e-1")) == 0
    summary = pd.read_csv(tmp_path / "out/summary.csv")
    assert summary["requests"].tolist() == [5, 5] and summary["p50_ttft_s"].notna().all()


def test_non_utf8_experiment_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "some.parquet"
    pd.DataFrame({"a": [1, 2]}).to_parquet(path)
    assert main(["run", str(path), "--quiet"]) == 2
    assert "some.parquet: not a UTF-8 text file" in one_error_line(capsys)


def test_path_component_too_long(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(tmp_path / f"{LONG}.yaml"), "--quiet"]) == 2
    assert one_error_line(capsys).endswith("File name too long)")
    assert main(run_quickstart(tmp_path, f"trace.path={tmp_path / LONG}.csv")) == 2
    line = one_error_line(capsys)
    assert "File name too long" in line and len(line) < 300  # the long name is shortened
    assert main(["trace", "inspect", str(tmp_path / f"{LONG}.csv")]) == 2
    assert "File name too long" in one_error_line(capsys)
    argv = run_quickstart(tmp_path)
    argv[argv.index("--out") + 1] = str(tmp_path / LONG)
    assert main(argv) == 2
    one_error_line(capsys)


def test_ctrl_c_prints_interrupted_and_exits_130(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    def interrupt(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(tangram_sim.experiments, "load_yaml", interrupt)
    assert main(["run", str(QUICKSTART), "--quiet"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_trace_synth_does_not_overwrite_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "mine.csv"
    out.write_text("the user's own trace\n")
    argv = ["trace", "synth", "--out", str(out), "--models", "a,b", "--requests", "5", "--rate", "1"]
    assert main(argv) == 2
    assert one_error_line(capsys) == f"error: --out: '{out}' already exists; pass --force to overwrite it"
    assert out.read_text() == "the user's own trace\n"
    assert main([*argv, "--force"]) == 0
    assert len(pd.read_csv(out)) == 5
    assert main(["trace", "synth", "--out", str(tmp_path / "new.csv"), "--models", "a", "--requests", "3",
                 "--rate", "1"]) == 0
    (tmp_path / "d.csv").mkdir()
    assert main(["trace", "synth", "--out", str(tmp_path / "d.csv"), "--models", "a", "--requests", "3",
                 "--rate", "1", "--force"]) == 2
    assert "is a folder" in one_error_line(capsys)


def test_control_characters_quoted_from_a_file_stay_on_one_line(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "vt.csv"
    bad.write_bytes(b"TIME\x0bSTAMP,a\n1,2\n")  # a vertical tab is a line break to str.splitlines
    assert main(["trace", "inspect", str(bad), "--format", "azure-llm"]) == 2
    assert one_error_line(capsys).endswith("got 'TIME\\x0bSTAMP,a'")


def test_fuzz_findings_end_in_one_error_line(tmp_path, capsys) -> None:
    """Found by the fuzz runs: a trace row ending in a lone quote, a mapping kind that is a list, and a
    bandwidth so small that simulated time stops advancing."""
    from tangram_sim.cli import main

    trace = tmp_path / "t.csv"
    trace.write_text('TIMESTAMP,ContextTokens,GeneratedTokens,x\n2023-11-16 18:15:46.6805900,396,109,"\n')
    assert main(["trace", "inspect", str(trace)]) in (0, 2)
    err = capsys.readouterr().err
    assert "Traceback" not in err and len([ln for ln in err.splitlines() if ln.startswith("error:")]) <= 1
    assert main(["run", "experiments/quickstart.yaml", "--out", str(tmp_path / "o1"), "--no-plots", "--quiet",
                 "--set", "trace.mapping.kind=[]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "mapping.kind" in err[0]
    assert main(["run", "experiments/quickstart.yaml", "--out", str(tmp_path / "o2"), "--no-plots", "--quiet",
                 "--set", "trace.max_requests=6", "--set", "cluster.tiers.ssd_gbps=1e-300"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and "no" in err[-1] and "Traceback" not in "\n".join(err)

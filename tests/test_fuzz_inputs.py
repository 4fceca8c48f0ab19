"""Bad-input fuzzing of `tangram-sim run`: mutated experiment YAMLs and trace files.

Whatever the mutation (wrong types, NaN/inf, negatives, missing or extra keys, truncation, random
bytes), the CLI must either succeed with defined summary numbers or exit 2 with exactly one
`error: ...` line on stderr; any other exception escapes `main` and fails the test with its traceback.

The quickstart experiment is shrunk to six requests so an example takes well under a second. CI runs
25 fixed (derandomized) examples per test; TANGRAM_FUZZ_EXAMPLES=1000 runs that many random ones, and
`--hypothesis-show-statistics` shows which keys or files the errors were about.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tangram_sim.cli import main
from tangram_sim.experiments.config import set_dotted

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "experiments/quickstart.yaml"
CONV = ROOT / "traces/azure_llm_2023/AzureLLMInferenceTrace_conv.csv"
REQUESTS = 6  # rows of the trace files below, and trace.max_requests of the base experiment

EXAMPLES = int(os.environ.get("TANGRAM_FUZZ_EXAMPLES", "25"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=EXAMPLES <= 25,  # CI: the same examples every run; a long local run explores
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)

# Summary numbers defined for every run, and those defined once a request completed.
ALWAYS_DEFINED = ["requests", "completed", "rejected", "cold_starts", "mean_load_s", "p99_load_s", "bytes_needed",
                  "bytes_loaded", "bytes_reused", "io_reduction", "full_hit_ratio", "request_resident_ratio",
                  "request_bytes_from_gpu", "mean_load_per_request_s", "compaction_bytes",
                  "evicted_bytes", "gpu_busy_s", "waited_for_kv_s", "preemptions", "ttft_slo_attainment",
                  "tpot_slo_attainment", "goodput_rps", "gpu_held_s", "gpu_seconds_per_request", "mean_overlap_s"]
DEFINED_IF_COMPLETED = ["mean_ttft_s", "p50_ttft_s", "p90_ttft_s", "p99_ttft_s", "mean_e2e_s", "mean_queue_s"]


def base_experiment(trace_path: Path, kind: str = "azure-llm") -> dict[str, Any]:
    raw = yaml.safe_load(QUICKSTART.read_text())
    raw["trace"].update(kind=kind, path=str(trace_path), max_requests=REQUESTS)
    if kind == "table":
        raw["trace"].pop("mapping")  # the canonical table names its models
    raw["outputs"] = {"plots": False}
    return raw


def azure_rows() -> list[list[str]]:
    with open(CONV) as f:
        lines = [next(f) for _ in range(REQUESTS + 1)]
    return [line.rstrip("\n").split(",") for line in lines]


def canonical_rows() -> list[list[str]]:
    models = ["qwen2.5-3b", "phi-3-mini-4k", "llama-3-8b", "yi-9b"]
    rows = [["arrival_s", "model", "input_tokens", "output_tokens"]]
    rows += [[f"{2.5 * i:g}", models[i % 4], str(100 + 50 * i), str(10 + i)] for i in range(REQUESTS)]
    return rows


# ------------------------------------------------------------------ mutations
BAD_VALUES = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, -1, 0, -0.0, 0.5, 1, 2, 1e300, -1e300, 10**30, 2**63,
                     True, False, None, "", "x", "5e-2", ".nan", "1e9", "auto", "../nope", "/", [], {}, [1, 2],
                     {"a": 1}, ["qwen2.5-3b"], {"kind": "zipf"}]),
    st.integers(-10, 100),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
).map(copy.deepcopy)  # a fresh [] or {} each time: mutating a shared one would leak between examples
EXTRA_KEYS = st.sampled_from(["colour", "nodes", "kind", "name", "seed", "sweep", "0", "tiers", "overrides",
                              "calibration", "real", "mapping", "derive", "checkpoint", "diurnal"])


def paths_of(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path of a nested dict/list config, parents before children."""
    out = []
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        return out
    for key, value in items:
        out.append((*prefix, key))
        out.extend(paths_of(value, (*prefix, key)))
    return out


def mutate(config: dict[str, Any], data: st.DataObject, rounds: int) -> dict[str, Any]:
    for _ in range(rounds):
        # deepest first: Hypothesis favours the first choice, and leaves are where the numbers are
        paths = sorted(paths_of(config), key=len, reverse=True)
        if not paths:
            break
        path = data.draw(st.sampled_from(paths), label="path")
        parent: Any = config
        for key in path[:-1]:
            parent = parent[key]
        action = data.draw(st.sampled_from(["replace", "replace", "delete", "extra"]), label="action")
        if action == "replace":
            parent[path[-1]] = data.draw(BAD_VALUES, label="value")
        elif action == "delete":
            if isinstance(parent, dict):
                del parent[path[-1]]
            else:
                parent.pop(path[-1])
        else:
            target = parent[path[-1]]
            if isinstance(target, dict):
                target[data.draw(EXTRA_KEYS, label="extra key")] = data.draw(BAD_VALUES, label="extra value")
            elif isinstance(target, list):
                target.append(data.draw(BAD_VALUES, label="extra item"))
    return config


def damage_text(text: bytes, data: st.DataObject) -> bytes:
    """Byte-level damage: truncation, random bytes spliced in, or a whole file of random bytes."""
    action = data.draw(st.sampled_from(["keep"] * 5 + ["truncate", "splice", "random"]), label="text action")
    if action == "truncate":
        return text[: data.draw(st.integers(0, len(text)), label="cut")]
    if action == "splice":
        at = data.draw(st.integers(0, len(text)), label="at")
        return text[:at] + data.draw(st.binary(min_size=1, max_size=16), label="bytes") + text[at:]
    if action == "random":
        return data.draw(st.binary(max_size=256), label="random file")
    return text


def mutate_rows(rows: list[list[str]], data: st.DataObject) -> list[list[str]]:
    cells = st.sampled_from(["nan", "NaN", "inf", "-inf", "-1", "0", "", "abc", "1e400", "99999999999999999999",
                             "2023-13-45 99:99:99", "1.5", "\x00", "\x0b", "yi-9b", "no-model"])
    for _ in range(data.draw(st.integers(1, 4), label="cell edits")):
        action = data.draw(st.sampled_from(["cell", "cell", "drop column", "extra column", "drop row",
                                            "header cell"]), label="row action")
        if action == "cell" and len(rows) > 1:
            r = data.draw(st.integers(1, len(rows) - 1), label="row")
            if rows[r]:
                c = data.draw(st.integers(0, len(rows[r]) - 1), label="column")
                rows[r][c] = data.draw(st.one_of(cells, st.text(max_size=6)), label="cell")
        elif action == "drop column" and rows and rows[0]:
            c = data.draw(st.integers(0, len(rows[0]) - 1), label="dropped column")
            rows = [[v for i, v in enumerate(row) if i != c] for row in rows]
        elif action == "extra column":
            rows = [row + [data.draw(cells, label="extra cell")] for row in rows]
        elif action == "drop row" and len(rows) > 1:
            rows.pop(data.draw(st.integers(0, len(rows) - 1), label="dropped row"))
        elif action == "header cell" and rows and rows[0]:
            rows[0][data.draw(st.integers(0, len(rows[0]) - 1), label="header")] = data.draw(cells, label="name")
    return rows


# ------------------------------------------------------------------ the contract
def run_and_check(experiment: bytes, folder: Path, record: bool = True, extra: tuple[str, ...] = ()) -> int:
    path = folder / "exp.yaml"
    path.write_bytes(experiment)
    out = folder / "out"
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(["run", str(path), "--out", str(out), "--quiet", "--no-plots", "--jobs", "1", *extra])
    if rc == 2:
        lines = err.getvalue().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), err.getvalue()
        assert len(lines[0]) < 2500, len(lines[0])  # a huge value is quoted short, not copied whole
        if record:  # --hypothesis-show-statistics: which key or file the errors were about
            event(f"rc 2: {lines[0][7:].replace(str(folder), '').split(':')[0][:40]}")
        return rc
    if record:
        event(f"rc {rc}")
    assert rc == 0, (rc, err.getvalue())
    summary = pd.read_csv(out / "summary.csv")
    for column in ALWAYS_DEFINED:
        assert summary[column].map(math.isfinite).all(), (column, summary[column].tolist())
    done = summary[summary["completed"] > 0]
    for column in DEFINED_IF_COMPLETED:
        assert done[column].map(math.isfinite).all(), (column, done[column].tolist())
    return rc


def dump(config: Any) -> bytes:
    return yaml.safe_dump(config, sort_keys=False, allow_unicode=True).encode()


@FUZZ
@given(data=st.data())
def test_mutated_experiments_fail_in_one_line_or_run_cleanly(data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        trace = folder / "trace.csv"
        trace.write_text("\n".join(",".join(r) for r in azure_rows()) + "\n")
        config = mutate(base_experiment(trace), data, data.draw(st.integers(1, 3), label="rounds"))
        run_and_check(damage_text(dump(config), data), folder)


@FUZZ
@given(data=st.data(), kind=st.sampled_from(["azure-llm", "table"]))
def test_mutated_trace_files_fail_in_one_line_or_run_cleanly(data: st.DataObject, kind: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rows = mutate_rows(azure_rows() if kind == "azure-llm" else canonical_rows(), data)
        text = ("\n".join(",".join(r) for r in rows) + "\n").encode("utf-8", "surrogatepass")
        trace = folder / "trace.csv"
        trace.write_bytes(damage_text(text, data))
        run_and_check(dump(base_experiment(trace, kind)), folder)


# Every number an experiment can hold, with the scale of a plausible value (bandwidths in GB/s, GPU
# overrides in B/s or FLOP/s). Values are drawn as scale x [1e-3, 1e3], small integers, or specials.
# Magnitudes far beyond that (a bandwidth of 1e-300 B/s, a 1e300 s overhead) are left out: they are
# inside the documented ranges but push simulated time past ~1e13 s, where a decode step no longer
# advances the float clock and the simulation spins (a simulator limit, reported separately).
NUMERIC_KEYS: dict[str, float] = {
    "seed": 0, "cluster.nodes": 0, "cluster.gpus_per_node": 0, "cluster.gpu_memory_gib": 40.0,
    "cluster.compute_efficiency": 1.0, "cluster.memory_efficiency": 1.0,
    "cluster.gpu_overrides.memory_bytes": 40 * 2**30, "cluster.gpu_overrides.bf16_flops": 3e14,
    "cluster.gpu_overrides.hbm_bps": 2e12, "cluster.gpu_overrides.pcie_bps": 25e9,
    "cluster.gpu_overrides.d2d_bps": 1e12, "cluster.tiers.host_cache_gib": 64.0, "cluster.tiers.ssd_gbps": 6.0,
    "cluster.tiers.network_gbps": 1.25, "cluster.tiers.unit_overhead_s": 0.001, "models.0.sensitivity": 1.0,
    "models.1.tensor_parallel": 0, "trace.max_requests": 0, "trace.rate_scale": 0.05, "trace.start_s": 10.0,
    "trace.duration_s": 100.0, "trace.mapping.alpha": 1.0, "outputs.sample_interval_s": 1.0,
    **{f"systems.{i}.overrides.{key}": scale for i in (0, 1) for key, scale in (
        ("keep_alive_s", 30.0), ("fairness_window_s", 5.0), ("engine_overhead_s", 0.2), ("kv_fraction", 1.0),
        ("min_unit_bytes", 0), ("kv_block_tokens", 0), ("kv_chunk_blocks", 0), ("max_batch", 0),
        ("prefill_batch", 0))},
}
SPECIAL_NUMBERS = st.sampled_from([math.nan, math.inf, -math.inf, 0, -0.0, -1, -1e-9, 1, True, None, "1e-2",
                                   "nan", [1], {}]).map(copy.deepcopy)


def numbers_for(scale: float) -> st.SearchStrategy[Any]:
    plausible = (st.integers(-3, 40) if scale == 0 else
                 st.floats(1e-3, 1e3).map(lambda x: x * scale) | st.floats(-1e3, 0).map(lambda x: x * scale))
    return SPECIAL_NUMBERS | plausible


@FUZZ
@given(data=st.data())
def test_bad_numbers_fail_in_one_line_or_give_defined_results(data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        trace = folder / "trace.csv"
        trace.write_text("\n".join(",".join(r) for r in azure_rows()) + "\n")
        config = base_experiment(trace)
        for _ in range(data.draw(st.integers(1, 3), label="numbers")):
            key = data.draw(st.sampled_from(sorted(NUMERIC_KEYS)), label="key")
            set_dotted(config, key, data.draw(numbers_for(NUMERIC_KEYS[key]), label=key))
        run_and_check(dump(config), folder)


def test_the_unmutated_bases_run(tmp_path: Path) -> None:
    """The fuzzing starts from valid inputs: both bases run and complete every request."""
    for kind, rows in (("azure-llm", azure_rows()), ("table", canonical_rows())):
        folder = tmp_path / kind
        folder.mkdir()
        trace = folder / "trace.csv"
        trace.write_text("\n".join(",".join(r) for r in rows) + "\n")
        assert run_and_check(dump(base_experiment(trace, kind)), folder, record=False) == 0
        assert pd.read_csv(folder / "out/summary.csv")["completed"].tolist() == [REQUESTS, REQUESTS]


# ------------------------------------------------------------------ attacks on the YAML itself
def alias_bomb(levels: int, width: int) -> str:
    """`&b0 [x, ...]`, `&b1 [*b0, *b0, ...]`, ...: width**levels values once expanded."""
    lines = ["bombs:", f"  - &b0 [{', '.join(['x'] * width)}]"]
    lines += [f"  - &b{i} [{', '.join([f'*b{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@FUZZ
@given(data=st.data(), attack=st.sampled_from(["alias bomb", "self alias", "duplicate key", "huge value",
                                               "deep nesting", "long sweep"]))
def test_yaml_attacks_fail_in_one_line_or_run_cleanly(data: st.DataObject, attack: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        trace = folder / "trace.csv"
        trace.write_text("\n".join(",".join(r) for r in azure_rows()) + "\n")
        config = base_experiment(trace)
        text = dump(config).decode()
        if attack == "alias bomb":  # a small one may pass the alias limit and fail as an unknown key
            text += alias_bomb(data.draw(st.integers(2, 9), label="levels"), data.draw(st.integers(2, 12), label="width"))
        elif attack == "self alias":
            text += "sweep: &s {seed: [*s]}\n"
        elif attack == "duplicate key":
            key = data.draw(st.sampled_from(sorted(config)), label="key")
            text += f"{key}: {data.draw(st.sampled_from(['1', 'x', '[]', '{}']), label='value')}\n"
        elif attack == "huge value":
            path = data.draw(st.sampled_from(sorted(paths_of(config), key=len, reverse=True)), label="path")
            size = data.draw(st.sampled_from([10**4, 10**6, 5 * 10**6]), label="size")
            set_dotted(config, ".".join(map(str, path)), "q" * size)
            text = dump(config).decode()
        elif attack == "deep nesting":
            depth = data.draw(st.sampled_from([50, 5000, 50_000]), label="depth")
            text += f"description: {'[' * depth}{']' * depth}\n"
        else:
            text = text.replace("seed: 7", "seed: 7\nsweep: {seed: [" + ", ".join(map(str, range(20_001))) + "]}")
        event(attack)
        run_and_check(text.encode(), folder)


# ------------------------------------------------------------------ calibration files
QUICKSTART_MODELS = ["qwen2.5-3b", "phi-3-mini-4k", "llama-3-8b", "yi-9b"]


def base_calibration() -> dict[str, Any]:
    coeffs = {"prefill_base_s": 0.04, "prefill_per_token_s": 1e-4, "decode_base_s": 0.03,
              "decode_per_seq_s": 0.007, "decode_per_kv_token_s": 1e-6}
    return {"device": "test", "h2d_bps": 2.5e10, "d2d_bps": 5e11, "read_bps": 2e10, "unit_overhead_s": 4e-5,
            "engine_overhead_s": 0.05, "models": {m: dict(coeffs) for m in QUICKSTART_MODELS},
            "measurements": {"seconds": 1.0}}


@FUZZ
@given(data=st.data(), partial=st.booleans())
def test_mutated_calibration_files_fail_in_one_line_or_run_cleanly(data: st.DataObject, partial: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        trace = folder / "trace.csv"
        trace.write_text("\n".join(",".join(r) for r in azure_rows()) + "\n")
        cal = mutate(base_calibration(), data, data.draw(st.integers(1, 3), label="rounds"))
        (folder / "cal.yaml").write_bytes(damage_text(dump(cal), data))
        extra = ("--calibration", str(folder / "cal.yaml"), *(["--calibration-partial"] if partial else []))
        run_and_check(dump(base_experiment(trace)), folder, extra=extra)


def test_the_unmutated_calibration_runs(tmp_path: Path) -> None:
    trace = tmp_path / "trace.csv"
    trace.write_text("\n".join(",".join(r) for r in azure_rows()) + "\n")
    (tmp_path / "cal.yaml").write_bytes(dump(base_calibration()))
    assert run_and_check(dump(base_experiment(trace)), tmp_path, record=False,
                         extra=("--calibration", str(tmp_path / "cal.yaml"))) == 0


# ------------------------------------------------------------------ concurrent writers
@pytest.mark.parametrize("lock", ["live here", "dead here", "other host", "garbage", "empty"])
@pytest.mark.parametrize("state", ["none", "complete", "interrupted"])
def test_a_run_folder_with_a_lock_refuses_or_runs_in_one_line(tmp_path: Path, lock: str, state: str) -> None:
    from tangram_sim.rundir import JobKey, RunWriter, read_record
    from tangram_sim.rundir.lock import LOCK_NAME

    trace = tmp_path / "trace.csv"
    trace.write_text("\n".join(",".join(r) for r in azure_rows()) + "\n")
    experiment = dump(base_experiment(trace))
    out = tmp_path / "out"
    if state != "none":
        assert run_and_check(experiment, tmp_path, record=False) == 0
        if state == "interrupted":
            record = json.loads((out / "run.json").read_text())
            record.update(status="interrupted", complete=False)
            (out / "run.json").write_text(json.dumps(record))
    out.mkdir(exist_ok=True)
    holder = None
    if lock == "live here":  # a writer of this process holds it
        holder = RunWriter(out / "sub", {"name": "x"})
        holder.check([JobKey(0, 0)])
        holder.open()
        (out / LOCK_NAME).write_text((out / "sub" / LOCK_NAME).read_text())
    elif lock == "dead here":
        proc = subprocess.Popen([sys.executable, "-c", "pass"])
        proc.wait()
        (out / LOCK_NAME).write_text(json.dumps({"pid": proc.pid, "host": socket.gethostname()}))
    elif lock == "other host":
        (out / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    elif lock == "garbage":
        (out / LOCK_NAME).write_bytes(b"\xff\x00not json")
        os.utime(out / LOCK_NAME, (0, 0))  # old: not a lock being written right now
    else:
        (out / LOCK_NAME).write_bytes(b"")
        os.utime(out / LOCK_NAME, (0, 0))
    before = read_record(out)
    rc = run_and_check(experiment, tmp_path, record=False)
    if holder is not None:
        holder.close(status="interrupted")
    if lock in ("live here", "other host"):
        assert rc == 2 and read_record(out) == before  # refused, nothing written
    else:
        assert rc == 0 and read_record(out).complete  # a stale lock is taken over

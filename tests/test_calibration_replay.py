"""Calibration measured on the replay path: fed to the simulator, it reproduces the calibration trace's
own replay (CPU device, tiny models)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from tangram_sim.real.calibrate import calibrate, design_trace  # noqa: E402
from tangram_sim.real.checkpoints import make_checkpoints  # noqa: E402
from tangram_sim.real.loader import open_checkpoint  # noqa: E402
from tangram_sim.sim.hardware import GiB, TierSpec, gpu_spec  # noqa: E402
from tangram_sim.sim.simulate import ClusterSpec, ModelChoice, simulate  # noqa: E402
from tangram_sim.sim.systems import make_system  # noqa: E402

# Stated tolerance of the simulation of a calibration trace against that trace's replay, on a 2-core
# VM with sub-10-ms operations (the host's noise is the floor; a GPU's loads are bandwidth-bound):
TTFT_TOLERANCE = 0.25  # mean TTFT
LOAD_TOLERANCE = 0.35  # mean load time per cold start


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("cal-ckpts")
    written = make_checkpoints(["llama-3-8b", "qwen2.5-3b"], out, "small", dtype="float32")
    return {w.name: open_checkpoint(w.path) for w in written}


def _experiment_trace(n: int = 120, seed: int = 3) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "arrival_s": np.cumsum(rng.exponential(0.06, n)),
        "model": rng.choice(["llama-3-8b", "qwen2.5-3b"], n, p=[0.6, 0.4]),
        "input_tokens": rng.integers(8, 64, n),
        "output_tokens": rng.integers(2, 10, n),
    })


def test_design_trace_follows_the_experiment_and_covers_lengths_and_batches() -> None:
    t = _experiment_trace()
    d = design_trace(t, ["llama-3-8b", "qwen2.5-3b"], n=100, batch_sizes=[1, 2, 4], seed=1)
    assert d["arrival_s"].is_monotonic_increasing and d["arrival_s"].iloc[0] == 0
    assert len(d) == 100 + 2 * (1 + 2 + 4)
    lengths = set(np.percentile(t["input_tokens"], [5, 25, 50, 75, 95]).round().astype(int))
    assert lengths <= set(d["input_tokens"])  # prompts at the trace's percentiles
    bursts = d.groupby(["arrival_s", "model"]).size()
    assert {2, 4} <= set(bursts)  # simultaneous requests of one model: decode batches
    assert d.equals(design_trace(t, ["llama-3-8b", "qwen2.5-3b"], n=100, batch_sizes=[1, 2, 4], seed=1))
    assert not d.equals(design_trace(t, ["llama-3-8b", "qwen2.5-3b"], n=100, batch_sizes=[1, 2, 4], seed=2))


def test_calibration_reproduces_its_own_replay_in_the_simulator(ckpts: dict) -> None:
    cap = int(2.2 * max(c.spec.weight_bytes for c in ckpts.values()))
    cap -= cap % 256
    system = make_system("tangram", "tangram", {"keep_alive_s": 0.1, "fairness_window_s": 0.3})
    keep: dict = {}
    report = calibrate(ckpts, "cpu", systems=[system], capacity=cap, trace=_experiment_trace(), quick=True,
                       threads=1, seed=7, keep=keep)
    cal = report.calibration
    assert set(cal.models) == set(ckpts) and cal.read_bps > 0 and cal.h2d_bps > 0
    measured = report.measurements
    assert measured["replays"]["tangram"]["cold_starts"] >= 10
    for name, m in measured["models"].items():  # each fit reproduces the mean of the steps it was fitted on
        assert m["prefill_fit_mean_s"] == pytest.approx(m["prefill_mean_s"], rel=0.15), name
        assert m["decode_fit_mean_s"] == pytest.approx(m["decode_mean_s"], rel=0.15), name

    design, replay = keep["tangram"]
    gpu = gpu_spec("a100-80gb", memory_gib=cap / GiB)
    cluster = ClusterSpec(nodes=1, gpus_per_node=1, gpu=gpu, tiers=TierSpec(host_cache_bytes=0))
    sim = simulate({m: ModelChoice(c.spec) for m, c in ckpts.items()}, design, cluster, system,
                   calibration=cal).summary
    real = replay.summary
    assert sim["requests"] == real["requests"] == len(design)
    assert sim["mean_ttft_s"] == pytest.approx(real["mean_ttft_s"], rel=TTFT_TOLERANCE)
    assert sim["mean_load_s"] == pytest.approx(real["mean_load_s"], rel=LOAD_TOLERANCE)
    assert sim["cold_starts"] == pytest.approx(real["cold_starts"], rel=0.2)


def test_calibration_yaml_keeps_every_raw_figure(ckpts: dict, tmp_path: Path) -> None:
    import yaml

    from tangram_sim.sim.timemodel import Calibration

    cap = int(2.2 * max(c.spec.weight_bytes for c in ckpts.values()))
    cap -= cap % 256
    report = calibrate(ckpts, "cpu", systems=[make_system("serverlessllm", "serverlessllm")], capacity=cap,
                       trace=_experiment_trace(60), quick=True, threads=1)
    path = report.write(tmp_path / "cal.yaml")
    back = Calibration.load(path)
    assert back.models.keys() == report.calibration.models.keys()
    raw = yaml.safe_load(path.read_text())["measurements"]
    for key in ("h2d_bps_by_chunk", "d2d_bps_by_chunk", "loads", "models", "replays", "design"):
        assert key in raw, key
    assert raw["loads"]["rel_rms_residual_alone"] >= 0


def test_calibration_fits_each_layers_share_of_a_prefill_from_layered_replays(ckpts: dict, tmp_path: Path) -> None:
    from tangram_sim.models.layers import layer_blocks
    from tangram_sim.sim.hardware import GPUS
    from tangram_sim.sim.timemodel import Calibrated, Calibration, Roofline

    cap = int(2.2 * max(c.spec.weight_bytes for c in ckpts.values()))
    cap -= cap % 256
    system = make_system("s", "serverlessllm", {"keep_alive_s": 0.05, "execute_while_load": True})
    report = calibrate(ckpts, "cpu", systems=[system], capacity=cap, trace=_experiment_trace(60), quick=True,
                       threads=1, seed=5)
    layers = report.measurements["layers"]
    for name, ck in ckpts.items():
        shares = report.calibration.models[name].prefill_layer_shares
        n = len(layer_blocks(ck.spec))
        assert shares is not None and len(shares) == n and sum(shares) == pytest.approx(1.0)
        assert min(shares[1:-1]) > 0  # every decoder layer computes
        fit = layers[name]
        assert fit["prefills"] >= 3 and fit["shares_rel_rms_residual"] >= 0
        assert fit["load"]["starts"] >= 3 and fit["load"]["rate_bps"] > 0
        assert fit["load"]["simulator_rel_rms_residual"] >= 0
    # the file keeps them, and the calibrated time model splits a prefill by them
    back = Calibration.load(report.write(tmp_path / "cal.yaml"))
    name = "qwen2.5-3b"
    assert back.models[name].prefill_layer_shares == pytest.approx(report.calibration.models[name].prefill_layer_shares)
    tm = Calibrated(back, Roofline(GPUS["a100-80gb"]))
    spec = ckpts[name].spec
    split = tm.prefill_layers_s(spec, 40)
    assert sum(split) == pytest.approx(tm.prefill_s(spec, 40))
    np.testing.assert_allclose(np.asarray(split) / sum(split), back.models[name].prefill_layer_shares, rtol=1e-9)


def test_layered_starts_get_a_rate_of_their_own_and_serial_ones_keep_the_formula() -> None:
    """`fit_loads` fits the serial formula on serial starts; `fit_layered_rate` the rate of the layered
    starts' bytes after the same overheads (None when they read no slower, or are too few)."""
    from tangram_sim.real.calibrate import fit_loads
    from tangram_sim.real.layerfit import fit_layered_rate

    rng = np.random.default_rng(0)
    fixed, unit, serial_bps, layered_bps = 2e-3, 1e-4, 5e9, 3.5e9
    rows = []
    for i in range(40):
        units = int(rng.integers(1, 20))
        nbytes = float(rng.uniform(5e6, 9e7))
        layered = i % 2 == 1
        read_s = fixed + unit * units + nbytes / (layered_bps if layered else serial_bps)
        rows.append({"rid": i, "gpu": 0, "model": "m", "units": units, "units_loaded": units,
                     "units_copied": 0, "copied_bytes": 0.0, "copy_s": 0.0,
                     "loaded_bytes": nbytes, "moved_bytes": 0.0, "move_s": 0.0, "read_s": read_s,
                     "engine_s": 1e-3, "load_s": read_s, "wall_s": float(i), "system": "s", "layered": layered})
    loads = pd.DataFrame(rows)
    got_fixed, got_unit, device_bps, _read, _move, _ = fit_loads(loads, 1e10, 1e11)
    assert (got_fixed, got_unit, device_bps) == pytest.approx((fixed, unit, serial_bps), rel=1e-6)
    rate, details = fit_layered_rate(loads, got_fixed, got_unit, device_bps)
    assert rate == pytest.approx(layered_bps, rel=1e-6)
    assert details["fitted_mean_read_s"] == pytest.approx(loads[loads.layered].read_s.mean(), rel=1e-6)
    # a formula fitted over both kinds of start would be off for both (what the calibration did before)
    mixed = fit_loads(loads.drop(columns="layered"), 1e10, 1e11)
    assert not mixed[2] == pytest.approx(serial_bps, rel=0.05)
    assert fit_layered_rate(loads.assign(layered=False), got_fixed, got_unit, device_bps)[0] is None
    assert fit_layered_rate(loads[loads.rid < 4], got_fixed, got_unit, device_bps)[0] is None  # 2 layered
    faster = loads.assign(read_s=np.where(loads.layered, loads.read_s * 0.5, loads.read_s))
    assert fit_layered_rate(faster, got_fixed, got_unit, device_bps)[0] is None


def test_a_calibration_file_with_bad_layer_shares_is_one_line(tmp_path: Path) -> None:
    from tangram_sim.errors import ConfigError
    from tangram_sim.sim.timemodel import Calibration

    path = tmp_path / "cal.yaml"
    path.write_text("device: cpu\nmodels:\n  m: {prefill_base_s: 0.001, prefill_per_token_s: 0.0, decode_base_s: 0.001,"
                    " prefill_layer_shares: [0.5, -1]}\n")
    with pytest.raises(ConfigError, match=r"models.m.prefill_layer_shares\[1\]"):
        Calibration.load(path)
    path.write_text("device: cpu\nmodels:\n  m: {prefill_base_s: 0.001, prefill_per_token_s: 0.0, decode_base_s: 0.001,"
                    " prefill_layer_shares: 3}\n")
    with pytest.raises(ConfigError, match="prefill_layer_shares: expected a list of shares"):
        Calibration.load(path)


def test_refit_on_a_replay_recovers_its_steps_and_loads(tmp_path: Path) -> None:
    """`real.refit` fits the calibration's fits on a replay folder's own tables: on tables made from
    known coefficients it gives them back (serial loads by the formula, layered ones at their own rate,
    prefill and decode per model), fills the copy columns of an older replay, and a folder without its
    tables is one line naming the file."""
    import yaml

    from tangram_sim.errors import ConfigError
    from tangram_sim.real.refit import refit_on_replay

    tiny = make_checkpoints(["llama-3-8b", "qwen2.5-3b"], tmp_path / "ckpts", "tiny", dtype="float32")
    ckpts = {w.name: open_checkpoint(w.path) for w in tiny}
    replay = tmp_path / "replay"
    replay.mkdir()
    (replay / "experiment.sim.yaml").write_text(yaml.safe_dump({
        "name": "refit", "seed": 1,
        "cluster": {"nodes": 1, "gpus_per_node": 2, "gpu": "a100-80gb", "gpu_memory_gib": 0.2},
        "models": [{"name": "llama-3-8b"}, {"name": "qwen2.5-3b"}],
        "trace": {"kind": "synthetic", "n_requests": 10, "rate": 1.0},
        "systems": [{"name": "off", "preset": "serverlessllm"},
                    {"name": "on", "preset": "serverlessllm", "overrides": {"execute_while_load": True}}]}))
    with pytest.raises(ConfigError, match=r"loads\.parquet: not found"):
        refit_on_replay(replay, tmp_path / "cal.yaml", ckpts)
    rng = np.random.default_rng(5)
    fixed, unit, serial_bps, layered_bps = 1.5e-3, 2e-4, 6e9, 4e9
    loads, steps = [], []
    for i in range(60):
        system = "on" if i % 2 else "off"
        model = ["llama-3-8b", "qwen2.5-3b"][i % 3 % 2]
        units = int(rng.integers(1, 12))
        nbytes = float(rng.uniform(1e7, 9e7))
        read_s = fixed + unit * units + nbytes / (layered_bps if system == "on" else serial_bps)
        loads.append({"system": system, "point": 0, "rid": i, "gpu": 0, "model": model, "units": units,
                      "units_loaded": units, "loaded_bytes": nbytes, "moved_bytes": 0.0, "move_s": 0.0,
                      "read_s": read_s, "engine_s": 4e-3, "total_s": read_s + 4e-3, "read_gbps": 1.0,
                      "wall_s": 10.0 * i})  # far apart: every start ran alone
    truth = {"llama-3-8b": (0.012, 3e-4, 0.008, 1.2e-3), "qwen2.5-3b": (0.015, 4e-4, 0.010, 1.5e-3)}
    for i in range(200):
        model = ["llama-3-8b", "qwen2.5-3b"][i % 2]
        p_base, p_tok, d_base, d_seq = truth[model]
        tokens, batch = int(rng.integers(4, 200)), int(rng.integers(1, 9))
        steps.append({"system": "off", "point": 0, "gpu": 0, "kind": "prefill", "model": model, "requests": 1,
                      "tokens": tokens, "kv_tokens": tokens, "time_s": 0.0, "wall_s": 0.0,
                      "seconds": p_base + p_tok * tokens})
        steps.append({"system": "off", "point": 0, "gpu": 0, "kind": "decode", "model": model, "requests": batch,
                      "tokens": batch, "kv_tokens": int(rng.integers(10, 900)), "time_s": 0.0, "wall_s": 0.0,
                      "seconds": d_base + d_seq * (batch - 1)})
    pd.DataFrame(loads).to_parquet(replay / "loads.parquet")  # no copy columns: a replay made before them
    pd.DataFrame(steps).to_parquet(replay / "steps.parquet")
    (tmp_path / "cal.yaml").write_text(yaml.safe_dump({
        "device": "cpu (test)", "h2d_bps": 5e9, "d2d_bps": 3e9,
        "measurements": {"h2d_copy_bps": 2e10, "loads": {"d2d_copy_bps": 1e10}}}))
    report = refit_on_replay(replay, tmp_path / "cal.yaml", ckpts)
    cal = report.calibration
    assert (cal.load_overhead_s, cal.unit_overhead_s, cal.h2d_bps) == pytest.approx((fixed, unit, serial_bps),
                                                                                     rel=1e-6)
    assert cal.layered_load_bps == pytest.approx(layered_bps, rel=1e-6)
    assert cal.engine_overhead_s == pytest.approx(4e-3)
    for model, (p_base, p_tok, d_base, d_seq) in truth.items():
        c = cal.models[model]
        assert (c.prefill_base_s, c.prefill_per_token_s) == pytest.approx((p_base, p_tok), rel=1e-6)
        assert (c.decode_base_s, c.decode_per_seq_s) == pytest.approx((d_base, d_seq), rel=1e-6)
    assert report.measurements["refitted_on"] == str(replay)
    assert "refitted on" in cal.device

"""Prefetch: the pure policy, cancellable transfers, the lifecycle (never delays a cold start, displaces
only less valuable unpinned units of models with nothing queued), its accounting and configuration."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pandas as pd
import pytest
import simpy

from tangram_sim.arena import State
from tangram_sim.core import prefetch as prefetch_module
from tangram_sim.core.links import Fabric, Link
from tangram_sim.core.prefetch import PREFETCH_COLUMNS
from tangram_sim.errors import ConfigError
from tangram_sim.experiments.config import load_yaml
from tangram_sim.experiments.runner import Job, prepare, run_job
from tangram_sim.models import get_model
from tangram_sim.policies.prefetch import PREFETCH, PrefetchCandidate, ResidentGroup
from tangram_sim.sim.hardware import TierSpec, gpu_spec
from tangram_sim.sim.simulate import ClusterSpec, ModelChoice, simulate
from tangram_sim.sim.systems import make_system

ROOT = Path(__file__).resolve().parents[1]
GB = 10**9
NAMES = ["llama-3-8b", "yi-9b", "qwen2.5-3b", "phi-3-mini-4k"]


def trace(rows: list[tuple[float, str, int, int]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["arrival_s", "model", "input_tokens", "output_tokens"])


def gapped_workload(n: int = 300, seed: int = 3, gap_s: float = 8.0) -> pd.DataFrame:
    """Requests of four models (47.5 GB in all) with idle gaps (exponential, mean `gap_s`)."""
    rng = random.Random(seed)
    t = 0.0
    rows = []
    for _ in range(n):
        t += rng.expovariate(1 / gap_s)
        rows.append((t, rng.choices(NAMES, weights=[4, 2, 1, 1])[0], rng.randint(50, 400), rng.randint(5, 60)))
    return trace(rows)


def models(names: list[str] = NAMES) -> dict[str, ModelChoice]:
    return {n: ModelChoice(get_model(n)) for n in names}


def cluster(gpus: int, gib: float) -> ClusterSpec:
    return ClusterSpec(1, gpus, gpu_spec("a100-80gb", memory_gib=gib), TierSpec())


def system(prefetch: str = "next-model", **overrides: object):
    return make_system(prefetch, "tangram", {"retention": "model-value", "keep_alive_s": 5.0, "prefetch": prefetch,
                                             **overrides})


# ------------------------------------------------------------------ the policy (pure)


def cand(model: str, value: float, missing: int, home: bool | None = None, queued: bool = False):
    return PrefetchCandidate(model, value, missing, home, queued)


def group(owners: set[str], value: float, nbytes: int, queued: bool = False) -> ResidentGroup:
    return ResidentGroup(frozenset(owners), value, nbytes, queued)


def test_next_model_takes_the_most_valuable_model_that_fits_over_free_and_less_valuable_bytes() -> None:
    pol = PREFETCH.create("next-model")
    groups = [group({"c"}, 1.0, 5 * GB), group({"d"}, 3.0, 5 * GB), group({"e"}, 0.5, 5 * GB, queued=True)]
    # a (value 4) may displace c and d; e has queued requests
    choice = pol.choose([cand("a", 4.0, 12 * GB), cand("b", 2.0, 1 * GB)], 2 * GB, groups)
    assert choice is not None and choice.model == "a"
    assert choice.evictable == {frozenset({"c"}), frozenset({"d"})}
    # too big for a: free + c + d = 12 GB < 13 GB; b (value 2) may displace c only
    choice = pol.choose([cand("a", 4.0, 13 * GB), cand("b", 2.0, 6 * GB)], 2 * GB, groups)
    assert choice is not None and choice.model == "b" and choice.evictable == {frozenset({"c"})}
    # equal value is not below; nothing fits
    assert pol.choose([cand("b", 1.0, 6 * GB)], 2 * GB, groups) is None
    # no value, nothing missing, queued requests: never a candidate
    assert pol.choose([cand("a", 0.0, GB), cand("b", 5.0, 0), cand("f", 5.0, GB, queued=True)], 100 * GB, []) is None
    # ties by name
    assert pol.choose([cand("z", 1.0, GB), cand("y", 1.0, GB)], 10 * GB, []).model == "y"


def test_next_model_skips_models_homed_elsewhere_and_never_displaces_their_own_units() -> None:
    pol = PREFETCH.create("next-model")
    cands = [cand("a", 4.0, GB, home=False), cand("b", 2.0, GB, home=True)]
    assert pol.choose(cands, 10 * GB, []).model == "b"
    assert PREFETCH.create("next-model", home_only=False).choose(cands, 10 * GB, []).model == "a"
    assert pol.choose([cand("a", 4.0, GB, home=None)], 10 * GB, []).model == "a"  # no homes: all count
    shared = [group({"a", "x"}, 0.1, 5 * GB)]  # a unit a shares with x is a's too
    assert pol.choose([cand("a", 4.0, 6 * GB)], 2 * GB, shared) is None


def test_evict_below_limits_what_a_prefetch_displaces() -> None:
    groups = [group({"c"}, 1.0, 5 * GB), group({"d"}, 3.0, 5 * GB)]
    half = PREFETCH.create("next-model", evict_below=0.5).choose([cand("a", 4.0, 3 * GB)], GB, groups)
    assert half.evictable == {frozenset({"c"})}
    assert PREFETCH.create("next-model", evict_below=0).choose([cand("a", 4.0, 3 * GB)], GB, groups) is None
    assert PREFETCH.create("none").choose([cand("a", 4.0, GB)], 10 * GB, []) is None


def test_values_are_decayed_rates_times_sensitivity() -> None:
    pol = PREFETCH.create("next-model", half_life_s=10.0, sensitivity={"b": 2.0})
    assert pol.value("a", 0.0) == 0.0
    pol.observe("a", 0.0)
    pol.observe("b", 0.0)
    assert pol.value("a", 0.0) == pytest.approx(math.log(2) / 10)
    assert pol.value("a", 10.0) == pytest.approx(pol.value("a", 0.0) / 2)
    assert pol.value("b", 10.0) == pytest.approx(2 * pol.value("a", 10.0))


@pytest.mark.parametrize("params, problem", [
    ({"half_life_s": 0}, "half_life_s must be a positive number"),
    ({"home_only": "yes"}, "home_only must be true or false"),
    ({"evict_below": 1.5}, "evict_below must be a number in [0, 1]"),
    ({"sensitivity": {"a": -1}}, "sensitivity of 'a'"),
    ({"bogus": 1}, "bad parameters for prefetch policy 'next-model'"),
])
def test_prefetch_parameters_are_checked_at_config_time(params: dict, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        make_system("s", "tangram", {"prefetch": "next-model", "prefetch_params": params}, where="systems.3")
    msg = str(err.value)
    assert msg.startswith("systems.3.overrides.prefetch_params: ") and problem in msg and "\n" not in msg


def test_prefetch_names_and_their_conflicts_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"^systems\.1\.prefetch: unknown prefetch policy 'soon'; expected one "
                                          r"of: next-model, none$"):
        make_system("s", "tangram", {"prefetch": "soon"}, where="systems.1")
    with pytest.raises(ConfigError, match=r"^systems\.0\.overrides\.prefetch: expected str, got 3$"):
        make_system("s", "tangram", {"prefetch": 3}, where="systems.0")
    with pytest.raises(ConfigError, match=r"^systems\.0\.overrides\.prefetch: 'next-model' needs a retention "):
        make_system("s", "serverlessllm", {"prefetch": "next-model"}, where="systems.0")
    assert make_system("s", "tangram").prefetch == "none"
    # through an experiment file's validation, with the same one-line message
    raw, base = load_yaml(ROOT / "experiments" / "quickstart.yaml")
    raw["systems"][1]["overrides"] = {"prefetch": "next-model", "prefetch_params": {"half_life_s": -1}}
    with pytest.raises(ConfigError, match=r"^systems\.1\.overrides\.prefetch_params: prefetch parameter "):
        prepare(raw, base)


# ------------------------------------------------------------------ cancellable transfers


def test_a_cancelled_transfer_leaves_its_link_at_once_and_returns_the_bytes_it_moved() -> None:
    env = simpy.Environment()
    fabric = Fabric(env)
    link = Link("pcie", 100.0)
    a = fabric.transfer(1000, (link,))
    b = fabric.transfer(1000, (link,))
    moved: list[float | None] = []
    env.process(_cancel_at(env, fabric, b, 4.0, moved))
    finished: list[float] = []
    a.callbacks.append(lambda _ev: finished.append(env.now))
    env.run()
    assert moved == [pytest.approx(200.0)]  # 4 s at half the link
    assert a.triggered and not b.triggered
    assert finished == [pytest.approx(4.0 + 800 / 100)]  # a has the whole link after the cancel
    assert link.active == 0 and link.bytes_moved == pytest.approx(1200.0)
    assert fabric.cancel(a) is None  # finished: nothing to cancel
    # cancelling the only flow leaves a stale timer that must be ignored
    env2 = simpy.Environment()
    fabric2 = Fabric(env2)
    c = fabric2.transfer(1000, (Link("x", 100.0),))
    moved2: list[float | None] = []
    env2.process(_cancel_at(env2, fabric2, c, 1.0, moved2))
    env2.run()
    assert moved2 == [pytest.approx(100.0)] and not c.triggered  # (its stale timer fired, ignored)


def _cancel_at(env: simpy.Environment, fabric: Fabric, done: simpy.Event, at: float, out: list):
    yield env.timeout(at)
    out.append(fabric.cancel(done))


# ------------------------------------------------------------------ the lifecycle


def _events(res) -> list[tuple[float, int, str, int, str]]:
    return [e for e in res.events if e[2].startswith("prefetch") or e[2] in ("cold_start", "loaded")]


def test_a_prefetch_in_flight_never_delays_the_cold_start_that_cancels_it() -> None:
    # One 20 GiB GPU, whole-model units: llama (requested twice) is evicted by qwen's cold start, then
    # prefetched back over qwen once qwen's keep-alive ends; a request for llama arrives mid-transfer.
    ms = models(["llama-3-8b", "qwen2.5-3b"])
    cl = cluster(1, 20)
    base = [(0.0, "llama-3-8b", 100, 10), (10.0, "llama-3-8b", 100, 10), (20.0, "qwen2.5-3b", 100, 10)]
    probe = simulate(ms, trace(base), cl, system(granularity="model"), record_events=True)
    starts = [e[0] for e in probe.events if e[2] == "prefetch_unit"]
    assert len(starts) == 1 and starts[0] > 20.0  # llama's single unit, over qwen
    llama = get_model("llama-3-8b").weight_bytes
    arrival = starts[0] + 0.5 * llama / cl.gpu.pcie_bps  # half way through its transfer
    rows = [*base, (arrival, "llama-3-8b", 100, 10)]
    on = simulate(ms, trace(rows), cl, system(granularity="model"), record_events=True)
    off = simulate(ms, trace(rows), cl, system("none", granularity="model"), record_events=True)
    cancelled = [e for e in on.events if e[2] == "prefetch_cancelled"]
    assert len(cancelled) == 1 and cancelled[0][0] == arrival
    moved = int(cancelled[0][4].split("moved=")[1])
    assert moved == pytest.approx(llama / 2, rel=1e-6)
    a, b = on.requests.iloc[3], off.requests.iloc[3]
    assert a.cold and b.cold
    for col in ("queue_s", "startup_s", "load_s", "ttft_s", "e2e_s", "bytes_needed", "bytes_loaded"):
        assert a[col] == b[col], col
    on_start = [e[0] for e in on.events if e[2] == "cold_start" and e[3] == 3]
    off_start = [e[0] for e in off.events if e[2] == "cold_start" and e[3] == 3]
    on_end = [e[0] for e in on.events if e[2] == "loaded" and e[3] == 3]
    off_end = [e[0] for e in off.events if e[2] == "loaded" and e[3] == 3]
    assert on_start == off_start == [arrival] and on_end == off_end
    s = on.summary
    assert s["prefetch_cancelled_bytes"] == moved == s["prefetch_wasted_bytes"] and s["prefetched_bytes"] == 0


def test_prefetch_transfers_never_overlap_a_cold_start_on_their_gpu() -> None:
    res = simulate(models(), gapped_workload(200, gap_s=1.0), cluster(2, 20), system(), record_events=True)
    assert res.summary["prefetched_bytes"] > 0 and res.summary["prefetch_cancelled_bytes"] > 0
    busy: dict[int, float | None] = {}  # GPU -> start of its cold start in progress
    inflight: dict[int, bool] = {}
    for t, gpu, kind, _rid, _detail in res.events:
        if kind == "cold_start":
            assert not inflight.get(gpu), f"gpu {gpu}: cold start at {t} while a prefetch transfer runs"
            busy[gpu] = t
        elif kind == "loaded":
            busy[gpu] = None
        elif kind == "prefetch_unit":
            assert busy.get(gpu) is None, f"gpu {gpu}: prefetch at {t} during a cold start"
            inflight[gpu] = True
        elif kind in ("prefetch_loaded", "prefetch_cancelled"):
            inflight[gpu] = False


def test_prefetch_displaces_only_less_valuable_unpinned_units_of_models_with_nothing_queued(monkeypatch) -> None:
    seen = {"evicted": 0, "pinned_present": 0, "started": 0}
    original_evict = prefetch_module.Prefetcher._evict
    original_log = prefetch_module.Prefetcher._log

    def evict(self, model: str, keys) -> None:
        w = self.worker
        now = w.cluster.env.now
        target = self.policy.value(model, now)
        if any(r.pin_count for r in w.arena.regions()):
            seen["pinned_present"] += 1
        for key in keys:
            region = w.arena.lookup(key)
            assert region.state is State.RESIDENT and region.pin_count == 0
            assert model not in region.owners
            assert not any(w.queued_for(m) for m in region.owners)
            assert sum(self.policy.value(m, now) for m in sorted(region.owners)) < target
            seen["evicted"] += 1
        original_evict(self, model, keys)

    def log(self, kind: str, detail: str) -> None:
        if kind == "prefetch_start":  # only home models, with a home-affinity scheduler
            seen["started"] += 1
            assert self.worker.gpu_id in self.worker.cluster.scheduler.home_of(detail)
            assert not self.worker.queued
        original_log(self, kind, detail)

    monkeypatch.setattr(prefetch_module.Prefetcher, "_evict", evict)
    monkeypatch.setattr(prefetch_module.Prefetcher, "_log", log)
    res = simulate(models(), gapped_workload(200, gap_s=4.0), cluster(1, 30),
                   system(scheduler="home-affinity", keep_alive_s=30.0), record_events=True)
    assert seen["evicted"] > 0 and seen["pinned_present"] > 0 and seen["started"] > 0
    assert res.summary["prefetched_bytes"] > 0


def test_prefetch_loads_fewer_cold_start_bytes_and_accounts_for_every_prefetched_byte(tmp_path: Path) -> None:
    ms, tr, cl = models(), gapped_workload(), cluster(2, 20)
    off = simulate(ms, tr, cl, system("none")).summary
    res = simulate(ms, tr, cl, system())
    on = res.summary
    assert not set(PREFETCH_COLUMNS) & set(off) and "io_reduction_with_prefetch" not in off
    assert on["bytes_loaded"] < 0.95 * off["bytes_loaded"] and on["mean_load_s"] < off["mean_load_s"]
    assert on["prefetched_bytes"] > 0 and on["prefetch_used_bytes"] > 0
    assert on["prefetched_bytes"] == (on["prefetch_used_bytes"] + on["prefetch_wasted_bytes"]
                                      - on["prefetch_cancelled_bytes"] + on["prefetch_resident_bytes"])
    r = res.requests
    assert ((r["bytes_loaded"] + r["bytes_reused"]) == r["bytes_needed"]).all()
    # every byte that crossed PCIe, against the unlimited-memory bound (io_reduction alone may pass it)
    crossed = on["bytes_loaded"] + on["prefetched_bytes"] + on["prefetch_cancelled_bytes"]
    assert on["io_reduction_with_prefetch"] == pytest.approx(1 - crossed / on["bytes_needed"], rel=1e-12)
    assert on["io_reduction_with_prefetch"] <= on["io_reduction_bound"] < 1
    # same seed, same results; streamed, the same numbers
    again = simulate(ms, tr, cl, system())
    assert json.dumps(again.summary, sort_keys=True) == json.dumps(on, sort_keys=True)
    pd.testing.assert_frame_equal(again.requests, r)
    streamed = simulate(ms, tr, cl, system(), requests_path=tmp_path / "r.parquet")
    assert streamed.summary == on


def test_the_modelled_device_prefetches_only_from_the_nodes_dram_cache() -> None:
    res = simulate(models(["llama-3-8b", "qwen2.5-3b"]), trace([(0.0, "qwen2.5-3b", 10, 2)]),
                   ClusterSpec(1, 1, gpu_spec("a100-80gb"), TierSpec(host_cache_bytes=1)),
                   system(), record_events=True)
    assert not [e for e in res.events if e[2] == "prefetch_unit"]  # nothing in DRAM: nothing prefetched


# ------------------------------------------------------------------ presets unchanged

FLOAT_TOL = 1e-5  # summary.csv keeps 6 significant digits


@pytest.mark.parametrize("name", ["overall-azure", "overall-servegen"])
def test_presets_without_prefetch_reproduce_their_committed_results(name: str) -> None:
    raw, base = load_yaml(ROOT / "experiments" / f"{name}.yaml")
    committed = pd.read_csv(ROOT / "results" / name / "summary.csv").set_index("system")
    _, points = prepare(raw, base)
    config = points[0]["config"]
    for i, s in enumerate(config["systems"]):
        summary = run_job(Job(0, i, config, str(base))).summary
        assert not set(PREFETCH_COLUMNS) & set(summary)
        row = committed.loc[s["name"]]
        for col, want in row.items():
            if col == "point":
                continue
            got = summary[col]
            if isinstance(got, int):
                assert got == want, (s["name"], col)
            else:
                assert got == pytest.approx(want, rel=FLOAT_TOL, abs=1e-12), (s["name"], col)


# ------------------------------------------------------------------ the real device


@pytest.fixture(scope="module")
def real_ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict:
    pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    from tangram_sim.real.checkpoints import make_checkpoints
    from tangram_sim.real.loader import open_checkpoint

    written = make_checkpoints(["llama-3-8b", "qwen2.5-3b"], tmp_path_factory.mktemp("pf-ckpts"), "tiny",
                               dtype="float32")
    return {w.name: open_checkpoint(w.path) for w in written}


def test_a_real_replay_prefetches_during_idle_gaps_and_accounts_for_it(real_ckpts: dict) -> None:
    from tangram_sim.real.replay import replay_trace

    # llama (asked twice) is displaced by qwen, then read back while the GPU idles, before it is asked again
    t = trace([(0.0, "llama-3-8b", 20, 3), (0.05, "llama-3-8b", 10, 2), (0.2, "qwen2.5-3b", 10, 2),
               (0.8, "llama-3-8b", 10, 2)])
    cap = int(max(c.spec.weight_bytes for c in real_ckpts.values()) * 1.3)
    results = {}
    for pf in ("none", "next-model"):
        sys_ = make_system(pf, "tangram", {"keep_alive_s": 0.02, "retention": "model-value", "prefetch": pf})
        results[pf] = replay_trace(real_ckpts, t, sys_, capacity=cap, threads=1)
    off, on = results["none"], results["next-model"]
    assert off.requests.loc[3, "bytes_loaded"] > 0 and on.requests.loc[3, "bytes_loaded"] == 0
    s = on.summary
    assert s["prefetched_bytes"] == s["prefetch_used_bytes"] == off.requests.loc[3, "bytes_loaded"]
    assert s["prefetch_wasted_bytes"] == s["prefetch_resident_bytes"] == 0
    assert (on.steps["kind"] == "prefetch").sum() > 0 and "prefetch_wait_max_s" in s
    assert "prefetch_wait_max_s" not in off.summary and not (off.steps["kind"] == "prefetch").any()


def test_a_real_prefetch_read_cancelled_before_it_begins_is_skipped(real_ckpts: dict) -> None:
    import threading

    from tangram_sim.arena import ARENA_ALIGNMENT
    from tangram_sim.core.clock import WallClockEnvironment
    from tangram_sim.real.backend import BackendSpec, model_layouts
    from tangram_sim.real.device import RealDevice

    env = WallClockEnvironment()
    cap = 4 * 2**20
    spec = BackendSpec("cpu", cap, ARENA_ALIGNMENT, {m: str(c.path) for m, c in real_ckpts.items()}, "group",
                       8 * 2**20, 0, 16, {"readers": 1, "chunk_bytes": 2**20, "staging": "never"})
    dev = RealDevice(env, 0, spec, real_ckpts, {})
    try:
        lay = model_layouts(spec, real_ckpts["qwen2.5-3b"])[0]
        key, nbytes = lay.unit.key, lay.unit.nbytes
        assert dev.prefetch_source(None, key)  # type: ignore[arg-type]
        dev.arena.allocate(key, nbytes)
        gate = threading.Event()
        dev.thread.submit(gate.wait)  # the device's thread is busy: the read cannot begin
        done, cancel = dev.prefetch_unit(key, nbytes)
        assert cancel() == 0.0
        gate.set()
        env.run(until=done)
        assert done.value is None and dev.prefetches_submitted == dev.prefetches_finished == 1
        assert not dev.steps  # nothing was read
    finally:
        dev.close()

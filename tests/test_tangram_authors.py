"""The `tangram` preset as the authors' implementation runs it (docs/tangram-authors.md): their store's
reuse units, per-GPU access counts bumped by every request, cost order with ties by address, eviction
until enough free bytes, and the experiment keys that express their simulator's constants."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import tangram_sim.sim.simulate as simulate_module
from tangram_sim.arena import Arena, State
from tangram_sim.core.records import build_entries
from tangram_sim.errors import ConfigError
from tangram_sim.experiments.config import build_calibration, validate
from tangram_sim.models import ModelSpec, build_units, derive_model, get_model, share_patterns_first_layers
from tangram_sim.models.spec import TensorSpec, tensor_block, tensor_fingerprint
from tangram_sim.policies.packing import PACKING
from tangram_sim.policies.retention import RETENTION, TangramRetention
from tangram_sim.sim.hardware import TierSpec, gpu_spec
from tangram_sim.sim.simulate import ClusterSpec, ModelChoice, simulate
from tangram_sim.sim.systems import PRESETS, make_system
from tangram_sim.sim.timemodel import Calibration, ModelCoefficients

MiB = 2**20
CATALOG = ["qwen2.5-3b", "phi-3-mini-4k", "llama-3-8b", "yi-9b", "qwen2.5-14b", "gpt-neox-20b", "llava-1.5-7b"]


def toy(sizes: list[int], per_block: int = 2) -> ModelSpec:
    """A model whose tensors have these byte sizes, `per_block` tensors per layer."""
    tensors = []
    for i, n in enumerate(sizes):
        name = f"model.layers.{i // per_block}.t{i % per_block}.weight"
        tensors.append(TensorSpec(name, (n,), "U8", n, tensor_fingerprint("toy", name, "U8", (n,))))
    return ModelSpec("toy", "llama", tuple(tensors), "U8", None, "test")


def checkpoint_groups(model: ModelSpec, group_bytes: int) -> list[list[int]]:
    """The authors' checkpoint tensor groups: tensors in order until a group holds >= group_bytes."""
    groups, current, size = [], [], 0
    for i, t in enumerate(model.tensors):
        current.append(i)
        size += t.nbytes
        if size >= group_bytes:
            groups.append(current)
            current, size = [], 0
    if current:
        groups.append(current)
    return groups


def check_units(model: ModelSpec, divisor: int, group_bytes: int = 8 * MiB) -> None:
    units = build_units(model, "group", group_bytes, divisor)
    flat = [i for u in units for i in u.tensor_indices]
    assert flat == list(range(model.num_tensors))  # every tensor once, in order
    assert sum(u.nbytes for u in units) == model.weight_bytes
    minimum = model.weight_bytes // divisor
    assert all(u.nbytes >= minimum for u in units)
    if minimum:
        assert len(units) <= model.weight_bytes // minimum
    # units end where the checkpoint's groups end: the store merges groups, never splits them (a model
    # under divisor x group_bytes is cut into groups of its share instead)
    ends = {g[-1] for g in checkpoint_groups(model, min(group_bytes, minimum))}
    assert {u.tensor_indices[-1] for u in units} <= ends


# ------------------------------------------------------------------ units
def test_store_rule_merges_checkpoint_groups_across_layers() -> None:
    # checkpoint groups of >= 5 bytes: [6] [3 6] [3 6] [3] (the short last group stays);
    # merged to >= 27 // 3 = 9: [6 + 3 6] [3 6] and the short tail [3] joins the unit before it
    model = toy([6, 3, 6, 3, 6, 3])
    units = build_units(model, "group", min_unit_bytes=5, unit_divisor=3)
    assert [u.tensor_indices for u in units] == [(0, 1, 2), (3, 4, 5)]
    assert [u.nbytes for u in units] == [15, 12]
    blocks = {tensor_block(model.tensors[i].name) for i in units[0].tensor_indices}
    assert len(blocks) == 2  # unlike block groups, a unit spans layers
    # a model under divisor x group size: groups of its share (9) instead, so ~divisor units
    assert [u.tensor_indices for u in build_units(model, "group", min_unit_bytes=50, unit_divisor=3)] == [
        (0, 1), (2, 3), (4, 5)]
    # block groups of >= 9 bytes cut the same tensors at every layer instead
    assert [u.tensor_indices for u in build_units(model, "group", min_unit_bytes=9)] == [(0, 1), (2, 3), (4, 5)]


@pytest.mark.parametrize("name", CATALOG)
@pytest.mark.parametrize("divisor", [1, 10, 40, 1000])
def test_store_units_of_catalog_models(name: str, divisor: int) -> None:
    model = get_model(name)
    check_units(model, divisor)
    if divisor == 40:
        assert 30 <= len(build_units(model, "group", 8 * MiB, 40)) <= 40
    if divisor == 1:
        assert len(build_units(model, "group", 8 * MiB, 1)) == 1


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 1000), min_size=1, max_size=60),
    group_bytes=st.integers(1, 2000),
    divisor=st.integers(1, 100),
)
def test_store_units_of_random_models(sizes: list[int], group_bytes: int, divisor: int) -> None:
    check_units(toy(sizes, per_block=3), divisor, group_bytes)


@pytest.mark.parametrize("name", ["llama-3-8b", "llava-1.5-7b", "qwen2.5-3b"])
@pytest.mark.parametrize("share", [0.25, 0.5, 0.9])
def test_fine_tune_shares_store_units_made_only_of_shared_tensors(name: str, share: float) -> None:
    base = get_model(name)
    tuned = derive_model(base, f"{name}-ft", share_patterns_first_layers(base, share))
    base_units = build_units(base, "group", 8 * MiB, 40)
    tuned_units = build_units(tuned, "group", 8 * MiB, 40)
    # sizes alone place the boundaries, and a fine-tune keeps every size
    assert [u.tensor_indices for u in base_units] == [u.tensor_indices for u in tuned_units]
    shared_keys = 0
    for b, t in zip(base_units, tuned_units):
        all_shared = all(base.tensors[i].fingerprint == tuned.tensors[i].fingerprint for i in b.tensor_indices)
        assert (b.key == t.key) == all_shared
        shared_keys += all_shared
    assert 0 < shared_keys < len(base_units)


def test_presets_units() -> None:
    models = {n: (get_model(n), 1.0, 1) for n in ("llama-3-8b", "qwen2.5-3b")}

    def keys(preset: str) -> dict[str, tuple[str, ...]]:
        entries = build_entries(models, make_system(preset, preset), 256)
        return {n: tuple(u.key for u in e.units) for n, e in entries.items()}

    tangram = keys("tangram")
    assert make_system("t", "tangram").unit_divisor == 40
    assert all(30 <= len(k) <= 40 for k in tangram.values())
    eight = make_system("t", "tangram-8mib")
    assert (eight.unit_divisor, eight.min_unit_bytes, eight.granularity) == (0, 8 * MiB, "group")
    assert keys("tangram-8mib")["llama-3-8b"] == tuple(u.key for u in build_units(get_model("llama-3-8b"), "group"))
    for stage in ("tensor-reuse", "tensor-reuse+elastic-kv", "tensor-reuse+elastic-kv+affinity"):
        assert keys(stage) == tangram, stage  # the breakdown adds one idea per stage, same units
    assert {k: v for k, v in PRESETS["tangram-8mib"].items() if k not in ("min_unit_bytes", "unit_divisor")} == {
        k: v for k, v in PRESETS["tangram"].items() if k != "unit_divisor"
    }


# ------------------------------------------------------------------ retention
def region(arena: Arena, key: str, offset: int, size: int, owner: str) -> None:
    arena.place(key, offset, size, State.LOADING, owners=[owner])
    arena.finish_load(key)


def test_cost_order_and_ties_by_address() -> None:
    pol = RETENTION.create("tangram", host_to_gpu_bps=20e9)
    for model in ("a", "b", "b", "c", "c"):
        pol.record_access(model, [], 0.0)
    arena = Arena(64 * 256, alignment=256)
    region(arena, "b-late", 40 * 256, 256, "b")
    region(arena, "c-big", 20 * 256, 2 * 256, "c")
    region(arena, "a0", 10 * 256, 256, "a")
    region(arena, "c-early", 5 * 256, 256, "c")
    region(arena, "d0", 30 * 256, 4 * 256, "d")  # never requested on this GPU: worth nothing
    region(arena, "a-big", 50 * 256, 2 * 256, "a")
    # cost = size / bandwidth x count / total: d0 0 < a0 1 < a-big 2 = b, c 2 (ties by address) < c-big 4
    assert pol.eviction_order(arena.evictable(), 1.0) == ["d0", "a0", "c-early", "b-late", "a-big", "c-big"]
    assert pol.value(arena.lookup("c-big"), 1.0) == pytest.approx(2 * 256 / 20e9 * 2 / 5)


def policies_of_run(monkeypatch: pytest.MonkeyPatch) -> list[TangramRetention]:
    """Catch the retention policies the next `simulate` makes (one per GPU, in GPU order)."""
    made: list[TangramRetention] = []
    real = simulate_module.build_policies

    def recording(*args: object, **kwargs: object) -> object:
        policies = real(*args, **kwargs)
        make = policies.make_retention

        def make_and_keep() -> object:
            pol = make()
            made.append(pol)
            return pol

        policies.make_retention = make_and_keep
        return policies

    monkeypatch.setattr(simulate_module, "build_policies", recording)
    return made


def test_access_counts_are_per_gpu_and_every_request_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    llama, qwen = get_model("llama-3-8b"), get_model("qwen2.5-3b")
    models = {"llama-3-8b": ModelChoice(llama), "qwen2.5-3b": ModelChoice(qwen)}
    rows = [
        (0.0, "llama-3-8b", 64, 4), (0.01, "llama-3-8b", 64, 4),  # the second joins the running instance
        (0.02, "qwen2.5-3b", 64, 4),  # the other GPU
        (30.0, "llama-3-8b", 64, 4),  # after the keep-alive: a cold start that loads nothing (full hit)
        (60.0, "qwen2.5-3b", 64, 4),
    ]
    trace = pd.DataFrame(rows, columns=["arrival_s", "model", "input_tokens", "output_tokens"])
    cluster = ClusterSpec(1, 2, gpu_spec("a100-80gb", memory_gib=40), TierSpec())
    made = policies_of_run(monkeypatch)
    res = simulate(models, trace, cluster, make_system("t", "tangram", {"keep_alive_s": 1.0}))
    r = res.requests
    assert not r.loc[1, "cold"] and r.loc[3, "cold"] and r.loc[3, "bytes_loaded"] == 0
    per_gpu = made  # one policy per GPU, GPU 0 first
    assert len(per_gpu) == 2 and all(isinstance(pol, TangramRetention) for pol in per_gpu)
    for gpu, pol in enumerate(per_gpu):
        served = r[r["gpu"] == gpu]["model"].value_counts().to_dict()
        assert pol.counts == served and pol.total == sum(served.values())
    assert sorted(pol.total for pol in per_gpu) == [2, 3]


def test_eviction_stops_at_enough_free_bytes_then_compacts() -> None:
    # blocks: u1 u1 u1 . . u2 u2 . . u3 u3 u3 u4 u4; the new unit needs 6, 4 are free. The cheapest
    # unit goes until the free total is enough (not until one hole is), then pbp compacts: 2 + 2 + 2
    # scattered blocks, and no second eviction
    A = 256
    arena = Arena(14 * A, alignment=A)
    for key, start, size in [("u1", 0, 3), ("u2", 5, 2), ("u3", 9, 3), ("u4", 12, 2)]:
        region(arena, key, start * A, size * A, "old")
    plan = PACKING.create("pbp").plan(arena, [("new", 6 * A)], ["u4", "u2", "u1", "u3"])
    assert plan is not None
    assert plan.evictions == ["u4"]
    assert plan.extra_evicted_bytes == 0 and plan.moved_bytes > 0


# ------------------------------------------------------------------ configuration
def small(**cluster: object) -> dict:
    return {
        "name": "t",
        "cluster": {"gpus_per_node": 1, "gpu_memory_gib": 40, **cluster},
        "models": [{"name": "qwen2.5-3b"}, {"name": "llama-3-8b"}],
        "trace": {"kind": "synthetic", "n_requests": 5, "rate": 1.0},
        "systems": [{"name": "tangram", "preset": "tangram"}],
    }


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"unit_divisor": -1}, "systems.0.overrides.unit_divisor: expected an integer >= 0, got -1"),
        ({"unit_divisor": 2.5}, "systems.0.overrides.unit_divisor: expected int, got 2.5"),
        ({"unit_divisor": True}, "systems.0.overrides.unit_divisor: expected int, got True"),
        ({"unit_divisor": "40"}, "systems.0.overrides.unit_divisor: expected int, got '40'"),
    ],
)
def test_unit_divisor_validation(overrides: dict, message: str) -> None:
    raw = small()
    raw["systems"][0]["overrides"] = overrides
    with pytest.raises(ConfigError) as err:
        validate(raw, None)
    assert str(err.value) == message


def test_unit_divisor_zero_and_other_granularities_are_accepted() -> None:
    assert make_system("t", "tangram", {"unit_divisor": 0}).unit_divisor == 0
    # ignored at model and tensor granularity, as min_unit_bytes is
    assert make_system("t", "tangram", {"granularity": "model"}).unit_divisor == 40


@pytest.mark.parametrize(
    ("time_model", "message"),
    [
        ({"prefill_base_s": 0.02}, "cluster.time_model.decode_base_s: required, expected a number > 0"),
        ({"decode_base_s": 0}, "cluster.time_model.decode_base_s: expected a positive value, got 0"),
        ({"decode_base_s": 0.002, "prefill_per_token_s": -1},
         "cluster.time_model.prefill_per_token_s: expected a number >= 0, got -1"),
        ({"decode_base_s": 0.002, "prefill_s": 1}, "cluster.time_model.prefill_s: unknown key"),
        ([0.002], "cluster.time_model: expected a mapping, got list"),
    ],
)
def test_time_model_validation(time_model: object, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate(small(time_model=time_model), None)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_time_model_gives_every_model_its_coefficients(tmp_path: Path) -> None:
    config = validate(small(time_model={"prefill_base_s": 0.02, "prefill_per_token_s": 2e-5, "decode_base_s": 0.002}),
                      None)
    cal = build_calibration(config)
    want = ModelCoefficients(0.02, 2e-5, 0.002, 0.0, 0.0)
    assert cal.models == {"qwen2.5-3b": want, "llama-3-8b": want}
    assert cal.h2d_bps is None and cal.engine_overhead_s is None  # the system's and the GPU's stay
    assert build_calibration(validate(small(), None)) is None
    assert "time_model" not in validate(small(), None)["cluster"]  # older configs keep their hash
    # a calibration file's measured coefficients win for the models it lists
    path = tmp_path / "cal.yaml"
    measured = {"prefill_base_s": 0.1, "prefill_per_token_s": 0.0, "decode_base_s": 0.01}
    path.write_text(yaml.safe_dump({"device": "x", "h2d_bps": 1e9, "models": {"llama-3-8b": measured}}))
    raw = small(time_model={"decode_base_s": 0.002})
    raw["calibration"] = str(path)
    cal = build_calibration(validate(raw, None))
    assert cal.h2d_bps == 1e9
    assert cal.models["llama-3-8b"] == ModelCoefficients(**measured)
    assert cal.models["qwen2.5-3b"] == ModelCoefficients(0.0, 0.0, 0.002)
    assert Calibration.load(path).models["llama-3-8b"] == ModelCoefficients(**measured)


def test_authors_constants_in_a_simulation() -> None:
    """Load 20 GB/s, no instance start cost, prefill 20 ms + 0.02 ms/token, decode 2 ms/token."""
    config = validate(small(
        gpu_overrides={"pcie_bps": 20e9}, tiers={"ssd_gbps": 1000},
        time_model={"prefill_base_s": 0.02, "prefill_per_token_s": 2e-5, "decode_base_s": 0.002},
    ), None)
    cal = build_calibration(config)
    llama = get_model("llama-3-8b")
    trace = pd.DataFrame([(0.0, "llama-3-8b", 1000, 11)], columns=["arrival_s", "model", "input_tokens",
                                                                  "output_tokens"])
    cluster = ClusterSpec(1, 1, gpu_spec("a100-80gb", {"pcie_bps": 20e9}, 40), TierSpec(ssd_bps=1e12))
    system = make_system("t", "tangram", {"engine_overhead_s": 0.0, "max_batch": 1, "prefill_batch": 1})
    row = simulate({"llama-3-8b": ModelChoice(llama)}, trace, cluster, system, calibration=cal).requests.iloc[0]
    load = llama.weight_bytes / 20e9
    assert row.load_s == pytest.approx(load, rel=1e-3)
    assert row.ttft_s == pytest.approx(load + 0.02 + 1000 * 2e-5, rel=1e-3)
    assert row.e2e_s - row.ttft_s == pytest.approx(10 * 0.002, rel=1e-6)

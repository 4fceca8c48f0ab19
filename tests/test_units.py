"""Reuse units: coverage, block purity, grouping rule and key sharing between base and fine-tune."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tangram_sim.errors import ConfigError
from tangram_sim.models import (
    ModelSpec,
    ReuseUnit,
    build_units,
    derive_model,
    get_model,
    share_patterns_first_layers,
)
from tangram_sim.models.spec import TensorSpec, tensor_block, tensor_fingerprint

MiB = 2**20


def check_cover(model: ModelSpec, units: tuple[ReuseUnit, ...]) -> None:
    flat = [i for u in units for i in u.tensor_indices]
    assert flat == list(range(model.num_tensors))
    assert sum(u.nbytes for u in units) == model.weight_bytes
    for u in units:
        assert u.nbytes == sum(model.tensors[i].nbytes for i in u.tensor_indices)
        assert list(u.tensor_indices) == list(range(u.tensor_indices[0], u.tensor_indices[-1] + 1))


@pytest.mark.parametrize("name", ["llama-3-8b", "qwen2.5-3b", "gpt-neox-20b", "llava-1.5-7b", "opt-6.7b"])
@pytest.mark.parametrize("granularity", ["model", "group", "tensor"])
def test_units_cover_every_tensor_once(name: str, granularity: str) -> None:
    model = get_model(name)
    units = build_units(model, granularity)
    check_cover(model, units)
    if granularity == "model":
        assert len(units) == 1
    if granularity == "tensor":
        assert len(units) == model.num_tensors
    assert len({u.key for u in units}) == len(units)


def test_groups_stay_in_blocks_and_reach_min_size() -> None:
    model = get_model("llama-3-8b")
    units = build_units(model, "group", min_unit_bytes=64 * MiB)
    for u in units:
        blocks = {tensor_block(model.tensors[i].name) for i in u.tensor_indices}
        assert len(blocks) == 1
    # Layer: ln(8K) q(32M) k(8M) v(8M) o(32M) | ln(8K) gate(112M) | up(112M) | down(112M)
    layer0 = [u for u in units if tensor_block(model.tensors[u.tensor_indices[0]].name) == "model.layers.0"]
    assert [len(u.tensor_indices) for u in layer0] == [5, 2, 1, 1]
    assert [u.nbytes for u in layer0] == [80 * MiB + 8192, 112 * MiB + 8192, 112 * MiB, 112 * MiB]
    # head block: final norm (8 KiB) + lm_head in one unit
    assert len(units[-1].tensor_indices) == 2


def test_small_tail_merges_into_previous_group() -> None:
    tensors = tuple(
        TensorSpec(name, (n,), "U8", n, tensor_fingerprint("t", name, "U8", (n,)))
        for name, n in [
            ("model.embed_tokens.weight", 100),
            ("model.layers.0.a.weight", 60),
            ("model.layers.0.b.weight", 50),
            ("model.layers.0.c.weight", 70),
            ("model.layers.0.d.weight", 10),
            ("model.layers.1.a.weight", 60),
            ("model.layers.1.b.weight", 50),
            ("model.layers.1.c.weight", 70),
            ("model.layers.1.d.weight", 40),
            ("model.layers.2.a.weight", 30),
            ("model.norm.weight", 5),
        ]
    )
    model = ModelSpec("toy", "llama", tensors, "U8", None, "test")
    units = build_units(model, "group", min_unit_bytes=100)
    # layer 0: the 80-byte tail joins the previous group; layer 1: two full groups;
    # layer 2 and the norm are smaller than the minimum but never merge across blocks.
    assert [u.tensor_indices for u in units] == [(0,), (1, 2, 3, 4), (5, 6), (7, 8), (9,), (10,)]
    assert [u.nbytes for u in units] == [100, 190, 110, 110, 30, 5]


def test_unit_divisor_gives_units_of_at_least_a_share_of_the_model() -> None:
    model = get_model("llama-3-8b")
    units = build_units(model, "group", unit_divisor=32)
    check_cover(model, units)
    assert all(u.nbytes >= model.weight_bytes // 32 for u in units)
    assert 25 <= len(units) <= 32  # merging crosses blocks, so close to the divisor
    # a divisor so large that the minimum is below the checkpoint's 8 MiB groups: those groups stay
    assert build_units(model, "group", unit_divisor=10**9) == build_units(model, "group", 8 * MiB, 2**62)


def test_bad_parameters() -> None:
    model = get_model("llama-3-8b")
    with pytest.raises(ConfigError, match="granularity 'layer'"):
        build_units(model, "layer")
    with pytest.raises(ConfigError, match="min_unit_bytes"):
        build_units(model, "group", min_unit_bytes=0)
    with pytest.raises(ConfigError, match="unit_divisor"):
        build_units(model, "group", unit_divisor=-1)


def test_cached() -> None:
    model = get_model("yi-9b")
    assert build_units(model, "group") is build_units(model, "group")


@pytest.mark.parametrize("name", ["llama-3-8b", "llava-1.5-7b", "qwen2.5-3b"])
@pytest.mark.parametrize("granularity", ["group", "tensor", "model"])
def test_fine_tune_shares_exactly_the_units_of_shared_tensors(name: str, granularity: str) -> None:
    base = get_model(name)
    ft = derive_model(base, f"{name}-ft", share_patterns_first_layers(base, 0.5))
    base_units, ft_units = build_units(base, granularity), build_units(ft, granularity)
    assert [u.tensor_indices for u in base_units] == [u.tensor_indices for u in ft_units]
    shared_bytes = 0
    for bu, fu in zip(base_units, ft_units):
        all_shared = all(base.tensors[i].fingerprint == ft.tensors[i].fingerprint for i in bu.tensor_indices)
        assert (bu.key == fu.key) is all_shared
        shared_bytes += bu.nbytes if all_shared else 0
    if granularity == "model":
        assert shared_bytes == 0
    else:
        assert shared_bytes >= 0.45 * base.weight_bytes
        assert shared_bytes < 0.75 * base.weight_bytes
    other = get_model("yi-9b")
    assert not {u.key for u in build_units(other, granularity)} & {u.key for u in base_units}


@st.composite
def toy_models(draw: st.DrawFn) -> ModelSpec:
    names: list[tuple[str, int]] = [("model.embed_tokens.weight", draw(st.integers(1, 500)))]
    for layer in range(draw(st.integers(0, 5))):
        for j in range(draw(st.integers(1, 6))):
            names.append((f"model.layers.{layer}.t{j}.weight", draw(st.integers(0, 300))))
    names += [("model.norm.weight", draw(st.integers(1, 50)))]
    if draw(st.booleans()):
        names.append(("lm_head.weight", draw(st.integers(1, 500))))
    tensors = tuple(TensorSpec(n, (b,), "U8", b, tensor_fingerprint("toy", n, "U8", (b,))) for n, b in names)
    return ModelSpec("toy", "llama", tensors, "U8", None, "test")


@given(toy_models(), st.integers(1, 700))
def test_group_invariants(model: ModelSpec, min_bytes: int) -> None:
    units = build_units(model, "group", min_unit_bytes=min_bytes)
    check_cover(model, units)
    by_block: dict[str, list[ReuseUnit]] = {}
    for u in units:
        blocks = {tensor_block(model.tensors[i].name) for i in u.tensor_indices}
        assert len(blocks) == 1
        by_block.setdefault(blocks.pop(), []).append(u)
    for block_units in by_block.values():
        # Every unit reaches the minimum unless it is the block's only unit.
        if len(block_units) > 1:
            assert all(u.nbytes >= min_bytes for u in block_units)


def test_base_then_fine_tune_in_one_arena_stores_shared_bytes_once() -> None:
    from tangram_sim.arena import Arena
    from tangram_sim.policies.packing import PACKING, execute_plan

    base = get_model("llama-3-8b")
    tuned = derive_model(base, "llama-3-8b-chat", share_patterns_first_layers(base, 0.5))
    arena = Arena(40 * 2**30, alignment=512)
    owners = {}
    for model in (base, tuned):
        for unit in build_units(model, "group"):
            owners.setdefault(unit.key, set()).add(model.name)
    pbp = PACKING.create("pbp")
    loaded = {}
    for model in (base, tuned):
        units = build_units(model, "group")
        missing = [(u.key, u.nbytes) for u in units if u.key not in arena]
        plan = pbp.plan(arena, missing, [])
        assert plan is not None and plan.evictions == []
        execute_plan(arena, plan, owners=lambda key: owners[key])
        for key, _ in missing:
            arena.finish_load(key)
        loaded[model.name] = sum(n for _, n in missing)
    shared = sum(u.nbytes for u in build_units(base, "group") if u.key in {v.key for v in build_units(tuned, "group")})
    assert shared > 0.45 * base.weight_bytes  # embeddings + half of the layers
    assert loaded["llama-3-8b"] == base.weight_bytes
    assert loaded["llama-3-8b-chat"] == tuned.weight_bytes - shared  # the shared units were not loaded again
    assert arena.resident_bytes_by_model()["llama-3-8b-chat"] >= tuned.weight_bytes
    arena.check_invariants()

"""Model catalog and config-based inventories: check figures, naming, errors, derived models."""

from __future__ import annotations

import json
import math
import re

import pytest

from tangram_sim.errors import ModelError
from tangram_sim.models import (
    ModelSpec,
    build_model_spec,
    derive_model,
    get_model,
    list_models,
    share_patterns_first_layers,
    supported_model_types,
    tensor_fingerprint,
)
from tangram_sim.models.catalog import catalog_config
from tangram_sim.models.spec import DTYPE_BYTES, layer_of, tensor_block

# bf16 bytes per full load, from the Tangram evaluation (DESIGN.md "Models").
CHECK_FIGURES = {
    "qwen2.5-3b": 6.17e9,
    "phi-3-mini-4k": 7.64e9,
    "llama-3-8b": 16.06e9,
    "yi-9b": 17.66e9,
    "qwen2.5-14b": 29.54e9,
    "deepseek-r1-distill-qwen-14b": 29.54e9,
    "gpt-neox-20b": 41.11e9,
    "llava-1.5-7b": 14.13e9,
}

REQUIRED = [
    "qwen2.5-3b", "phi-3-mini-4k", "llama-3-8b", "yi-9b", "qwen2.5-14b", "deepseek-r1-distill-qwen-14b",
    "gpt-neox-20b", "llava-1.5-7b", "llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-3-70b", "mistral-7b",
    "opt-6.7b", "opt-13b", "opt-30b", "opt-66b",
]  # fmt: skip


def names(spec: ModelSpec) -> list[str]:
    return [t.name for t in spec.tensors]


def shape(spec: ModelSpec, name: str) -> tuple[int, ...]:
    return spec.tensors[spec.tensor_index(name)].shape


@pytest.mark.parametrize("name", sorted(CHECK_FIGURES))
def test_check_figures_within_one_percent(name: str) -> None:
    spec = get_model(name)
    assert DTYPE_BYTES[spec.dtype] == 2
    assert spec.weight_bytes == pytest.approx(CHECK_FIGURES[name], rel=0.01)


def test_llama3_8b_numbers() -> None:
    spec = get_model("llama-3-8b")
    assert spec.kv_bytes_per_token == 131072 == 128 * 1024
    assert spec.num_params == 8_030_261_248
    assert spec.num_tensors == 1 + 32 * 9 + 2
    # 2 x non-embedding parameters (lm_head is a real matmul, the token table is a lookup)
    assert spec.flops_per_token == 2 * (spec.num_params - 128256 * 4096)


def test_catalog_lists_required_models() -> None:
    assert set(REQUIRED) <= set(list_models())
    for name in list_models():
        spec = get_model(name)
        assert spec.weight_bytes == sum(t.nbytes for t in spec.tensors)
        assert spec.num_params == sum(math.prod(t.shape) for t in spec.tensors)
        assert spec.kv_bytes_per_token > 0
        assert 0 < spec.flops_per_token <= 2 * spec.num_params


def test_qwen_tied_embeddings_and_qkv_bias() -> None:
    spec = get_model("qwen2.5-3b")
    assert "lm_head.weight" not in names(spec)
    assert shape(spec, "model.layers.0.self_attn.k_proj.weight") == (256, 2048)
    assert shape(spec, "model.layers.0.self_attn.k_proj.bias") == (256,)
    assert "model.layers.0.self_attn.o_proj.bias" not in names(spec)
    assert spec.flops_per_token == 2 * spec.num_params  # tied table doubles as the lm_head
    assert "lm_head.weight" in names(get_model("qwen2.5-14b"))


def test_phi3_fused_projections() -> None:
    spec = get_model("phi-3-mini-4k")
    assert shape(spec, "model.layers.0.self_attn.qkv_proj.weight") == ((32 + 2 * 32) * 96, 3072)
    assert shape(spec, "model.layers.31.mlp.gate_up_proj.weight") == (2 * 8192, 3072)
    assert "model.layers.0.self_attn.q_proj.weight" not in names(spec)


def test_gpt_neox_naming() -> None:
    spec = get_model("gpt-neox-20b")
    n = names(spec)
    assert n[0] == "gpt_neox.embed_in.weight" and n[-1] == "embed_out.weight"
    assert shape(spec, "gpt_neox.layers.0.attention.query_key_value.weight") == (3 * 6144, 6144)
    assert shape(spec, "gpt_neox.layers.43.mlp.dense_h_to_4h.bias") == (24576,)
    assert "gpt_neox.layers.0.input_layernorm.bias" in n
    assert "gpt_neox.final_layer_norm.bias" in n


def test_opt_positions_offset_and_tied_head() -> None:
    spec = get_model("opt-6.7b")
    assert shape(spec, "model.decoder.embed_positions.weight") == (2050, 4096)
    assert shape(spec, "model.decoder.layers.0.fc1.weight") == (16384, 4096)
    assert "model.decoder.layers.0.self_attn.out_proj.bias" in names(spec)
    assert "lm_head.weight" not in names(spec)
    assert spec.dtype == "F16"


def test_opt_projection_and_untied_variants() -> None:
    cfg = {
        "model_type": "opt", "hidden_size": 1024, "word_embed_proj_dim": 512, "ffn_dim": 4096,
        "num_hidden_layers": 2, "num_attention_heads": 16, "do_layer_norm_before": False,
        "tie_word_embeddings": False,
    }  # fmt: skip
    spec = build_model_spec(cfg, "opt-350m-like")
    n = names(spec)
    assert shape(spec, "model.decoder.project_in.weight") == (1024, 512)
    assert shape(spec, "model.decoder.project_out.weight") == (512, 1024)
    assert shape(spec, "lm_head.weight") == (50272, 512)
    assert "model.decoder.final_layer_norm.weight" not in n
    assert spec.dtype == "BF16"  # no torch_dtype: serving default


def test_llava_components() -> None:
    spec = get_model("llava-1.5-7b")
    n = names(spec)
    assert n[0] == "language_model.model.embed_tokens.weight"
    assert shape(spec, "language_model.lm_head.weight") == (32064, 4096)
    v = "vision_tower.vision_model."
    assert shape(spec, v + "embeddings.position_embedding.weight") == (577, 1024)
    assert shape(spec, v + "embeddings.patch_embedding.weight") == (1024, 3, 14, 14)
    assert shape(spec, v + "encoder.layers.23.mlp.fc1.weight") == (4096, 1024)
    assert v + "encoder.layers.24.mlp.fc1.weight" not in n
    assert v + "pre_layrnorm.weight" in n and v + "post_layernorm.bias" in n
    assert shape(spec, "multi_modal_projector.linear_1.weight") == (4096, 1024)
    assert n[-1] == "multi_modal_projector.linear_2.bias"
    assert spec.arch is not None and spec.arch.vision_layers == 24 and spec.arch.num_layers == 32
    assert spec.kv_bytes_per_token == 2 * 32 * 128 * 32 * 2  # text model only
    text_params = sum(math.prod(t.shape) for t in spec.tensors if t.name.startswith("language_model."))
    assert spec.flops_per_token == 2 * (text_params - 32064 * 4096)  # vision tower runs per image


@pytest.mark.parametrize("name", ["llama-3-8b", "gpt-neox-20b", "opt-13b", "llava-1.5-7b", "phi-3-mini-4k"])
def test_logical_order(name: str) -> None:
    spec = get_model(name)
    n = names(spec)
    assert re.search(r"embed", n[0])
    text_layers = [layer_of(x)[1] for x in n if layer_of(x) and not x.startswith("vision_tower")]
    assert text_layers == sorted(text_layers) and text_layers[0] == 0
    last_text_layer = max(i for i, x in enumerate(n) if layer_of(x) and not x.startswith("vision_tower"))
    first_text_layer = min(i for i, x in enumerate(n) if layer_of(x) and not x.startswith("vision_tower"))
    assert all(tensor_block(x).endswith(".embeddings") for x in n[:first_text_layer])
    assert tensor_block(n[last_text_layer + 1]).endswith(".head")


def test_fingerprints_unique_and_deterministic() -> None:
    a, b = get_model("qwen2.5-14b"), get_model("deepseek-r1-distill-qwen-14b")
    fa = [t.fingerprint for t in a.tensors]
    assert len(set(fa)) == len(fa)
    assert all(re.fullmatch(r"[0-9a-f]{16}", f) for f in fa)
    assert not set(fa) & {t.fingerprint for t in b.tensors}  # same shapes, different weights
    rebuilt = build_model_spec(catalog_config("qwen2.5-14b"), "qwen2.5-14b", source="catalog")
    assert [t.fingerprint for t in rebuilt.tensors] == fa
    assert rebuilt == a and hash(rebuilt) == hash(a)
    t = a.tensors[3]
    assert t.fingerprint == tensor_fingerprint("qwen2.5-14b", t.name, t.dtype, t.shape)
    assert tensor_fingerprint("x", t.name, t.dtype, t.shape) != t.fingerprint


def test_get_model_cache_aliases_and_dtype_override() -> None:
    assert get_model("llama-3-8b") is get_model("llama-3-8b")
    assert get_model("meta-llama/Meta-Llama-3-8B") is get_model("LLAMA-3-8B")
    f32 = get_model("llama-3-8b", dtype="float32")
    base = get_model("llama-3-8b")
    assert f32.dtype == "F32" and f32.weight_bytes == 2 * base.weight_bytes
    assert f32.kv_bytes_per_token == 2 * base.kv_bytes_per_token
    with pytest.raises(ModelError, match="unknown dtype"):
        get_model("llama-3-8b", dtype="int3")


def test_spec_is_hashable_and_json() -> None:
    spec = get_model("mistral-7b")
    assert {spec: 1}[spec] == 1
    js = spec.to_json()
    for key in ("name", "family", "dtype", "weight_bytes", "num_params", "num_tensors", "kv_bytes_per_token",
                "source", "tensors"):  # fmt: skip
        assert key in js
    assert len(js["tensors"]) == spec.num_tensors
    assert sum(t["bytes"] for t in js["tensors"]) == spec.weight_bytes
    assert set(js["tensors"][0]) == {"name", "shape", "dtype", "bytes", "fingerprint"}
    assert "tensors" not in spec.to_json(include_tensors=False)
    json.dumps(js)
    assert spec.tensor_index("model.norm.weight") == spec.num_tensors - 2
    with pytest.raises(ModelError, match="no tensor named"):
        spec.tensor_index("nope")


def test_unknown_catalog_name_lists_known() -> None:
    with pytest.raises(ModelError) as info:
        get_model("llama-9-1t")
    msg = str(info.value)
    assert "llama-9-1t" in msg and "llama-3-8b" in msg and "\n" not in msg


def test_unknown_model_type(tmp_path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "mamba", "hidden_size": 8}))
    with pytest.raises(ModelError) as info:
        get_model(str(path))
    msg = str(info.value)
    assert str(path) in msg and "model_type" in msg and "'mamba'" in msg
    for supported in ("llama", "qwen2", "phi3", "gpt_neox", "opt", "llava"):
        assert supported in msg
    assert set(supported_model_types()) >= {"llama", "mistral", "qwen2", "phi3", "gpt_neox", "opt", "llava"}


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"hidden_size": "4096"}, "hidden_size"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
        ({"num_key_value_heads": 5}, "num_key_value_heads"),
        ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
        ({"torch_dtype": "float7"}, "torch_dtype"),
    ],
)
def test_bad_config_fields_are_one_line_errors(tmp_path, patch, field) -> None:
    cfg = catalog_config("llama-3-8b") | patch
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ModelError) as info:
        get_model(path)
    msg = str(info.value)
    assert field in msg and str(path) in msg and "expected" in msg and "\n" not in msg


def test_config_path_and_folder(tmp_path) -> None:
    folder = tmp_path / "my-llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(catalog_config("llama-2-7b")))
    by_file = get_model(str(folder / "config.json"))
    by_folder = get_model(str(folder))
    assert by_file.name == by_folder.name == "my-llama"
    assert by_file.weight_bytes == get_model("llama-2-7b").weight_bytes
    assert by_file.source == str((folder / "config.json").resolve())
    # A local copy is a different model: no accidental sharing with the catalog entry.
    assert not {t.fingerprint for t in by_file.tensors} & {
        t.fingerprint for t in get_model("llama-2-7b").tensors
    }
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        get_model(str(folder / "config.json"))
    with pytest.raises(ModelError, match="no such file"):
        get_model(str(tmp_path / "missing" / "config.json"))
    # an edited config is re-read, an unchanged one comes from the cache
    (folder / "config.json").write_text(json.dumps(catalog_config("llama-2-7b") | {"num_hidden_layers": 2}))
    small = get_model(folder)
    assert small.num_tensors == 1 + 2 * 9 + 2 and get_model(folder) is small
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="neither config.json nor"):
        get_model(empty)


def test_llama_attention_bias_and_head_dim() -> None:
    cfg = catalog_config("mistral-7b") | {"attention_bias": True, "head_dim": 64, "num_hidden_layers": 2}
    spec = build_model_spec(cfg, "m")
    assert shape(spec, "model.layers.0.self_attn.q_proj.weight") == (32 * 64, 4096)
    assert shape(spec, "model.layers.0.self_attn.o_proj.weight") == (4096, 32 * 64)
    assert "model.layers.1.self_attn.o_proj.bias" in names(spec)
    assert spec.kv_bytes_per_token == 2 * 8 * 64 * 2 * 2


def test_derive_model_shares_exactly_matching_tensors() -> None:
    base = get_model("llama-3-8b")
    patterns = share_patterns_first_layers(base, 0.5)
    assert patterns[0] == "model.embed_tokens.weight"
    assert patterns[1:] == [f"model.layers.{i}.*" for i in range(16)]
    ft = derive_model(base, "llama-3-8b-ft", patterns)
    assert names(ft) == names(base) and ft.weight_bytes == base.weight_bytes
    assert ft.kv_bytes_per_token == base.kv_bytes_per_token
    for b, f in zip(base.tensors, ft.tensors):
        layer = layer_of(b.name)
        expect_shared = b.name == "model.embed_tokens.weight" or (layer is not None and layer[1] < 16)
        assert (b.fingerprint == f.fingerprint) is expect_shared, b.name
    # "model.layers.1.*" must not match layers 10..19
    one = derive_model(base, "one-layer", ["model.layers.1.*"])
    shared = [b.name for b, f in zip(base.tensors, one.tensors) if b.fingerprint == f.fingerprint]
    assert len(shared) == 9 and all(n.startswith("model.layers.1.") for n in shared)
    with pytest.raises(ModelError, match="matches no tensor"):
        derive_model(base, "x", ["model.layer.*"])
    with pytest.raises(ModelError, match="same name"):
        derive_model(base, base.name, [])


def test_share_patterns_multimodal_and_fractions() -> None:
    llava = get_model("llava-1.5-7b")
    pats = share_patterns_first_layers(llava, 0.5, embeddings=False)
    assert "language_model.model.layers.15.*" in pats and "language_model.model.layers.16.*" not in pats
    assert "vision_tower.vision_model.encoder.layers.11.*" in pats
    assert "vision_tower.vision_model.encoder.layers.12.*" not in pats
    assert share_patterns_first_layers(llava, 0.0, embeddings=False) == []
    opt = share_patterns_first_layers(get_model("opt-6.7b"), 1.0)
    assert opt[:2] == ["model.decoder.embed_tokens.weight", "model.decoder.embed_positions.weight"]
    assert len(opt) == 2 + 32
    with pytest.raises(ModelError):
        share_patterns_first_layers(llava, 1.5)

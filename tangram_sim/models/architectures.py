"""Tensor inventories from HuggingFace `config.json` dicts, without downloading any weights.

Each supported `model_type` has a builder that lists the checkpoint's tensors with their real HF
names and shapes in logical load order (embeddings, layer 0..N-1, final norm, lm_head, then vision
tower and projector for multimodal models). Missing config fields fall back to the defaults of the
corresponding `transformers` config class, because published config.json files rely on them (the
LLaVA `text_config` lists almost nothing).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from tangram_sim.errors import ModelError
from tangram_sim.models.spec import (
    ArchInfo,
    ModelSpec,
    make_tensor,
    normalize_dtype,
)

Entry = tuple[str, tuple[int, ...]]
Builder = Callable[[Mapping[str, Any], str, str], tuple[list[Entry], ArchInfo]]

_BUILDERS: dict[str, Builder] = {}

# Serving precision assumed when a config does not state `torch_dtype`.
DEFAULT_DTYPE = "BF16"


def _register(*model_types: str) -> Callable[[Builder], Builder]:
    def decorator(builder: Builder) -> Builder:
        for model_type in model_types:
            _BUILDERS[model_type] = builder
        return builder

    return decorator


def supported_model_types() -> list[str]:
    return sorted(_BUILDERS)


class _Cfg:
    """Typed access to a config dict that names the file and field in every error."""

    def __init__(self, cfg: Mapping[str, Any], where: str, defaults: Mapping[str, Any]) -> None:
        self.cfg = cfg
        self.where = where
        self.defaults = defaults

    def _raw(self, key: str) -> Any:
        value = self.cfg.get(key)
        return self.defaults.get(key) if value is None else value

    def int(self, key: str, default: int | None = None) -> int:
        value = self._raw(key)
        if value is None:
            value = default
        if value is None:
            raise ModelError(f"{self.where}: field {key!r} is missing, expected a positive integer")
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ModelError(f"{self.where}: field {key!r} is {value!r}, expected a positive integer")
        return value

    def bool(self, key: str, default: bool) -> bool:
        value = self._raw(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ModelError(f"{self.where}: field {key!r} is {value!r}, expected true or false")
        return value


def _heads(c: _Cfg) -> tuple[int, int, int, int]:
    """(hidden, heads, kv_heads, head_dim) with GQA and explicit head_dim handled."""
    hidden = c.int("hidden_size")
    heads = c.int("num_attention_heads")
    kv_heads = c.int("num_key_value_heads", heads)
    if c.cfg.get("head_dim") is not None:
        head_dim = c.int("head_dim")
    else:
        if hidden % heads:
            raise ModelError(
                f"{c.where}: hidden_size {hidden} is not divisible by num_attention_heads {heads}, "
                "expected head_dim to be given"
            )
        head_dim = hidden // heads
    if heads % kv_heads:
        raise ModelError(
            f"{c.where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}, "
            "expected num_key_value_heads to divide num_attention_heads"
        )
    return hidden, heads, kv_heads, head_dim


# --- Llama family (llama, mistral, qwen2, phi3): RMSNorm, rotary, gated MLP ---------------------------

_LLAMA_DEFAULTS = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "max_position_embeddings": 2048,
}
_MISTRAL_DEFAULTS = {**_LLAMA_DEFAULTS, "intermediate_size": 14336, "num_key_value_heads": 8}
_QWEN2_DEFAULTS = {
    "vocab_size": 151936,
    "hidden_size": 4096,
    "intermediate_size": 22016,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 32768,
}
_PHI3_DEFAULTS = {
    "vocab_size": 32064,
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "max_position_embeddings": 4096,
}


def _llama_like(
    cfg: Mapping[str, Any], where: str, prefix: str, family: str, defaults: Mapping[str, Any]
) -> tuple[list[Entry], ArchInfo]:
    c = _Cfg(cfg, where, defaults)
    hidden, heads, kv_heads, head_dim = _heads(c)
    layers = c.int("num_hidden_layers")
    inter = c.int("intermediate_size")
    vocab = c.int("vocab_size")
    tie = c.bool("tie_word_embeddings", False)
    fused = family == "phi3"
    qkv_bias = family == "qwen2" or c.bool("attention_bias", False)
    o_bias = family != "qwen2" and c.bool("attention_bias", False)
    mlp_bias = c.bool("mlp_bias", False)
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim

    m = f"{prefix}model."
    out: list[Entry] = [(f"{m}embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"{m}layers.{i}."
        out.append((f"{p}input_layernorm.weight", (hidden,)))
        if fused:
            out.append((f"{p}self_attn.qkv_proj.weight", (q_dim + 2 * kv_dim, hidden)))
        else:
            for proj, dim in (("q_proj", q_dim), ("k_proj", kv_dim), ("v_proj", kv_dim)):
                out.append((f"{p}self_attn.{proj}.weight", (dim, hidden)))
                if qkv_bias:
                    out.append((f"{p}self_attn.{proj}.bias", (dim,)))
        out.append((f"{p}self_attn.o_proj.weight", (hidden, q_dim)))
        if o_bias:
            out.append((f"{p}self_attn.o_proj.bias", (hidden,)))
        out.append((f"{p}post_attention_layernorm.weight", (hidden,)))
        if fused:
            out.append((f"{p}mlp.gate_up_proj.weight", (2 * inter, hidden)))
        else:
            for proj in ("gate_proj", "up_proj"):
                out.append((f"{p}mlp.{proj}.weight", (inter, hidden)))
                if mlp_bias:
                    out.append((f"{p}mlp.{proj}.bias", (inter,)))
        out.append((f"{p}mlp.down_proj.weight", (hidden, inter)))
        if mlp_bias:
            out.append((f"{p}mlp.down_proj.bias", (hidden,)))
    out.append((f"{m}norm.weight", (hidden,)))
    if not tie:
        out.append((f"{prefix}lm_head.weight", (vocab, hidden)))
    arch = ArchInfo(
        family=family,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=inter,
        vocab_size=vocab,
        tie_word_embeddings=tie,
        max_position_embeddings=c.int("max_position_embeddings"),
    )
    return out, arch


@_register("llama")
def _llama(cfg: Mapping[str, Any], where: str, prefix: str) -> tuple[list[Entry], ArchInfo]:
    return _llama_like(cfg, where, prefix, "llama", _LLAMA_DEFAULTS)


@_register("mistral")
def _mistral(cfg: Mapping[str, Any], where: str, prefix: str) -> tuple[list[Entry], ArchInfo]:
    return _llama_like(cfg, where, prefix, "mistral", _MISTRAL_DEFAULTS)


@_register("qwen2")
def _qwen2(cfg: Mapping[str, Any], where: str, prefix: str) -> tuple[list[Entry], ArchInfo]:
    return _llama_like(cfg, where, prefix, "qwen2", _QWEN2_DEFAULTS)


@_register("phi3")
def _phi3(cfg: Mapping[str, Any], where: str, prefix: str) -> tuple[list[Entry], ArchInfo]:
    return _llama_like(cfg, where, prefix, "phi3", _PHI3_DEFAULTS)


# --- GPT-NeoX: LayerNorm with bias, fused QKV, biases everywhere ---------------------------------------

_NEOX_DEFAULTS = {
    "vocab_size": 50432,
    "hidden_size": 6144,
    "num_hidden_layers": 44,
    "num_attention_heads": 64,
    "intermediate_size": 24576,
    "max_position_embeddings": 2048,
}


@_register("gpt_neox")
def _gpt_neox(cfg: Mapping[str, Any], where: str, prefix: str) -> tuple[list[Entry], ArchInfo]:
    c = _Cfg(cfg, where, _NEOX_DEFAULTS)
    hidden = c.int("hidden_size")
    heads = c.int("num_attention_heads")
    if hidden % heads:
        raise ModelError(
            f"{where}: hidden_size {hidden} is not divisible by num_attention_heads {heads}, "
            "expected num_attention_heads to divide hidden_size"
        )
    layers = c.int("num_hidden_layers")
    inter = c.int("intermediate_size")
    vocab = c.int("vocab_size")
    tie = c.bool("tie_word_embeddings", False)
    bias = c.bool("attention_bias", True)
    g = f"{prefix}gpt_neox."
    out: list[Entry] = [(f"{g}embed_in.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"{g}layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out += [(f"{p}{norm}.weight", (hidden,)), (f"{p}{norm}.bias", (hidden,))]
        out.append((f"{p}attention.query_key_value.weight", (3 * hidden, hidden)))
        if bias:
            out.append((f"{p}attention.query_key_value.bias", (3 * hidden,)))
        out.append((f"{p}attention.dense.weight", (hidden, hidden)))
        if bias:
            out.append((f"{p}attention.dense.bias", (hidden,)))
        out += [
            (f"{p}mlp.dense_h_to_4h.weight", (inter, hidden)),
            (f"{p}mlp.dense_h_to_4h.bias", (inter,)),
            (f"{p}mlp.dense_4h_to_h.weight", (hidden, inter)),
            (f"{p}mlp.dense_4h_to_h.bias", (hidden,)),
        ]
    out += [(f"{g}final_layer_norm.weight", (hidden,)), (f"{g}final_layer_norm.bias", (hidden,))]
    if not tie:
        out.append((f"{prefix}embed_out.weight", (vocab, hidden)))
    arch = ArchInfo(
        family="gpt_neox",
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=inter,
        vocab_size=vocab,
        tie_word_embeddings=tie,
        max_position_embeddings=c.int("max_position_embeddings"),
    )
    return out, arch


# --- OPT: learned positions (+2 offset), biases, fc1/fc2, tied lm_head -----------------------------------

_OPT_DEFAULTS = {
    "vocab_size": 50272,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "ffn_dim": 3072,
    "num_attention_heads": 12,
    "max_position_embeddings": 2048,
}
_OPT_POSITION_OFFSET = 2  # OPTLearnedPositionalEmbedding reserves two rows (fairseq padding legacy)


@_register("opt")
def _opt(cfg: Mapping[str, Any], where: str, prefix: str) -> tuple[list[Entry], ArchInfo]:
    c = _Cfg(cfg, where, _OPT_DEFAULTS)
    hidden = c.int("hidden_size")
    heads = c.int("num_attention_heads")
    if hidden % heads:
        raise ModelError(
            f"{where}: hidden_size {hidden} is not divisible by num_attention_heads {heads}, "
            "expected num_attention_heads to divide hidden_size"
        )
    layers = c.int("num_hidden_layers")
    ffn = c.int("ffn_dim")
    vocab = c.int("vocab_size")
    max_pos = c.int("max_position_embeddings")
    proj_dim = c.int("word_embed_proj_dim", hidden)
    tie = c.bool("tie_word_embeddings", True)
    bias = c.bool("enable_bias", True)
    affine = c.bool("layer_norm_elementwise_affine", True)
    final_norm = c.bool("do_layer_norm_before", True) and not c.bool("_remove_final_layer_norm", False)

    def norm(name: str) -> list[Entry]:
        return [(f"{name}.weight", (hidden,)), (f"{name}.bias", (hidden,))] if affine else []

    def linear(name: str, rows: int, cols: int) -> list[Entry]:
        return [(f"{name}.weight", (rows, cols))] + ([(f"{name}.bias", (rows,))] if bias else [])

    d = f"{prefix}model.decoder."
    out: list[Entry] = [
        (f"{d}embed_tokens.weight", (vocab, proj_dim)),
        (f"{d}embed_positions.weight", (max_pos + _OPT_POSITION_OFFSET, hidden)),
    ]
    if proj_dim != hidden:
        out.append((f"{d}project_in.weight", (hidden, proj_dim)))
    for i in range(layers):
        p = f"{d}layers.{i}."
        out += norm(f"{p}self_attn_layer_norm")
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out += linear(f"{p}self_attn.{proj}", hidden, hidden)
        out += norm(f"{p}final_layer_norm")
        out += linear(f"{p}fc1", ffn, hidden)
        out += linear(f"{p}fc2", hidden, ffn)
    if final_norm:
        out += norm(f"{d}final_layer_norm")
    if proj_dim != hidden:
        out.append((f"{d}project_out.weight", (proj_dim, hidden)))
    if not tie:
        out.append((f"{prefix}lm_head.weight", (vocab, proj_dim)))
    arch = ArchInfo(
        family="opt",
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=ffn,
        vocab_size=vocab,
        tie_word_embeddings=tie,
        max_position_embeddings=max_pos,
    )
    return out, arch


# --- LLaVA: a language model + CLIP vision tower + 2-layer MLP projector --------------------------------

_CLIP_VISION_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 32,
}


def _clip_vision(cfg: Mapping[str, Any], where: str, prefix: str) -> tuple[list[Entry], int, int]:
    c = _Cfg(cfg, where, _CLIP_VISION_DEFAULTS)
    hidden = c.int("hidden_size")
    inter = c.int("intermediate_size")
    layers = c.int("num_hidden_layers")
    channels = c.int("num_channels")
    image, patch = c.int("image_size"), c.int("patch_size")
    positions = (image // patch) ** 2 + 1  # patches + class token
    v = f"{prefix}vision_model."

    def linear(name: str, rows: int, cols: int) -> list[Entry]:
        return [(f"{name}.weight", (rows, cols)), (f"{name}.bias", (rows,))]

    def norm(name: str) -> list[Entry]:
        return [(f"{name}.weight", (hidden,)), (f"{name}.bias", (hidden,))]

    out: list[Entry] = [
        (f"{v}embeddings.class_embedding", (hidden,)),
        (f"{v}embeddings.patch_embedding.weight", (hidden, channels, patch, patch)),
        (f"{v}embeddings.position_embedding.weight", (positions, hidden)),
    ]
    out += norm(f"{v}pre_layrnorm")
    for i in range(layers):
        p = f"{v}encoder.layers.{i}."
        out += norm(f"{p}layer_norm1")
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out += linear(f"{p}self_attn.{proj}", hidden, hidden)
        out += norm(f"{p}layer_norm2")
        out += linear(f"{p}mlp.fc1", inter, hidden)
        out += linear(f"{p}mlp.fc2", hidden, inter)
    out += norm(f"{v}post_layernorm")
    return out, layers, hidden


@_register("llava")
def _llava(cfg: Mapping[str, Any], where: str, prefix: str) -> tuple[list[Entry], ArchInfo]:
    text_cfg = cfg.get("text_config") or {}
    vision_cfg = cfg.get("vision_config") or {}
    for key, value in (("text_config", text_cfg), ("vision_config", vision_cfg)):
        if not isinstance(value, Mapping):
            raise ModelError(f"{where}: field {key!r} is {type(value).__name__}, expected an object")
    text_type = text_cfg.get("model_type", "llama")
    if text_type not in _LLAMA_FAMILY:
        raise ModelError(
            f"{where}: text_config.model_type is {text_type!r}, expected one of {', '.join(_LLAMA_FAMILY)}"
        )
    vision_type = vision_cfg.get("model_type", "clip_vision_model")
    if vision_type != "clip_vision_model":
        raise ModelError(
            f"{where}: vision_config.model_type is {vision_type!r}, expected 'clip_vision_model'"
        )
    text, arch = _BUILDERS[text_type](text_cfg, f"{where} text_config", f"{prefix}language_model.")
    vision, v_layers, v_hidden = _clip_vision(vision_cfg, f"{where} vision_config", f"{prefix}vision_tower.")
    feature_layer = cfg.get("vision_feature_layer", -2)
    n_features = len(feature_layer) if isinstance(feature_layer, list) else 1
    text_hidden = arch.hidden_size or 0
    proj_bias = _Cfg(cfg, where, {}).bool("multimodal_projector_bias", True)
    mm = f"{prefix}multi_modal_projector."
    projector: list[Entry] = [(f"{mm}linear_1.weight", (text_hidden, v_hidden * n_features))]
    if proj_bias:
        projector.append((f"{mm}linear_1.bias", (text_hidden,)))
    projector.append((f"{mm}linear_2.weight", (text_hidden, text_hidden)))
    if proj_bias:
        projector.append((f"{mm}linear_2.bias", (text_hidden,)))
    arch = dataclasses.replace(arch, vision_layers=v_layers, vision_hidden_size=v_hidden)
    return text + vision + projector, arch


_LLAMA_FAMILY = ("llama", "mistral", "qwen2", "phi3")


# --- public entry points ------------------------------------------------------------------------------


def inventory_from_config(
    config: Mapping[str, Any], where: str = "config.json"
) -> tuple[list[Entry], ArchInfo, str]:
    """(ordered (name, shape) list, ArchInfo, model_type) for a HF config dict.

    `where` names the config (a path or catalog name) in error messages.
    """
    if not isinstance(config, Mapping):
        raise ModelError(f"{where}: top level is {type(config).__name__}, expected a JSON object")
    model_type = config.get("model_type")
    if model_type is None:
        raise ModelError(
            f"{where}: field 'model_type' is missing, expected one of {', '.join(supported_model_types())}"
        )
    builder = _BUILDERS.get(model_type) if isinstance(model_type, str) else None
    if builder is None:
        raise ModelError(
            f"{where}: field 'model_type' is {model_type!r}, expected one of "
            f"{', '.join(supported_model_types())}"
        )
    entries, arch = builder(config, where, "")
    return entries, arch, model_type


def config_dtype(config: Mapping[str, Any], where: str = "config.json") -> str:
    """The checkpoint dtype a config declares (`torch_dtype`, newer `dtype`), else DEFAULT_DTYPE."""
    value = config.get("torch_dtype") or config.get("dtype")
    if value is None and isinstance(config.get("text_config"), Mapping):
        value = config["text_config"].get("torch_dtype")
    if value is None:
        return DEFAULT_DTYPE
    return normalize_dtype(value, f"{where}: field 'torch_dtype'")


def build_model_spec(
    config: Mapping[str, Any],
    name: str,
    *,
    dtype: str | None = None,
    source: str = "config",
    namespace: str | None = None,
    where: str | None = None,
) -> ModelSpec:
    """A ModelSpec from a HF config dict; `dtype` overrides `torch_dtype`.

    Fingerprints use `namespace` (default: `name`), so two models never share tensors by accident.
    """
    where = where or name
    entries, arch, model_type = inventory_from_config(config, where)
    st_dtype = normalize_dtype(dtype, "dtype override") if dtype is not None else config_dtype(config, where)
    ns = namespace if namespace is not None else name
    tensors = tuple(make_tensor(ns, n, shape, st_dtype) for n, shape in entries)
    return ModelSpec(name=name, family=model_type, tensors=tensors, dtype=st_dtype, arch=arch, source=source)

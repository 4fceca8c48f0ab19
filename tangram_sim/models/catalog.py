"""Built-in model catalog and the single entry point `get_model` for names and checkpoint paths.

The catalog holds the public HF `config.json` values of the models used in the Tangram evaluation and
common baselines, so experiments run without downloading anything. Anything else is given as a path:
a config.json, a folder holding one, a .safetensors file or a sharded checkpoint folder.
"""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path
from typing import Any

from tangram_sim.errors import ModelError
from tangram_sim.models.architectures import build_model_spec
from tangram_sim.models.safetensors_header import load_config_json, spec_from_safetensors
from tangram_sim.models.spec import ModelSpec, normalize_dtype


def llama_config(
    hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int, **extra: Any
) -> dict[str, Any]:
    """An HF-style Llama config dict (extra keys override or add fields)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": vocab,
        "tie_word_embeddings": False,
        **extra,
    }


def _qwen2(
    hidden: int, inter: int, layers: int, heads: int, kv: int, tie: bool, **extra: Any
) -> dict[str, Any]:
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "tie_word_embeddings": tie,
        "rms_norm_eps": 1e-6,
        "torch_dtype": "bfloat16",
        **extra,
    }


def _opt(hidden: int, ffn: int, layers: int, heads: int) -> dict[str, Any]:
    return {
        "architectures": ["OPTForCausalLM"],
        "model_type": "opt",
        "hidden_size": hidden,
        "word_embed_proj_dim": hidden,
        "ffn_dim": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "vocab_size": 50272,
        "max_position_embeddings": 2048,
        "do_layer_norm_before": True,
        "torch_dtype": "float16",
    }


# name -> (HF repo id, config.json values as published)
CATALOG: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen2.5-3b": (
        "Qwen/Qwen2.5-3B",
        _qwen2(
            2048, 11008, 36, 16, 2, True, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6
        ),
    ),
    "phi-3-mini-4k": (
        "microsoft/Phi-3-mini-4k-instruct",
        {
            "architectures": ["Phi3ForCausalLM"],
            "model_type": "phi3",
            "hidden_size": 3072,
            "intermediate_size": 8192,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "vocab_size": 32064,
            "max_position_embeddings": 4096,
            "rope_theta": 10000.0,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
        },
    ),
    "llama-3-8b": (
        "meta-llama/Meta-Llama-3-8B",
        llama_config(
            4096,
            14336,
            32,
            32,
            8,
            128256,
            max_position_embeddings=8192,
            rope_theta=500000.0,
            torch_dtype="bfloat16",
        ),
    ),
    "yi-9b": (
        "01-ai/Yi-9B",
        llama_config(
            4096,
            11008,
            48,
            32,
            4,
            64000,
            max_position_embeddings=4096,
            rope_theta=10000.0,
            torch_dtype="bfloat16",
        ),
    ),
    "qwen2.5-14b": (
        "Qwen/Qwen2.5-14B",
        _qwen2(
            5120, 13824, 48, 40, 8, False, vocab_size=152064, max_position_embeddings=131072, rope_theta=1e6
        ),
    ),
    "deepseek-r1-distill-qwen-14b": (
        "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B",
        _qwen2(
            5120, 13824, 48, 40, 8, False, vocab_size=152064, max_position_embeddings=131072, rope_theta=1e6
        ),
    ),
    "gpt-neox-20b": (
        "EleutherAI/gpt-neox-20b",
        {
            "architectures": ["GPTNeoXForCausalLM"],
            "model_type": "gpt_neox",
            "hidden_size": 6144,
            "intermediate_size": 24576,
            "num_hidden_layers": 44,
            "num_attention_heads": 64,
            "vocab_size": 50432,
            "max_position_embeddings": 2048,
            "rotary_pct": 0.25,
            "use_parallel_residual": True,
            "tie_word_embeddings": False,
            "torch_dtype": "float16",
        },
    ),
    "llava-1.5-7b": (
        "llava-hf/llava-1.5-7b-hf",
        {
            "architectures": ["LlavaForConditionalGeneration"],
            "model_type": "llava",
            "ignore_index": -100,
            "image_token_index": 32000,
            "projector_hidden_act": "gelu",
            "vision_feature_layer": -2,
            "vision_feature_select_strategy": "default",
            "torch_dtype": "float16",
            "text_config": {
                "_name_or_path": "lmsys/vicuna-7b-v1.5",
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "max_position_embeddings": 4096,
                "rms_norm_eps": 1e-5,
                "torch_dtype": "float16",
                "vocab_size": 32064,
            },
            "vision_config": {
                "model_type": "clip_vision_model",
                "hidden_size": 1024,
                "intermediate_size": 4096,
                "num_attention_heads": 16,
                "num_hidden_layers": 24,
                "image_size": 336,
                "patch_size": 14,
                "projection_dim": 768,
            },
        },
    ),
    "llama-2-7b": (
        "meta-llama/Llama-2-7b-hf",
        llama_config(4096, 11008, 32, 32, 32, 32000, max_position_embeddings=4096, torch_dtype="float16"),
    ),
    "llama-2-13b": (
        "meta-llama/Llama-2-13b-hf",
        llama_config(5120, 13824, 40, 40, 40, 32000, max_position_embeddings=4096, torch_dtype="float16"),
    ),
    "llama-2-70b": (
        "meta-llama/Llama-2-70b-hf",
        llama_config(8192, 28672, 80, 64, 8, 32000, max_position_embeddings=4096, torch_dtype="float16"),
    ),
    "llama-3-70b": (
        "meta-llama/Meta-Llama-3-70B",
        llama_config(
            8192,
            28672,
            80,
            64,
            8,
            128256,
            max_position_embeddings=8192,
            rope_theta=500000.0,
            torch_dtype="bfloat16",
        ),
    ),
    "mistral-7b": (
        "mistralai/Mistral-7B-v0.1",
        {
            "architectures": ["MistralForCausalLM"],
            "model_type": "mistral",
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "vocab_size": 32000,
            "max_position_embeddings": 32768,
            "sliding_window": 4096,
            "rope_theta": 10000.0,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
        },
    ),
    "opt-6.7b": ("facebook/opt-6.7b", _opt(4096, 16384, 32, 32)),
    "opt-13b": ("facebook/opt-13b", _opt(5120, 20480, 40, 40)),
    "opt-30b": ("facebook/opt-30b", _opt(7168, 28672, 48, 56)),
    "opt-66b": ("facebook/opt-66b", _opt(9216, 36864, 64, 72)),
    # The small and mid-size Qwen2.5 models, for evaluations spanning 0.5-14B (Medusa's ten models)
    "qwen2.5-0.5b": (
        "Qwen/Qwen2.5-0.5B",
        _qwen2(896, 4864, 24, 14, 2, True, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6),
    ),
    "qwen2.5-1.5b": (
        "Qwen/Qwen2.5-1.5B",
        _qwen2(1536, 8960, 28, 12, 2, True, vocab_size=151936, max_position_embeddings=131072, rope_theta=1e6),
    ),
    "qwen2.5-7b": (
        "Qwen/Qwen2.5-7B",
        _qwen2(3584, 18944, 28, 28, 4, False, vocab_size=152064, max_position_embeddings=131072, rope_theta=1e6),
    ),
    # The larger models of BlitzScale's evaluation (OSDI'25): a 24B on 2 GPUs and a 72B on 4
    "mistral-small-24b": (
        "mistralai/Mistral-Small-24B-Instruct-2501",
        {
            "architectures": ["MistralForCausalLM"],
            "model_type": "mistral",
            "hidden_size": 5120,
            "intermediate_size": 32768,
            "num_hidden_layers": 40,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "vocab_size": 131072,
            "max_position_embeddings": 32768,
            "rope_theta": 100000000.0,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
        },
    ),
    "qwen2.5-72b": (
        "Qwen/Qwen2.5-72B-Instruct",
        _qwen2(8192, 29568, 80, 64, 8, False, vocab_size=152064, max_position_embeddings=32768, rope_theta=1e6),
    ),
}

# Lower-cased catalog names and HF repo ids -> catalog name.
_ALIASES: dict[str, str] = {
    **{name: name for name in CATALOG},
    **{hf_id.lower(): name for name, (hf_id, _) in CATALOG.items()},
}


def list_models() -> list[str]:
    """Catalog names in catalog order (the Tangram evaluation models first)."""
    return list(CATALOG)


def catalog_config(name: str) -> dict[str, Any]:
    """A copy of the catalog's config.json values for `name` (a catalog name or HF repo id)."""
    key = _ALIASES.get(name.lower())
    if key is None:
        raise _unknown(name)
    return copy.deepcopy(CATALOG[key][1])


def hf_repo_id(name: str) -> str:
    key = _ALIASES.get(name.lower())
    if key is None:
        raise _unknown(name)
    return CATALOG[key][0]


def _unknown(name: str) -> ModelError:
    return ModelError(
        f"unknown model {name!r}; expected a catalog name ({', '.join(CATALOG)}), "
        "a config.json, a .safetensors file or a checkpoint folder"
    )


def get_model(name_or_path: str | os.PathLike[str], dtype: str | None = None) -> ModelSpec:
    """Resolve a catalog name, HF repo id of a catalog model, or a local path to a (cached) ModelSpec.

    `dtype` overrides the config's `torch_dtype` for config-based models; safetensors checkpoints keep
    the dtypes stored in their headers.
    """
    if dtype is not None:
        dtype = normalize_dtype(dtype, "dtype override")
    text = os.fspath(name_or_path)
    key = _ALIASES.get(text.lower())
    if key is not None and not os.path.exists(text):
        return _catalog_model(key, dtype)
    path = Path(text).expanduser()
    if not path.exists():
        if isinstance(name_or_path, os.PathLike) or any(
            s in text for s in ("/", "\\", ".json", ".safetensors")
        ):
            raise ModelError(
                f"{text}: no such file or folder, "
                "expected a config.json, .safetensors file or checkpoint folder"
            )
        raise _unknown(text)
    resolved = path.resolve()
    return _path_model(str(resolved), _signature(resolved), dtype)


def _signature(path: Path) -> tuple[tuple[str, int, int], ...]:
    """(name, mtime, size) of every file a spec is read from, so edited checkpoints are re-read."""
    folder = path if path.is_dir() else path.parent
    files = [path] if path.is_file() else []
    files += [p for p in folder.glob("*.safetensors*") if p != path] + [folder / "config.json"]
    out = []
    for f in files:
        try:
            st = f.stat()
        except OSError:
            continue
        out.append((f.name, st.st_mtime_ns, st.st_size))
    return tuple(sorted(out))


@functools.cache
def _catalog_model(name: str, dtype: str | None) -> ModelSpec:
    config = CATALOG[name][1]
    return build_model_spec(config, name, dtype=dtype, source="catalog", where=f"catalog model {name!r}")


@functools.lru_cache(maxsize=64)
def _path_model(path_text: str, signature: tuple[tuple[str, int, int], ...], dtype: str | None) -> ModelSpec:
    """Cached per (path, file signature): an edited checkpoint or config is re-read."""
    path = Path(path_text)
    if path.is_file() and path.suffix == ".json":
        return _config_model(path, path.parent.name if path.name == "config.json" else path.stem, dtype)
    if path.is_file() and path.suffix == ".safetensors":
        return spec_from_safetensors(path)
    if path.is_dir():
        has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.safetensors.index.json"))
        if has_weights:
            return spec_from_safetensors(path)
        if (path / "config.json").is_file():
            return _config_model(path / "config.json", path.name, dtype)
        raise ModelError(
            f"{path}: folder has neither config.json nor *.safetensors, expected a checkpoint folder"
        )
    raise ModelError(f"{path}: unsupported file type, expected a config.json or a .safetensors file")


def _config_model(config_path: Path, name: str, dtype: str | None) -> ModelSpec:
    config = load_config_json(config_path)
    resolved = str(config_path.resolve())
    return build_model_spec(config, name, dtype=dtype, source=resolved, namespace=resolved, where=resolved)

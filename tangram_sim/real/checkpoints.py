"""Real safetensors checkpoints with random weights, laid out exactly like HF ones.

The real executor needs checkpoints to load, but downloading 100 GB of weights to test a loader is
neither possible in CI nor necessary: what matters is the tensor names, shapes, dtypes, the sharding
with `model.safetensors.index.json`, and that a fine-tune shares byte-identical tensors with its base.
Values are a pure function of each tensor's fingerprint (a seeded `torch.Generator` per tensor, no
global RNG), so a derived fine-tune gets the very same bytes for every tensor it shares with its base,
and the fingerprints written to `__metadata__["tangram.fingerprints"]` let header-only readers
(`tangram_sim.models.get_model`) recognise that sharing without reading a weight.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from tangram_sim.errors import ModelError
from tangram_sim.models.architectures import build_model_spec
from tangram_sim.models.catalog import catalog_config, list_models, llama_config
from tangram_sim.models.derived import derive_model, share_patterns_first_layers
from tangram_sim.models.safetensors_header import FINGERPRINTS_KEY, INDEX_NAME
from tangram_sim.models.spec import ModelSpec, TensorSpec, normalize_dtype

__all__ = [
    "SCALES",
    "Derivation",
    "WrittenCheckpoint",
    "make_checkpoint",
    "make_checkpoints",
    "make_derived_checkpoint",
    "make_synthetic_checkpoint",
    "parse_derive",
    "scaled_config",
    "synthetic_config",
    "tensor_values",
    "torch_dtype",
]

SCALES = ("tiny", "small", "full")
HF_SHARD_BYTES = 5 * 10**9  # HF's default max_shard_size ("5GB")
TINY_HIDDEN, TINY_LAYERS, TINY_VOCAB, TINY_POSITIONS = 64, 2, 256, 512
# (hidden, layers, vocab, positions, at least this many query heads) of the shrunk scales: tiny for
# exact tests (~0.5 MB in float32), small for timing on the CPU (tens of MB: a cold start takes
# milliseconds of copying, not microseconds of overhead)
SHRUNK: dict[str, tuple[int, int, int, int, int]] = {
    "tiny": (TINY_HIDDEN, TINY_LAYERS, TINY_VOCAB, TINY_POSITIONS, 4),
    "small": (512, 4, 8192, 2048, 8),
}

_TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_CONFIG_DTYPE = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def torch_dtype(st_dtype: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name (`BF16` -> torch.bfloat16)."""
    try:
        return _TORCH_DTYPES[st_dtype]
    except KeyError:
        raise ModelError(
            f"dtype {st_dtype!r} has no torch equivalent, expected one of {', '.join(_TORCH_DTYPES)}"
        ) from None


# --- configs -------------------------------------------------------------------------------------------


def _round_up(x: float, multiple: int) -> int:
    return max(multiple, int(math.ceil(x / multiple)) * multiple)


def _shrink_text(cfg: dict[str, Any], family: str, scale: str = "tiny") -> None:
    """Shrunk dimensions for a decoder config, keeping the query/KV head ratio and every field's role."""
    new_hidden, layers, vocab, positions, min_heads = SHRUNK[scale]
    hidden = cfg.get("hidden_size") or {"gpt_neox": 6144, "opt": 768}.get(family, 4096)
    heads = cfg.get("num_attention_heads") or {"gpt_neox": 64, "opt": 12}.get(family, 32)
    kv = cfg.get("num_key_value_heads") or heads
    ratio = max(1, heads // kv)
    tiny_kv = -(-min_heads // ratio)  # at least min_heads query heads
    tiny_heads = ratio * tiny_kv
    cfg.pop("head_dim", None)
    cfg["hidden_size"] = new_hidden
    cfg["num_attention_heads"] = tiny_heads
    if new_hidden % tiny_heads:  # e.g. 40/8 heads: keep the ratio 5 with an explicit head width
        cfg["head_dim"] = new_hidden // min_heads
    if "num_key_value_heads" in cfg or family in ("llama", "mistral", "qwen2", "phi3"):
        cfg["num_key_value_heads"] = tiny_kv
    for key, default in (("intermediate_size", 4 * hidden), ("ffn_dim", 4 * hidden)):
        if key in cfg or (key == "intermediate_size" and family != "opt"):
            cfg[key] = _round_up(new_hidden * (cfg.get(key) or default) / hidden, 16)
    cfg["num_hidden_layers"] = layers
    cfg["vocab_size"] = vocab
    cfg["max_position_embeddings"] = min(cfg.get("max_position_embeddings") or 2048, positions)
    if "word_embed_proj_dim" in cfg:
        cfg["word_embed_proj_dim"] = new_hidden
    cfg.pop("sliding_window", None)


def scaled_config(name: str, scale: str = "tiny") -> dict[str, Any]:
    """The catalog config of `name`, shrunk for CPU tests when `scale` is `tiny` or `small`.

    tiny: hidden 64, 2 layers, vocab 256, at most 512 positions; small: hidden 512, 4 layers, vocab
    8192, at most 2048 positions; both keep the query/KV head ratio and the MLP width in the same
    proportion to hidden; the tensor names and structure stay exactly the model's.
    """
    if scale not in SCALES:
        raise ModelError(f"scale {scale!r} is unknown, expected one of {', '.join(SCALES)}")
    cfg = catalog_config(name)
    if scale == "full":
        return cfg
    family = cfg.get("model_type", "")
    if family == "llava":
        text = dict(cfg.get("text_config") or {})
        _shrink_text(text, text.get("model_type", "llama"), scale)
        cfg["text_config"] = text
        cfg["vision_config"] = {
            **(cfg.get("vision_config") or {}),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 2,
            "num_hidden_layers": TINY_LAYERS,
            "image_size": 28,
            "patch_size": 14,
            "projection_dim": 32,
        }
        cfg["image_token_index"] = TINY_VOCAB - 1
    else:
        _shrink_text(cfg, family, scale)
    return cfg


def synthetic_config(gb: float, dtype: str = "BF16") -> dict[str, Any]:
    """A Llama-shaped config (GQA 4:1, MLP 4x) of about `gb` GB, for loader benchmarks of a chosen size.

    Takes the widest hidden size (4096 down to 128) that still gives at least 4 layers, so 16 GB is
    7B-like (hidden 4096, 32 layers) and 1.5 GB is hidden 2048 with 10 layers of ~122 MB.
    """
    if not gb > 0:
        raise ModelError(f"synthetic size {gb!r} GB, expected a positive number")
    dtype = normalize_dtype(dtype, "synthetic dtype")
    elt = torch_dtype(dtype).itemsize
    for hidden in (4096, 2048, 1024, 512, 256, 128):
        heads = max(4, hidden // 128)
        kv, inter, vocab = heads // 4, 4 * hidden, min(32000, 16 * hidden)
        kv_dim = hidden * kv // heads
        per_layer = (2 * hidden * hidden + 2 * hidden * kv_dim + 3 * hidden * inter + 2 * hidden) * elt
        fixed = (2 * vocab * hidden + hidden) * elt
        layers = max(1, round((gb * 1e9 - fixed) / per_layer))
        if layers >= 4:
            break
    return llama_config(
        hidden, inter, layers, heads, kv, vocab,
        max_position_embeddings=4096, rope_theta=500000.0, torch_dtype=_CONFIG_DTYPE.get(dtype, "bfloat16"),
    )


# --- values --------------------------------------------------------------------------------------------


def _init_std(t: TensorSpec) -> tuple[float, float]:
    """(mean, std) that keep a random model's activations O(1): norms near 1, fan-in scaled weights."""
    leaf = t.name.rsplit(".", 1)[-1]
    if len(t.shape) == 1 and ("norm" in t.name or "ln" in t.name) and leaf == "weight":
        return 1.0, 0.1
    if len(t.shape) <= 1:
        return 0.0, 0.1
    if "embed" in t.name or "wte" in t.name or "wpe" in t.name:
        return 0.0, 0.02  # HF's initializer_range: small, so tied logits do not just echo the input
    fan_in = math.prod(t.shape[1:])
    return 0.0, 1.0 / math.sqrt(fan_in)


def tensor_values(t: TensorSpec) -> torch.Tensor:
    """Deterministic random values of one tensor: a function of its fingerprint only.

    Equal fingerprints give equal bytes, which is what lets a fine-tune share its base's tensors.
    """
    dtype = torch_dtype(t.dtype)
    g = torch.Generator().manual_seed(int(t.fingerprint[:15], 16))
    mean, std = _init_std(t)
    if dtype.is_floating_point:
        work = (
            dtype if dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64) else torch.float32
        )
        out = torch.empty(t.shape, dtype=work).normal_(mean, std, generator=g)
        return out.to(dtype)
    if dtype is torch.bool:
        return torch.randint(0, 2, t.shape, generator=g).bool()
    return torch.randint(0, 100, t.shape, generator=g, dtype=torch.int64).to(dtype)


# --- writing -------------------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class Derivation:
    name: str  # the fine-tune's name (its folder)
    base: str  # catalog name of its base model
    fraction: float  # share of each layer stack that is frozen (shared), embeddings always shared


def parse_derive(text: str) -> Derivation:
    """`NAME=BASE:FRACTION` (fraction defaults to 0.5), e.g. `llama-ft=llama-3-8b:0.5`."""
    name, sep, rest = text.partition("=")
    base, _, frac = rest.partition(":")
    try:
        fraction = float(frac) if frac else 0.5
    except ValueError:
        fraction = -1.0
    if not sep or not name.strip() or not base.strip() or not 0.0 <= fraction <= 1.0:
        raise ModelError(f"--derive {text!r}: expected NAME=BASE:FRACTION with FRACTION in [0, 1]")
    return Derivation(name.strip(), base.strip(), fraction)


@dataclass(slots=True)
class WrittenCheckpoint:
    name: str  # model name = folder name
    path: Path  # the checkpoint folder
    spec: ModelSpec  # what was written (names, shapes, dtypes, fingerprints)
    shards: list[Path]  # the .safetensors files in order
    nbytes: int  # weight bytes
    seconds: float  # time to generate and write
    base: str | None = None  # base model of a derived fine-tune
    shared_bytes: int = 0  # bytes identical to the base's


def _namespace(name: str, seed: int) -> str:
    # The seed is part of the identity: two checkpoints of one model with other seeds share nothing.
    return f"tangram-real/{name}/seed={seed}"


def _set_dtype(cfg: dict[str, Any], dtype: str | None) -> str | None:
    if dtype is None:
        return None
    st = normalize_dtype(dtype, "--dtype")
    if st not in _CONFIG_DTYPE:
        raise ModelError(f"--dtype {dtype!r}: expected float32, bfloat16 or float16")
    cfg["torch_dtype"] = _CONFIG_DTYPE[st]
    if isinstance(cfg.get("text_config"), dict):
        cfg["text_config"]["torch_dtype"] = _CONFIG_DTYPE[st]
    return st


def _shards(spec: ModelSpec, shard_bytes: int) -> list[list[TensorSpec]]:
    """Greedy shards in inventory order, like `save_pretrained(max_shard_size=...)`."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for t in spec.tensors:
        if shards[-1] and size + t.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def write_checkpoint(
    out: str | Path,
    spec: ModelSpec,
    config: Mapping[str, Any],
    shard_bytes: int | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> WrittenCheckpoint:
    """Write `spec` as `out/<spec.name>/` with HF shard names, the index, config.json and fingerprints.

    `shard_bytes` None: shards of half the model (2-3 files, so tests cover sharding), at most HF's 5 GB.
    """
    t0 = time.perf_counter()
    folder = Path(out) / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    for stale in list(folder.glob("*.safetensors")) + list(folder.glob("*.safetensors.index.json")):
        stale.unlink()
    if shard_bytes is None:
        shard_bytes = min(HF_SHARD_BYTES, max(1, -(-spec.weight_bytes // 2)))
    groups = _shards(spec, shard_bytes)
    n = len(groups)
    weight_map: dict[str, str] = {}
    paths: list[Path] = []
    for i, group in enumerate(groups, start=1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:  # torch RNG releases the GIL
            tensors = dict(zip((t.name for t in group), pool.map(tensor_values, group)))
        metadata = {
            "format": "pt",
            FINGERPRINTS_KEY: json.dumps({t.name: t.fingerprint for t in group}, sort_keys=True),
        }
        save_file(tensors, str(folder / fname), metadata=metadata)
        del tensors
        weight_map.update({t.name: fname for t in group})
        paths.append(folder / fname)
    index = {"metadata": {"total_size": spec.weight_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    cfg = copy.deepcopy(dict(config))
    if provenance:
        cfg["tangram_generated"] = dict(provenance)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    return WrittenCheckpoint(
        name=spec.name,
        path=folder,
        spec=spec,
        shards=paths,
        nbytes=spec.weight_bytes,
        seconds=time.perf_counter() - t0,
    )


def _base_spec(name: str, cfg: Mapping[str, Any], dtype: str | None, seed: int) -> ModelSpec:
    return build_model_spec(cfg, name, dtype=dtype, source="generated", namespace=_namespace(name, seed))


def make_checkpoint(
    model: str,
    out: str | Path,
    scale: str = "tiny",
    dtype: str | None = None,
    seed: int = 0,
    shard_bytes: int | None = None,
) -> WrittenCheckpoint:
    """A random-weight checkpoint of catalog model `model` at `out/<model>/`."""
    cfg = scaled_config(model, scale)
    st = _set_dtype(cfg, dtype)
    spec = _base_spec(model, cfg, st, seed)
    return write_checkpoint(
        out, spec, cfg, shard_bytes, {"model": model, "scale": scale, "seed": seed, "base": None}
    )


def make_derived_checkpoint(
    derivation: Derivation,
    out: str | Path,
    scale: str = "tiny",
    dtype: str | None = None,
    seed: int = 0,
    shard_bytes: int | None = None,
) -> WrittenCheckpoint:
    """A fine-tune of a catalog model: embeddings and the first `fraction` of the layers are the base's
    bytes (same fingerprints, same values), everything else is new."""
    base = derivation.base
    cfg = scaled_config(base, scale)
    st = _set_dtype(cfg, dtype)
    base_spec = _base_spec(base, cfg, st, seed)
    spec = derive_model(
        base_spec, derivation.name, share_patterns_first_layers(base_spec, derivation.fraction)
    )
    written = write_checkpoint(
        out,
        spec,
        cfg,
        shard_bytes,
        {
            "model": derivation.name,
            "scale": scale,
            "seed": seed,
            "base": base,
            "fraction": derivation.fraction,
        },
    )
    base_fps = {t.fingerprint for t in base_spec.tensors}
    written.base = base
    written.shared_bytes = sum(t.nbytes for t in spec.tensors if t.fingerprint in base_fps)
    return written


def make_synthetic_checkpoint(
    out: str | Path, gb: float, dtype: str = "BF16", seed: int = 0, shard_bytes: int | None = None
) -> WrittenCheckpoint:
    """A Llama-shaped checkpoint of about `gb` GB (see `synthetic_config`) for loader benchmarks."""
    cfg = synthetic_config(gb, dtype)
    name = f"synthetic-{gb:g}gb"
    spec = _base_spec(name, cfg, None, seed)
    if shard_bytes is None:
        shard_bytes = HF_SHARD_BYTES
    return write_checkpoint(out, spec, cfg, shard_bytes, {"model": name, "scale": "synthetic", "seed": seed})


def make_checkpoints(
    models: Sequence[str],
    out: str | Path,
    scale: str = "tiny",
    derive: Iterable[Derivation | str] = (),
    dtype: str | None = None,
    seed: int = 0,
    shard_bytes: int | None = None,
) -> list[WrittenCheckpoint]:
    """Base models first, then fine-tunes; names are checked before anything is written."""
    derivations = [d if isinstance(d, Derivation) else parse_derive(d) for d in derive]
    known = list_models()
    for name in [*models, *(d.base for d in derivations)]:
        if name not in known:
            raise ModelError(f"unknown model {name!r}; expected a catalog name ({', '.join(known)})")
    names = [*models, *(d.name for d in derivations)]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ModelError(f"checkpoint name {dup!r} is given twice, expected distinct folder names")
    written = [make_checkpoint(m, out, scale, dtype, seed, shard_bytes) for m in models]
    written += [make_derived_checkpoint(d, out, scale, dtype, seed, shard_bytes) for d in derivations]
    return written

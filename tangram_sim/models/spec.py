"""Model specifications: what a model's weights look like, without the weights.

Everything downstream (reuse units, retention scoring, packing, the time model) needs only tensor
names, shapes, sizes and content fingerprints, so a `ModelSpec` is plain immutable data that is
cheap to hash and pass around. Derived numbers are computed once at construction.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tangram_sim.errors import ModelError

# Bytes per element of every dtype name used in safetensors headers.
DTYPE_BYTES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "F64": 8,
    "I64": 8,
    "U64": 8,
}

# torch / HF `torch_dtype` spellings -> safetensors dtype names.
_DTYPE_ALIASES: dict[str, str] = {
    "bfloat16": "BF16",
    "bf16": "BF16",
    "float16": "F16",
    "fp16": "F16",
    "half": "F16",
    "float32": "F32",
    "fp32": "F32",
    "float": "F32",
    "float64": "F64",
    "double": "F64",
    "int8": "I8",
    "uint8": "U8",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
}


def normalize_dtype(value: object, where: str = "dtype") -> str:
    """Map a safetensors or torch spelling (`BF16`, `bfloat16`, `torch.float16`) to a safetensors name."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("torch."):
            text = text[len("torch.") :]
        if text.upper() in DTYPE_BYTES:
            return text.upper()
        alias = _DTYPE_ALIASES.get(text.lower())
        if alias is not None:
            return alias
    raise ModelError(
        f"{where}: unknown dtype {value!r}, expected one of bfloat16, float16, float32 "
        f"or a safetensors dtype ({', '.join(DTYPE_BYTES)})"
    )


def tensor_fingerprint(namespace: str, name: str, dtype: str, shape: tuple[int, ...]) -> str:
    """Content identity of a tensor without reading it: same namespace+name+dtype+shape = same bytes.

    Models that really share bytes (a fine-tune's frozen layers) share fingerprints on purpose by
    keeping the base's namespace for those tensors.
    """
    text = f"{namespace}|{name}|{dtype}|{','.join(str(d) for d in shape)}"
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()


# --- tensor roles, derived from HF naming conventions -------------------------------------------

# `<stack>.layers.<i>.` / `.h.<i>.` / `.blocks.<i>.`: the transformer block a tensor belongs to.
_LAYER_RE = re.compile(r"^(?P<stack>(?:.*\.)?(?:layers|layer|h|blocks))\.(?P<index>\d+)(?:\.|$)")
# Lookup tables (token / position embeddings): bytes to load but no matmul FLOPs per token.
_LOOKUP_RE = re.compile(
    r"(?:^|\.)(?:embed_tokens|embed_in|embed_positions|word_embeddings|position_embeddings?|"
    r"wte|wpe)\.weight$|(?:^|\.)class_embedding$"
)
# Tensors that come before the first transformer block (embeddings and pre-block norms).
_PRE_RE = re.compile(
    r"(?:^|\.|_)(?:embed_tokens|embed_in|embed_positions|embeddings?|wte|wpe|pre_layrnorm|project_in)(?:\.|$)"
)
_LM_HEAD_RE = re.compile(r"(?:^|\.)(?:lm_head|embed_out)\.weight$")
_NATURAL_RE = re.compile(r"(\d+)")


def tensor_root(name: str) -> str:
    """Which sub-model a tensor belongs to: `text`, `vision` or `projector` (multimodal models)."""
    if name.startswith(("vision_tower.", "visual.", "vision_model.")) or ".vision_model." in name:
        return "vision"
    if "multi_modal_projector" in name or "mm_projector" in name:
        return "projector"
    return "text"


def layer_of(name: str) -> tuple[str, int] | None:
    """(stack prefix, layer number) of a tensor inside a transformer block, else None."""
    m = _LAYER_RE.match(name)
    if m is None:
        return None
    return m.group("stack"), int(m.group("index"))


def tensor_block(name: str) -> str:
    """The block a tensor belongs to: `<stack>.<i>` for layer i, else `<root>.embeddings` / `<root>.head`.

    Reuse units never span blocks, so a fine-tune that freezes whole layers shares whole units.
    """
    layer = layer_of(name)
    if layer is not None:
        return f"{layer[0]}.{layer[1]}"
    part = "embeddings" if _PRE_RE.search(name) else "head"
    return f"{tensor_root(name)}.{part}"


def is_lookup_table(name: str) -> bool:
    """Token/position embedding tables: loaded but not multiplied per token."""
    return _LOOKUP_RE.search(name) is not None


def is_lm_head(name: str) -> bool:
    return _LM_HEAD_RE.search(name) is not None


def natural_key(name: str) -> tuple[Any, ...]:
    """Sort key treating digit runs as numbers, so `layers.2` sorts before `layers.10`."""
    return tuple(int(p) if p.isdigit() else p for p in _NATURAL_RE.split(name))


_ROOT_RANK = {"text": 0, "vision": 1, "projector": 2}


def logical_sort_key(name: str) -> tuple[Any, ...]:
    """Load order for checkpoints whose files do not say it: per sub-model, embeddings, layers, head."""
    block = tensor_block(name)
    section = 1 if layer_of(name) is not None else (0 if block.endswith(".embeddings") else 2)
    return (_ROOT_RANK[tensor_root(name)], section, natural_key(name))


# --- specs -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str  # checkpoint tensor name, e.g. "model.layers.0.self_attn.q_proj.weight"
    shape: tuple[int, ...]  # dimensions, outermost first (() for a scalar)
    dtype: str  # safetensors dtype name, a key of DTYPE_BYTES
    nbytes: int  # bytes on disk and on the GPU: prod(shape) * dtype size
    fingerprint: str  # 16 hex chars identifying the content; equal across models only when shared

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True, slots=True)
class ArchInfo:
    family: str  # HF model_type of the (language) model, e.g. "llama", "qwen2"
    hidden_size: int | None = None  # model width
    num_layers: int | None = None  # transformer blocks of the language model
    num_heads: int | None = None  # query heads
    num_kv_heads: int | None = None  # key/value heads (== num_heads without GQA)
    head_dim: int | None = None  # width of one attention head
    intermediate_size: int | None = None  # MLP width
    vocab_size: int | None = None  # rows of the token embedding
    tie_word_embeddings: bool | None = None  # lm_head reuses the token embedding (no extra tensor)
    max_position_embeddings: int | None = None  # context length the model was built for
    vision_layers: int | None = None  # vision tower blocks (multimodal models only)
    vision_hidden_size: int | None = None  # vision tower width (multimodal models only)

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


def _infer_kv_bytes(tensors: tuple[TensorSpec, ...]) -> int:
    """KV bytes per token from shapes alone: K/V projection widths x layers of the text stack."""
    per_layer: dict[int, int] = {}
    for t in tensors:
        if tensor_root(t.name) != "text" or not t.name.endswith(".weight") or len(t.shape) != 2:
            continue
        layer = layer_of(t.name)
        if layer is None:
            continue
        idx = layer[1]
        leaf = t.name.rsplit(".", 2)[-2]
        size = DTYPE_BYTES[t.dtype]
        if leaf in ("k_proj", "v_proj", "k", "v", "key", "value"):
            per_layer[idx] = per_layer.get(idx, 0) + t.shape[0] * size
        elif leaf in ("qkv_proj", "query_key_value", "Wqkv"):
            # Fused [q; k; v]: the output projection's input width is the query width.
            out_dim = t.shape[0]
            q_dim = _query_width(tensors, t.name)
            if q_dim is None:
                if out_dim % 3:
                    continue
                q_dim = out_dim // 3
            per_layer[idx] = per_layer.get(idx, 0) + (out_dim - q_dim) * size
    return sum(per_layer.values())


def _query_width(tensors: tuple[TensorSpec, ...], fused_name: str) -> int | None:
    base = fused_name.rsplit(".", 2)[0]
    for leaf in ("o_proj", "dense", "out_proj"):
        for t in tensors:
            if t.name == f"{base}.{leaf}.weight" and len(t.shape) == 2:
                return t.shape[1]
    return None


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str  # catalog name or checkpoint name, unique within an experiment
    family: str  # HF model_type ("llama", "llava", ...) or "safetensors" when unknown
    tensors: tuple[TensorSpec, ...]  # full inventory in load order
    dtype: str  # dominant safetensors dtype (used for KV cache size)
    arch: ArchInfo | None  # architecture numbers when a config is known
    source: str  # where it came from: "catalog", a file path, "derived:<base>"
    # Derived once in __post_init__; excluded from equality and hashing.
    _weight_bytes: int = field(init=False, repr=False, compare=False)
    _num_params: int = field(init=False, repr=False, compare=False)
    _kv_bytes: int = field(init=False, repr=False, compare=False)
    _flops: int = field(init=False, repr=False, compare=False)
    _index: dict[str, int] = field(init=False, repr=False, compare=False)
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.tensors, tuple):
            object.__setattr__(self, "tensors", tuple(self.tensors))
        index = {t.name: i for i, t in enumerate(self.tensors)}
        if len(index) != len(self.tensors):
            dup = next(n for n, c in Counter(t.name for t in self.tensors).items() if c > 1)
            raise ModelError(f"{self.source}: tensor {dup!r} appears twice, expected unique tensor names")
        set_ = object.__setattr__
        set_(self, "_index", index)
        set_(self, "_weight_bytes", sum(t.nbytes for t in self.tensors))
        num_params = sum(t.numel for t in self.tensors)
        set_(self, "_num_params", num_params)
        set_(self, "_kv_bytes", self._compute_kv_bytes())
        set_(self, "_flops", self._compute_flops(num_params))
        set_(self, "_hash", hash((self.name, self.family, self.dtype, self.source, self.tensors)))

    def __hash__(self) -> int:  # cached: specs are dictionary keys in hot paths
        return self._hash

    def _compute_kv_bytes(self) -> int:
        a = self.arch
        if a is not None and a.num_layers and a.num_kv_heads and a.head_dim:
            return 2 * a.num_kv_heads * a.head_dim * a.num_layers * DTYPE_BYTES[self.dtype]
        return _infer_kv_bytes(self.tensors)

    def _compute_flops(self, num_params: int) -> int:
        # Vision tower and projector run once per image, not per generated token.
        per_image = sum(t.numel for t in self.tensors if tensor_root(t.name) != "text")
        lookup = [t for t in self.tensors if is_lookup_table(t.name) and tensor_root(t.name) == "text"]
        dense = num_params - per_image - sum(t.numel for t in lookup)
        if not any(is_lm_head(t.name) for t in self.tensors):
            # Tied embeddings: the token table is also the output projection, a real matmul.
            token = [t for t in lookup if "position" not in t.name]
            if token:
                dense += max(t.numel for t in token)
        return 2 * dense

    @property
    def weight_bytes(self) -> int:
        """Bytes of one full load (all tensors)."""
        return self._weight_bytes

    @property
    def num_params(self) -> int:
        return self._num_params

    @property
    def num_tensors(self) -> int:
        return len(self.tensors)

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token across all layers; 0 when it cannot be known."""
        return self._kv_bytes

    @property
    def flops_per_token(self) -> int:
        """2 x non-embedding parameters of the language model: forward FLOPs per token (roofline).

        Token/position tables are lookups (excluded) unless tied to the output projection; a vision
        tower runs per image, so it is excluded too.
        """
        return self._flops

    def tensor_index(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise ModelError(f"model {self.name!r}: no tensor named {name!r}") from None

    def to_json(self, include_tensors: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "family": self.family,
            "dtype": self.dtype,
            "weight_bytes": self.weight_bytes,
            "num_params": self.num_params,
            "num_tensors": self.num_tensors,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "flops_per_token": self.flops_per_token,
            "source": self.source,
            "arch": None if self.arch is None else self.arch.to_json(),
        }
        if include_tensors:
            out["tensors"] = [
                {
                    "name": t.name,
                    "shape": list(t.shape),
                    "dtype": t.dtype,
                    "bytes": t.nbytes,
                    "fingerprint": t.fingerprint,
                }
                for t in self.tensors
            ]
        return out


def make_tensor(namespace: str, name: str, shape: tuple[int, ...], dtype: str) -> TensorSpec:
    """A TensorSpec whose size and fingerprint follow from its name, shape and dtype."""
    shape = tuple(int(d) for d in shape)
    return TensorSpec(
        name=name,
        shape=shape,
        dtype=dtype,
        nbytes=math.prod(shape) * DTYPE_BYTES[dtype],
        fingerprint=tensor_fingerprint(namespace, name, dtype, shape),
    )


def dominant_dtype(tensors: tuple[TensorSpec, ...] | list[TensorSpec]) -> str:
    """The dtype holding most bytes (what the model computes and caches KV in)."""
    by_dtype: Counter[str] = Counter()
    for t in tensors:
        by_dtype[t.dtype] += t.nbytes
    return by_dtype.most_common(1)[0][0] if by_dtype else "BF16"

"""A minimal Llama-style decoder whose weights and KV cache live in the arena buffer.

gpt-fast style: the module tree is built on the meta device (no memory, no init), then every parameter
is bound to a view of the arena with `load_state_dict(assign=True)`; module names equal HF tensor
names, so the bindings are the checkpoint's names verbatim. Covers the Llama family of the catalog:
RMSNorm, rotary embeddings (HF rotate-half convention), grouped-query attention, SwiGLU MLP, tied or
untied embeddings, Qwen2's q/k/v biases, Phi-3's fused qkv / gate_up projections.

The KV cache is paged: a sequence holds cross-layer blocks `[layers, 2, block_tokens, kv_heads,
head_dim]` whose bytes are arena regions handed out by the KV policy (ElasticKV blocks or a static
pool), so the cache shares memory with the weights exactly as in the simulator.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tangram_sim.errors import ModelError
from tangram_sim.models.spec import ModelSpec

__all__ = ["SUPPORTED_FAMILIES", "CausalLM", "EngineConfig", "PagedKv", "build_engine", "greedy"]

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "phi3")


@dataclass(slots=True, frozen=True)
class EngineConfig:
    family: str  # HF model_type
    hidden: int  # model width D
    layers: int  # decoder blocks L
    heads: int  # query heads H
    kv_heads: int  # key/value heads (GQA: H is a multiple)
    head_dim: int  # width of one head
    intermediate: int  # MLP width
    vocab: int  # rows of the embedding
    tied: bool  # no lm_head tensor: the embedding is the output projection
    eps: float  # RMSNorm epsilon
    rope_theta: float  # rotary base
    qkv_bias: bool  # q/k/v projections have biases (Qwen2)
    o_bias: bool  # o_proj has a bias (attention_bias)
    mlp_bias: bool  # MLP projections have biases (mlp_bias)
    fused: bool  # Phi-3: qkv_proj and gate_up_proj

    @classmethod
    def from_checkpoint(cls, spec: ModelSpec, config: Mapping[str, Any] | None) -> EngineConfig:
        """Numbers from the spec's ArchInfo, epsilon and rotary base from config.json."""
        a = spec.arch
        where = spec.source
        if a is None or a.family not in SUPPORTED_FAMILIES or spec.family == "llava":
            raise ModelError(
                f"{where}: the engine runs {', '.join(SUPPORTED_FAMILIES)} decoders, "
                f"got family {spec.family!r} (loading works for every family)"
            )
        cfg = dict(config or {})
        if cfg.get("rope_scaling"):
            raise ModelError(f"{where}: rope_scaling {cfg['rope_scaling']!r} is not supported, expected none")
        if not a.head_dim or a.head_dim % 2:
            raise ModelError(
                f"{where}: head_dim {a.head_dim} is odd or unknown, expected an even rotary width"
            )
        names = {t.name for t in spec.tensors}
        p = "model.layers.0."
        default_eps = 1e-5 if a.family in ("llama", "phi3") else 1e-6
        return cls(
            family=a.family,
            hidden=int(a.hidden_size or 0),
            layers=int(a.num_layers or 0),
            heads=int(a.num_heads or 0),
            kv_heads=int(a.num_kv_heads or 0),
            head_dim=int(a.head_dim or 0),
            intermediate=int(a.intermediate_size or 0),
            vocab=int(a.vocab_size or 0),
            tied=bool(a.tie_word_embeddings),
            eps=float(cfg.get("rms_norm_eps") or default_eps),
            rope_theta=float(cfg.get("rope_theta") or 10000.0),
            qkv_bias=f"{p}self_attn.q_proj.bias" in names,
            o_bias=f"{p}self_attn.o_proj.bias" in names,
            mlp_bias=f"{p}mlp.down_proj.bias" in names,
            fused=f"{p}self_attn.qkv_proj.weight" in names,
        )

    def kv_block_shape(self, block_tokens: int) -> tuple[int, int, int, int, int]:
        """One cross-layer KV block: [layers, 2 (K, V), block_tokens, kv_heads, head_dim]."""
        return (self.layers, 2, block_tokens, self.kv_heads, self.head_dim)


class PagedKv:
    """One sequence's KV cache: a list of cross-layer block views of the arena."""

    def __init__(self, block_tokens: int) -> None:
        self.block_tokens = block_tokens  # tokens per block T
        self.blocks: list[torch.Tensor] = []  # each [L, 2, T, KV, hd], a view of the arena

    @property
    def capacity(self) -> int:
        return len(self.blocks) * self.block_tokens

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v: [S, KV, hd] at token positions start..start+S-1."""
        T = self.block_tokens
        pos, end = start, start + k.shape[0]
        if end > self.capacity:
            raise RuntimeError(f"KV holds {self.capacity} tokens, {end} needed (allocate blocks first)")
        while pos < end:
            b, s = divmod(pos, T)
            n = min(T - s, end - pos)
            block = self.blocks[b]
            block[layer, 0, s : s + n] = k[pos - start : pos - start + n]
            block[layer, 1, s : s + n] = v[pos - start : pos - start + n]
            pos += n

    def read(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of the first `length` tokens: [length, KV, hd] each (gathered from the blocks)."""
        used = self.blocks[: -(-length // self.block_tokens)]
        kv = torch.cat([blk[layer] for blk in used], dim=1) if len(used) > 1 else used[0][layer]
        return kv[0, :length], kv[1, :length]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, S, D]; statistics in fp32 as HF does, then back to the weights' dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, c: EngineConfig) -> None:
        super().__init__()
        self.c = c
        q, kv = c.heads * c.head_dim, c.kv_heads * c.head_dim
        if c.fused:
            self.qkv_proj = nn.Linear(c.hidden, q + 2 * kv, bias=False)
        else:
            self.q_proj = nn.Linear(c.hidden, q, bias=c.qkv_bias)
            self.k_proj = nn.Linear(c.hidden, kv, bias=c.qkv_bias)
            self.v_proj = nn.Linear(c.hidden, kv, bias=c.qkv_bias)
        self.o_proj = nn.Linear(q, c.hidden, bias=c.o_bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        layer: int,
        caches: Sequence[PagedKv],
        starts: Sequence[int],
    ) -> torch.Tensor:
        c = self.c
        B, S, _ = x.shape  # x: [B, S, D]
        if c.fused:
            q, k, v = self.qkv_proj(x).split([c.heads * c.head_dim, *(2 * [c.kv_heads * c.head_dim])], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, S, c.heads, c.head_dim)  # q: [B, S, H, hd]
        k = k.view(B, S, c.kv_heads, c.head_dim)  # k, v: [B, S, KV, hd]
        v = v.view(B, S, c.kv_heads, c.head_dim)
        q = q * cos + _rotate_half(q) * sin  # cos, sin: [B, S, 1, hd]
        k = k * cos + _rotate_half(k) * sin
        group = c.heads // c.kv_heads
        out = torch.empty(B, c.heads, S, c.head_dim, dtype=x.dtype, device=x.device)
        for b, (cache, start) in enumerate(zip(caches, starts)):
            cache.write(layer, start, k[b], v[b])
            kk, vv = cache.read(layer, start + S)  # kk, vv: [T, KV, hd], T = start + S
            kk = kk.transpose(0, 1).repeat_interleave(group, dim=0)  # [H, T, hd]
            vv = vv.transpose(0, 1).repeat_interleave(group, dim=0)
            mask = None
            if S > 1:  # query s sees keys 0..start+s
                mask = torch.ones(S, start + S, dtype=torch.bool, device=x.device).tril(diagonal=start)
            out[b] = F.scaled_dot_product_attention(q[b].transpose(0, 1), kk, vv, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, c.heads * c.head_dim))


class MLP(nn.Module):
    def __init__(self, c: EngineConfig) -> None:
        super().__init__()
        self.fused = c.fused
        if c.fused:
            self.gate_up_proj = nn.Linear(c.hidden, 2 * c.intermediate, bias=False)
        else:
            self.gate_proj = nn.Linear(c.hidden, c.intermediate, bias=c.mlp_bias)
            self.up_proj = nn.Linear(c.hidden, c.intermediate, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate, c.hidden, bias=c.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, S, D] -> [B, S, I] -> [B, S, D]
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, c: EngineConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden, c.eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden, c.eps)
        self.mlp = MLP(c)


class Decoder(nn.Module):
    def __init__(self, c: EngineConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab, c.hidden)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.layers))
        self.norm = RMSNorm(c.hidden, c.eps)


class CausalLM(nn.Module):
    """HF module names (`model.layers.0.self_attn.q_proj`), so state-dict keys are tensor names."""

    def __init__(self, c: EngineConfig) -> None:
        super().__init__()
        self.config = c
        self.model = Decoder(c)
        if not c.tied:
            self.lm_head = nn.Linear(c.hidden, c.vocab, bias=False)
        self.inv_freq: torch.Tensor | None = None  # rotary frequencies, set when bound to real weights

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        caches: Sequence[PagedKv],
        last_only: bool = True,
    ) -> torch.Tensor:
        """tokens, positions: [B, S] (int64); caches: one PagedKv per row, already large enough.

        Row b's tokens occupy positions[b, 0] .. positions[b, 0] + S - 1 (prefill from 0, or one
        decode step); returns fp32 logits [B, S, V], or [B, 1, V] for the last position only.
        """
        assert self.inv_freq is not None, "bind the weights with build_engine first"
        c = self.config
        starts = [int(p) for p in positions[:, 0].tolist()]
        x = self.model.embed_tokens(tokens)  # x: [B, S, D]
        freqs = positions.float()[..., None] * self.inv_freq  # [B, S, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]  # [B, S, 1, hd]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = x + layer.self_attn(layer.input_layernorm(x), cos, sin, i, caches, starts)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        if last_only:
            x = x[:, -1:]
        x = self.model.norm(x)
        head = self.model.embed_tokens.weight if c.tied else self.lm_head.weight
        return F.linear(x, head).float()  # [B, S', V]


def build_engine(
    config: EngineConfig, weights: Mapping[str, torch.Tensor], device: str | torch.device
) -> CausalLM:
    """Build on the meta device, then bind every parameter to its arena view (no copies).

    `weights` must hold exactly the model's tensors by HF name; a missing or extra name, or a wrong
    shape, is a ModelError naming it.
    """
    with torch.device("meta"):
        model = CausalLM(config)
    model.requires_grad_(False)
    try:
        model.load_state_dict(dict(weights), strict=True, assign=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:300]
        raise ModelError(
            f"cannot bind the weights to the engine ({first}), expected HF Llama tensor names"
        ) from None
    dev = torch.device(device)
    half = config.head_dim // 2
    model.inv_freq = 1.0 / (
        config.rope_theta ** (torch.arange(0, half, dtype=torch.float32, device=dev) * 2 / config.head_dim)
    )
    model.eval()
    return model


def greedy(logits: torch.Tensor) -> list[int]:
    """Argmax token of each row's last position: logits [B, S, V] -> B token ids."""
    return [int(t) for t in logits[:, -1].argmax(dim=-1).tolist()]

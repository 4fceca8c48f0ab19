"""A minimal Llama-style decoder whose weights and KV cache live in the arena buffer.

gpt-fast style: the module tree is built on the meta device (no memory, no init), then every parameter
is bound to a view of the arena with `load_state_dict(assign=True)`; module names equal HF tensor
names, so the bindings are the checkpoint's names verbatim. Covers the Llama family of the catalog:
RMSNorm, rotary embeddings (HF rotate-half convention), grouped-query attention, SwiGLU MLP, tied or
untied embeddings, Qwen2's q/k/v biases, Phi-3's fused qkv / gate_up projections.

The KV cache is paged: a sequence holds cross-layer blocks `[layers, 2, block_tokens, kv_heads,
head_dim]` whose bytes are arena regions handed out by the KV policy (ElasticKV blocks or a static
pool), so the cache shares memory with the weights exactly as in the simulator.

Attention does the same few device operations per layer whatever the batch: when every block is a
view of one storage (the arena buffer), each row's K/V are written and gathered by index tensors built
once per forward pass from a block table (`KvBatch`), then one SDPA runs over all rows, padded to the
longest context with a per-row boolean mask. So a decode step's time follows the device work, not the
number of sequences. Blocks of different storages (tests) take a per-row fallback with the same result.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tangram_sim.errors import ModelError
from tangram_sim.models.spec import ModelSpec
from tangram_sim.real.kvcache import KvBatch, PagedKv

__all__ = [
    "SUPPORTED_FAMILIES", "CausalLM", "EngineConfig", "build_engine", "complete", "greedy", "stage_blocks",
    "stage_tensors",
]

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
                f"got family {spec.family!r}"
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
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer: int, kv: KvBatch
    ) -> torch.Tensor:
        """x: [B, S, D] (one row per sequence), or [N, D] packed: the real tokens of a ragged batch in
        row order (`kv.valid` says where each sits in the padded [B * S] grid); returns the same shape.

        Packed, the projections (most of a prefill's work) run on the N real tokens only; attention
        alone pads to [B, S], since each row attends to its own keys."""
        c = self.c
        packed = x.dim() == 2
        if c.fused:
            q, k, v = self.qkv_proj(x).split([c.heads * c.head_dim, *(2 * [c.kv_heads * c.head_dim])], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        lead = q.shape[:-1]  # [B, S] or [N]
        q = q.view(*lead, c.heads, c.head_dim)  # q: [.., H, hd]
        k = k.view(*lead, c.kv_heads, c.head_dim)  # k, v: [.., KV, hd]
        v = v.view(*lead, c.kv_heads, c.head_dim)
        q = q * cos + _rotate_half(q) * sin  # cos, sin: [.., 1, hd]
        k = k * cos + _rotate_half(k) * sin
        if packed:  # to the padded grid for attention (padding rows stay zero, no real token reads them)
            q, k, v = (kv.unpack(t) for t in (q, k, v))
        B, S = q.shape[:2]
        kk, vv = kv.store_and_gather(layer, k, v)  # [B, KV, T, hd]
        # GQA without copying K/V per query head: head h uses KV head h // G, so the G heads of one KV
        # head become G * S queries of that head
        G = c.heads // c.kv_heads
        q = q.view(B, S, c.kv_heads, G, c.head_dim).permute(0, 2, 3, 1, 4).reshape(B, c.kv_heads, G * S, -1)
        out = F.scaled_dot_product_attention(q, kk, vv, attn_mask=kv.mask)  # [B, KV, G * S, hd]
        out = out.view(B, c.kv_heads, G, S, c.head_dim).permute(0, 3, 1, 2, 4).reshape(B, S, c.heads * c.head_dim)
        if packed:
            out = out.view(B * S, -1).index_select(0, kv.valid)
        return self.o_proj(out)


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
        self.stage = (0, c.layers)  # decoder layers it computes (a pipeline stage: a range of them)
        self.embeds = True  # it embeds the tokens (the first stage, or the whole model)
        self.has_head = True  # it computes the final norm and the head (the last stage, or the whole model)
        self.dtype = torch.float32  # of its activations and KV: its weights' (set by build_engine)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        caches: Sequence[PagedKv],
        last_only: bool = True,
        lengths: Sequence[int] | None = None,
        gate: Callable[[int], None] | None = None,
        hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens, positions: [B, S] (int64); caches: one PagedKv per row, already large enough.

        Row b's tokens occupy positions[b, 0] .. positions[b, 0] + S - 1 (prefill from 0, or one
        decode step; rows may start at different positions); returns fp32 logits [B, S, V], or
        [B, 1, V] for the last position only.

        Ragged batch (`lengths`): row b holds lengths[b] (1 .. S) real tokens, right-padded to S with
        any token ids and positions; only the real ones get KV written and are attended to, and
        `last_only` takes each row's position lengths[b] - 1. With `last_only=False` the logits at
        padded positions are meaningless.

        `gate` (execute-while-load): called with block j before the pass computes block j of
        `models.layers.layer_blocks` - 0 the embeddings, 1 + i decoder layer i, L + 1 the final norm and
        head - and with L + 2 once the logits are computed; it may block until block j's weights have
        landed (`real.landing`), and it is where the layers' spans are measured.

        A pipeline stage (`build_engine(stage=...)`) computes its decoder layers only: the first stage
        embeds `tokens`, a later one starts from `hidden`, what the previous stage returned; a stage
        before the last returns its hidden states ([B, S, D], or [N, D] packed) instead of logits (the
        last stage may be the head alone, the first the embeddings alone).
        Every stage gets the same tokens, positions and lengths, so each packs the rows alike.
        """
        assert self.inv_freq is not None, "bind the weights with build_engine first"
        c = self.config
        B, S = tokens.shape
        if len(caches) != B:
            raise ValueError(f"{len(caches)} caches for {B} rows, expected one per row")
        if lengths is not None and (len(lengths) != B or any(not 1 <= int(n) <= S for n in lengths)):
            raise ValueError(f"lengths {list(lengths)} for {B} rows of {S} tokens, expected 1 .. {S} each")
        starts = [int(p) for p in positions[:, 0].tolist()]
        rows = [S] * B if lengths is None else [int(n) for n in lengths]
        dtype = self.dtype
        kv = KvBatch(c, caches, starts, rows, S, tokens.device, dtype)
        packed = kv.valid is not None  # ragged: every layer but attention runs on the real tokens only
        if packed:
            tokens, positions = (t.reshape(-1).index_select(0, kv.valid) for t in (tokens, positions))
        lo, hi = self.stage
        if gate is not None:
            gate(0)
        if self.embeds:
            x = self.model.embed_tokens(tokens)  # x: [B, S, D], or [N, D] packed
        elif hidden is None or hidden.shape[:-1] != tokens.shape:
            raise ValueError(f"stage of layers [{lo}, {hi}): hidden states {None if hidden is None else tuple(hidden.shape)}"
                             f" for tokens {tuple(tokens.shape)}, expected the previous stage's output")
        else:
            x = hidden.to(dtype)
        freqs = positions.float()[..., None] * self.inv_freq  # [.., hd/2]
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(-2)  # [.., 1, hd]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for i in range(lo, hi):
            layer = self.model.layers[i]
            if gate is not None:
                gate(1 + i)
            x = x + layer.self_attn(layer.input_layernorm(x), cos, sin, i, kv)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        if not self.has_head:
            return x  # a stage before the last: its hidden states go to the next one
        if packed:
            if last_only:  # each row's last real token
                ends = torch.tensor(rows, device=x.device).cumsum(0) - 1
                x = x.index_select(0, ends)[:, None]
            else:
                x = kv.unpack(x)
        elif last_only:
            if lengths is None:
                x = x[:, -1:]
            else:
                last = torch.tensor([n - 1 for n in rows], device=x.device)
                x = x[torch.arange(B, device=x.device), last][:, None]
        if gate is not None:
            gate(1 + c.layers)
        x = self.model.norm(x)
        head = self.model.embed_tokens.weight if c.tied else self.lm_head.weight
        logits = F.linear(x, head).float()  # [B, S', V]
        if gate is not None:
            gate(2 + c.layers)
        return logits


def stage_blocks(config: EngineConfig, blocks: tuple[int, int]) -> tuple[tuple[int, int], bool, bool]:
    """A pipeline stage of layer blocks [b0, b1) (`models.layers.layer_blocks`: 0 the embeddings, 1 + i
    decoder layer i, L + 1 the final norm and head) as (its decoder layers [lo, hi), whether it embeds
    the tokens, whether it computes the head)."""
    b0, b1 = blocks
    n = config.layers + 2
    if not 0 <= b0 < b1 <= n:
        raise ValueError(f"stage blocks [{b0}, {b1}) of a model of {n} blocks")
    return (max(0, b0 - 1), min(config.layers, b1 - 1)), b0 == 0, b1 == n


def stage_tensors(config: EngineConfig, names: Sequence[str], blocks: tuple[int, int]) -> list[str]:
    """Of the model's tensor `names`, those a pipeline stage of layer blocks `blocks` binds: its decoder
    layers', the embeddings on the first stage, the final norm and the head on the last (a tied model's
    token table there too: its head multiplies by it)."""
    (lo, hi), embeds, head = stage_blocks(config, blocks)
    out = []
    for name in names:
        if name.startswith("model.layers."):
            keep = lo <= int(name.split(".")[2]) < hi
        elif name.startswith("model.embed_tokens."):
            keep = embeds or (head and config.tied)
        else:  # model.norm, lm_head
            keep = head
        if keep:
            out.append(name)
    return out


def build_engine(
    config: EngineConfig, weights: Mapping[str, torch.Tensor], device: str | torch.device,
    stage: tuple[int, int] | None = None,
) -> CausalLM:
    """Build on the meta device, then bind every parameter to its arena view (no copies).

    `weights` must hold exactly the model's tensors by HF name (with `stage`, layer blocks [b0, b1) of a
    pipeline, `stage_blocks`: exactly that stage's, `stage_tensors`); a missing or extra name, or a wrong
    shape, is a ModelError naming it. The other parameters of a stage stay on the meta device, never
    computed.
    """
    with torch.device("meta"):
        model = CausalLM(config)
    model.requires_grad_(False)
    if stage is not None:
        model.stage, model.embeds, model.has_head = stage_blocks(config, stage)
    try:
        if stage is None:
            model.load_state_dict(dict(weights), strict=True, assign=True)
        else:
            want = set(stage_tensors(config, list(model.state_dict()), stage))
            got = set(weights)
            if want != got:
                odd = sorted(got - want) or sorted(want - got)
                raise RuntimeError(f"stage of blocks [{stage[0]}, {stage[1]}) "
                                   f"{'does not compute' if got - want else 'lacks'} {odd[0]}")
            model.load_state_dict(dict(weights), strict=False, assign=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:300]
        raise ModelError(
            f"cannot bind the weights to the engine ({first}), expected HF Llama tensor names"
        ) from None
    ref = weights.get("model.embed_tokens.weight")
    if ref is None:
        ref = next((w for n, w in weights.items() if n.startswith("model.layers.")), None)
    model.dtype = ref.dtype if ref is not None else torch.float32
    dev = torch.device(device)
    half = config.head_dim // 2
    model.inv_freq = 1.0 / (
        config.rope_theta ** (torch.arange(0, half, dtype=torch.float32, device=dev) * 2 / config.head_dim)
    )
    model.eval()
    return model


def complete(model: CausalLM, weights: Mapping[str, torch.Tensor]) -> None:
    """A pipeline stage's engine made the whole model's (its instance consolidated): every parameter bound
    to `weights` (all of the model's, as `build_engine` takes them), the modules built with the stage
    reused; a ModelError as `build_engine`'s."""
    try:
        model.load_state_dict(dict(weights), strict=True, assign=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:300]
        raise ModelError(f"cannot bind the weights to the engine ({first}), expected HF Llama tensor names") from None
    model.stage = (0, model.config.layers)
    model.embeds = model.has_head = True


def greedy(logits: torch.Tensor) -> list[int]:
    """Argmax token of each row's last position: logits [B, S, V] -> B token ids."""
    return [int(t) for t in logits[:, -1].argmax(dim=-1).tolist()]

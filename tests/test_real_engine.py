"""The engine on arena views (paged KV in arena blocks) against a plain dense reference."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from safetensors.torch import load_file  # noqa: E402

from tangram_sim.arena import State  # noqa: E402
from tangram_sim.errors import CapacityError, ModelError  # noqa: E402
from tangram_sim.policies.kv import KV  # noqa: E402
from tangram_sim.real.checkpoints import make_checkpoints  # noqa: E402
from tangram_sim.real.executor import RealGpu  # noqa: E402

MODELS = ("llama-3-8b", "qwen2.5-3b", "phi-3-mini-4k")  # GQA untied, tied + q/k/v biases, fused projections


@pytest.fixture(scope="module")
def ckdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("engine-ckpts")
    make_checkpoints([*MODELS, "opt-6.7b"], out, "tiny", dtype="float32", seed=3)
    return out


def dense_reference(folder: Path, tokens: list[int]) -> torch.Tensor:
    """Full causal attention over the whole sequence, no cache, straight from the files: [S, V]."""
    w: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        w.update({k: v.float() for k, v in load_file(str(shard)).items()})
    cfg = json.loads((folder / "config.json").read_text())
    D, H = cfg["hidden_size"], cfg["num_attention_heads"]
    KVH, L = cfg.get("num_key_value_heads", H), cfg["num_hidden_layers"]
    hd = cfg.get("head_dim") or D // H
    eps = cfg.get("rms_norm_eps") or (1e-6 if cfg["model_type"] == "qwen2" else 1e-5)
    theta = cfg.get("rope_theta", 10000.0)
    S = len(tokens)
    ang = torch.arange(S, dtype=torch.float64)[:, None] / theta ** (torch.arange(0, hd, 2).double() / hd)
    cos, sin = (
        torch.cat([ang.cos()] * 2, -1)[:, None].float(),
        torch.cat([ang.sin()] * 2, -1)[:, None].float(),
    )

    def rope(t: torch.Tensor) -> torch.Tensor:
        return t * cos + torch.cat([-t[..., hd // 2 :], t[..., : hd // 2]], -1) * sin

    def norm(x: torch.Tensor, name: str) -> torch.Tensor:
        return w[name] * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def lin(x: torch.Tensor, name: str) -> torch.Tensor:
        y = x @ w[f"{name}.weight"].T
        return y + w[f"{name}.bias"] if f"{name}.bias" in w else y

    x = w["model.embed_tokens.weight"][torch.tensor(tokens)]
    causal = torch.ones(S, S, dtype=torch.bool).triu(1)
    for i in range(L):
        p = f"model.layers.{i}."
        h = norm(x, p + "input_layernorm.weight")
        if p + "self_attn.qkv_proj.weight" in w:
            q, k, v = lin(h, p + "self_attn.qkv_proj").split([H * hd, KVH * hd, KVH * hd], -1)
        else:
            q, k, v = (lin(h, p + f"self_attn.{n}_proj") for n in "qkv")
        q, k = rope(q.view(S, H, hd)), rope(k.view(S, KVH, hd))
        k, v = k.repeat_interleave(H // KVH, 1), v.view(S, KVH, hd).repeat_interleave(H // KVH, 1)
        scores = torch.einsum("shd,thd->hst", q, k) / math.sqrt(hd)
        att = scores.masked_fill(causal, float("-inf")).softmax(-1)
        x = x + lin(torch.einsum("hst,thd->shd", att, v).reshape(S, H * hd), p + "self_attn.o_proj")
        h = norm(x, p + "post_attention_layernorm.weight")
        if p + "mlp.gate_up_proj.weight" in w:
            g, u = lin(h, p + "mlp.gate_up_proj").chunk(2, -1)
        else:
            g, u = lin(h, p + "mlp.gate_proj"), lin(h, p + "mlp.up_proj")
        x = x + lin(torch.nn.functional.silu(g) * u, p + "mlp.down_proj")
    x = norm(x, "model.norm.weight")
    return x @ w.get("lm_head.weight", w["model.embed_tokens.weight"]).T


PROMPT = [5, 17, 200, 3, 99, 42, 7, 128, 1, 64, 250]  # 11 tokens: spans 3 blocks of 4 tokens


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("kv", ["elastic", "static"])
def test_engine_matches_dense_reference(ckdir: Path, model: str, kv: str) -> None:
    gpu = RealGpu("cpu", 4 << 20, "group", kv=KV.create(kv, block_tokens=4))
    gpu.start_instance(ckdir / model)
    first = gpu.prefill(model, PROMPT, all_logits=True)
    ref = dense_reference(ckdir / model, PROMPT)
    torch.testing.assert_close(first.logits[0], ref, rtol=1e-4, atol=1e-4)
    assert first.tokens == [int(ref[-1].argmax())]
    rid = first.rids[0]
    seq = list(PROMPT) + first.tokens
    for _ in range(6):  # crosses into a fourth and fifth block
        step = gpu.decode_step([rid])
        ref = dense_reference(ckdir / model, seq)
        torch.testing.assert_close(step.logits[0, -1], ref[-1], rtol=1e-4, atol=1e-4)
        seq.append(step.tokens[0])
    # The KV cache lives in the arena: ElasticKV regions, or blocks of the static pool.
    kv_bytes = gpu.arena.bytes_in(State.KV)
    assert kv_bytes > 0
    gpu.check()
    gpu.end_instance(model)
    assert gpu.arena.bytes_in(State.KV) == 0
    gpu.check()


def test_batched_decode_of_different_lengths(ckdir: Path) -> None:
    model = "llama-3-8b"
    gpu = RealGpu("cpu", 4 << 20, kv=KV.create("elastic", block_tokens=4))
    gpu.start_instance(ckdir / model)
    prompts = [PROMPT, [9, 8, 7], list(range(30, 48))]
    rids, seqs = [], []
    for p in prompts:
        step = gpu.prefill(model, p)
        rids.append(step.rids[0])
        seqs.append(list(p) + step.tokens)
    for _ in range(3):
        step = gpu.decode_step(rids)
        for b, seq in enumerate(seqs):
            ref = dense_reference(ckdir / model, seq)
            torch.testing.assert_close(step.logits[b, -1], ref[-1], rtol=1e-4, atol=1e-4)
            seq.append(step.tokens[b])
    gpu.finish(rids[1])
    gpu.check()
    gen = gpu.generate(model, [1, 2, 3], 4)
    assert len(gen.tokens) == 5 and gen.ttft_s > 0
    gpu.end_instance(model)
    assert gpu.arena.bytes_in(State.KV) == 0


def test_bf16_engine_runs_and_tracks_fp32(tmp_path: Path) -> None:
    make_checkpoints(["llama-3-8b"], tmp_path, "tiny", dtype="bfloat16")
    gpu = RealGpu("cpu", 2 << 20)
    gpu.start_instance(tmp_path / "llama-3-8b")
    step = gpu.prefill("llama-3-8b", PROMPT)
    ref = dense_reference(tmp_path / "llama-3-8b", PROMPT)  # fp32 math on the bf16 weights
    assert torch.isfinite(step.logits).all()
    assert torch.nn.functional.cosine_similarity(step.logits[0, -1], ref[-1].float(), dim=0) > 0.99


def test_kv_pressure_evicts_retained_weights_then_waits(ckdir: Path) -> None:
    gpu = RealGpu("cpu", 1_300_000, "tensor", retention="lru", kv=KV.create("elastic", block_tokens=16))
    gpu.start_instance(ckdir / "qwen2.5-3b")
    gpu.end_instance("qwen2.5-3b")  # retained, unpinned
    gpu.start_instance(ckdir / "llama-3-8b")
    before = gpu.arena.model_bytes("qwen2.5-3b")
    rid = gpu.prefill("llama-3-8b", [1] * 300).rids[0]
    assert gpu.arena.model_bytes("qwen2.5-3b") < before  # ElasticKV evicted another model's units
    with pytest.raises(CapacityError, match="would wait"):
        gpu.prefill("llama-3-8b", [1] * 3000)  # 768 KB: more than all evictable bytes
    gpu.check()
    gpu.finish(rid)
    gpu.end_instance("llama-3-8b")
    gpu.check()


def test_unsupported_family_loads_but_has_no_engine(ckdir: Path) -> None:
    gpu = RealGpu("cpu", 4 << 20, verify=True)
    stats = gpu.start_instance(ckdir / "opt-6.7b")
    assert stats.loaded_bytes == stats.needed_bytes
    with pytest.raises(ModelError, match="engine runs llama"):
        gpu.prefill("opt-6.7b", [1, 2])
    gpu.end_instance("opt-6.7b")
    gpu.check()


@pytest.mark.gpu
@pytest.mark.parametrize("model", MODELS)
def test_engine_on_cuda_matches_reference(ckdir: Path, model: str) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    gpu = RealGpu("cuda", 64 << 20, kv=KV.create("elastic", block_tokens=4))
    gpu.start_instance(ckdir / model)
    first = gpu.prefill(model, PROMPT, all_logits=True)
    ref = dense_reference(ckdir / model, PROMPT)
    torch.testing.assert_close(first.logits[0].cpu(), ref, rtol=1e-3, atol=1e-3)
    seq = list(PROMPT) + first.tokens
    for _ in range(4):
        step = gpu.decode_step(first.rids)
        torch.testing.assert_close(
            step.logits[0, -1].cpu(), dense_reference(ckdir / model, seq)[-1], rtol=1e-3, atol=1e-3
        )
        seq.append(step.tokens[0])
    gpu.end_instance(model)
    gpu.check()

"""The engine on arena views (paged KV in arena blocks) against a plain dense reference."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from safetensors.torch import load_file, save_file  # noqa: E402

from tangram_sim.arena import State  # noqa: E402
from tangram_sim.errors import CapacityError, ModelError  # noqa: E402
from tangram_sim.models.catalog import llama_config  # noqa: E402
from tangram_sim.policies.kv import KV  # noqa: E402
from tangram_sim.real.checkpoints import make_checkpoints  # noqa: E402
from tangram_sim.real.device_arena import DeviceArena  # noqa: E402
from tangram_sim.real.engine import CausalLM, EngineConfig, PagedKv  # noqa: E402
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


SENTINEL = float("nan")  # what KV slots hold until the engine writes them: reading one poisons logits


def paged(c: EngineConfig, tokens: list[int], shared: bool, block_tokens: int = 4) -> list[PagedKv]:
    """One PagedKv per row with room for tokens[b] tokens, every slot holding SENTINEL.

    shared: blocks are views of one arena buffer, in shuffled order, at offsets that are no multiple of
    a token's K row (the engine's indexed path); else each block is a tensor of its own (its fallback).
    """
    shape = c.kv_block_shape(block_tokens)
    need = [-(-n // block_tokens) for n in tokens]
    caches = [PagedKv(block_tokens) for _ in tokens]
    if not shared:
        for cache, n in zip(caches, need):
            cache.blocks = [torch.full(shape, SENTINEL) for _ in range(n)]
        return caches
    stride = math.prod(shape) * 4 + 12
    arena = DeviceArena(-(-(sum(need) * stride) // 256) * 256)
    arena.buffer.view(torch.float32).fill_(SENTINEL)
    slots = list(range(sum(need)))[::-1]
    slots = slots[1::2] + slots[::2]
    for cache, n in zip(caches, need):
        cache.blocks = [arena.tensor(slots.pop() * stride, torch.float32, shape) for _ in range(n)]
    return caches


def run(
    engine: CausalLM, rows: list[list[int]], starts: list[int], caches: list[PagedKv], **kw
) -> torch.Tensor:
    """One forward pass of right-padded rows (ragged when their lengths differ)."""
    S = max(len(r) for r in rows)
    tokens = torch.tensor([r + [255] * (S - len(r)) for r in rows])
    positions = torch.tensor(starts)[:, None] + torch.arange(S)
    lengths = [len(r) for r in rows] if any(len(r) != S for r in rows) else None
    with torch.inference_mode():
        return engine(tokens, positions, caches, lengths=lengths, **kw)


def assert_same_kv(c: EngineConfig, a: PagedKv, b: PagedKv, length: int) -> None:
    for layer in range(c.layers):
        for x, y in zip(a.read(layer, length), b.read(layer, length)):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


PROMPTS = [PROMPT, [9, 8, 7], list(range(30, 48)), [77]]  # 11, 3, 18, 1 tokens


def gpu_engine(ckdir: Path, model: str) -> CausalLM:
    gpu = RealGpu("cpu", 4 << 20, kv=KV.create("elastic", block_tokens=4))
    gpu.start_instance(ckdir / model)
    return gpu.engine(model)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("shared", [True, False], ids=["arena", "fallback"])
def test_batched_decode_equals_each_row_alone(ckdir: Path, model: str, shared: bool) -> None:
    engine = gpu_engine(ckdir, model)
    c = engine.config
    steps = 3
    batched = paged(c, [len(p) + steps for p in PROMPTS], shared)
    alone = paged(c, [len(p) + steps for p in PROMPTS], shared=True)
    nxt = []
    for p, cb, ca in zip(PROMPTS, batched, alone):
        run(engine, [p], [0], [cb])
        nxt.append(int(run(engine, [p], [0], [ca])[0, -1].argmax()))
    lengths = [len(p) for p in PROMPTS]
    for _ in range(steps):  # rows of 11..21 tokens in blocks of 4: each step crosses some row's block
        logits = run(engine, [[t] for t in nxt], lengths, batched)
        assert logits.shape == (len(PROMPTS), 1, c.vocab)
        for b in range(len(PROMPTS)):
            one = run(engine, [[nxt[b]]], [lengths[b]], [alone[b]])
            torch.testing.assert_close(logits[b], one[0], rtol=1e-5, atol=1e-5)
            nxt[b] = int(one[0, -1].argmax())
            lengths[b] += 1
    for b, n in enumerate(lengths):
        assert_same_kv(c, batched[b], alone[b], n)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("shared", [True, False], ids=["arena", "fallback"])
def test_ragged_prefill_equals_each_prompt_alone(ckdir: Path, model: str, shared: bool) -> None:
    engine = gpu_engine(ckdir, model)
    c = engine.config
    lengths = [len(p) for p in PROMPTS]
    caches = paged(c, [n + 1 for n in lengths], shared)
    alone = paged(c, [n + 1 for n in lengths], shared=True)
    every = paged(c, lengths, shared)
    last = run(engine, PROMPTS, [0] * len(PROMPTS), caches)  # each row's last real position
    full = run(engine, PROMPTS, [0] * len(PROMPTS), every, last_only=False)
    assert last.shape == (len(PROMPTS), 1, c.vocab) and full.shape == (len(PROMPTS), max(lengths), c.vocab)
    for b, p in enumerate(PROMPTS):
        one = run(engine, [p], [0], [alone[b]], last_only=False)[0]
        torch.testing.assert_close(last[b, 0], one[-1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(full[b, : len(p)], one, rtol=1e-5, atol=1e-5)
        assert_same_kv(c, caches[b], alone[b], len(p))
        assert_same_kv(c, every[b], alone[b], len(p))
        for layer in range(c.layers):  # padded positions wrote nothing
            k, v = caches[b].read(layer, len(p) + 1)
            assert k[-1].isnan().all() and v[-1].isnan().all()
    # decoding continues from the ragged prefill as from prompts prefilled one by one
    nxt = [[int(x)] for x in last[:, -1].argmax(-1)]
    step = run(engine, nxt, lengths, caches)
    for b in range(len(PROMPTS)):
        torch.testing.assert_close(
            step[b], run(engine, nxt[b : b + 1], lengths[b : b + 1], alone[b : b + 1])[0]
        )


def test_gqa_with_several_kv_heads_matches_dense_reference(tmp_path: Path) -> None:
    """8 query heads on 2 KV heads (the catalog's tiny models have one KV head, or no grouping)."""
    cfg = llama_config(64, 128, 2, 8, 2, 256, rms_norm_eps=1e-5, rope_theta=10000.0, torch_dtype="float32")
    c = EngineConfig("llama", 64, 2, 8, 2, 8, 128, 256, False, 1e-5, 1e4, False, False, False, False)
    with torch.device("meta"):
        names = CausalLM(c).state_dict()
    g = torch.Generator().manual_seed(5)
    weights = {
        k: torch.randn(t.shape, generator=g) / math.sqrt(t.shape[-1])
        if t.dim() == 2
        else 1 + 0.1 * torch.randn(t.shape, generator=g)
        for k, t in names.items()
    }
    folder = tmp_path / "gqa"
    folder.mkdir()
    save_file(weights, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(cfg))
    engine = gpu_engine(tmp_path, "gqa")
    assert (engine.config.heads, engine.config.kv_heads) == (8, 2)
    for shared in (True, False):
        caches = paged(c, [len(p) + 2 for p in PROMPTS], shared)
        logits = run(engine, PROMPTS, [0] * len(PROMPTS), caches)
        seqs = [list(p) for p in PROMPTS]
        for _ in range(2):
            for b, seq in enumerate(seqs):
                ref = dense_reference(folder, seq)
                torch.testing.assert_close(logits[b, -1], ref[-1], rtol=1e-4, atol=1e-4)
                seq.append(int(ref[-1].argmax()))
            logits = run(engine, [s[-1:] for s in seqs], [len(s) - 1 for s in seqs], caches)


def test_block_table_follows_the_blocks() -> None:
    c = EngineConfig("llama", 64, 2, 4, 1, 16, 128, 256, False, 1e-5, 1e4, False, False, False, False)
    a, b = paged(c, [8, 4], shared=True)
    key, offsets = a.table()
    assert key is not None and offsets == [blk.storage_offset() for blk in a.blocks]
    a.blocks += b.blocks  # appended: the same storage
    assert a.table() == (key, [blk.storage_offset() for blk in a.blocks])
    a.blocks = a.blocks[1:]  # replaced
    assert a.table()[1] == [blk.storage_offset() for blk in a.blocks]
    del a.blocks[-1:]  # shrunk
    assert a.table()[1] == [blk.storage_offset() for blk in a.blocks]
    a.blocks.append(torch.zeros(c.kv_block_shape(4)))  # another storage: the fallback
    assert a.table()[0] is None
    assert PagedKv(4).table() == (None, [])


def test_ragged_lengths_are_checked(ckdir: Path) -> None:
    engine = gpu_engine(ckdir, "llama-3-8b")
    caches = paged(engine.config, [4, 4], shared=True)
    tokens, positions = torch.zeros(2, 3, dtype=torch.long), torch.arange(3).expand(2, 3)
    for lengths in ([3], [0, 3], [3, 4]):
        with pytest.raises(ValueError, match="lengths"):
            engine(tokens, positions, caches, lengths=lengths)
    with pytest.raises(RuntimeError, match="KV holds 4 tokens, 5 needed"):
        engine(tokens, positions + 2, caches)


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

"""The engine on arena views (paged KV in arena blocks) against a plain dense reference."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from safetensors.torch import load_file, save_file  # noqa: E402

from tangram_sim.arena import ARENA_ALIGNMENT  # noqa: E402
from tangram_sim.errors import ModelError  # noqa: E402
from tangram_sim.models.catalog import llama_config  # noqa: E402
from tangram_sim.real.backend import BackendSpec, DeviceBackend  # noqa: E402
from tangram_sim.real.checkpoints import make_checkpoints  # noqa: E402
from tangram_sim.real.device_arena import DeviceArena  # noqa: E402
from tangram_sim.real.engine import CausalLM, EngineConfig  # noqa: E402
from tangram_sim.real.kvcache import PagedKv  # noqa: E402
from tangram_sim.real.loader import open_checkpoint  # noqa: E402
from tangram_sim.real.session import run_requests, system_for  # noqa: E402

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


def dense_greedy(folder: Path, prompt: list[int], n: int) -> list[int]:
    """The first `n` greedy tokens of the dense reference."""
    seq, out = list(prompt), []
    for _ in range(n):
        out.append(int(dense_reference(folder, seq)[-1].argmax()))
        seq.append(out[-1])
    return out


def backend_engine(folder: Path, device: str = "cpu", capacity: int = 4 << 20) -> CausalLM:
    """The engine a cold start builds: the checkpoint read by a `DeviceBackend` into its arena (verified
    against the files), the engine on the arena's views."""
    name = folder.name
    spec = BackendSpec(device, capacity, ARENA_ALIGNMENT, {name: str(folder)}, "group", 8 << 20, 0, 4)
    backend = DeviceBackend(spec)
    try:
        units, offsets, end = backend.models[name].by_key, {}, 0
        for key, lay in units.items():
            offsets[key] = end
            end += -(-lay.nbytes // ARENA_ALIGNMENT) * ARENA_ALIGNMENT
        backend.start((), name, offsets, list(units), (), True)
        engine = backend.engines[name]
        assert all(p.untyped_storage().data_ptr() == backend.dev.buffer.untyped_storage().data_ptr()
                   for p in engine.state_dict().values())  # weights are views of the arena
        return engine
    finally:
        backend.close()


PROMPT = [5, 17, 200, 3, 99, 42, 7, 128, 1, 64, 250]  # 11 tokens: spans 3 blocks of 4 tokens


@pytest.mark.parametrize("model", MODELS)
def test_engine_matches_dense_reference(ckdir: Path, model: str) -> None:
    engine = backend_engine(ckdir / model)
    c = engine.config
    cache = paged(c, [len(PROMPT) + 6], shared=True)  # KV blocks: views of one arena buffer
    logits = run(engine, [PROMPT], [0], cache, last_only=False)
    ref = dense_reference(ckdir / model, PROMPT)
    torch.testing.assert_close(logits[0], ref, rtol=1e-4, atol=1e-4)
    seq = list(PROMPT) + [int(ref[-1].argmax())]
    for _ in range(6):  # crosses into a fourth and fifth block
        step = run(engine, [seq[-1:]], [len(seq) - 1], cache)
        ref = dense_reference(ckdir / model, seq)
        torch.testing.assert_close(step[0, -1], ref[-1], rtol=1e-4, atol=1e-4)
        seq.append(int(step[0, -1].argmax()))


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("kv", ["elastic", "static"])
def test_replay_generates_the_dense_greedy_tokens(ckdir: Path, model: str, kv: str) -> None:
    """Through the replay path (the lifecycle's KV in the arena: ElasticKV regions or the static pool)."""
    res = run_requests([open_checkpoint(ckdir / model)], [(model, PROMPT, 7, 0.0)],
                       system_for(kv=kv, kv_block_tokens=4), capacity=4 << 20, threads=1)
    assert res.requests.loc[0, "outcome"] == "completed"
    assert res.tokens[0] == dense_greedy(ckdir / model, PROMPT, 7)  # 18 tokens: 5 KV blocks of 4
    assert res.steps.loc[res.steps["kind"] == "decode", "kv_tokens"].tolist() == list(range(12, 18))


def test_batched_decode_of_different_lengths(ckdir: Path) -> None:
    model = "llama-3-8b"
    prompts = [PROMPT, [9, 8, 7], list(range(30, 48))]
    res = run_requests([open_checkpoint(ckdir / model)], [(model, p, 4, 0.0) for p in prompts],
                       system_for(kv_block_tokens=4), capacity=4 << 20, threads=1)
    steps = res.steps
    prefill = steps[steps["kind"] == "prefill"]
    decode = steps[steps["kind"] == "decode"]
    assert prefill["requests"].tolist() == [3] and prefill["tokens"].tolist() == [sum(map(len, prompts))]
    assert decode["requests"].tolist() == [3, 3, 3]  # one batched step per token after the first
    for rid, p in enumerate(prompts):
        assert res.tokens[rid] == dense_greedy(ckdir / model, p, 4), rid
    assert (res.requests["outcome"] == "completed").all() and res.timeline.iloc[-1]["kv_bytes"] == 0


SENTINEL = float("nan")  # what KV slots hold until the engine writes them: reading one poisons logits


def paged(c: EngineConfig, tokens: list[int], shared: bool, block_tokens: int = 4, device: str = "cpu",
          dtype: torch.dtype = torch.float32) -> list[PagedKv]:
    """One PagedKv per row with room for tokens[b] tokens, every slot holding SENTINEL.

    shared: blocks are views of one arena buffer, in shuffled order, at offsets that are no multiple of
    a token's K row (the engine's indexed path); else each block is a tensor of its own (its fallback),
    of `dtype`.
    """
    shape = c.kv_block_shape(block_tokens)
    need = [-(-n // block_tokens) for n in tokens]
    caches = [PagedKv(block_tokens) for _ in tokens]
    if not shared:
        for cache, n in zip(caches, need):
            cache.blocks = [torch.full(shape, SENTINEL, dtype=dtype, device=device) for _ in range(n)]
        return caches
    stride = math.prod(shape) * 4 + 12
    arena = DeviceArena(-(-(sum(need) * stride) // 256) * 256, device)
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
    device = caches[0].blocks[0].device
    tokens = torch.tensor([r + [255] * (S - len(r)) for r in rows], device=device)
    positions = torch.tensor(starts, device=device)[:, None] + torch.arange(S, device=device)
    lengths = [len(r) for r in rows] if any(len(r) != S for r in rows) else None
    with torch.inference_mode():
        return engine(tokens, positions, caches, lengths=lengths, **kw)


def assert_same_kv(c: EngineConfig, a: PagedKv, b: PagedKv, length: int) -> None:
    for layer in range(c.layers):
        for x, y in zip(a.read(layer, length), b.read(layer, length)):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


PROMPTS = [PROMPT, [9, 8, 7], list(range(30, 48)), [77]]  # 11, 3, 18, 1 tokens


def gpu_engine(ckdir: Path, model: str) -> CausalLM:
    return backend_engine(ckdir / model)


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
    folder = tmp_path / "llama-3-8b"
    engine = backend_engine(folder, capacity=2 << 20)
    cache = paged(engine.config, [len(PROMPT)], shared=False, dtype=torch.bfloat16)
    logits = run(engine, [PROMPT], [0], cache)
    ref = dense_reference(folder, PROMPT)  # fp32 math on the bf16 weights
    assert torch.isfinite(logits).all()
    assert torch.nn.functional.cosine_similarity(logits[0, -1].float(), ref[-1].float(), dim=0) > 0.99
    res = run_requests([open_checkpoint(folder)], [("llama-3-8b", PROMPT, 3, 0.0)], system_for(),
                       capacity=2 << 20, threads=1, verify=True)
    assert res.requests.loc[0, "outcome"] == "completed" and len(res.tokens[0]) == 3


def test_kv_pressure_evicts_retained_weights_then_rejects(ckdir: Path) -> None:
    ckpts = {m: open_checkpoint(ckdir / m) for m in ("qwen2.5-3b", "llama-3-8b")}
    requests = [("qwen2.5-3b", [1], 1, 0.0),  # loaded, then retained (unpinned) when llama starts
                ("llama-3-8b", [1] * 300, 2, 0.0),  # 77 KB of KV: more than the free bytes
                ("llama-3-8b", [1] * 3000, 2, 0.0)]  # 768 KB: more than all evictable bytes
    res = run_requests(ckpts, requests, system_for("tensor", "lru", kv_block_tokens=16), capacity=1_300_000,
                       threads=1)
    r = res.requests
    weights = sum(c.spec.weight_bytes for c in ckpts.values())
    assert r["outcome"].tolist() == ["completed", "completed", "rejected"]
    assert r.loc[2, "reason"] == "kv-capacity"
    assert r["bytes_evicted"].sum() == 0  # no cold start evicted anything...
    assert res.timeline.iloc[-1]["retained_bytes"] < weights  # ...ElasticKV evicted retained units


def test_unsupported_family_is_a_one_line_error_at_setup(ckdir: Path) -> None:
    with pytest.raises(ModelError, match="engine runs llama") as info:
        run_requests([open_checkpoint(ckdir / "opt-6.7b")], [("opt-6.7b", [1, 2], 1, 0.0)], system_for(),
                     capacity=4 << 20, verify=True)
    assert "\n" not in str(info.value)


@pytest.mark.gpu
@pytest.mark.parametrize("model", MODELS)
def test_engine_on_cuda_matches_reference(ckdir: Path, model: str) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    engine = backend_engine(ckdir / model, "cuda", 64 << 20)
    cache = paged(engine.config, [len(PROMPT) + 4], shared=True, device="cuda")
    logits = run(engine, [PROMPT], [0], cache, last_only=False)
    ref = dense_reference(ckdir / model, PROMPT)
    torch.testing.assert_close(logits[0].cpu(), ref, rtol=1e-3, atol=1e-3)
    seq = list(PROMPT) + [int(logits[0, -1].argmax())]
    for _ in range(4):
        step = run(engine, [seq[-1:]], [len(seq) - 1], cache)
        torch.testing.assert_close(
            step[0, -1].cpu(), dense_reference(ckdir / model, seq)[-1], rtol=1e-3, atol=1e-3
        )
        seq.append(int(step[0, -1].argmax()))
    res = run_requests([open_checkpoint(ckdir / model)], [(model, PROMPT, 5, 0.0)],
                       system_for(kv_block_tokens=4),
                       device="cuda", capacity=64 << 20, verify=True)
    assert res.tokens[0] == seq[len(PROMPT):]

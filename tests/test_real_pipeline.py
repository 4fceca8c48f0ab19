"""Pipelined cold starts on real devices (`real.pipelined`): stage engines against the whole model, and
replays on two CPU arenas whose tokens, bytes and accounting match the one-device replay's."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from safetensors.torch import load_file  # noqa: E402

from tangram_sim.errors import ModelError  # noqa: E402
from tangram_sim.real.checkpoints import make_checkpoints  # noqa: E402
from tangram_sim.real.engine import EngineConfig, build_engine, stage_tensors  # noqa: E402
from tangram_sim.real.kvcache import PagedKv  # noqa: E402
from tangram_sim.real.loader import open_checkpoint  # noqa: E402
from tangram_sim.real.replay import replay_trace  # noqa: E402
from tangram_sim.sim.systems import make_system  # noqa: E402

MODELS = ("llama-3-8b", "qwen2.5-3b")  # untied; tied (its last stage multiplies by the token table)
PIPE = {"pipeline": "fixed", "pipeline_params": {"k": 2}}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("pipeline-ckpts")
    written = make_checkpoints(list(MODELS), out, "tiny", dtype="float32")
    return {w.name: open_checkpoint(w.path) for w in written}


def _weights(path: Path) -> dict[str, torch.Tensor]:
    w: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        w.update(load_file(str(shard)))
    return w


def _cache(c: EngineConfig, blocks: int) -> PagedKv:
    kv = PagedKv(16)
    storage = torch.zeros(blocks, *c.kv_block_shape(16))
    kv.blocks = list(storage.unbind(0))
    return kv


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("cut", [1, 2, 3])
def test_stage_engines_compute_what_the_whole_model_does(ckpts: dict, model: str, cut: int) -> None:
    """Layer blocks [0, cut) then [cut, L + 2) over one KV cache (tiny models: L = 2): the logits of a
    prefill and a decode step are the whole engine's, bit for bit (the same operations in the same order);
    cut 1 is an embeddings-only first stage, cut L + 1 a head-only last one."""
    ck = ckpts[model]
    c = EngineConfig.from_checkpoint(ck.spec, ck.config)
    w = _weights(ck.path)
    whole = build_engine(c, w, "cpu")
    names = list(w)
    end = c.layers + 2
    first = build_engine(c, {n: w[n] for n in stage_tensors(c, names, (0, cut))}, "cpu", stage=(0, cut))
    last = build_engine(c, {n: w[n] for n in stage_tensors(c, names, (cut, end))}, "cpu", stage=(cut, end))
    assert (first.embeds, first.has_head, last.embeds, last.has_head) == (True, False, False, True)
    assert first.stage == (0, cut - 1) and last.stage == (cut - 1, c.layers)
    tokens = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8, 1, 0]])
    positions = torch.arange(8).expand(2, 8)
    lengths = [8, 5]
    a, b = [_cache(c, 2), _cache(c, 2)], [_cache(c, 2), _cache(c, 2)]
    with torch.inference_mode():
        ref = whole(tokens, positions, a, lengths=lengths)
        hidden = first(tokens, positions, b, lengths=lengths)
        out = last(tokens, positions, b, lengths=lengths, hidden=hidden)
        assert torch.equal(out, ref)
        step = torch.tensor([[11], [12]])
        at = torch.tensor([[8], [5]])
        ref = whole(step, at, a)
        out = last(step, at, b, hidden=first(step, at, b))
    assert torch.equal(out, ref)
    for x, y in zip(a, b):  # each stage wrote its own layers' KV into the shared blocks
        assert all(torch.equal(p, q) for p, q in zip(x.blocks, y.blocks))


def test_a_stage_binds_exactly_its_tensors(ckpts: dict) -> None:
    ck = ckpts["llama-3-8b"]
    c = EngineConfig.from_checkpoint(ck.spec, ck.config)
    w = _weights(ck.path)
    with pytest.raises(ModelError, match=r"stage of blocks \[0, 2\) does not compute lm_head.weight"):
        build_engine(c, w, "cpu", stage=(0, 2))
    mine = {n: w[n] for n in stage_tensors(c, list(w), (2, 4))}
    assert "model.embed_tokens.weight" not in mine and "model.layers.0.mlp.up_proj.weight" not in mine
    assert "model.layers.1.mlp.up_proj.weight" in mine and "model.norm.weight" in mine
    mine.pop("lm_head.weight")
    with pytest.raises(ModelError, match=r"stage of blocks \[2, 4\) lacks lm_head.weight"):
        build_engine(c, mine, "cpu", stage=(2, 4))
    tied = EngineConfig.from_checkpoint(ckpts["qwen2.5-3b"].spec, ckpts["qwen2.5-3b"].config)
    assert "model.embed_tokens.weight" in stage_tensors(tied, ["model.embed_tokens.weight"], (3, 4))


def trace(rows: list[tuple[float, str, int, int]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["arrival_s", "model", "input_tokens", "output_tokens"])


def _replay(ckpts: dict, t: pd.DataFrame, overrides: dict, capacity: int = 4 * 2**20, processes: bool = False):
    system = make_system("s", "tangram", {"granularity": "tensor", "keep_alive_s": 0.05, **overrides})
    return replay_trace(ckpts, t, system, devices=["cpu", "cpu"], capacity=capacity, threads=1, processes=processes)


@pytest.mark.parametrize("processes", [False, True])
def test_a_pipelined_replay_generates_the_one_device_tokens(ckpts: dict, processes: bool) -> None:
    """Each model's cold start runs as two stages on the two arenas (each loads its layers: its own row
    of the loads table), serves, consolidates on the leader (its engine rebuilt over every unit) and
    generates exactly the tokens of the same trace on one device per instance; the books balance
    (`replay_trace` checks that nothing is left bound)."""
    t = trace([(0.0, "llama-3-8b", 20, 4), (0.002, "llama-3-8b", 9, 6), (0.3, "qwen2.5-3b", 12, 6),
               (0.301, "qwen2.5-3b", 30, 3)])
    flat = _replay(ckpts, t, {}, processes=processes)
    pipe = _replay(ckpts, t, PIPE, processes=processes)
    assert pipe.tokens == flat.tokens and len(pipe.tokens) == 4
    r = pipe.requests
    assert (r["outcome"] == "completed").all() and r["cold"].tolist() == [True, False, True, False]
    loads = pipe.loads.sort_values(["rid", "gpu"])
    assert loads["rid"].tolist() == [0, 0, 2, 2] and loads["gpu"].tolist() == [0, 1, 0, 1]
    for rid in (0, 2):  # the stages' bytes are the cold start's (the tied table twice for qwen)
        assert loads.loc[loads["rid"] == rid, "loaded_bytes"].sum() == r.loc[rid, "bytes_loaded"]
    assert r.loc[0, "bytes_needed"] == ckpts["llama-3-8b"].spec.weight_bytes
    assert r.loc[2, "bytes_needed"] > ckpts["qwen2.5-3b"].spec.weight_bytes
    kinds = pipe.steps["kind"].value_counts()
    assert kinds["prefill-pipelined"] >= 2 and kinds["consolidate"] == 2 and kinds["merge-load"] == 2
    assert (pipe.steps["seconds"] > 0).all()
    assert (r["ttft_s"] > 0).all() and (r["load_s"][r["cold"]] > 0).all()
    # the last stage's engine build is startup, as a serial start's (no modelled stage before the weights)
    assert (r["startup_s"][r["cold"]] > 0).all()


def test_a_pipeline_whose_leader_has_no_room_serves_to_the_end(ckpts: dict) -> None:
    """The leader holds its stage and the request's KV but not the rest of the model as well: the merge
    is skipped and every decode step runs through both stages (activations one way, tokens back), still
    the tokens of a one-device replay (given room for the model and the KV at once)."""
    spec = ckpts["llama-3-8b"].spec
    t = trace([(0.0, "llama-3-8b", 300, 20)])
    flat = _replay(ckpts, t, {})
    capacity = spec.weight_bytes + 40 * 2**10  # 300 + 20 tokens of KV take 80 KiB: they do not fit beside it
    pipe = _replay(ckpts, t, PIPE, capacity=capacity)
    assert pipe.requests.loc[0, "outcome"] == "completed"
    assert pipe.tokens == flat.tokens and len(pipe.tokens[0]) == 20
    kinds = pipe.steps["kind"].value_counts()
    assert kinds["decode-pipelined"] == 19 and "consolidate" not in kinds and "decode" not in kinds


def test_a_leader_copies_the_other_stages_units_from_their_arena(ckpts: dict) -> None:
    """With a source policy that reads GPU copies (`gpu-first`), the leader's load before consolidation
    copies the other stage's units from the follower's arena, which holds them (counted per source, as the
    simulator counts them), and the checksums of `verify` hold; the tokens are the one-device replay's."""
    t = trace([(0.0, "llama-3-8b", 20, 4), (0.1, "qwen2.5-3b", 12, 6), (0.4, "llama-3-8b", 9, 5)])
    flat = _replay(ckpts, t, {"source": "gpu-first"})
    system = make_system("s", "tangram", {"granularity": "tensor", "keep_alive_s": 0.05, "source": "gpu-first",
                                          **PIPE})
    pipe = replay_trace(ckpts, t, system, devices=["cpu", "cpu"], capacity=4 * 2**20, threads=1, verify=True)
    assert pipe.tokens == flat.tokens
    r = pipe.requests
    stages = r.loc[[0, 1], "bytes_loaded"].sum()  # two pipelined cold starts read every stage's units
    assert pipe.summary["bytes_from_ssd"] == stages
    # their consolidations: the follower's units (less a tied table the leader holds), copied
    loads = pipe.loads.merge(r[["rid", "gpu"]].rename(columns={"gpu": "leader"}), on="rid")
    followers = loads.loc[loads["gpu"] != loads["leader"], "loaded_bytes"].sum()
    tied = stages - ckpts["llama-3-8b"].spec.weight_bytes - ckpts["qwen2.5-3b"].spec.weight_bytes
    assert pipe.summary["bytes_from_peer_gpu"] == followers - tied > 0

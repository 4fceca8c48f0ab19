"""Execute-while-load on the real device: layered reads, their notes, the per-layer first prefill, the
lifecycle's booking of each landing, modelled startup stages, and the same on CUDA where there is one."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from tangram_sim.core.device import pipeline  # noqa: E402
from tangram_sim.models.layers import layer_blocks  # noqa: E402
from tangram_sim.models.spec import tensor_block  # noqa: E402
from tangram_sim.real.checkpoints import make_checkpoints  # noqa: E402
from tangram_sim.real.landing import Landing, landing_steps  # noqa: E402
from tangram_sim.real.loader import Loader, Segment, open_checkpoint  # noqa: E402
from tangram_sim.real.replay import replay_trace  # noqa: E402
from tangram_sim.sim.systems import make_system  # noqa: E402

MODELS = ["llama-3-8b", "qwen2.5-3b"]
CAP = 4 * 2**20


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict:
    written = make_checkpoints(MODELS, tmp_path_factory.mktemp("ewl-ckpts"), "tiny", dtype="float32")
    return {w.name: open_checkpoint(w.path) for w in written}


def trace(rows: list[tuple[float, str, int, int]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["arrival_s", "model", "input_tokens", "output_tokens"])


def spaced(n: int = 6) -> pd.DataFrame:
    """One request per cold start: arrivals far apart, models alternating."""
    return trace([(0.25 * i, MODELS[i % 2], 24, 2) for i in range(n)])


@pytest.fixture
def slow_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every read call takes 3 ms more (loads slow enough that a layer's compute can hide behind them)."""
    load = Loader.load

    def slow(self, buffer, segments, after_compute=True):
        time.sleep(0.003)
        return load(self, buffer, segments, after_compute)

    monkeypatch.setattr(Loader, "load", slow)


# ------------------------------------------------------------------ the reads, cut at layer ends
@pytest.mark.parametrize("granularity", ["tensor", "group", "model"])
def test_landing_steps_read_every_missing_byte_once_in_plan_order(ckpts: dict, granularity: str) -> None:
    ck = ckpts["llama-3-8b"]
    blocks = layer_blocks(ck.spec)
    layouts = list(ck.layouts(granularity, 2**16))
    offsets = list(np.cumsum([0] + [lay.nbytes for lay in layouts])[:-1] * 2)
    steps = landing_steps(blocks, layouts, offsets)
    reads = [seg for st in steps for seg in st.segments]
    assert reads == [Segment(s.path, s.start, s.nbytes, int(off) + s.rel) for lay, off in zip(layouts, offsets)
                     for s in lay.slots]
    whole = [b for st in steps for b in st.blocks]
    assert whole == list(range(len(blocks)))  # each block once, in compute order (load order is layer order)
    assert [u for st in steps for u in st.units] == list(range(len(layouts)))
    block_of = {(s.path, s.start): blocks.index[tensor_block(s.name)] for lay in layouts for s in lay.slots}
    for st in steps:  # a step ends with the tensor that completes its block
        last = st.segments[-1]
        assert block_of[(last.path, last.file_offset)] == st.blocks[-1]
    if granularity == "tensor":  # units already resident: their blocks are whole before any read
        rest = landing_steps(blocks, layouts[1:], offsets[1:])
        assert 0 not in {b for st in rest for b in st.blocks}  # the embeddings' one tensor was reused


def test_a_landing_notes_each_layer_in_order_and_its_bytes_are_the_files(ckpts: dict) -> None:
    ck = ckpts["qwen2.5-3b"]
    blocks = layer_blocks(ck.spec)
    layouts = list(ck.layouts("tensor", 2**16))
    offsets, end = [], 0
    for lay in layouts:
        offsets.append(end)
        end += -(-lay.nbytes // 256) * 256
    buffer = torch.zeros(end, dtype=torch.uint8)
    notes: list[tuple] = []
    steps = landing_steps(blocks, layouts, offsets)
    landing = Landing(Loader("cpu", readers=2, chunk_bytes=2**16), buffer, steps, len(blocks), notes.append)
    landing.start()
    for b in range(len(blocks)):
        landing.wait(b)
        assert any(b in n[1] for n in notes if n[0] == "mark")  # noted no later than its waiter is let go
    landing.join()
    marks = [n for n in notes if n[0] == "mark"]
    assert notes[-1][0] == "done" and len(notes) == len(marks) + 1 == len(steps) + 1
    stamps = [n[3] for n in marks] + [notes[-1][1]]
    assert stamps == sorted(stamps)
    assert [b for n in marks for b in n[1]] == list(range(len(blocks)))
    assert [u for n in marks for u in n[2]] == list(range(len(layouts)))
    assert notes[-1][3] == sum(lay.nbytes for lay in layouts)  # read bytes
    for lay, off in zip(layouts, offsets):
        for s in lay.slots:
            with open(s.path, "rb") as f:
                f.seek(s.start)
                assert bytes(buffer[off + s.rel: off + s.rel + s.nbytes].numpy()) == f.read(s.nbytes)


def test_a_failed_read_lets_every_waiter_go_and_is_raised(ckpts: dict, tmp_path) -> None:
    ck = ckpts["qwen2.5-3b"]
    blocks = layer_blocks(ck.spec)
    lay = ck.layouts("model")[0]
    bad = [Segment(str(tmp_path / "missing.safetensors"), 0, 16, 0)]
    steps = landing_steps(blocks, [lay], [0])
    steps[0].segments[:] = bad
    notes: list[tuple] = []
    landing = Landing(Loader("cpu"), torch.zeros(lay.nbytes, dtype=torch.uint8), steps, len(blocks), notes.append)
    landing.start()
    with pytest.raises(Exception, match="cannot open"):
        landing.wait(len(blocks) - 1)
    assert notes[-1][0] == "error"
    with pytest.raises(Exception, match="cannot open"):
        landing.join()


# ------------------------------------------------------------------ the replay
def check_layer_spans(layers: pd.DataFrame, eps: float = 1e-9) -> None:
    """Layer i computed after its bytes landed and after layer i-1: the recurrence `pipeline` states."""
    assert len(layers)
    for _, g in layers.groupby(["gpu", "rid"]):
        g = g.sort_values("block")
        assert list(g["block"]) == list(range(len(g)))
        start, finish, ready = (g[c].to_numpy() for c in ("start_s", "finish_s", "ready_s"))
        assert (start >= ready - eps).all()
        assert (start[1:] >= finish[:-1] - eps).all() and (finish >= start).all()
        assert (ready >= g["load_start_s"].to_numpy() - eps).all()
        assert ready.max() <= g["load_end_s"].iloc[0] + eps
        # the measured spans satisfy the modelled recurrence with the measured computes and waits
        s, f = pipeline(list(ready), list(finish - start), float(start[0]))
        assert (np.asarray(s) <= start + eps).all() and (np.asarray(f) <= finish + eps).all()


@pytest.mark.parametrize("preset", ["serverlessllm", "tangram"])
@pytest.mark.parametrize("processes", [False, True])
def test_real_execute_while_load_computes_each_layer_after_it_lands(ckpts: dict, slow_reads: None, preset: str,
                                                                    processes: bool) -> None:
    system = make_system(preset, preset, {"keep_alive_s": 0.02, "execute_while_load": True})
    res = replay_trace(ckpts, spaced(), system, capacity=CAP, threads=1, processes=processes, verify=True)
    r = res.requests
    assert list(r["outcome"]) == ["completed"] * len(r) and r["cold"].all()
    assert ((r["bytes_loaded"] + r["bytes_reused"]) == r["bytes_needed"]).all()
    loaded = r[r["bytes_loaded"] > 0]
    assert len(loaded) >= 2
    assert (loaded["first_layer_s"] <= loaded["startup_s"] + loaded["load_s"] + 1e-9).all()
    check_layer_spans(res.layers)
    assert set(res.layers["rid"]) == set(r["rid"])  # every cold start's first prefill ran layer by layer
    if not processes:  # reads slower than a tiny layer's compute: some load time is hidden
        assert (loaded["overlap_s"] > 0).all()
    assert len(res.loads) == len(r) and (res.loads["units_loaded"] > 0).sum() == len(loaded)


def test_serial_and_layered_replays_decide_and_account_alike(ckpts: dict) -> None:
    t = spaced(8)
    cols = ["gpu", "cold", "outcome", "bytes_needed", "bytes_loaded", "bytes_reused", "bytes_moved",
            "bytes_evicted"]
    out = {}
    for ewl in (False, True):
        system = make_system("t", "tangram", {"keep_alive_s": 0.02, "execute_while_load": ewl})
        out[ewl] = replay_trace(ckpts, t, system, capacity=CAP, threads=1)
    pd.testing.assert_frame_equal(out[False].requests[cols], out[True].requests[cols])
    assert out[False].layers.empty and not out[True].layers.empty
    assert (out[False].requests["overlap_s"] == 0).all()
    assert out[False].tokens == out[True].tokens  # the layered pass computes the same tokens


def test_real_execute_while_load_behind_a_prefetch_and_with_it(ckpts: dict) -> None:
    # llama is displaced by qwen, then prefetched while the GPU idles (as in test_prefetch); on: layered starts
    t = trace([(0.0, "llama-3-8b", 20, 3), (0.05, "llama-3-8b", 10, 2), (0.2, "qwen2.5-3b", 10, 2),
               (0.8, "llama-3-8b", 10, 2), (0.81, "qwen2.5-3b", 10, 2)])
    cap = int(max(c.spec.weight_bytes for c in ckpts.values()) * 1.3)
    system = make_system("p", "tangram", {"keep_alive_s": 0.02, "retention": "model-value",
                                          "prefetch": "next-model", "execute_while_load": True})
    res = replay_trace(ckpts, t, system, capacity=cap, threads=1, verify=True)
    r = res.requests
    assert list(r["outcome"]) == ["completed"] * len(r)
    assert ((r["bytes_loaded"] + r["bytes_reused"])[r["cold"]] == r["bytes_needed"][r["cold"]]).all()
    assert r.loc[3, "bytes_loaded"] == 0  # the prefetch had read it back
    s = res.summary
    assert s["prefetched_bytes"] == s["prefetch_used_bytes"] + s["prefetch_wasted_bytes"] + s["prefetch_resident_bytes"]
    check_layer_spans(res.layers)


def test_stages_the_real_executor_does_not_perform_are_charged_their_stated_times(ckpts: dict) -> None:
    t = spaced(4)
    stages = {"context": {"mode": "serial", "s": 0.01}, "kv_init": {"mode": "serial", "s": 0.02},
              "graph_capture": {"mode": "restore", "restore_s": 0.005}}
    base = replay_trace(ckpts, t, make_system("t", "tangram", {"keep_alive_s": 0.02}), capacity=CAP, threads=1)
    staged = replay_trace(ckpts, t, make_system("t", "tangram", {"keep_alive_s": 0.02, "startup": stages}),
                          capacity=CAP, threads=1)
    engine = staged.loads["engine_s"].to_numpy()
    r = staged.requests
    # context before the weights, kv_init after them, graph capture restored beside the load
    lane = np.maximum(0.0, 0.005 - r["load_s"].to_numpy())
    np.testing.assert_allclose(r["startup_s"].to_numpy(), 0.01 + engine + lane + 0.02, rtol=1e-9)
    kinds = staged.steps["kind"]
    assert (kinds == "stage").sum() == 2 * len(r) and not (base.steps["kind"] == "stage").any()
    ewl = replay_trace(ckpts, t, make_system("t", "tangram", {"keep_alive_s": 0.02, "execute_while_load": True,
                                                              "startup": {"context": {"s": 0.01, "mode": "serial"},
                                                                          "kv_init": {"mode": "overlap", "s": 0.03}}}),
                       capacity=CAP, threads=1)
    e = ewl.requests
    # the compute gate: the context, the engine build, then the lane's 30 ms from the load's start
    assert (e["startup_s"] >= 0.01 + 0.03 - 1e-9).all()
    assert (ewl.layers["start_s"] >= ewl.layers["load_start_s"] + 0.03 - 1e-9).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_real_execute_while_load_on_cuda(ckpts: dict) -> None:
    system = make_system("s", "serverlessllm", {"keep_alive_s": 0.02, "execute_while_load": True})
    res = replay_trace(ckpts, spaced(), system, devices=["cuda"], capacity=CAP, threads=1, verify=True)
    r = res.requests
    assert list(r["outcome"]) == ["completed"] * len(r)
    check_layer_spans(res.layers)
    serial = replay_trace(ckpts, spaced(), make_system("s", "serverlessllm", {"keep_alive_s": 0.02}),
                          devices=["cuda"], capacity=CAP, threads=1)
    assert serial.tokens == res.tokens

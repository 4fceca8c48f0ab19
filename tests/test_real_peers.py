"""Units copied between real arenas (`real.peers`): the hold that keeps the holder's bytes in place, the
buffers shared between device processes, and replays whose source policy takes GPU copies."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from tangram_sim.arena import ARENA_ALIGNMENT  # noqa: E402
from tangram_sim.errors import ConfigError, ModelError  # noqa: E402
from tangram_sim.real.backend import BackendSpec, model_layouts  # noqa: E402
from tangram_sim.real.checkpoints import make_checkpoints  # noqa: E402
from tangram_sim.real.link import DeviceLink  # noqa: E402
from tangram_sim.real.loader import open_checkpoint  # noqa: E402
from tangram_sim.real.peers import Hold, Sourced  # noqa: E402
from tangram_sim.real.replay import replay_trace  # noqa: E402
from tangram_sim.real.setup import check_replayable  # noqa: E402
from tangram_sim.sim.hardware import GiB, TierSpec, gpu_spec  # noqa: E402
from tangram_sim.sim.simulate import ClusterSpec, ModelChoice, simulate  # noqa: E402
from tangram_sim.sim.systems import make_system  # noqa: E402

MODEL = "llama-3-8b"


@pytest.fixture(scope="module")
def ckdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("peer-ckpts")
    make_checkpoints(["llama-3-8b", "qwen2.5-3b"], out, "tiny", derive=["llama-ft=llama-3-8b:0.5"], dtype="float32")
    return out


@pytest.fixture(scope="module")
def ckpts(ckdir: Path) -> dict:
    return {m: open_checkpoint(ckdir / m) for m in ("llama-3-8b", "qwen2.5-3b", "llama-ft")}


def _spec(ckpts: dict, device: str = "cpu", shared: bool = False) -> BackendSpec:
    return BackendSpec(device, 4 * 2**20, ARENA_ALIGNMENT, {MODEL: str(ckpts[MODEL].path)}, "tensor", 1, 0, 16,
                       threads=1 if shared else None, shared=shared)


def _offsets(spec: BackendSpec, ckpts: dict, base: int = 0) -> dict:
    """The model's units packed from `base` (different offsets in the two arenas: the copy must map them)."""
    offsets, end = {}, base
    for lay in model_layouts(spec, ckpts[MODEL]):
        offsets[lay.unit.key] = end
        end += -(-lay.nbytes // ARENA_ALIGNMENT) * ARENA_ALIGNMENT
    return offsets


def _links(ckpts: dict, device: str, process: bool) -> tuple[DeviceLink, DeviceLink, dict, dict]:
    spec = _spec(ckpts, device, shared=process)
    holder, reader = DeviceLink(spec, process), DeviceLink(spec, process)
    reader.call("attach_peer", 0, holder.call("export_buffer", process))
    return holder, reader, _offsets(spec, ckpts), _offsets(spec, ckpts, base=512 * 1024)


@pytest.mark.parametrize("held", [True, False])
def test_a_hold_keeps_the_holders_bytes_until_the_copy_is_done(ckpts: dict, held: bool) -> None:
    """The holder's thread queues, after the split, work that overwrites the unit (an eviction and a load
    over it); the reader's thread is busy when the split happens. With the hold the reader copies the
    bytes as they were at the split (its checksums pass); without it, the holder's later work runs first
    and the copy gets zeros (the case a real replay would hit without the hold)."""
    holder, reader, src, dst = _links(ckpts, "cpu", process=False)
    holder_thread, reader_thread = ThreadPoolExecutor(1), ThreadPoolExecutor(1)
    try:
        holder_thread.submit(holder.call, "start", (), MODEL, src, list(src), (), False).result()
        sourced = Sourced(copies=[(0, key, src[key]) for key in dst])
        reader_thread.submit(time.sleep, 0.3)  # the reader's earlier work
        if held:  # what `peers.split` does at the hand-over
            sourced.holds.append(Hold())
            holder_thread.submit(sourced.holds[0].park)
        buffer = holder._backend.dev.buffer
        holder_thread.submit(buffer.zero_)  # decided after the split: the unit's bytes overwritten
        copies = sourced.copies
        done = reader_thread.submit(sourced.run, lambda: reader.call("start", (), MODEL, dst, [], (), True,
                                                                     False, copies))
        if held:
            m = done.result(timeout=30)
            move_s, read_s, _engine_s, read_bytes, _gbps, copy_s, copied = m.value
            assert read_bytes == 0 and copy_s > 0 and copied >= ckpts[MODEL].spec.weight_bytes
        else:
            with pytest.raises(ModelError, match="differs from the file"):
                done.result(timeout=30)
        holder_thread.submit(lambda: None).result(timeout=30)  # the holder was released
        assert int(buffer.count_nonzero()) == 0
    finally:
        holder_thread.shutdown()
        reader_thread.shutdown()
        holder.close()
        reader.close()


def test_device_processes_share_their_buffers(ckpts: dict) -> None:
    """Two backends in processes of their own: the reader copies from the holder's shared CPU buffer."""
    holder, reader, src, dst = _links(ckpts, "cpu", process=True)
    try:
        holder.call("start", (), MODEL, src, list(src), (), True)
        m = reader.call("start", (), MODEL, dst, [], (), True, False, [(0, key, src[key]) for key in dst])
        assert m.value[3] == 0 and m.value[6] >= ckpts[MODEL].spec.weight_bytes  # copied, nothing read; verified
    finally:
        holder.close()
        reader.close()


@pytest.mark.gpu
@pytest.mark.parametrize("process", [False, True])
def test_cuda_arenas_copy_from_each_other(ckpts: dict, process: bool) -> None:
    """Same-process peer copies, and CUDA IPC between device processes (two arenas of one card, or of two)."""
    device = "cuda:1" if torch.cuda.device_count() > 1 else "cuda:0"
    spec = _spec(ckpts, "cuda:0", shared=process)
    holder, reader = DeviceLink(spec, process), DeviceLink(BackendSpec(**{**_fields(spec), "device": device}),
                                                           process)
    try:
        reader.call("attach_peer", 0, holder.call("export_buffer", process))
        src, dst = _offsets(spec, ckpts), _offsets(spec, ckpts, base=512 * 1024)
        holder.call("start", (), MODEL, src, list(src), (), True)
        m = reader.call("start", (), MODEL, dst, [], (), True, False, [(0, key, src[key]) for key in dst])
        assert m.value[6] >= ckpts[MODEL].spec.weight_bytes
        reader.call("finish", ())  # drops the mapping before the holder's process ends
    finally:
        reader.close()
        holder.close()


def _fields(spec: BackendSpec) -> dict:
    return {f: getattr(spec, f) for f in spec.__slots__}


def test_the_real_executor_runs_source_policies_and_refuses_multicast() -> None:
    for source in ("fastest", "gpu-first"):
        check_replayable(make_system("s", "blitzscale", {"source": source, "multicast": "none"}))
    with pytest.raises(ConfigError, match=r"multicast chain is not yet supported by the real executor.*set "
                                          "multicast none$"):
        check_replayable(make_system("s", "blitzscale"))


# ------------------------------------------------------------------ replays that copy between arenas
def _trace(ckpts: dict) -> pd.DataFrame:
    """Bursts of two models at a time on two GPUs that hold about two models each: a fine-tune starts
    beside its base's retained units on the other GPU, and models move between the GPUs."""
    rng = np.random.default_rng(3)
    models = list(ckpts)
    rows = []
    for i in range(12):
        a, b = rng.choice(len(models), 2, replace=False)
        rows += [(0.3 * i, models[a], int(rng.integers(8, 40)), 40), (0.3 * i + 0.002, models[b], 12, 3)]
    return pd.DataFrame(rows, columns=["arrival_s", "model", "input_tokens", "output_tokens"])


@pytest.mark.parametrize("layered", [False, True])
def test_a_replay_copies_units_from_the_other_arena_as_the_simulation_does(ckpts: dict, layered: bool) -> None:
    """Serial starts, and execute-while-load ones (the copies land before the first layer's reads)."""
    t = _trace(ckpts)
    cap = int(2.3 * max(c.spec.weight_bytes for c in ckpts.values()))
    gpu = gpu_spec("a100-80gb", memory_gib=cap / GiB)
    cluster = ClusterSpec(nodes=1, gpus_per_node=2, gpu=gpu, tiers=TierSpec(host_cache_bytes=0))
    system = make_system("blitz", "tangram", {"keep_alive_s": 0.05, "engine_overhead_s": 0.0, "source": "gpu-first",
                                                  "execute_while_load": layered})
    real = replay_trace(ckpts, t, system, devices=["cpu", "cpu"], capacity=gpu.memory_bytes, threads=1,
                        h2d_bps=gpu.pcie_bps, verify=True)
    sim = simulate({m: ModelChoice(c.spec) for m, c in ckpts.items()}, t, cluster, system)
    copied = int(real.loads["copied_bytes"].sum())
    assert copied > 0 and real.summary["bytes_from_peer_gpu"] == copied  # every copied byte is in the books
    assert (real.loads["copy_s"] > 0).sum() == (real.loads["copied_bytes"] > 0).sum()
    assert real.summary["bytes_from_peer_gpu"] + real.summary["bytes_from_ssd"] == real.requests["bytes_loaded"].sum()
    for col in ("bytes_from_ssd", "bytes_from_peer_gpu"):
        assert real.summary[col] == pytest.approx(sim.summary[col], rel=0.05), col
    assert real.summary["cold_starts"] == pytest.approx(sim.summary["cold_starts"], rel=0.05)
    if layered:  # every copied unit landed (the lifecycle's end checks passed) and the layers were timed
        assert len(real.layers) > 0

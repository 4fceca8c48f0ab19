"""Device arena + loader: real copies driven by the shared policies, reuse of shared tensors, failures."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from tangram_sim.arena import ARENA_ALIGNMENT  # noqa: E402
from tangram_sim.cli import main  # noqa: E402
from tangram_sim.errors import CapacityError, ModelError, TangramError  # noqa: E402
from tangram_sim.models import get_model  # noqa: E402
from tangram_sim.policies.packing import Move  # noqa: E402
from tangram_sim.real.backend import BackendSpec, DeviceBackend  # noqa: E402
from tangram_sim.real.checkpoints import make_checkpoints  # noqa: E402
from tangram_sim.real.device_arena import DeviceArena  # noqa: E402
from tangram_sim.real.loader import Loader, Segment, open_checkpoint  # noqa: E402
from tangram_sim.real.memory import read_memory  # noqa: E402
from tangram_sim.real.replay import ReplayResult  # noqa: E402
from tangram_sim.real.session import run_requests, system_for  # noqa: E402
from tangram_sim.real.setup import resolve_device  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODES = [("never", 32 << 20), ("always", 4096), ("always", 32 << 20)]  # direct; staged in small/large chunks


@pytest.fixture(scope="module")
def ckdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("loader-ckpts")
    make_checkpoints(
        ["llama-3-8b", "qwen2.5-3b"], out, "tiny", derive=["llama-ft=llama-3-8b:0.5"], dtype="float32"
    )
    return out


@pytest.fixture(scope="module")
def ckpts(ckdir: Path) -> dict:
    return {m: open_checkpoint(ckdir / m) for m in ("llama-3-8b", "qwen2.5-3b", "llama-ft")}


def _file_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in folder.glob("*.safetensors"):
        out.update(load_file(str(shard)))
    return out


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _sequence(ckpts: dict, models: list[str], **kw) -> ReplayResult:
    """One single-token request per entry of `models`, all at once: served in turn on one CPU arena."""
    return run_requests(ckpts, [(m, [1, 2], 1, 0.0) for m in models], threads=1, **kw)


@pytest.mark.parametrize("granularity", ["group", "tensor"])
@pytest.mark.parametrize(("staging", "chunk"), MODES)
def test_fine_tune_reuses_shared_tensors_bit_identically(
    ckpts: dict, ckdir: Path, granularity: str, staging: str, chunk: int
) -> None:
    order = ["llama-3-8b", "qwen2.5-3b", "llama-ft"]
    res = _sequence(ckpts, order, system=system_for(granularity), capacity=4 << 20, verify=True,
                    staging=staging, chunk_bytes=chunk, readers=3)  # verify: every tensor checked
    r = res.requests
    assert r["model"].tolist() == order and r["cold"].all() and (r["outcome"] == "completed").all()
    base, ft = get_model(ckdir / "llama-3-8b"), get_model(ckdir / "llama-ft")
    shared = sum(t.nbytes for t, u in zip(base.tensors, ft.tensors) if t.fingerprint == u.fingerprint)
    first, ftrow = r.iloc[:2], r.iloc[2]
    assert (first["bytes_loaded"] == first["bytes_needed"]).all() and (first["bytes_reused"] == 0).all()
    assert ftrow["bytes_reused"] == shared > 0  # shared tensors not copied again
    assert ftrow["bytes_loaded"] == ft.weight_bytes - shared
    loads = res.loads.set_index("rid")
    assert (loads["loaded_bytes"] == r["bytes_loaded"]).all()
    assert loads.loc[2, "units_loaded"] < loads.loc[2, "units"]
    # released units stay resident: both llama models' units and qwen's, nothing else
    end = res.timeline.iloc[-1]
    assert end["active_bytes"] == end["kv_bytes"] == 0
    assert end["retained_bytes"] >= sum(r["bytes_loaded"])


def test_pressure_evicts_and_compacts_with_verified_bytes(ckpts: dict) -> None:
    rng = random.Random(7)
    moved = evicted = 0
    for packing in ("pbp", "compact-all", "first-fit"):
        models = [rng.choice(["llama-3-8b", "qwen2.5-3b", "llama-ft"]) for _ in range(10)]
        res = _sequence(ckpts, models, system=system_for("tensor", "lru", packing), capacity=1_400_000,
                        verify=True, staging="always", chunk_bytes=8192)  # every cold start's tensors checked
        r = res.requests
        assert (r["outcome"] == "completed").all()
        runs = [m for i, m in enumerate(models) if i == 0 or models[i - 1] != m]  # a repeat joins the batch
        assert r.loc[r["cold"], "model"].tolist() == runs
        moved += int(r["bytes_moved"].sum())
        evicted += int(r["bytes_evicted"].sum())
    assert moved > 0 and evicted > 0


def test_none_retention_reloads_every_time_and_capacity_error(ckpts: dict) -> None:
    res = _sequence(ckpts, ["llama-3-8b", "qwen2.5-3b", "llama-3-8b"], system=system_for(retention="none"),
                    capacity=2 << 20)
    r = res.requests
    assert r["cold"].all() and (r["bytes_reused"] == 0).all()
    assert (r["bytes_loaded"] == r["bytes_needed"]).all()  # the third load reads everything again
    end = res.timeline.iloc[-1]
    assert end["free_bytes"] == 2 << 20  # nothing retained
    with pytest.raises(CapacityError, match="do not fit") as info:
        _sequence(ckpts, ["llama-3-8b"], system=system_for(), capacity=300_000)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("staging", ["never", "always"])
def test_read_failure_is_a_one_line_error_and_the_run_stops_cleanly(
    ckpts: dict, ckdir: Path, tmp_path: Path, staging: str
) -> None:
    folder = _copy(ckdir / "llama-ft", tmp_path / "llama-ft")
    mine = {"llama-3-8b": ckpts["llama-3-8b"], "llama-ft": open_checkpoint(folder)}
    last = sorted(folder.glob("*.safetensors"))[-1]
    before = {t.name for t in threading.enumerate()}

    def truncate(i: int) -> None:  # once the device holds the headers, before any read
        if i == 0:
            os.truncate(last, last.stat().st_size - 1000)

    with pytest.raises(ModelError) as info:
        run_requests(mine, [("llama-3-8b", [1], 1, 0.0), ("llama-ft", [1], 1, 0.0)], system_for(),
                     capacity=4 << 20, staging=staging, chunk_bytes=4096, progress=truncate)
    msg = str(info.value)
    assert "\n" not in msg and last.name in msg and "truncated" in msg
    assert {t.name for t in threading.enumerate()} <= before  # the device's thread has ended
    # Reading the (now truncated) headers again is a one-line error before anything runs.
    with pytest.raises(ModelError, match="past the end of the data"):
        run_requests(mine, [("llama-ft", [1], 1, 0.0)], system_for(), capacity=4 << 20)


def test_corrupt_files_give_one_line_errors(
    ckdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _copy(ckdir / "qwen2.5-3b", tmp_path / "bad")
    shard = sorted(folder.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[8:20] = b"not json at!"
    shard.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="header is not valid JSON") as info:
        open_checkpoint(folder)
    assert "\n" not in str(info.value)
    assert main(["real", "load", str(folder), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and shard.name in err and err.count("\n") == 1
    assert main(["real", "load", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_verify_detects_bytes_changed_in_the_file(ckdir: Path, tmp_path: Path) -> None:
    """A cold start that reuses resident units checks them against the file: a byte changed in the file
    since they were read is a one-line ModelError (the backend's `start`, as a replay's reuse runs it)."""
    folder = _copy(ckdir / "qwen2.5-3b", tmp_path / "qwen2.5-3b")
    spec = BackendSpec("cpu", 4 << 20, ARENA_ALIGNMENT, {"qwen": str(folder)}, "tensor", 1 << 20, 0, 16)
    backend = DeviceBackend(spec)
    try:
        units, offsets, end = backend.models["qwen"].by_key, {}, 0
        for key, lay in units.items():
            offsets[key] = end
            end += -(-lay.nbytes // ARENA_ALIGNMENT) * ARENA_ALIGNMENT
        backend.start((), "qwen", offsets, list(units), (), True)  # read, then verified
        backend.apply((("end", "qwen"),))
        backend.start((), "qwen", offsets, [], (), True)  # everything reused: verified again
        backend.apply((("end", "qwen"),))
        name, (path, start, _) = next(iter(open_checkpoint(folder).locations.items()))
        with open(path, "r+b") as f:
            f.seek(start)
            b = f.read(1)
            f.seek(start)
            f.write(bytes([b[0] ^ 0xFF]))
        with pytest.raises(ModelError, match="differs from the file") as info:
            backend.start((), "qwen", offsets, [], (), True)
        assert name in str(info.value) and "\n" not in str(info.value)
    finally:
        backend.close()


def test_loader_segments_scattered_in_file_and_buffer(tmp_path: Path) -> None:
    rng = random.Random(3)
    data = bytes(rng.getrandbits(8) for _ in range(200_000))
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    segments, dst = [], 0
    for _ in range(60):
        n = rng.randint(0, 9000)
        off = rng.randint(0, len(data) - n)
        segments.append(Segment(str(path), off, n, dst))
        dst += n + rng.choice([0, 0, 13])
    rng.shuffle(segments)
    for staging, chunk in [("never", 4096), ("always", 4096), ("always", 1 << 20)]:
        buf = torch.zeros(dst + 64, dtype=torch.uint8)
        res = Loader("cpu", readers=3, chunk_bytes=chunk, staging=staging).load(buf, segments)
        assert res.nbytes == sum(s.nbytes for s in segments)
        raw = buf.numpy().tobytes()
        for s in segments:
            assert raw[s.dst : s.dst + s.nbytes] == data[s.file_offset : s.file_offset + s.nbytes]
    with pytest.raises(ModelError, match="file ends before byte"):
        Loader("cpu", staging="always").load(
            torch.zeros(10, dtype=torch.uint8), [Segment(str(path), 199_995, 10, 0)]
        )


@given(
    st.lists(
        st.tuples(st.integers(0, 40), st.integers(0, 40), st.integers(1, 30)),
        min_size=1,
        max_size=8,
    )
)
def test_device_moves_are_memmove(moves: list[tuple[int, int, int]]) -> None:
    dev = DeviceArena(64 * 256, "cpu", move_chunk_bytes=512)
    dev.buffer.copy_(
        torch.randint(0, 256, (dev.capacity,), generator=torch.Generator().manual_seed(1)).to(torch.uint8)
    )
    ref = bytearray(dev.buffer.numpy().tobytes())
    for a, b, n in moves:
        src, dst, nbytes = a * 256 // 3 * 3, b * 256 // 5 * 5, n * 256 + 7  # odd sizes and distances
        nbytes = min(nbytes, dev.capacity - max(src, dst))
        dev.copy_move(Move("k", src, dst, nbytes))
        ref[dst : dst + nbytes] = ref[src : src + nbytes]
        assert dev.buffer.numpy().tobytes() == bytes(ref)


def test_cli_load_prints_reuse(ckdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["real", "load", str(ckdir), "--device", "cpu", "--verify", "--capacity-gb", "0.0014",
               "--retention", "lru", "--staging", "always"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:5]}
    assert set(rows) == {"llama-3-8b", "llama-ft", "qwen2.5-3b"}
    assert float(rows["llama-ft"][3]) > 0  # reused MB: the base's shared tensors
    assert "verified bit-identical" in out and "memory: cpu (host)" in out


def test_memory_reading_cpu() -> None:
    m = read_memory("cpu")
    assert m.source == "host" and m.total_bytes > 0 and m.used_bytes > 0
    assert "GiB" in m.summary()


def test_missing_extra_message_and_bad_device() -> None:
    from tangram_sim.real import MISSING_EXTRA

    assert "pip install -e '.[real]'" in MISSING_EXTRA
    with pytest.raises(TangramError, match="device"):
        resolve_device("cuda:99" if not torch.cuda.is_available() else "tpu")
    with pytest.raises(TangramError, match="device"):
        run_requests({}, [("x", [1], 1, 0.0)], system_for(), device="tpu")


def test_gpu_check_dry_run_on_cpu(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "real/gpu_check.py", "--device", "cpu", "--out", str(tmp_path), "--gb", "0.02",
         "--repeats", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["pytest"]["ok"] and result["device_info"]["torch"] == torch.__version__
    assert result["bench"]["ours"]["gbps"] > 0 and result["bench"]["ratio"] > 0
    assert "Loader benchmark" in (tmp_path / "gpu_check.md").read_text()


@pytest.mark.gpu
def test_cuda_load_pinned_staging_reuse_and_verify(ckpts: dict, ckdir: Path) -> None:
    res = run_requests(ckpts, [("llama-3-8b", [1], 1, 0.0), ("llama-ft", [1], 1, 0.0)], system_for("tensor"),
                       device="cuda", capacity=16 << 20, chunk_bytes=64 << 10, verify=True)
    r = res.requests
    assert r["cold"].all() and r.loc[1, "bytes_reused"] > 0 and (res.loads["read_gbps"] > 0).all()
    mem = res.memory.iloc[-1]
    assert mem["total_bytes"] > 0 and mem["torch_allocated"] >= 16 << 20
    # the backend's loader stages through pinned buffers; its views equal the files
    spec = BackendSpec("cuda", 16 << 20, ARENA_ALIGNMENT, {"llama-ft": str(ckdir / "llama-ft")}, "tensor", 1 << 20, 0,
                       16, {"chunk_bytes": 64 << 10})
    backend = DeviceBackend(spec)
    try:
        units, offsets, end = backend.models["llama-ft"].by_key, {}, 0
        for key, lay in units.items():
            offsets[key] = end
            end += -(-lay.nbytes // ARENA_ALIGNMENT) * ARENA_ALIGNMENT
        backend.start((), "llama-ft", offsets, list(units), (), True)
        assert backend.loader.staged and backend.loader._pool[0].is_pinned()
        files = _file_tensors(ckdir / "llama-ft")
        views = backend._views(backend.models["llama-ft"], offsets)
        assert set(views) == set(files)
        for name, view in views.items():
            assert view.is_cuda and torch.equal(view.cpu(), files[name])
    finally:
        backend.close()


@pytest.mark.gpu
def test_cuda_moves_and_compaction_under_pressure(ckpts: dict) -> None:
    dev = DeviceArena(1 << 20, "cuda", move_chunk_bytes=4096)
    host = torch.randint(0, 256, (dev.capacity,), dtype=torch.uint8)
    dev.buffer.copy_(host)
    ref = bytearray(host.numpy().tobytes())
    for src, dst, n in [(0, 1000, 300_000), (5000, 256, 200_000), (0, 600_000, 300_000)]:
        dev.copy_move(Move("k", src, dst, n))
        ref[dst : dst + n] = ref[src : src + n]
    assert dev.buffer.cpu().numpy().tobytes() == bytes(ref)
    models = ["llama-3-8b", "qwen2.5-3b", "llama-ft", "qwen2.5-3b", "llama-3-8b"]
    res = run_requests(ckpts, [(m, [1], 1, 0.0) for m in models], system_for("tensor", "lru", "pbp"),
                       device="cuda", capacity=1_400_000, chunk_bytes=8192, verify=True)
    r = res.requests
    assert r["cold"].all() and (r["outcome"] == "completed").all() and r["bytes_evicted"].sum() > 0

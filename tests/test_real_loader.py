"""Device arena + loader: real copies driven by the shared policies, reuse of shared tensors, failures."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from tangram_sim.arena import State  # noqa: E402
from tangram_sim.cli import main  # noqa: E402
from tangram_sim.errors import CapacityError, ModelError, TangramError  # noqa: E402
from tangram_sim.models import get_model  # noqa: E402
from tangram_sim.policies.packing import Move  # noqa: E402
from tangram_sim.real.checkpoints import make_checkpoints  # noqa: E402
from tangram_sim.real.device_arena import DeviceArena  # noqa: E402
from tangram_sim.real.executor import RealGpu  # noqa: E402
from tangram_sim.real.loader import Loader, Segment, open_checkpoint  # noqa: E402
from tangram_sim.real.memory import read_memory  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODES = [("never", 32 << 20), ("always", 4096), ("always", 32 << 20)]  # direct; staged in small/large chunks


@pytest.fixture(scope="module")
def ckdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("loader-ckpts")
    make_checkpoints(
        ["llama-3-8b", "qwen2.5-3b"], out, "tiny", derive=["llama-ft=llama-3-8b:0.5"], dtype="float32"
    )
    return out


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


@pytest.mark.parametrize("granularity", ["group", "tensor"])
@pytest.mark.parametrize(("staging", "chunk"), MODES)
def test_fine_tune_reuses_shared_tensors_bit_identically(
    ckdir: Path, granularity: str, staging: str, chunk: int
) -> None:
    gpu = RealGpu("cpu", 4 << 20, granularity, staging=staging, chunk_bytes=chunk, readers=3)
    for model in ("llama-3-8b", "qwen2.5-3b"):
        s = gpu.start_instance(ckdir / model)
        assert s.loaded_bytes == s.needed_bytes and s.reused_bytes == 0
        assert s.read is not None and s.read.nbytes == s.loaded_bytes
        assert s.read.staged == (staging == "always")
        gpu.end_instance(model)
        gpu.check()
    # Released units stay resident, unpinned, owned by their model.
    for key in gpu._models["llama-3-8b"].keys:
        region = gpu.arena.lookup(key)
        assert region is not None and region.state is State.RESIDENT and region.pin_count == 0
    base, ft = get_model(ckdir / "llama-3-8b"), get_model(ckdir / "llama-ft")
    shared = sum(t.nbytes for t, u in zip(base.tensors, ft.tensors) if t.fingerprint == u.fingerprint)
    s = gpu.start_instance(ckdir / "llama-ft")
    assert s.reused_bytes == shared > 0
    assert s.loaded_bytes == s.read.nbytes == ft.weight_bytes - shared  # shared tensors not copied again
    gpu.check()
    gpu.verify_model("llama-ft")  # reused tensors equal this checkpoint's file, bit for bit
    files = _file_tensors(ckdir / "llama-ft")
    views = gpu.weights("llama-ft")
    assert set(views) == set(files)
    for name, t in files.items():
        assert torch.equal(views[name], t), name
        assert views[name].untyped_storage().data_ptr() == gpu.dev.buffer.untyped_storage().data_ptr()
    gpu.end_instance("llama-ft")
    assert gpu.arena.model_bytes("llama-3-8b") == gpu.arena.model_bytes("llama-ft") > 0  # both still resident
    gpu.check()


def test_pressure_evicts_and_compacts_with_verified_bytes(ckdir: Path) -> None:
    rng = random.Random(7)
    moved = evicted = 0
    for packing in ("pbp", "compact-all", "first-fit"):
        gpu = RealGpu(
            "cpu", 1_400_000, "tensor", "lru", packing, verify=True, staging="always", chunk_bytes=8192
        )
        for _ in range(10):
            model = rng.choice(["llama-3-8b", "qwen2.5-3b", "llama-ft"])
            s = gpu.start_instance(ckdir / model)  # verify=True: every tensor checked after moves/loads
            moved += s.moved_bytes
            evicted += s.evicted_bytes
            gpu.check()
            gpu.end_instance(model)
        gpu.check()
    assert moved > 0 and evicted > 0


def test_none_retention_frees_and_capacity_error(ckdir: Path) -> None:
    gpu = RealGpu("cpu", 2 << 20, retention="none")
    gpu.start_instance(ckdir / "llama-3-8b")
    gpu.end_instance("llama-3-8b")
    assert gpu.arena.free_bytes == gpu.arena.capacity
    small = RealGpu("cpu", 300_000)
    with pytest.raises(CapacityError, match="do not fit"):
        small.start_instance(ckdir / "llama-3-8b")
    small.check()
    assert small.arena.free_bytes == small.arena.capacity


@pytest.mark.parametrize("staging", ["never", "always"])
def test_read_failure_leaves_arena_consistent(ckdir: Path, tmp_path: Path, staging: str) -> None:
    folder = _copy(ckdir / "llama-ft", tmp_path / "llama-ft")
    gpu = RealGpu("cpu", 4 << 20, staging=staging, chunk_bytes=4096)
    gpu.start_instance(ckdir / "llama-3-8b")
    gpu.end_instance("llama-3-8b")
    before = {r.key: (r.offset, r.state) for r in gpu.arena.regions() if r.key is not None}
    ckpt = open_checkpoint(folder)  # headers read while the files were whole
    last = sorted(folder.glob("*.safetensors"))[-1]
    os.truncate(last, last.stat().st_size - 1000)
    with pytest.raises(ModelError) as info:
        gpu.start_instance(ckpt)
    msg = str(info.value)
    assert "\n" not in msg and last.name in msg and "truncated" in msg
    gpu.check()
    assert gpu.arena.bytes_in(State.LOADING) == 0 and "llama-ft" not in gpu.instances
    after = {r.key: (r.offset, r.state) for r in gpu.arena.regions() if r.key is not None}
    assert after == before  # nothing half-registered; the shared units stay, unpinned
    assert all(r.pin_count == 0 for r in gpu.arena.regions())
    # Reading the (now truncated) headers again is a one-line error before anything moves.
    with pytest.raises(ModelError, match="past the end of the data"):
        gpu.start_instance(folder)
    gpu.check()


def test_corrupt_files_give_one_line_errors(
    ckdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _copy(ckdir / "qwen2.5-3b", tmp_path / "bad")
    shard = sorted(folder.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[8:20] = b"not json at!"
    shard.write_bytes(bytes(data))
    gpu = RealGpu("cpu", 4 << 20)
    with pytest.raises(ModelError, match="header is not valid JSON") as info:
        gpu.start_instance(folder)
    assert "\n" not in str(info.value)
    gpu.check()
    assert main(["real", "load", str(folder), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and shard.name in err and err.count("\n") == 1
    assert main(["real", "load", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_verify_detects_bytes_changed_in_the_file(ckdir: Path, tmp_path: Path) -> None:
    folder = _copy(ckdir / "qwen2.5-3b", tmp_path / "qwen2.5-3b")
    gpu = RealGpu("cpu", 4 << 20)
    gpu.start_instance(folder)
    gpu.verify_model("qwen2.5-3b")
    name, (path, start, _) = next(iter(open_checkpoint(folder).locations.items()))
    with open(path, "r+b") as f:
        f.seek(start)
        b = f.read(1)
        f.seek(start)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(ModelError, match="differs from the file") as info:
        gpu.verify_model("qwen2.5-3b")
    assert name in str(info.value) and "\n" not in str(info.value)


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
        RealGpu("cuda:99" if not torch.cuda.is_available() else "tpu", 1 << 20)


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
def test_cuda_load_pinned_staging_reuse_and_verify(ckdir: Path) -> None:
    gpu = RealGpu("cuda", 16 << 20, "tensor", chunk_bytes=64 << 10)
    s = gpu.start_instance(ckdir / "llama-3-8b")
    assert s.read is not None and s.read.staged and gpu.loader._pool[0].is_pinned()
    gpu.end_instance("llama-3-8b")
    s = gpu.start_instance(ckdir / "llama-ft")
    assert s.reused_bytes > 0
    gpu.verify_model("llama-ft")
    files = _file_tensors(ckdir / "llama-ft")
    for name, view in gpu.weights("llama-ft").items():
        assert view.is_cuda and torch.equal(view.cpu(), files[name])
    mem = gpu.memory()
    assert mem.total_bytes > 0 and mem.torch_allocated >= gpu.arena.capacity
    gpu.end_instance("llama-ft")
    gpu.check()


@pytest.mark.gpu
def test_cuda_moves_and_compaction_under_pressure(ckdir: Path) -> None:
    dev = DeviceArena(1 << 20, "cuda", move_chunk_bytes=4096)
    host = torch.randint(0, 256, (dev.capacity,), dtype=torch.uint8)
    dev.buffer.copy_(host)
    ref = bytearray(host.numpy().tobytes())
    for src, dst, n in [(0, 1000, 300_000), (5000, 256, 200_000), (0, 600_000, 300_000)]:
        dev.copy_move(Move("k", src, dst, n))
        ref[dst : dst + n] = ref[src : src + n]
    assert dev.buffer.cpu().numpy().tobytes() == bytes(ref)
    gpu = RealGpu("cuda", 1_400_000, "tensor", "lru", "pbp", verify=True, chunk_bytes=8192)
    for model in ["llama-3-8b", "qwen2.5-3b", "llama-ft", "qwen2.5-3b", "llama-3-8b"]:
        gpu.start_instance(ckdir / model)
        gpu.check()
        gpu.end_instance(model)

"""Reading safetensors bytes into the device arena the way fast loaders do.

Where the speed comes from (DESIGN.md): several reader threads `pread` file ranges into a small pool
of staging buffers (16-32 MiB, page-locked on CUDA so the copy engine can DMA them), and while they
read, the main thread issues non-blocking host->device copies of the filled buffers on a side stream;
a buffer goes back to the readers once the event recorded after its copies has completed. Destinations
are views of one arena buffer, so nothing is allocated per tensor.

On the CPU the same pipeline runs with plain buffers and synchronous copies (the tests exercise it),
and `staging="auto"` reads straight into the arena instead, since there the arena already is host
memory and a staging copy would only cost bandwidth.

A `Checkpoint` is a model folder seen through the header-only readers of `tangram_sim.models`:
its `ModelSpec` (names, fingerprints), the byte range of each tensor in its shard, and the layout of
each reuse unit (tensor i of a unit lives at unit offset + running size of the tensors before it).
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tangram_sim.errors import ConfigError, ModelError
from tangram_sim.models.catalog import get_model
from tangram_sim.models.safetensors_header import load_config_json, tensor_locations
from tangram_sim.models.spec import DTYPE_BYTES, ModelSpec
from tangram_sim.models.units import DEFAULT_MIN_UNIT_BYTES, ReuseUnit, build_units

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "STAGING_MODES",
    "Checkpoint",
    "LoadResult",
    "Loader",
    "Segment",
    "TensorSlot",
    "UnitLayout",
    "default_readers",
    "file_digest",
    "open_checkpoint",
]

MiB = 2**20
DEFAULT_CHUNK_BYTES = 32 * MiB
STAGING_MODES = ("auto", "always", "never")


def default_readers() -> int:
    """Reader threads: enough to keep a PCIe link busy from page cache, not more than the cores."""
    return max(2, min(8, os.cpu_count() or 2))


# --- checkpoints and unit layouts -------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class TensorSlot:
    index: int  # position in ModelSpec.tensors
    name: str  # tensor name
    rel: int  # byte offset inside the unit's region
    nbytes: int  # bytes of the tensor
    path: str  # shard file holding it
    start: int  # absolute byte offset of its data in that file


@dataclass(slots=True, frozen=True)
class UnitLayout:
    unit: ReuseUnit  # the shared policy's unit (key, nbytes, tensor indices)
    nbytes: int  # bytes the tensors span in the region; > unit.nbytes only if mixed dtypes need padding
    slots: tuple[TensorSlot, ...]  # the unit's tensors in inventory order


@dataclass(slots=True)
class Checkpoint:
    """A safetensors checkpoint as the executor needs it; everything comes from headers."""

    path: Path  # the folder (or single file) it was opened from, resolved
    spec: ModelSpec  # inventory in load order with fingerprints (shared tensors marked by metadata)
    locations: dict[str, tuple[str, int, int]]  # tensor -> (file, first byte, one past last)
    config: dict[str, Any] | None  # config.json beside the weights, if any
    _layouts: dict[tuple[str, int, int], tuple[UnitLayout, ...]] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    def layouts(
        self, granularity: str, min_unit_bytes: int = DEFAULT_MIN_UNIT_BYTES, unit_divisor: int = 0
    ) -> tuple[UnitLayout, ...]:
        """Reuse units from `build_units` with each tensor's place inside its unit (cached)."""
        key = (granularity, min_unit_bytes, unit_divisor)
        cached = self._layouts.get(key)
        if cached is None:
            units = build_units(self.spec, granularity, min_unit_bytes, unit_divisor)
            cached = tuple(self._layout(u) for u in units)
            self._layouts[key] = cached
        return cached

    def _layout(self, unit: ReuseUnit) -> UnitLayout:
        slots: list[TensorSlot] = []
        rel = 0
        for i in unit.tensor_indices:
            t = self.spec.tensors[i]
            elt = DTYPE_BYTES[t.dtype]
            rel = -(-rel // elt) * elt  # only mixed-dtype units ever pad: typed views need alignment
            path, start, end = self.locations[t.name]
            slots.append(TensorSlot(i, t.name, rel, end - start, path, start))
            rel += t.nbytes
        return UnitLayout(unit, rel, tuple(slots))


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read a checkpoint folder's headers (no weights); one-line ModelError for anything unusable."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelError(f"{p}: no such file or folder, expected a safetensors checkpoint folder")
    if p.is_dir() and not any(p.glob("*.safetensors")):
        raise ModelError(
            f"{p}: folder has no *.safetensors files, expected a checkpoint "
            "(write one with `tangram-sim real make-checkpoints`)"
        )
    if p.is_file() and p.suffix != ".safetensors":
        raise ModelError(f"{p}: not a .safetensors file, expected a checkpoint folder or .safetensors file")
    spec = get_model(p)
    locations = tensor_locations(p)
    missing = [t.name for t in spec.tensors if t.name not in locations]
    if missing:
        raise ModelError(f"{p}: tensor {missing[0]!r} has no data in any shard, expected every tensor stored")
    folder = p if p.is_dir() else p.parent
    config = load_config_json(folder / "config.json") if (folder / "config.json").is_file() else None
    return Checkpoint(p.resolve(), spec, locations, config)


# --- copy plans ---------------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class Segment:
    path: str  # file to read
    file_offset: int  # first byte in the file
    nbytes: int  # bytes to copy
    dst: int  # byte offset in the device buffer


@dataclass(slots=True)
class _Batch:
    """What one staging buffer carries: file reads into it, then copies out of it."""

    reads: list[tuple[str, int, int, int]] = field(default_factory=list)  # (path, file off, n, stage off)
    copies: list[tuple[int, int, int]] = field(default_factory=list)  # (stage off, dst, n)
    nbytes: int = 0  # bytes used in the staging buffer


def _pieces(segments: Sequence[Segment], chunk: int) -> list[Segment]:
    """Segments in file order, file-and-destination-contiguous ones merged, split to <= chunk bytes."""
    merged: list[Segment] = []
    for s in sorted((s for s in segments if s.nbytes > 0), key=lambda s: (s.path, s.file_offset)):
        last = merged[-1] if merged else None
        if (
            last is not None
            and last.path == s.path
            and last.file_offset + last.nbytes == s.file_offset
            and last.dst + last.nbytes == s.dst
        ):
            merged[-1] = Segment(s.path, last.file_offset, last.nbytes + s.nbytes, last.dst)
        else:
            merged.append(s)
    out: list[Segment] = []
    for s in merged:
        for a in range(0, s.nbytes, chunk):
            n = min(chunk, s.nbytes - a)
            out.append(Segment(s.path, s.file_offset + a, n, s.dst + a))
    return out


def _batches(pieces: Sequence[Segment], chunk: int) -> list[_Batch]:
    """Pack pieces into staging-buffer loads; file-contiguous pieces share one read."""
    batches: list[_Batch] = []
    b = _Batch()
    for s in pieces:
        if b.nbytes + s.nbytes > chunk:
            batches.append(b)
            b = _Batch()
        stage = b.nbytes
        r = b.reads[-1] if b.reads else None
        if r is not None and r[0] == s.path and r[1] + r[2] == s.file_offset:
            b.reads[-1] = (r[0], r[1], r[2] + s.nbytes, r[3])
        else:
            b.reads.append((s.path, s.file_offset, s.nbytes, stage))
        c = b.copies[-1] if b.copies else None
        if c is not None and c[0] + c[2] == stage and c[1] + c[2] == s.dst:
            b.copies[-1] = (c[0], c[1], c[2] + s.nbytes)
        else:
            b.copies.append((stage, s.dst, s.nbytes))
        b.nbytes += s.nbytes
    if b.nbytes:
        batches.append(b)
    return batches


# --- reading --------------------------------------------------------------------------------------------


def _pread_into(fd: int, view: memoryview, offset: int, path: str) -> None:
    """Fill `view` from the file at `offset`; a short file is a one-line ModelError."""
    n = len(view)
    got = 0
    while got < n:
        try:
            if hasattr(os, "preadv"):
                k = os.preadv(fd, [view[got:]], offset + got)
            else:  # pragma: no cover - platforms without preadv
                data = os.pread(fd, n - got, offset + got)
                k = len(data)
                view[got : got + k] = data
        except OSError as exc:
            raise ModelError(
                f"{path}: cannot read ({exc.strerror or exc}), expected a readable checkpoint"
            ) from None
        if k == 0:
            raise ModelError(
                f"{path}: file ends before byte {offset + n} (got {got} of {n} bytes at offset {offset}), "
                "expected a complete file (truncated after its header was read?)"
            )
        got += k


def _open_all(paths: Sequence[str]) -> dict[str, int]:
    fds: dict[str, int] = {}
    try:
        for p in dict.fromkeys(paths):
            try:
                fds[p] = os.open(p, os.O_RDONLY)
            except OSError as exc:
                raise ModelError(
                    f"{p}: cannot open ({exc.strerror or exc}), expected a readable shard"
                ) from None
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    return fds


@dataclass(slots=True)
class LoadResult:
    nbytes: int  # bytes copied into the arena
    seconds: float  # wall time from the first read to the last copy completed
    reads: int  # pread calls issued (after merging file-contiguous ranges)
    copies: int  # host->device copies issued (0 when reading straight into the arena)
    staged: bool  # True: through staging buffers; False: pread straight into the arena
    readers: int  # reader threads used

    @property
    def gbps(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


class Loader:
    """Reads segments of safetensors files into a device buffer (see the module docstring)."""

    def __init__(
        self,
        device: str | torch.device = "cpu",
        readers: int | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        staging: str = "auto",
    ) -> None:
        if staging not in STAGING_MODES:
            raise ConfigError(f"staging {staging!r} is unknown, expected one of {', '.join(STAGING_MODES)}")
        if readers is not None and readers < 1:
            raise ConfigError(f"readers {readers}, expected at least 1")
        if chunk_bytes < 4096:
            raise ConfigError(f"chunk_bytes {chunk_bytes}, expected at least 4096")
        self.device = torch.device(device)
        self.readers = readers or default_readers()  # reader threads
        self.chunk_bytes = int(chunk_bytes)  # bytes per staging buffer
        self.cuda = self.device.type == "cuda"  # pinned staging + side stream only there
        self.staged = staging == "always" or (staging == "auto" and self.device.type != "cpu")
        self._pool: list[torch.Tensor] = []  # staging buffers, allocated once (pinning is slow)
        self._stream: Any = None  # side stream of the host->device copies (CUDA)

    def _buffers(self, count: int) -> list[torch.Tensor]:
        while len(self._pool) < count:
            self._pool.append(torch.empty(self.chunk_bytes, dtype=torch.uint8, pin_memory=self.cuda))
        return self._pool[:count]

    def close(self) -> None:
        """Drop the staging buffers (pinned memory is a scarce host resource)."""
        self._pool.clear()

    def load(self, buffer: torch.Tensor, segments: Sequence[Segment], after_compute: bool = True) -> LoadResult:
        """Copy every segment's file bytes to `buffer[dst:dst+n]`; returns bytes and seconds.

        `after_compute` (CUDA): the copies wait for the work queued on the current stream first
        (compaction moves queued there read the bytes about to be overwritten); False for reads that
        must not wait for a forward pass in flight (execute-while-load, whose moves are done already).

        Raises ModelError for unreadable or short files; on error, copies already issued have
        completed before it returns, so the caller may free the destination ranges at once.
        """
        if buffer.dtype != torch.uint8 or buffer.dim() != 1:
            raise ValueError("the arena buffer must be a 1-D uint8 tensor")
        for s in segments:
            if s.dst < 0 or s.dst + s.nbytes > buffer.numel():
                raise ValueError(f"segment {s} is outside the {buffer.numel()}-byte buffer")
        pieces = _pieces(segments, self.chunk_bytes)
        total = sum(s.nbytes for s in pieces)
        if not pieces:
            return LoadResult(0, 0.0, 0, 0, self.staged, 0)
        fds = _open_all([s.path for s in pieces])
        t0 = time.perf_counter()
        try:
            if self.staged or buffer.device.type != "cpu":
                reads, copies, readers = self._load_staged(buffer, _batches(pieces, self.chunk_bytes), fds,
                                                           after_compute)
                staged = True
            else:
                reads, readers = self._load_direct(buffer, pieces, fds)
                copies, staged = 0, False
        finally:
            for fd in fds.values():
                os.close(fd)
        return LoadResult(total, time.perf_counter() - t0, reads, copies, staged, readers)

    def _load_direct(
        self, buffer: torch.Tensor, pieces: list[Segment], fds: dict[str, int]
    ) -> tuple[int, int]:
        """CPU arena: pread straight into it with a pool of reader threads."""
        arena = memoryview(buffer.numpy())
        readers = min(self.readers, len(pieces))

        def read(s: Segment) -> None:
            _pread_into(fds[s.path], arena[s.dst : s.dst + s.nbytes], s.file_offset, s.path)

        if readers == 1:
            for s in pieces:
                read(s)
        else:
            with ThreadPoolExecutor(readers, thread_name_prefix="tangram-read") as pool:
                futures = [pool.submit(read, s) for s in pieces]
                try:
                    for f in futures:
                        f.result()
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
        return len(pieces), readers

    def _load_staged(
        self, buffer: torch.Tensor, batches: list[_Batch], fds: dict[str, int], after_compute: bool = True
    ) -> tuple[int, int, int]:
        """Readers fill staging buffers; this thread copies them out, overlapping the two."""
        readers = min(self.readers, len(batches))
        pool = self._buffers(min(len(batches), 2 * readers))
        views = {id(b): memoryview(b.numpy()) for b in pool}
        work: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(len(batches)):
            work.put(i)
        free: queue.Queue[torch.Tensor] = queue.Queue()
        for b in pool:
            free.put(b)
        ready: queue.Queue[tuple[int, torch.Tensor | None, BaseException | None]] = queue.Queue()
        stop = threading.Event()

        def reader() -> None:
            while not stop.is_set():
                try:
                    i = work.get_nowait()
                except queue.Empty:
                    return
                stage: torch.Tensor | None = None
                while stage is None:
                    try:
                        stage = free.get(timeout=0.05)
                    except queue.Empty:
                        if stop.is_set():
                            return
                try:
                    mv = views[id(stage)]
                    for path, off, n, at in batches[i].reads:
                        _pread_into(fds[path], mv[at : at + n], off, path)
                except BaseException as exc:  # handed to the main thread, which re-raises it
                    ready.put((i, stage, exc))
                    return
                ready.put((i, stage, None))

        threads = [
            threading.Thread(target=reader, name=f"tangram-read-{k}", daemon=True) for k in range(readers)
        ]
        stream = None
        if self.cuda:
            if self._stream is None:
                self._stream = torch.cuda.Stream(device=buffer.device)
            stream = self._stream
            if after_compute:  # compaction copies queued on the compute stream must finish reading first
                stream.wait_stream(torch.cuda.current_stream(buffer.device))
        inflight: deque[tuple[Any, torch.Tensor]] = deque()  # (event or None, staging buffer)
        done = copies = 0
        for t in threads:
            t.start()
        try:
            while done < len(batches):
                try:
                    i, stage, exc = ready.get_nowait()
                except queue.Empty:
                    if inflight:  # nothing read yet: retire the oldest copy to hand its buffer back
                        event, old = inflight.popleft()
                        if event is not None:
                            event.synchronize()
                        free.put(old)
                        continue
                    i, stage, exc = ready.get()
                if exc is not None:
                    raise exc
                assert stage is not None
                if stream is not None:
                    with torch.cuda.stream(stream):
                        for at, dst, n in batches[i].copies:
                            buffer[dst : dst + n].copy_(stage[at : at + n], non_blocking=True)
                        event = torch.cuda.Event()
                        event.record(stream)
                else:
                    for at, dst, n in batches[i].copies:
                        buffer[dst : dst + n].copy_(stage[at : at + n])
                    event = None
                copies += len(batches[i].copies)
                inflight.append((event, stage))
                done += 1
                while inflight and (inflight[0][0] is None or inflight[0][0].query()):
                    free.put(inflight.popleft()[1])
            if stream is not None:
                stream.synchronize()
        finally:
            stop.set()
            for t in threads:
                t.join()
            if stream is not None:
                stream.synchronize()  # no copy may still read a staging buffer or write freed space
        return sum(len(b.reads) for b in batches), copies, readers


# --- verification ---------------------------------------------------------------------------------------


def file_digest(path: str, start: int, nbytes: int, chunk: int = 64 * MiB) -> str:
    """blake2b of a file range, read in chunks."""
    h = hashlib.blake2b(digest_size=16)
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(min(chunk, max(nbytes, 1)))
        mv = memoryview(buf)
        for a in range(0, nbytes, chunk):
            n = min(chunk, nbytes - a)
            _pread_into(fd, mv[:n], start + a, path)
            h.update(mv[:n])
    finally:
        os.close(fd)
    return h.hexdigest()


def device_digest(data: torch.Tensor, chunk: int = 64 * MiB) -> str:
    """blake2b of a uint8 device tensor's bytes (copied to the host in chunks)."""
    h = hashlib.blake2b(digest_size=16)
    n = data.numel()
    for a in range(0, n, chunk):
        piece = data[a : a + chunk]
        if piece.device.type != "cpu":
            piece = piece.cpu()
        h.update(memoryview(piece.contiguous().numpy()))
    return h.hexdigest()

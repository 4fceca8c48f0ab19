"""Loader throughput: tangram's loader vs `safetensors.torch.load_file` on the same checkpoint.

Generates a checkpoint in a temporary folder (or uses `--dir`), loads it with our pipeline into a
device arena (reader threads, staging buffers, side-stream copies: a cold start with nothing resident
through the replay path, `real.session.run_requests`, one fresh arena per run; its read time from the
replay's loads frame) and with `safetensors.torch.load_file(device=...)` shard by shard, and prints
GB/s for each and their ratio. On CUDA it also measures the pinned host->device copy bandwidth (the
ceiling for any loader reading from host memory) and prints ours as a fraction of it.

Files are read from the page cache after a warm-up (both loaders alike; ours: the device's own
warm-up before each run, which also starts its reader threads and pinned buffers), i.e. the host-DRAM
tier of the simulator; `--cold` drops the shards from the page cache before every run instead
(`posix_fadvise(DONTNEED)`, no root needed; ours: after the warm-up, before the cold start). On the
CPU, `load_file` returns tensors backed by an mmap of the file without reading them, so it is
reported twice: as is ("lazy"), and followed by a copy of every tensor into memory of its own, which
is what owning the bytes costs and what the ratio uses.

    python benchmarks/bench_loader.py                       # CPU: ~1.5 GB synthetic; CUDA: llama-3-8b
    python benchmarks/bench_loader.py --device cuda:0 --gb 8 --repeats 5
    python benchmarks/bench_loader.py --dir /path/to/checkpoint --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

GB = 1e9


def _drop_page_cache(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def make_checkpoint(out: Path, device_type: str, gb: float | None, model: str | None) -> Path:
    """The checkpoint to benchmark: `--gb N` synthetic, or a full-size catalog model."""
    from tangram_sim.real.checkpoints import make_checkpoint as make_model
    from tangram_sim.real.checkpoints import make_synthetic_checkpoint

    if gb is None and model is None:
        if device_type == "cuda":
            model = "llama-3-8b"
        else:
            gb = 1.5
    t0 = time.perf_counter()
    written = make_synthetic_checkpoint(out, gb) if gb is not None else make_model(model, out, "full")
    print(
        f"generated {written.path.name}: {written.nbytes / GB:.2f} GB in {len(written.shards)} shards "
        f"({time.perf_counter() - t0:.1f} s)",
        flush=True,
    )
    return written.path


def pinned_h2d_gbps(device: Any, nbytes: int = 2**30, repeats: int = 5) -> dict[str, float]:
    """Host->device copy bandwidth from pinned and from pageable memory (CUDA events)."""
    import torch

    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    out: dict[str, float] = {}
    for kind, pin in (("pinned", True), ("pageable", False)):
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        host.fill_(1)
        dev.copy_(host, non_blocking=pin)
        torch.cuda.synchronize(device)
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dev.copy_(host, non_blocking=pin)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        out[kind] = nbytes / min(times) / GB
        del host
    return out


def run(
    path: Path,
    device: str = "cpu",
    repeats: int = 3,
    readers: int | None = None,
    chunk_mb: float = 32,
    staging: str = "auto",
    cold: bool = False,
    verify: bool = False,
) -> dict[str, Any]:
    """Measure both loaders on checkpoint `path`; returns the figures (GB/s, seconds, settings)."""
    import torch
    from safetensors.torch import load_file

    from tangram_sim.real.loader import Loader, open_checkpoint
    from tangram_sim.real.session import run_requests, system_for
    from tangram_sim.real.setup import resolve_device

    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    ckpt = open_checkpoint(path)
    shards = sorted({Path(p) for p, _, _ in ckpt.locations.values()})
    nbytes = ckpt.spec.weight_bytes

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(dev)

    # Ours: one cold start per run in a fresh arena of the model's size plus room for its KV (`none`
    # retention), after the device's warm-up; the reads' time from the loads frame.
    loader = Loader(dev, readers, int(chunk_mb * 2**20), staging)  # the settings the device resolves
    system = system_for("group", "none")

    def drop(i: int) -> None:  # called once the request is routed: after the warm-up, before the start
        if cold:
            _drop_page_cache(shards)

    ours: list[float] = []
    for i in range(repeats):
        res = run_requests([ckpt], [(ckpt.name, [1], 1, 0.0)], system, device=dev,
                           capacity=nbytes + 64 * 2**20, verify=verify and i == repeats - 1, readers=readers,
                           chunk_bytes=int(chunk_mb * 2**20), staging=staging, warmup=True, progress=drop)
        load = res.loads.iloc[0]
        if int(load["loaded_bytes"]) != nbytes:
            raise AssertionError(f"cold start read {int(load['loaded_bytes'])} of {nbytes} bytes")
        ours.append(float(load["read_s"]))
    settings = {
        "readers": loader.readers,
        "chunk_mib": chunk_mb,
        "staged": loader.staged,
        "pinned": bool(loader.staged and cuda),
    }
    del res
    if cuda:
        torch.cuda.empty_cache()

    # safetensors, shard by shard, onto the device.
    st: list[float] = []
    st_owned: list[float] = []
    for i in range(repeats + 1):
        if cold:
            _drop_page_cache(shards)
        t0 = time.perf_counter()
        loaded = [load_file(str(s), device=str(dev)) for s in shards]
        sync()
        t1 = time.perf_counter()
        if not cuda:  # mmap-backed: copy to memory of its own, as a device load would
            owned = [{k: v.clone() for k, v in d.items()} for d in loaded]
            t2 = time.perf_counter()
            del owned
        del loaded
        if i:
            st.append(t1 - t0)
            if not cuda:
                st_owned.append(t2 - t0)
        if cuda:
            torch.cuda.empty_cache()

    result: dict[str, Any] = {
        "checkpoint": str(ckpt.path),
        "model": ckpt.name,
        "bytes": nbytes,
        "shards": len(shards),
        "dtype": ckpt.spec.dtype,
        "device": str(dev),
        "repeats": repeats,
        "cold_cache": cold,
        "ours": {"gbps": nbytes / statistics.median(ours) / GB, "seconds": ours, **settings},
        "safetensors": {"gbps": nbytes / statistics.median(st) / GB, "seconds": st},
    }
    if verify:
        result["ours"]["verified"] = True
    if st_owned:
        result["safetensors"]["lazy"] = True
        result["safetensors_owned"] = {"gbps": nbytes / statistics.median(st_owned) / GB, "seconds": st_owned}
        result["ratio"] = result["ours"]["gbps"] / result["safetensors_owned"]["gbps"]
    else:
        result["ratio"] = result["ours"]["gbps"] / result["safetensors"]["gbps"]
    if cuda:
        h2d = pinned_h2d_gbps(dev)
        result["h2d_gbps"] = h2d
        result["fraction_of_pinned_h2d"] = result["ours"]["gbps"] / h2d["pinned"]
    return result


def report(r: dict[str, Any]) -> str:
    """Human-readable lines of a `run` result."""
    ours = r["ours"]
    how = f"{ours['readers']} readers, {ours['chunk_mib']:g} MiB " + (
        "pinned staging" if ours["pinned"] else "staging" if ours["staged"] else "pread into the arena"
    )
    lines = [
        f"checkpoint: {r['model']}, {r['bytes'] / GB:.2f} GB {r['dtype']} in {r['shards']} shards; "
        f"device {r['device']}; median of {r['repeats']} runs, "
        f"{'cold' if r['cold_cache'] else 'warm'} page cache",
        f"  tangram loader ({how}):  {ours['gbps']:7.2f} GB/s",
    ]
    if "safetensors_owned" in r:
        lines += [
            f"  safetensors load_file(device='cpu'), lazy mmap (bytes not read):  "
            f"{r['safetensors']['gbps']:7.2f} GB/s",
            f"  safetensors load_file + copy of every tensor:  {r['safetensors_owned']['gbps']:7.2f} GB/s",
            f"  ratio tangram / safetensors (copied): {r['ratio']:.2f}x",
        ]
    else:
        lines += [
            f"  safetensors load_file(device='{r['device']}'):  {r['safetensors']['gbps']:7.2f} GB/s",
            f"  ratio tangram / safetensors: {r['ratio']:.2f}x",
        ]
    if "h2d_gbps" in r:
        h = r["h2d_gbps"]
        lines.append(
            f"  host->device copy: pinned {h['pinned']:.2f} GB/s, pageable {h['pageable']:.2f} GB/s; "
            f"tangram loader = {100 * r['fraction_of_pinned_h2d']:.0f}% of pinned"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--gb", type=float, default=None, help="synthetic Llama-shaped checkpoint of N GB")
    what.add_argument("--model", default=None, help="full-size catalog model, e.g. llama-3-8b")
    what.add_argument("--dir", default=None, help="an existing checkpoint folder")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--readers", type=int, default=None)
    parser.add_argument("--chunk-mb", type=float, default=32)
    parser.add_argument("--staging", choices=("auto", "always", "never"), default="auto")
    parser.add_argument(
        "--cold", action="store_true", help="drop the shards from the page cache before each run"
    )
    parser.add_argument("--verify", action="store_true", help="checksum the loaded tensors once")
    parser.add_argument("--tmp", default=None, help="where to generate the checkpoint (default: system temp)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)

    import torch

    from tangram_sim.errors import TangramError

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        with tempfile.TemporaryDirectory(prefix="tangram-bench-", dir=args.tmp) as tmp:
            path = (
                Path(args.dir)
                if args.dir
                else make_checkpoint(Path(tmp), torch.device(device).type, args.gb, args.model)
            )
            result = run(
                path, device, args.repeats, args.readers, args.chunk_mb, args.staging, args.cold, args.verify
            )
    except TangramError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

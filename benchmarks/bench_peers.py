"""A unit copied from another arena vs read from its files: the two ways a replay's cold start fills a region.

Two arenas of `--device`, each backend in a process of its own (as a replay with several arenas runs
them; on the CPU each pinned to its own core, its buffer in shared memory), the checkpoint loaded into
the first. The second then starts the same model again and again, alternately copying every unit from
the first arena's buffer (`real.peers`: what a GPU source of the source policy does) and reading every
unit from the files (warm page cache: the replay's host tier); the backend times each part on its own
(`copy_s`, `read_s` of the start). Prints the median GB/s of each and their ratio.

    python benchmarks/bench_peers.py --checkpoint DIR                 # CPU
    python benchmarks/bench_peers.py --checkpoint DIR --device cuda:0 --repeats 10
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def run(checkpoint: str, device: str = "cpu", repeats: int = 7) -> dict[str, Any]:
    """Median copy and read rates (GB/s) of the checkpoint's units between two arenas of `device`."""
    from tangram_sim.arena import ARENA_ALIGNMENT
    from tangram_sim.real.backend import BackendSpec, model_layouts
    from tangram_sim.real.link import DeviceLink, core_sets
    from tangram_sim.real.loader import open_checkpoint

    ckpt = open_checkpoint(checkpoint)
    name = ckpt.path.name
    cpu = device == "cpu"
    cores = core_sets(2, 1) if cpu else [(), ()]
    base = BackendSpec(device, 0, ARENA_ALIGNMENT, {name: str(ckpt.path)}, "group", 8 << 20, 0, 16,
                       threads=1 if cpu else None, shared=True)
    offsets, end = {}, 0
    for lay in model_layouts(base, ckpt):
        offsets[lay.unit.key] = end
        end += -(-lay.nbytes // ARENA_ALIGNMENT) * ARENA_ALIGNMENT
    specs = [BackendSpec(**{**{f: getattr(base, f) for f in base.__slots__}, "capacity": end, "cores": c})
             for c in cores]
    holder, reader = (DeviceLink(spec, True) for spec in specs)
    try:
        reader.call("attach_peer", 0, holder.call("export_buffer", True))
        holder.call("start", (), name, offsets, list(offsets), (), True)
        copies = [(0, key, off) for key, off in offsets.items()]
        copy_bps, read_bps = [], []
        for i in range(repeats + 1):  # the first round warms the page cache, threads and pages up
            c = reader.call("start", (("end", name),), name, offsets, [], (), i == 0, False, copies).value
            r = reader.call("start", (("end", name),), name, offsets, list(offsets), (), False).value
            if i:
                copy_bps.append(c[6] / c[5])
                read_bps.append(r[3] / r[1])
        reader.call("finish", ())
    finally:
        reader.close()
        holder.close()
    copy, read = statistics.median(copy_bps), statistics.median(read_bps)
    return {"checkpoint": str(ckpt.path), "device": device, "bytes": end, "repeats": repeats,
            "copy_gbps": copy / 1e9, "read_gbps": read / 1e9, "copy_over_read": copy / read,
            "copy_gbps_all": [b / 1e9 for b in copy_bps], "read_gbps_all": [b / 1e9 for b in read_bps]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a checkpoint folder (e.g. from real make-checkpoints)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=None, help="write every figure here")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    r = run(args.checkpoint, args.device, args.repeats)
    print(f"{r['bytes'] / 1e6:.1f} MB on {r['device']}: copied from the other arena {r['copy_gbps']:.2f} GB/s, "
          f"read from the files {r['read_gbps']:.2f} GB/s (copy / read {r['copy_over_read']:.2f}x; "
          f"medians of {r['repeats']})")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

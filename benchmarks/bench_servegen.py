"""ServeGen client-pool generation: wall time and peak memory, each case in a fresh process.

Cases: the Tangram evaluation's 0.4 req/s workload (one hour, five pools, eight models) from the
shipped extract; the same hour at the pools' native rates (~2,200 req/s, ~8 M requests); optionally
(`--data DIR`) the same from a full ServeGen data folder, to see the cost of reading its JSON files.
Prints one line per case; figures vary with the machine, so compare lines of one run.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POOLS = {
    "m-small": ["qwen2.5-3b", "phi-3-mini-4k"],
    "m-mid": ["llama-3-8b", "yi-9b"],
    "m-large": ["qwen2.5-14b", "gpt-neox-20b"],
    "mm-image": ["llava-1.5-7b"],
    "deepseek-r1": ["deepseek-r1-distill-qwen-14b"],
}


def one(data: str, target_rps: float | None) -> None:
    """Run one case in this process and print its figures as JSON."""
    t0 = time.perf_counter()
    from tangram_sim.traces.servegen_pool import generate

    t_import = time.perf_counter() - t0
    t0 = time.perf_counter()
    df = generate(Path(data), POOLS, (0.0, 3600.0), seed=0, target_rps=target_rps)
    wall = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"requests": len(df), "wall_s": wall, "import_s": t_import, "peak_rss_mib": rss,
                      "frame_mib": df.memory_usage(deep=True).sum() / 2**20}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="also run from this full ServeGen data folder")
    ap.add_argument("--one", nargs=2, metavar=("DATA", "RPS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        one(args.one[0], None if args.one[1] == "native" else float(args.one[1]))
        return
    cases = [("extract", str(ROOT / "traces" / "servegen"), "0.4"),
             ("extract", str(ROOT / "traces" / "servegen"), "native")]
    if args.data:
        cases += [("folder", args.data, "0.4"), ("folder", args.data, "native")]
    for source, data, rps in cases:
        out = subprocess.run([sys.executable, __file__, "--one", data, rps], capture_output=True, text=True,
                             check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"{source:<8} {rps:>7} req/s target: {r['requests']:>10,} requests in {r['wall_s']:6.2f} s "
              f"({r['requests'] / r['wall_s']:>10,.0f} req/s generated), peak RSS {r['peak_rss_mib']:6.0f} MiB, "
              f"table {r['frame_mib']:5.0f} MiB")


if __name__ == "__main__":
    main()

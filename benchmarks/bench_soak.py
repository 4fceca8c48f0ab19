"""Soak: peak memory of the simulator against the number of requests, with requests streamed to disk.

Each size runs in a fresh process (so its peak RSS is its own): N synthetic requests at a fixed rate
(default 278 per second, a million an hour, so that a larger N is a longer run with the same load, not
a heavier one) on 128 GPUs and 32 models under tangram (`bench_sim.large_case`), finished requests
written to a temporary Parquet file in batches (`simulate(..., requests_path=...)`) instead of kept.
`--in-memory` runs the same sizes keeping every request, for comparison. Prints wall time, peak RSS and
the RSS growth per 100k requests between the smallest and the largest size.

    python benchmarks/bench_soak.py [--sizes 125000 250000 500000 1000000] [--in-memory]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one(n: int, stream: bool, rate: float) -> dict:
    """Simulate one size in this process; returns its figures."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.bench_sim import large_case
    from tangram_sim.sim.simulate import simulate
    from tangram_sim.sim.systems import make_system

    models, trace, cluster = large_case(n, rate)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = simulate(models, trace, cluster, make_system("tangram", "tangram"), seed=0, sample_interval_s=30.0,
                       requests_path=Path(tmp) / "requests.parquet" if stream else None)
        wall = time.perf_counter() - t0
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    s = res.summary
    return {"requests": n, "streamed": stream, "wall_s": wall, "peak_rss_mib": peak_mib,
            "completed": s["completed"], "cold_starts": s["cold_starts"], "p50_ttft_s": s["p50_ttft_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[125_000, 250_000, 500_000, 1_000_000])
    parser.add_argument("--rate", type=float, default=1_000_000 / 3600, help="requests per second")
    parser.add_argument("--in-memory", action="store_true", help="also run every size keeping all requests")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a child process
    parser.add_argument("--keep", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.one, stream=not args.keep, rate=args.rate)))
        return
    modes = [True, False] if args.in_memory else [True]
    for stream in modes:
        rows = []
        for n in args.sizes:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--one", str(n), "--rate", str(args.rate)]
            cmd += [] if stream else ["--keep"]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            rows.append(r)
            print(f"{'streamed' if stream else 'in memory':9s} {n:>9,d} requests  {r['wall_s']:7.1f} s wall  "
                  f"peak RSS {r['peak_rss_mib']:7.0f} MiB  (completed {r['completed']:,d}, cold starts "
                  f"{r['cold_starts']:,d}, p50 TTFT {r['p50_ttft_s']:.3f} s)", flush=True)
        if len(rows) > 1:
            a, b = rows[0], rows[-1]
            slope = (b["peak_rss_mib"] - a["peak_rss_mib"]) / (b["requests"] - a["requests"]) * 100_000
            print(f"{'streamed' if stream else 'in memory':9s} RSS growth: {slope:.1f} MiB per 100k requests "
                  f"({a['requests']:,d} -> {b['requests']:,d})", flush=True)


if __name__ == "__main__":
    main()

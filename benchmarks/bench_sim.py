"""Simulator throughput: requests simulated per wall-second.

1. The full Azure conv trace (19,366 requests), 8 models (zipf alpha=1), 8 GPUs, under tangram and
   serverlessllm.
2. A synthetic trace of 1,000,000 requests on 128 GPUs (16 nodes x 8), 32 models, under tangram
   (`--skip-large` leaves it out).
3. The first case at 40 GiB with execute-while-load on (`execute_while_load: true`: marked transfers,
   units landing one by one, the first prefill layer by layer), under tangram and serverlessllm. A
   revision without execute-while-load runs its serial line of the same case for `--against`.
4. Multicast at scale: `--multicast-requests` (20,000) synthetic requests at 200 req/s of the large
   case's 32 models on 16 nodes x 8 GPUs whose checkpoints start only in a remote store (25 GB/s shared,
   12.5 GB/s NICs, RDMA, no host cache), under serverlessllm (every cold start loads its whole model),
   without and with a binomial multicast (`--skip-multicast` leaves them out). `--against` does not rerun them:
   a revision without the topology has no such case; the two lines compare with each other.

Each line also prints SimPy's raw rate on this machine, measured just before it (one process yielding
bare timeouts), and the simulator's requests per 1,000 raw timeouts: a figure that compares across
machines. `--against REV` runs every line a second time, right after, on the package as it was at git
revision REV (a temporary worktree), and prints the same-run ratio.

    python benchmarks/bench_sim.py [--skip-large] [--large-requests 1000000] [--profile] [--against REV]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import simpy

from tangram_sim.models import derive_model, get_model
from tangram_sim.sim.hardware import TierSpec, gpu_spec
from tangram_sim.sim.simulate import ClusterSpec, ModelChoice, simulate
from tangram_sim.sim.systems import make_system
from tangram_sim.topology import TopologySpec
from tangram_sim.traces.formats import read_azure_llm
from tangram_sim.traces.mapping import apply_mapping
from tangram_sim.traces.synthetic import synthesize

ROOT = Path(__file__).resolve().parents[1]
EIGHT = ["qwen2.5-3b", "phi-3-mini-4k", "llama-3-8b", "yi-9b", "qwen2.5-14b", "gpt-neox-20b", "llava-1.5-7b",
         "deepseek-r1-distill-qwen-14b"]


def large_case(n_requests: int, rate: float | None = None) -> tuple[dict[str, ModelChoice], pd.DataFrame,
                                                                    ClusterSpec]:
    """`n_requests` synthetic requests at `rate` per second (default: one hour's worth) on 128 GPUs
    (16 nodes x 8 A100-80GB), 32 models: the 8 above plus fine-tunes of the small ones (sharing half
    their layers), so that 128 GPUs see real reuse and real misses."""
    specs = {n: get_model(n) for n in EIGHT}
    for i in range(24):
        base = EIGHT[i % 4]
        name = f"{base}-ft{i}"
        specs[name] = derive_model(specs[base], name, [f"*layers.{k}.*" for k in range(8)])
    rate = rate or n_requests / 3600.0
    trace = synthesize(list(specs), np.random.default_rng(1), rate=rate, n_requests=n_requests,
                       arrival="gamma", cv=2.0, zipf_alpha=1.0, input_mean=1024, output_mean=128)
    return {n: ModelChoice(s) for n, s in specs.items()}, trace, ClusterSpec(16, 8, gpu_spec("a100-80gb"))


def simpy_rate(n: int = 200_000) -> float:
    """Bare SimPy timeouts processed per second (best of three)."""

    def proc(env: simpy.Environment):
        for _ in range(n):
            yield env.timeout(1.0)

    best = 0.0
    for _ in range(3):
        env = simpy.Environment()
        env.process(proc(env))
        t0 = time.perf_counter()
        env.run()
        best = max(best, n / (time.perf_counter() - t0))
    return best


def timed(label: str, models, trace, cluster, preset: str, profile: bool,
          overrides: dict | None = None) -> float:
    """Prints one line; returns requests per wall-second."""
    raw = simpy_rate()
    system = make_system(preset, preset, overrides)
    profiler = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    if profiler:
        profiler.enable()
    res = simulate(models, trace, cluster, system, seed=0, sample_interval_s=30.0,
                   progress=sys.stderr.isatty())
    if profiler:
        profiler.disable()
    wall = time.perf_counter() - t0
    s = res.summary
    print(
        f"{label:34s} {preset:14s} {len(trace):>9,d} req  {wall:7.2f} s wall  {len(trace) / wall:>9,.0f} req/s  "
        f"(cold starts {s['cold_starts']:,d}, mean load {s['mean_load_s']:.3f} s, p50 TTFT {s['p50_ttft_s']:.3f} s)"
        f"  simpy {raw:,.0f} timeouts/s, {1000 * len(trace) / wall / raw:.2f} req per 1k timeouts",
        flush=True,
    )
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(12)
    return len(trace) / wall


def against(rev: str, line: int, args: argparse.Namespace) -> float:
    """Requests per wall-second of benchmark line `line` on the package at git revision `rev`."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tree), rev], check=True)
        try:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--only", str(line),
                   "--large-requests", str(args.large_requests)]
            env = {**os.environ, "PYTHONPATH": str(tree)}
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=True)
    last = [ln for ln in out.splitlines() if "req/s" in ln][-1]
    print(f"  {rev:>32s}: {last.strip()}", flush=True)
    # the rate after the wall time: a label may hold a rate of its own ("synthetic 278 req/s")
    return float(last.split(" s wall")[1].split(" req/s")[0].replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--large-requests", type=int, default=1_000_000)
    parser.add_argument("--profile", action="store_true", help="cProfile each run (slower)")
    parser.add_argument("--against", metavar="REV", default=None,
                        help="also run each line on git revision REV and print the same-run ratio")
    parser.add_argument("--skip-multicast", action="store_true")
    parser.add_argument("--multicast-requests", type=int, default=20_000)
    parser.add_argument("--only", type=int, default=None, help=argparse.SUPPRESS)  # one line (for --against)
    args = parser.parse_args()

    trace = read_azure_llm(ROOT / "traces/azure_llm_2023/AzureLLMInferenceTrace_conv.csv")
    trace = apply_mapping(trace, EIGHT, {"kind": "zipf", "alpha": 1.0}, np.random.default_rng(0))
    models = {n: ModelChoice(get_model(n)) for n in EIGHT}
    line = 0
    for memory_gib in (80, 40):  # 80: the catalog A100; 40: memory pressure, ~20% of requests cold
        cluster = ClusterSpec(1, 8, gpu_spec("a100-80gb", memory_gib=memory_gib))
        for preset in ("tangram", "serverlessllm"):
            if args.only in (None, line):
                rate = timed(f"azure conv, 8 GPUs x {memory_gib} GiB", models, trace, cluster, preset,
                             args.profile)
                if args.against:
                    print(f"  same-run ratio, this tree / {args.against}: "
                          f"{rate / against(args.against, line, args):.3f}", flush=True)
            line += 1

    if not args.skip_large and args.only in (None, line):
        big_models, big, big_cluster = large_case(args.large_requests)
        rate = args.large_requests / 3600.0
        got = timed(f"synthetic {rate:.0f} req/s, 128 GPUs", big_models, big, big_cluster, "tangram", args.profile)
        if args.against and args.only is None:
            print(f"  same-run ratio, this tree / {args.against}: {got / against(args.against, line, args):.3f}")
    line += 1

    cluster = ClusterSpec(1, 8, gpu_spec("a100-80gb", memory_gib=40))
    for serial_line, preset in ((2, "tangram"), (3, "serverlessllm")):  # their serial lines above
        if args.only in (None, line):
            rate = timed("azure conv, 8 x 40 GiB, exec-while-load", models, trace, cluster, preset, args.profile,
                         {"execute_while_load": True})
            if args.against:
                print(f"  same-run ratio, this tree / {args.against}'s serial line: "
                      f"{rate / against(args.against, serial_line, args):.3f}", flush=True)
        line += 1

    if not args.skip_multicast and args.only is None:
        mc_models, mc_trace, _ = large_case(args.multicast_requests, rate=200.0)
        remote = ClusterSpec(16, 8, gpu_spec("a100-80gb"),
                             TierSpec(host_cache_bytes=0, network_bps=12.5e9, ssd_holds_all=False),
                             topology=TopologySpec(rdma=True, remote_store_bps=25e9))
        for multicast in ("none", "binomial"):
            timed(f"remote store, 128 GPUs, multicast {multicast}", mc_models, mc_trace, remote, "serverlessllm",
                  args.profile, {"multicast": multicast})


if __name__ == "__main__":
    main()

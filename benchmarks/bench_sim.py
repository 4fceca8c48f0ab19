"""Simulator throughput: requests simulated per wall-second.

1. The full Azure conv trace (19,366 requests), 8 models (zipf alpha=1), 8 GPUs, under tangram and
   serverlessllm.
2. A synthetic trace of 1,000,000 requests on 128 GPUs (16 nodes x 8), 32 models, under tangram
   (`--skip-large` leaves it out).

    python benchmarks/bench_sim.py [--skip-large] [--large-requests 1000000] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from pathlib import Path

import numpy as np

from tangram_sim.models import derive_model, get_model
from tangram_sim.sim.hardware import gpu_spec
from tangram_sim.sim.simulate import ClusterSpec, ModelChoice, simulate
from tangram_sim.sim.systems import make_system
from tangram_sim.traces.formats import read_azure_llm
from tangram_sim.traces.mapping import apply_mapping
from tangram_sim.traces.synthetic import synthesize

ROOT = Path(__file__).resolve().parents[1]
EIGHT = ["qwen2.5-3b", "phi-3-mini-4k", "llama-3-8b", "yi-9b", "qwen2.5-14b", "gpt-neox-20b", "llava-1.5-7b",
         "deepseek-r1-distill-qwen-14b"]


def timed(label: str, models, trace, cluster, preset: str, profile: bool) -> None:
    system = make_system(preset, preset)
    profiler = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    if profiler:
        profiler.enable()
    res = simulate(models, trace, cluster, system, seed=0, sample_interval_s=30.0, progress=True)
    if profiler:
        profiler.disable()
    wall = time.perf_counter() - t0
    s = res.summary
    print(
        f"{label:34s} {preset:14s} {len(trace):>9,d} req  {wall:7.2f} s wall  {len(trace) / wall:>9,.0f} req/s  "
        f"(cold starts {s['cold_starts']:,d}, mean load {s['mean_load_s']:.3f} s, p50 TTFT {s['p50_ttft_s']:.3f} s)"
    )
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--large-requests", type=int, default=1_000_000)
    parser.add_argument("--profile", action="store_true", help="cProfile each run (slower)")
    args = parser.parse_args()

    trace = read_azure_llm(ROOT / "traces/azure_llm_2023/AzureLLMInferenceTrace_conv.csv")
    trace = apply_mapping(trace, EIGHT, {"kind": "zipf", "alpha": 1.0}, np.random.default_rng(0))
    models = {n: ModelChoice(get_model(n)) for n in EIGHT}
    for memory_gib in (80, 40):  # 80: the catalog A100; 40: memory pressure, ~20% of requests cold
        cluster = ClusterSpec(1, 8, gpu_spec("a100-80gb", memory_gib=memory_gib))
        for preset in ("tangram", "serverlessllm"):
            timed(f"azure conv, 8 GPUs x {memory_gib} GiB", models, trace, cluster, preset, args.profile)

    if args.skip_large:
        return
    # 32 models: the 8 above plus fine-tunes of the small ones (sharing half their layers), so that
    # 128 GPUs see real reuse and real misses.
    specs = {n: get_model(n) for n in EIGHT}
    for i in range(24):
        base = EIGHT[i % 4]
        name = f"{base}-ft{i}"
        specs[name] = derive_model(specs[base], name, [f"*layers.{k}.*" for k in range(8)])
    names = list(specs)
    big_models = {n: ModelChoice(s) for n, s in specs.items()}
    rate = args.large_requests / 3600.0  # one hour of traffic
    big = synthesize(names, np.random.default_rng(1), rate=rate, n_requests=args.large_requests,
                     arrival="gamma", cv=2.0, zipf_alpha=1.0, input_mean=1024, output_mean=128)
    big_cluster = ClusterSpec(16, 8, gpu_spec("a100-80gb"))
    timed(f"synthetic {rate:.0f} req/s, 128 GPUs", big_models, big, big_cluster, "tangram", args.profile)


if __name__ == "__main__":
    main()

"""Throughput of the arena and the packing policies.

Prints ops/s for arena allocate+free, and the time of one packing plan on an arena holding 2,000
resident units (scattered holes, some pinned), for every packing policy.

    python benchmarks/bench_policies.py [--units 2000] [--repeat 20]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from tangram_sim.arena import Arena
from tangram_sim.policies.packing import PACKING

MiB = 2**20


def bench_alloc_free(n_ops: int, seed: int) -> float:
    rng = random.Random(seed)
    arena = Arena(80 * 2**30, alignment=512)
    live: list[int] = []
    start = time.perf_counter()
    for key in range(n_ops):
        if live and (rng.random() < 0.5 or arena.free_bytes < 2**30):
            arena.release(live.pop(rng.randrange(len(live))))
        else:
            if arena.allocate(key, rng.randint(1, 300) * MiB) is not None:
                live.append(key)
    return n_ops / (time.perf_counter() - start)


def fragmented_arena(n_units: int, seed: int) -> tuple[Arena, list[int]]:
    """2,000 resident units of 8-120 MiB filling ~97% of the arena in scattered runs."""
    rng = random.Random(seed)
    sizes = [rng.randint(8, 120) * MiB for _ in range(n_units)]
    arena = Arena(int(sum(sizes) * 1.03), alignment=512)
    for key, size in enumerate(sizes):
        arena.allocate(key, size, owners=[f"m{key % 40}"])
        arena.finish_load(key)
    for key in rng.sample(range(n_units), n_units // 10):
        arena.evict(key)  # ~10% of units become scattered holes
    for key in rng.sample([r.key for r in arena.evictable()], n_units // 50):
        arena.pin(key)  # a few active instances' units: forced split points
    order = [r.key for r in arena.evictable()]
    rng.shuffle(order)
    return arena, order


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()

    ops = bench_alloc_free(200_000, seed=1)
    print(f"arena allocate/free: {ops:,.0f} ops/s (80 GiB arena, 1-300 MiB requests)")

    arena, order = fragmented_arena(args.units, seed=2)
    arena.check_invariants()
    rng = random.Random(3)
    # A model in group units: 224 units of 8-448 MiB, larger than any hole.
    units = [(f"new{i}", rng.choice([8, 32, 112, 448]) * MiB) for i in range(224)]
    print(
        f"fragmented arena: {args.units} resident units, {arena.num_regions()} regions, "
        f"{arena.free_bytes / 2**30:.1f} GiB free, fragmentation {arena.fragmentation():.2f}; "
        f"placing {len(units)} units ({sum(s for _, s in units) / 1e9:.1f} GB)"
    )
    for name in ["pbp", "first-fit", "compact-all", "min-move-window"]:
        policy = PACKING.create(name)
        times = []
        plan = None
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            plan = policy.plan(arena, units, order)
            times.append(time.perf_counter() - t0)
        assert plan is not None
        print(
            f"  {name:16s} plan {statistics.median(times) * 1e3:7.2f} ms (median of {args.repeat})  "
            f"evicted {plan.evicted_bytes / 1e9:6.2f} GB (extra {plan.extra_evicted_bytes / 1e9:5.2f})  "
            f"moved {plan.moved_bytes / 1e9:6.2f} GB in {len(plan.moves)} moves"
        )


if __name__ == "__main__":
    main()

"""Real engine step times: one batched decode step against batch size, and ragged batched prefill.

Two random-weight fp32 models: llama-3-8b at the tiny test scale (hidden 64, 2 layers), where Python
overhead shows most, and a ~0.1 GB Llama-shaped one (hidden 512, 4 layers, GQA 4:1). Every sequence's
KV cache is paged in blocks of 16 tokens that are views of one uint8 arena buffer, handed out in a
shuffled order as a fragmented arena would; the cached K/V are random values, since the step time does
not depend on them. A decode step of B rows (contexts of about `--context` tokens, all different) is
timed repeatedly at the same positions; the figure is the median. Then prompts of different lengths
are prefilled one call per prompt and as one ragged batch (`lengths=`); the batch also computes its
padding (every row is as long as the longest), so where the matmuls are the cost (CPU) it can be slower.

    python benchmarks/bench_engine.py                        # CPU, batches 1 8 32, ~200 tokens
    python benchmarks/bench_engine.py --device cuda --batches 1 8 32 128 --context 1000
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from tangram_sim.real.checkpoints import make_checkpoint, make_synthetic_checkpoint
from tangram_sim.real.device_arena import MIN_ALIGNMENT, DeviceArena
from tangram_sim.real.engine import CausalLM, EngineConfig, PagedKv, build_engine
from tangram_sim.real.loader import open_checkpoint

BLOCK_TOKENS = 16


def load_engine(folder: Path, device: torch.device) -> CausalLM:
    ckpt = open_checkpoint(folder)
    weights: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        weights.update({k: v.to(device) for k, v in load_file(str(shard)).items()})
    return build_engine(EngineConfig.from_checkpoint(ckpt.spec, ckpt.config), weights, device)


def paged_caches(c: EngineConfig, lengths: list[int], device: torch.device, seed: int = 0) -> list[PagedKv]:
    """One PagedKv per row with room for lengths[b] + 1 tokens; blocks are shuffled views of one buffer."""
    shape = c.kv_block_shape(BLOCK_TOKENS)
    elems = 1
    for d in shape:
        elems *= d
    block = -(-elems * 4 // MIN_ALIGNMENT) * MIN_ALIGNMENT
    need = [-(-(n + 1) // BLOCK_TOKENS) for n in lengths]
    arena = DeviceArena(max(1, sum(need)) * block, device)
    arena.buffer.view(torch.float32).normal_()  # stands for K/V written by earlier steps
    slots = list(range(sum(need)))
    random.Random(seed).shuffle(slots)
    caches = []
    for n in need:
        cache = PagedKv(BLOCK_TOKENS)
        cache.blocks = [arena.tensor(slots.pop() * block, torch.float32, shape) for _ in range(n)]
        caches.append(cache)
    return caches


def timed(fn: Callable[[], object], device: torch.device, min_s: float, warmup: int = 2) -> float:
    """Median seconds of `fn` over repeats lasting at least `min_s` (and at least 5)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times: list[float] = []
    while len(times) < 5 or sum(times) < min_s:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def decode_step_s(engine: CausalLM, batch: int, context: int, device: torch.device, min_s: float) -> float:
    """One decode step of `batch` rows whose contexts are context - 15 .. context tokens."""
    lengths = [context - (7 * b) % 16 for b in range(batch)]
    caches = paged_caches(engine.config, lengths, device)
    tokens = torch.randint(0, engine.config.vocab, (batch, 1), device=device)
    positions = torch.tensor(lengths, device=device)[:, None]
    with torch.inference_mode():
        return timed(lambda: engine(tokens, positions, caches), device, min_s)


def prefill_s(
    engine: CausalLM, batch: int, context: int, device: torch.device, min_s: float
) -> tuple[float, float]:
    """(one call per prompt, one ragged call) seconds for `batch` prompts of context/2 .. context tokens."""
    lengths = [max(1, context - (context // 2) * b // max(1, batch - 1)) for b in range(batch)]
    caches = paged_caches(engine.config, lengths, device)
    S = max(lengths)
    tokens = torch.randint(0, engine.config.vocab, (batch, S), device=device)
    positions = torch.arange(S, device=device)[None].expand(batch, S)
    rows = [(tokens[b : b + 1, :n], positions[b : b + 1, :n], [caches[b]]) for b, n in enumerate(lengths)]
    with torch.inference_mode():
        one_by_one = timed(lambda: [engine(*r) for r in rows], device, min_s)
        ragged = timed(lambda: engine(tokens, positions, caches, lengths=lengths), device, min_s)
    return one_by_one, ragged


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--context", type=int, default=200, help="tokens of context per row (about)")
    ap.add_argument("--prefill-batch", type=int, default=8, help="prompts in the prefill comparison")
    ap.add_argument("--min-s", type=float, default=0.4, help="least seconds of repeats per figure")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (1: a shared VM's second core stalls thread joins)",
    )
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folders = {
            "llama-3-8b tiny": make_checkpoint("llama-3-8b", tmp, "tiny", dtype="float32").path,
            "llama 0.1 GB": make_synthetic_checkpoint(tmp, 0.1, dtype="F32").path,
        }
        for name, folder in folders.items():
            engine = load_engine(Path(folder), device)
            c = engine.config
            print(
                f"{name}: hidden {c.hidden}, {c.layers} layers, {c.heads} heads / {c.kv_heads} KV heads, "
                f"head_dim {c.head_dim}; {args.device}, {torch.get_num_threads()} threads",
                flush=True,
            )
            base = None
            for batch in args.batches:
                s = decode_step_s(engine, batch, args.context, device, args.min_s)
                base = base or s
                print(
                    f"  decode B={batch:<4} {s * 1e3:8.2f} ms/step  {s * 1e3 / batch:7.3f} ms/row  "
                    f"x{s / base:5.2f} of B={args.batches[0]}",
                    flush=True,
                )
            one, ragged = prefill_s(engine, args.prefill_batch, args.context, device, args.min_s)
            print(
                f"  prefill {args.prefill_batch} prompts of {args.context // 2}-{args.context} tokens: "
                f"one by one {one * 1e3:.2f} ms, ragged batch {ragged * 1e3:.2f} ms (x{one / ragged:.2f})",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

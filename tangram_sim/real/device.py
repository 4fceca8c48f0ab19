"""The real GPU: a `core.device.Device` that moves bytes and runs forward passes with torch.

The worker has already booked every decision in the arena (`self.arena` is the `DeviceArena`'s), so
this class only does the work those books describe, on the device's own thread (one per GPU, like a
stream: its work runs in order) through the wall clock's `run_on`:

- a cold start copies the plan's compaction moves in the order the plan applied them, reads the
  missing units from the checkpoint files into their regions (`Loader`: reader threads, staging
  buffers), then builds the engine on the arena's views; `load_s` is the copies and reads, `startup_s`
  the engine build;
- KV bytes the worker grants become block views: the regions of on-demand KV, or blocks of the
  instance's static pool (the pool's regions are cut into blocks when it is reserved);
- prefill runs the group's prompts in one ragged forward pass, decode one batched step for the batch;
- a prefetched unit (`core.prefetch`) is read from its files into its region by one piece of work on
  the same thread. A cancellation cannot stop a read that has begun: the unit's region is freed in the
  books at once (any later use of those bytes is work queued behind the read on the same thread, so
  it sees its own bytes) and its bytes count as wasted; a read not yet begun is skipped. So a cold
  start that follows a prefetch waits for at most one unit's read: the wait is recorded as a step of
  kind `prefetch-wait` (and the reads as steps of kind `prefetch`).

Durations are measured on the device's thread, synchronised with the device (`torch.cuda.synchronize`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import simpy
import torch

from tangram_sim.arena import Key
from tangram_sim.core.clock import WallClockEnvironment
from tangram_sim.core.device import RankLoad, Work
from tangram_sim.core.records import Request
from tangram_sim.core.storage import Node
from tangram_sim.core.worker import Instance
from tangram_sim.errors import ModelError
from tangram_sim.policies.kv import kv_block_bytes
from tangram_sim.real.checkpoints import torch_dtype
from tangram_sim.real.device_arena import DeviceArena
from tangram_sim.real.engine import CausalLM, EngineConfig, PagedKv, build_engine, greedy
from tangram_sim.real.loader import Checkpoint, Loader, Segment, UnitLayout
from tangram_sim.real.memory import read_memory

LOAD_COLUMNS = [
    "rid", "gpu", "model", "units", "units_loaded", "loaded_bytes", "moved_bytes", "move_s", "read_s",
    "engine_s", "total_s", "read_gbps",
]
STEP_COLUMNS = [  # one row per piece of device work: what the time model predicts, as measured
    "gpu", "kind", "model", "requests", "tokens", "kv_tokens", "time_s", "wall_s", "seconds",
]
MEMORY_COLUMNS = [
    "time_s", "gpu", "device", "source", "total_bytes", "used_bytes", "free_bytes", "torch_allocated",
    "torch_reserved",
]


@dataclass(slots=True)
class _Model:
    ckpt: Checkpoint  # headers, tensor locations, config.json
    by_key: dict[Key, UnitLayout]  # unit key -> where its tensors sit inside its region
    config: EngineConfig  # decoder shape
    block_bytes: int  # one cross-layer KV block
    block_shape: tuple[int, ...]  # its view shape
    dtype: torch.dtype  # of the KV (and the weights)


@dataclass(slots=True)
class _Seq:
    tokens: list[int]  # prompt, then every generated token
    cache: PagedKv  # block views, in token order
    length: int = 0  # tokens whose K/V are in the cache
    pool_blocks: list[int] = field(default_factory=list)  # offsets taken from a static pool


class RealDevice:
    """One arena on one torch device (a whole GPU, a slice of one, or the CPU); see module docstring."""

    binds_memory = True  # KV bytes become block views, samples read the device's memory counters

    def __init__(self, env: WallClockEnvironment, gpu_id: int, device: torch.device, capacity: int,
                 alignment: int, ckpts: dict[str, Checkpoint], granularity: str, min_unit_bytes: int,
                 block_tokens: int, prompts: dict[int, list[int]], *,
                 readers: int | None, chunk_bytes: int, staging: str, unit_divisor: int = 0) -> None:
        self.env = env
        self.gpu_id = gpu_id  # position in the cluster
        self.device = device  # torch device
        self.dev = DeviceArena(capacity, device, alignment)
        self.arena = self.dev.arena  # the worker's books are this buffer's layout
        self.loader = Loader(device, readers, chunk_bytes, staging)
        self.thread = ThreadPoolExecutor(1, thread_name_prefix=f"gpu{gpu_id}")  # the device's stream
        self.block_tokens = block_tokens
        self.prompts = prompts  # rid -> token ids, made before the clock started
        self.models: dict[str, _Model] = {}
        self.unit_model: dict[Key, str] = {}  # unit key -> a model whose files hold it
        for name, ckpt in ckpts.items():
            cfg = EngineConfig.from_checkpoint(ckpt.spec, ckpt.config)
            shape = cfg.kv_block_shape(block_tokens)
            dtype = torch_dtype(ckpt.spec.dtype)
            block = kv_block_bytes(ckpt.spec.kv_bytes_per_token, block_tokens)
            numel = 1
            for d in shape:
                numel *= d
            if numel * dtype.itemsize != block:
                raise ModelError(f"{ckpt.path}: KV block is {numel * dtype.itemsize} bytes but the spec "
                                 f"says {block}, expected a decoder whose config matches its tensors")
            layouts = ckpt.layouts(granularity, min_unit_bytes, unit_divisor)
            self.models[name] = _Model(ckpt, {lay.unit.key: lay for lay in layouts}, cfg, block, shape, dtype)
            for lay in layouts:
                self.unit_model.setdefault(lay.unit.key, name)
        self.engines: dict[str, CausalLM] = {}  # model -> engine of its running instance
        self.kv: dict[int, list[int]] = {}  # rid -> its KV block offsets, in token order
        self.seqs: dict[int, _Seq] = {}  # rid -> its running sequence (after prefill)
        self.pool_free: dict[str, list[int]] = {}  # model -> free block offsets of its static pool
        self.loads: list[tuple] = []  # LOAD_COLUMNS rows
        self.memory: list[tuple] = []  # MEMORY_COLUMNS rows
        self.steps: list[tuple] = []  # STEP_COLUMNS rows
        self.prefetches_submitted = 0  # prefetch reads handed to the thread (counted on the clock's thread)
        self.prefetches_finished = 0  # of those, done or skipped (counted on the device's thread)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------ cold start
    def start_instance(self, inst: Instance, head: Request, loads: Sequence[RankLoad]) -> Work:
        if len(loads) != 1:
            raise AssertionError("the real device runs one-GPU instances only")
        load = loads[0]
        m = self.models[inst.model]
        arena, dev = self.arena, self.dev
        segments = []
        for key, _ in load.missing:
            offset = arena.lookup(key).offset
            segments += [Segment(s.path, s.start, s.nbytes, offset + s.rel) for s in m.by_key[key].slots]
        views = {}
        spec = m.ckpt.spec
        for key, lay in m.by_key.items():  # the views are valid once the moves and reads below are done
            offset = arena.lookup(key).offset
            for s in lay.slots:
                t = spec.tensors[s.index]
                views[t.name] = dev.tensor(offset + s.rel, torch_dtype(t.dtype), t.shape)
        moves = list(load.moves)
        behind_prefetch = self.prefetches_submitted != self.prefetches_finished
        queued_at = time.perf_counter()

        def work():
            t0 = time.perf_counter()
            for move in moves:
                dev.copy_move(move)
            self._sync()
            t1 = time.perf_counter()
            read = self.loader.load(dev.buffer, segments) if segments else None
            self._sync()
            t2 = time.perf_counter()
            engine = build_engine(m.config, views, self.device)
            self._sync()
            return engine, read, t0, t1, t2, time.perf_counter()

        submitted = self.env.now
        engine, read, t0, t1, t2, t3 = yield self.env.run_on(self.thread, work)
        self.engines[inst.model] = engine
        wall = self.env.wall_at(t0)
        if behind_prefetch:  # it waited for a prefetch read that had begun (at most one unit)
            self.steps.append((self.gpu_id, "prefetch-wait", inst.model, 1, 0, 0, submitted,
                               self.env.wall_at(queued_at), max(0.0, t0 - queued_at)))
        self.steps.append((self.gpu_id, "load", inst.model, 1, len(load.missing), 0, submitted, wall, t2 - t0))
        self.steps.append((self.gpu_id, "engine", inst.model, 1, 0, 0, submitted + (t2 - t0),
                           self.env.wall_at(t2), t3 - t2))
        self.loads.append((
            head.rid, self.gpu_id, inst.model, len(m.by_key), len(load.missing),
            sum(s.nbytes for s in segments), load.moved_bytes, t1 - t0, t2 - t1, t3 - t2, t3 - t0,
            read.gbps if read else 0.0,
        ))
        return t3 - t2, t2 - t0

    # ------------------------------------------------------------ prefetch
    def prefetch_source(self, node: Node, key: Key) -> bool:
        """Any unit of the replay's checkpoints: it is read from its files on this device's thread."""
        return key in self.unit_model

    def prefetch_unit(self, key: Key, nbytes: int) -> tuple[simpy.Event, Callable[[], float | None]]:
        model = self.unit_model[key]
        offset = self.arena.lookup(key).offset
        segments = [Segment(s.path, s.start, s.nbytes, offset + s.rel) for s in self.models[model].by_key[key].slots]
        lock = threading.Lock()
        state = {"begun": False, "cancelled": False}

        def work():
            try:
                with lock:
                    if state["cancelled"]:
                        return None
                    state["begun"] = True
                t0 = time.perf_counter()
                self.loader.load(self.dev.buffer, segments)
                self._sync()
                return t0, time.perf_counter() - t0
            finally:
                self.prefetches_finished += 1

        def cancel() -> float | None:
            with lock:
                if not state["begun"]:
                    state["cancelled"] = True
                    return 0.0
            return float(nbytes)  # the read runs to its end, into a region already freed

        submitted = self.env.now
        self.prefetches_submitted += 1
        done = self.env.run_on(self.thread, work)

        def record(event: simpy.Event) -> None:
            if event.ok and event.value is not None:
                t0, seconds = event.value
                self.steps.append((self.gpu_id, "prefetch", model, 0, 0, 0, submitted, self.env.wall_at(t0),
                                   seconds))

        done.callbacks.append(record)
        return done, cancel

    # ------------------------------------------------------------ KV
    def pool_reserved(self, inst: Instance, keys: Sequence[Key]) -> None:
        block = self.models[inst.model].block_bytes
        free = self.pool_free.setdefault(inst.model, [])
        for key in keys:
            region = self.arena.lookup(key)
            free += [region.offset + i * block for i in range(region.size // block)]
        free.reverse()  # pop() hands out the lowest offsets first

    def kv_grown(self, inst: Instance, req: Request, keys: Sequence[Key], nbytes: int) -> None:
        m = self.models[inst.model]
        block = m.block_bytes
        offsets = self.kv.setdefault(req.rid, [])
        new: list[int] = []
        if keys:
            for key in keys:
                region = self.arena.lookup(key)
                new += [region.offset + i * block for i in range(region.size // block)]
        else:
            free = self.pool_free[inst.model]
            new = [free.pop() for _ in range(nbytes // block)]
        offsets += new
        seq = self.seqs.get(req.rid)
        if seq is not None:
            seq.cache.blocks += [self.dev.tensor(off, m.dtype, m.block_shape) for off in new]

    def kv_freed(self, inst: Instance, req: Request) -> None:
        offsets = self.kv.pop(req.rid, [])
        self.seqs.pop(req.rid, None)
        if inst.pool is not None and offsets:
            self.pool_free[inst.model] += offsets

    # ------------------------------------------------------------ forward passes
    def prefill(self, inst: Instance, batch: Sequence[Request]) -> tuple[simpy.Event, Callable[[], float]]:
        m = self.models[inst.model]
        engine = self.engines[inst.model]
        seqs = []
        for req in batch:
            cache = PagedKv(self.block_tokens)
            cache.blocks = [self.dev.tensor(off, m.dtype, m.block_shape) for off in self.kv[req.rid]]
            seq = _Seq(list(self.prompts[req.rid]), cache)
            self.seqs[req.rid] = seq
            seqs.append(seq)
        device = self.device

        def work():
            t0 = time.perf_counter()
            lengths = [len(s.tokens) for s in seqs]
            width = max(lengths)
            tokens = torch.tensor([s.tokens + [0] * (width - len(s.tokens)) for s in seqs], dtype=torch.long,
                                  device=device)
            positions = torch.arange(width, device=device).expand(len(seqs), width)
            with torch.inference_mode():
                logits = engine(tokens, positions, [s.cache for s in seqs], lengths=lengths)
            first = greedy(logits)
            self._sync()
            return first, lengths, t0, time.perf_counter() - t0

        submitted = self.env.now
        done = self.env.run_on(self.thread, work)

        def finish() -> float:
            first, lengths, t0, seconds = done.value
            self.steps.append((self.gpu_id, "prefill", inst.model, len(seqs), sum(lengths), max(lengths),
                               submitted, self.env.wall_at(t0), seconds))
            for seq, n, token in zip(seqs, lengths, first):
                seq.length = n
                seq.tokens.append(token)
            return seconds

        return done, finish

    def decode(self, inst: Instance, running: Sequence[Request], horizon: float, kv_tokens: float,
               wake: object) -> tuple[simpy.Event, Callable[[], tuple[float, float]]]:
        if horizon < 1:  # a request is at a KV growth point or done: nothing to run
            return self.env.timeout(0.0), lambda: (0.0, 0.0)
        engine = self.engines[inst.model]
        seqs = [self.seqs[r.rid] for r in running]
        device = self.device

        def work():
            t0 = time.perf_counter()
            tokens = torch.tensor([[s.tokens[-1]] for s in seqs], dtype=torch.long, device=device)
            positions = torch.tensor([[s.length] for s in seqs], dtype=torch.long, device=device)
            with torch.inference_mode():
                logits = engine(tokens, positions, [s.cache for s in seqs])
            new = greedy(logits)
            self._sync()
            return new, t0, time.perf_counter() - t0

        submitted = self.env.now
        done = self.env.run_on(self.thread, work)

        def finish() -> tuple[float, float]:
            new, t0, seconds = done.value
            self.steps.append((self.gpu_id, "decode", inst.model, len(seqs), len(seqs), int(kv_tokens),
                               submitted, self.env.wall_at(t0), seconds))
            for seq, token in zip(seqs, new):
                seq.length += 1
                seq.tokens.append(token)
            return seconds, 1.0

        return done, finish

    # ------------------------------------------------------------ the rest
    def end_instance(self, inst: Instance) -> None:
        self.engines.pop(inst.model, None)
        self.pool_free.pop(inst.model, None)

    def sampled(self, now: float) -> None:
        r = read_memory(self.device)
        self.memory.append((now, self.gpu_id, r.device, r.source, r.total_bytes, r.used_bytes, r.free_bytes,
                            r.torch_allocated, r.torch_reserved))

    def check(self) -> None:
        """The buffer still spans the arena, and nothing the lifecycle ended is still bound."""
        self.dev.check()
        if self.kv or self.seqs or self.engines:
            raise AssertionError(f"gpu {self.gpu_id}: {len(self.kv)} KV bindings, {len(self.seqs)} sequences "
                                 f"and {len(self.engines)} engines left after the run")

    def close(self) -> None:
        self.thread.shutdown(wait=True)
        self.loader.close()

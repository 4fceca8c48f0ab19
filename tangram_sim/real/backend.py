"""The torch side of one replay GPU: its buffer, loader, engines and sequences, in a process of its own.

`real.device.RealDevice` keeps the lifecycle's books (which units sit where, whose KV is which blocks)
and hands this backend the work those books describe, one command at a time and in order:

- `start`: the compaction copies, the reads of the missing units, then the engine build on the arena's
  views (and, when asked, a checksum of every tensor against its file, not timed); with
  execute-while-load (`layered`), the engine build, the copies, and then the reads handed to a
  `real.landing.Landing` that reads them layer by layer on a thread of its own and notes each landing
  on the backend's notification channel (`notify`) while the next commands run;
- `prefill`: one packed ragged forward pass over a group of prompts (the first one of a layered start
  waits for each layer's bytes before computing it, and measures each layer's span); `decode`: one
  batched step;
- `prefetch`: the read of one unit into its region;
- `export_buffer` / `attach_peer`: this buffer handed to, and another arena's attached by, the backends
  of a replay whose source policy reads GPU copies; a start then copies the units it takes from them
  (`real.peers`) after the compaction copies and before the reads;
- `apply`: KV blocks bound to or taken from a request, an ended instance's engine dropped. These come
  with the next timed command rather than as calls of their own (a command of the lifecycle that needs
  them is always a later one), so binding memory costs no round trip.

Each command measures its own device time (synchronised with the device) and returns it as a
`core.clock.Measured`; the clock stamps completions with it, not with the time the command spent in
transit. `real.link.DeviceLink` runs the backend either in this process (its calls on the device's thread:
tests, single arenas) or in a child process of its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tangram_sim.arena import Key
from tangram_sim.core.clock import Measured
from tangram_sim.errors import ModelError
from tangram_sim.models.layers import layer_blocks
from tangram_sim.policies.kv import kv_block_bytes
from tangram_sim.policies.packing import Move
from tangram_sim.real import peers
from tangram_sim.real.checkpoints import torch_dtype
from tangram_sim.real.device_arena import DeviceArena, sync
from tangram_sim.real.engine import CausalLM, EngineConfig, build_engine, greedy
from tangram_sim.real.kvcache import PagedKv
from tangram_sim.real.landing import Landing, landing_steps
from tangram_sim.real.loader import (
    Checkpoint,
    Loader,
    Segment,
    UnitLayout,
    device_digest,
    file_digest,
    open_checkpoint,
)
from tangram_sim.real.stage_backend import StageCommands

__all__ = ["BackendSpec", "DeviceBackend", "model_layouts", "sync"]


@dataclass(slots=True)
class BackendSpec:
    """Everything a backend is built from (picklable: a child process builds its own)."""

    device: str  # torch device ("cpu", "cuda:0")
    capacity: int  # arena bytes
    alignment: int  # arena alignment
    checkpoints: dict[str, str]  # model -> checkpoint folder
    granularity: str  # reuse units, as the system's
    min_unit_bytes: int
    unit_divisor: int
    block_tokens: int  # tokens per KV block
    loader: dict[str, Any] = field(default_factory=dict)  # Loader options (readers, chunk_bytes, staging)
    threads: int | None = None  # torch intra-op threads (None: unchanged; a child: its cores)
    cores: tuple[int, ...] = ()  # CPUs a child process is pinned to (empty: not pinned)
    shared: bool = False  # other arenas' backends copy units from this buffer (`real.peers`)


@dataclass(slots=True)
class _Model:
    ckpt: Checkpoint  # headers, tensor locations, config.json
    by_key: dict[Key, UnitLayout]  # unit key -> where its tensors sit inside its region
    config: EngineConfig  # decoder shape
    block_shape: tuple[int, ...]  # one cross-layer KV block's view shape
    dtype: torch.dtype  # of the KV (and the weights)


@dataclass(slots=True)
class _Seq:
    tokens: list[int]  # prompt, then every generated token
    cache: PagedKv  # block views, in token order
    length: int = 0  # tokens whose K/V are in the cache


def model_layouts(spec: BackendSpec, ckpt: Checkpoint) -> list[UnitLayout]:
    """The units of a checkpoint as the system cuts them (the lifecycle's and the backend's alike)."""
    return ckpt.layouts(spec.granularity, spec.min_unit_bytes, spec.unit_divisor)


class DeviceBackend(StageCommands):
    """One arena's buffer and everything computed on it (see module docstring)."""

    def __init__(self, spec: BackendSpec, notify: Callable[[tuple], None] | None = None) -> None:
        self.device = torch.device(spec.device)
        self.notify = notify  # where a layered start's landings are noted (`real.landing`)
        self.landing: Landing | None = None  # the layered start whose reads may still run
        self._land_loader: Loader | None = None  # its loader, made at the first layered start
        self._loader_options = dict(spec.loader)  # the options of both loaders
        self.dev = DeviceArena(spec.capacity, self.device, spec.alignment)
        if spec.shared:
            peers.share(self.dev.buffer)  # before any view of it exists
        self.peers: dict[int, torch.Tensor] = {}  # GPU -> another arena's buffer (`real.peers`)
        if self.device.type == "cpu":  # fault every page in now: a GPU's memory is mapped when allocated,
            self.dev.buffer.fill_(0)  # a host buffer's pages only at their first write (0.4 GB/s, not 5)
        self.loader = Loader(self.device, **spec.loader)
        self.block_tokens = spec.block_tokens
        self.models: dict[str, _Model] = {}
        for name, path in spec.checkpoints.items():
            ckpt = open_checkpoint(path)
            cfg = EngineConfig.from_checkpoint(ckpt.spec, ckpt.config)
            shape = cfg.kv_block_shape(spec.block_tokens)
            dtype = torch_dtype(ckpt.spec.dtype)
            block = kv_block_bytes(ckpt.spec.kv_bytes_per_token, spec.block_tokens)
            numel = 1
            for d in shape:
                numel *= d
            if numel * dtype.itemsize != block:
                raise ModelError(f"{ckpt.path}: KV block is {numel * dtype.itemsize} bytes but the spec "
                                 f"says {block}, expected a decoder whose config matches its tensors")
            layouts = model_layouts(spec, ckpt)
            self.models[name] = _Model(ckpt, {lay.unit.key: lay for lay in layouts}, cfg, shape, dtype)
        self.engines: dict[str, CausalLM] = {}  # model -> engine of its running instance
        self.kv: dict[int, list[int]] = {}  # rid -> its KV block offsets, in token order
        self.seqs: dict[int, _Seq] = {}  # rid -> its running sequence (after prefill)
        self.tokens: dict[int, list[int]] = {}  # rid -> every token it generated (first one first)
        # model -> the GPU whose buffer holds its KV, for a pipeline stage after the first (`real.pipelined`:
        # the lifecycle books a pipelined instance's KV on its leader; this stage reads and writes its
        # layers there); absent: this buffer
        self.kv_home: dict[str, int] = {}
        self._stages: dict[str, tuple[int, int] | None] = {}  # model -> its engine's layer blocks (a stage)

    # ------------------------------------------------------------ bindings
    def apply(self, ops: Sequence[tuple]) -> None:
        """Bindings decided since the last command, in order: ("kv", rid, model, offsets) binds new
        blocks, ("free", rid) drops a request's, ("end", model) drops an instance's engine."""
        for op in ops:
            kind = op[0]
            if kind == "kv":
                _, rid, model, offsets = op
                self.kv.setdefault(rid, []).extend(offsets)
                seq = self.seqs.get(rid)
                if seq is not None:
                    seq.cache.blocks += self._blocks(model, offsets)
            elif kind == "free":
                self.kv.pop(op[1], None)
                self.seqs.pop(op[1], None)
            elif kind == "end":
                self.engines.pop(op[1], None)
                self.kv_home.pop(op[1], None)
                self._stages.pop(op[1], None)
            elif kind == "next":  # a pipeline's first stage: the token its last stage generated
                _, rid, token = op
                self.seqs[rid].tokens.append(token)
                self.tokens.setdefault(rid, []).append(token)
            else:
                raise AssertionError(f"unknown binding {kind!r}")

    # ------------------------------------------------------------ device work
    def start(self, ops: Sequence[tuple], model: str, offsets: dict[Key, int], missing: Sequence[Key],
              moves: Sequence[tuple[int, int, int]], verify: bool, layered: bool = False,
              copies: Sequence[tuple[int, Key, int]] = (), stage: tuple[int, int, int] | None = None) -> Measured:
        """A cold start's device part: compaction copies, copies of units from other arenas (`copies`:
        (GPU, key, offset there)), reads of `missing`, engine build (then the checksums when `verify`).
        Value: (move_s, read_s, engine_s, read bytes, read GB/s, copy_s, copied bytes). `layered`: see
        `_start_layered`. `offsets` place the units the engine computes with: all of the model's, or, for
        a pipeline stage (`stage`: its layer blocks [b0, b1) and the GPU holding its KV, -1 for this
        one), that stage's (`real.pipelined`)."""
        self.apply(ops)
        self._settle()
        m = self.models[model]
        self._stages[model] = None if stage is None else (stage[0], stage[1])
        if stage is not None and stage[2] >= 0:
            self.kv_home[model] = stage[2]
        ranges = [(gpu, src, offsets[key], m.by_key[key].nbytes) for gpu, key, src in copies]
        if layered:
            assert stage is None, "a pipeline stage starts serially (real.pipelined)"
            return self._start_layered(m, model, offsets, missing, moves, verify, ranges)
        segments = [seg for key in missing for seg in self._segments(m, key, offsets[key])]
        t0, t1, t2, copy_s, copied, read = self._place(moves, ranges, segments)
        self.engines[model] = build_engine(m.config, self._views(m, offsets), self.device, self._stages[model])
        sync(self.device)
        t3 = time.perf_counter()
        if verify:
            self._verify(m, offsets)
        value = (t1 - t0 - copy_s, t2 - t1, t3 - t2, sum(s.nbytes for s in segments), read.gbps if read else 0.0,
                 copy_s, copied)
        return Measured(value, t0, t3 - t0)

    def _place(self, moves: Sequence[tuple[int, int, int]], ranges: Sequence[tuple[int, int, int, int]],
               segments: Sequence[Segment]) -> tuple[float, float, float, float, int, Any]:
        """Compaction copies, copies from other arenas (`real.peers.copy_units` ranges), then the reads of
        `segments`, each synchronised: (t0, t1 after the copies, t2 after the reads, copy_s, copied bytes,
        the loader's result or None)."""
        t0 = time.perf_counter()
        copy_s, copied = self._copy_in(moves, ranges)
        t1 = time.perf_counter()
        read = self.loader.load(self.dev.buffer, segments) if segments else None
        sync(self.device)
        return t0, t1, time.perf_counter(), copy_s, copied, read

    def _copy_in(self, moves: Sequence[tuple[int, int, int]], ranges: Sequence[tuple[int, int, int, int]]
                 ) -> tuple[float, int]:
        """The compaction copies (synchronised), then the copies from other arenas: (copy_s, copied bytes)."""
        for src, dst, n in moves:
            self.dev.copy_move(Move(None, src, dst, n))
        sync(self.device)
        return peers.copy_units(self.dev.buffer, self.peers, ranges, sync) if ranges else (0.0, 0)

    def _start_layered(self, m: _Model, model: str, offsets: dict[Key, int], missing: Sequence[Key],
                       moves: Sequence[tuple[int, int, int]], verify: bool,
                       ranges: Sequence[tuple[int, int, int, int]]) -> Measured:
        """Execute-while-load: the engine build on the views (no byte needs to be there), the compaction
        copies and the copies from other arenas, then the reads started on a `Landing` thread; returns once
        the engine may compute. Value: (engine_s, move_s, layer blocks, copy_s, copied bytes). The
        landings arrive as notes (`real.landing`)."""
        if self.notify is None:
            raise AssertionError("a layered start needs the backend's notification channel")
        t0 = time.perf_counter()
        self.engines[model] = build_engine(m.config, self._views(m, offsets), self.device)
        sync(self.device)
        t1 = time.perf_counter()
        copy_s, copied = self._copy_in(moves, ranges)
        t2 = time.perf_counter()
        blocks = layer_blocks(m.ckpt.spec)
        steps = landing_steps(blocks, [m.by_key[k] for k in missing], [offsets[k] for k in missing])
        if self._land_loader is None:
            self._land_loader = Loader(self.device, **self._loader_options)
        after = (lambda: self._verify(m, offsets)) if verify else None
        self.landing = Landing(self._land_loader, self.dev.buffer, steps, len(blocks), self.notify, after)
        self.landing.start()
        return Measured((t1 - t0, t2 - t1 - copy_s, len(blocks), copy_s, copied), t0, t2 - t0)

    def _settle(self) -> None:
        """Wait for a layered start's reads (and its checksums) to end; raise what failed them."""
        if self.landing is not None:
            landing, self.landing = self.landing, None
            landing.join()

    def prefetch(self, model: str, key: Key, offset: int) -> Measured:
        """Read one unit of `model`'s files into its region."""
        segments = self._segments(self.models[model], key, offset)
        t0 = time.perf_counter()
        self.loader.load(self.dev.buffer, segments)
        sync(self.device)
        return Measured(None, t0, time.perf_counter() - t0)

    def prefill(self, ops: Sequence[tuple], model: str, batch: Sequence[tuple[int, list[int]]],
                layered: bool = False, hidden: tuple | None = None) -> Measured:
        """One packed forward pass over the prompts of `batch` ((rid, prompt token ids)); the first
        token of each becomes its sequence's next input. Value: the prompt lengths; with `layered` (the
        first prefill of a layered start) each layer block waits for its bytes, and the value is
        (lengths, per block: perf_counter when it began computing, when it was done, when its bytes were
        in; when the last read completed), the pass ending once every unit has landed (a serial engine
        serves a whole model). A pipeline stage's pass: `_stage_pass`."""
        self.apply(ops)
        engine = self.engines[model]
        seqs = []
        for rid, prompt in batch:
            cache = PagedKv(self.block_tokens)
            cache.blocks = self._blocks(model, self.kv[rid])
            seq = self.seqs[rid] = _Seq(list(prompt), cache)
            seqs.append(seq)
        device = self.device
        t0 = time.perf_counter()
        if self._stages.get(model) is not None:
            return self._stage_pass(engine, seqs, hidden, t0, prefill=True)
        lengths = [len(s.tokens) for s in seqs]
        width = max(lengths)
        tokens = torch.tensor([s.tokens + [0] * (width - len(s.tokens)) for s in seqs], dtype=torch.long,
                              device=device)
        positions = torch.arange(width, device=device).expand(len(seqs), width)
        landing = self.landing if layered else None
        starts: list[float] = []
        finishes: list[float] = []
        gate = None
        if landing is not None:
            stream = torch.cuda.current_stream(device) if device.type == "cuda" else None

            def gate(block: int) -> None:
                if stream is not None:  # the compute so far (not the landing's copies on their own stream)
                    stream.synchronize()
                t = time.perf_counter()
                if block:
                    finishes.append(t)
                if block < len(landing.ready):
                    landing.wait(block)
                    starts.append(time.perf_counter())

        with torch.inference_mode():
            logits = engine(tokens, positions, [s.cache for s in seqs], lengths=lengths, gate=gate)
        first = greedy(logits)
        sync(device)
        if landing is not None:
            landing.all.wait()  # units that gate no layer (none in a text checkpoint) have landed too
            if landing.error is not None:
                raise landing.error
        seconds = time.perf_counter() - t0
        for (rid, _), seq, n, token in zip(batch, seqs, lengths, first):
            seq.length = n
            seq.tokens.append(token)
            self.tokens[rid] = [token]
        if landing is not None:
            self._settle()  # the checksums of the verify mode, after the measured span
            return Measured((lengths, starts, finishes, list(landing.stamps), landing.end), t0, seconds)
        return Measured(lengths, t0, seconds)

    def decode(self, ops: Sequence[tuple], model: str, rids: Sequence[int], hidden: tuple | None = None) -> Measured:
        """One batched decode step of `rids` (a pipeline stage's: `_stage_pass`)."""
        self.apply(ops)
        engine = self.engines[model]
        seqs = [self.seqs[r] for r in rids]
        device = self.device
        t0 = time.perf_counter()
        if self._stages.get(model) is not None:
            return self._stage_pass(engine, seqs, hidden, t0, prefill=False)
        tokens = torch.tensor([[s.tokens[-1]] for s in seqs], dtype=torch.long, device=device)
        positions = torch.tensor([[s.length] for s in seqs], dtype=torch.long, device=device)
        with torch.inference_mode():
            logits = engine(tokens, positions, [s.cache for s in seqs])
        new = greedy(logits)
        sync(device)
        seconds = time.perf_counter() - t0
        for rid, seq, token in zip(rids, seqs, new):
            seq.length += 1
            seq.tokens.append(token)
            self.tokens[rid].append(token)
        return Measured(None, t0, seconds)

    def warm_up(self, alignment: int) -> int:
        """Load, build, prefill and decode each model once with the commands above (page cache, kernels,
        threads), so a replay measures steady-state costs; the arena is empty before and after (its
        bytes are scratch until the replay's books place units). Returns the models warmed up."""
        done = 0
        for name, m in self.models.items():
            offsets, end = {}, 0
            for key, lay in m.by_key.items():
                offsets[key] = end
                end += -(-lay.nbytes // alignment) * alignment
            block = int(m.dtype.itemsize * torch.Size(m.block_shape).numel())
            room = (self.dev.capacity - end) // max(1, block)
            tokens = min(16, room * self.block_tokens - 1)
            if tokens < 1:
                continue  # the model alone fills the arena: its first cold start warms it
            blocks = [end + i * block for i in range(-(-(tokens + 1) // self.block_tokens))]
            self.start((), name, offsets, list(m.by_key), (), False)
            self.prefill((("kv", -1, name, blocks),), name, [(-1, [1] * tokens)])
            self.decode((), name, [-1])
            self.apply((("free", -1), ("end", name)))
            self.tokens.pop(-1, None)
            done += 1
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return done

    # ------------------------------------------------------------ the rest
    @staticmethod
    def _segments(m: _Model, key: Key, offset: int) -> list[Segment]:
        """The file reads that fill unit `key` of `m` placed at `offset`."""
        return [Segment(s.path, s.start, s.nbytes, offset + s.rel) for s in m.by_key[key].slots]

    def _views(self, m: _Model, offsets: dict[Key, int]) -> dict[str, torch.Tensor]:
        spec = m.ckpt.spec
        views = {}
        for key, off in offsets.items():
            for s in m.by_key[key].slots:
                t = spec.tensors[s.index]
                views[t.name] = self.dev.tensor(off + s.rel, torch_dtype(t.dtype), t.shape)
        return views

    def _verify(self, m: _Model, offsets: dict[Key, int]) -> None:
        """Every tensor of the model's units at `offsets` equals its bytes in its file (blake2b), or ModelError."""
        for key, off in offsets.items():
            for s in m.by_key[key].slots:
                on_device = device_digest(self.dev.bytes_at(off + s.rel, s.nbytes))
                in_file = file_digest(s.path, s.start, s.nbytes)
                if on_device != in_file:
                    raise ModelError(f"{s.path}: tensor {s.name!r} on {self.device} differs from the file "
                                     f"(blake2b {on_device} != {in_file}), expected bit-identical bytes")

    def export_buffer(self, pickled: bool) -> Any:
        """This arena's buffer for another backend's `attach_peer` (`real.peers.export`)."""
        return peers.export(self.dev.buffer, pickled)

    def attach_peer(self, gpu: int, handle: Any) -> None:
        """GPU `gpu`'s buffer, from its backend's `export_buffer`."""
        self.peers[gpu] = peers.attach(handle)

    def memory(self) -> tuple[int, int]:
        """(torch allocated, torch reserved) bytes of this process on its device (0 on the CPU)."""
        if self.device.type != "cuda":
            return 0, 0
        return torch.cuda.memory_allocated(self.device), torch.cuda.memory_reserved(self.device)

    def finish(self, ops: Sequence[tuple]) -> dict[str, Any]:
        """Apply the last bindings; what is left bound and every request's tokens."""
        self.apply(ops)
        self._settle()
        sync(self.device)
        self.peers.clear()  # a CUDA IPC mapping is closed before its owner's process ends
        return {"kv": len(self.kv), "seqs": len(self.seqs), "engines": len(self.engines),
                "tokens": self.tokens, "buffer_ok": self.dev.buffer.numel() == self.dev.capacity}

    def close(self) -> None:
        if self.landing is not None:
            self.landing.thread.join()
        self.loader.close()
        if self._land_loader is not None:
            self._land_loader.close()
        self.engines.clear()
        self.seqs.clear()

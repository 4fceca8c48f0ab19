"""The pipeline-stage commands of a device backend (`real.backend.DeviceBackend` inherits them): a
stage's part of a prefill or decode step, the leader's load of the other stages' units, and its engine
completed at consolidation (`real.pipelined` drives them); and the bytes that carry a stage's hidden
states to the next one.

A stage's engine computes its layer blocks only (`real.engine.build_engine(stage=...)`). The stages of
a pipelined instance see the same sequences (rid, prompt) and bind the same KV blocks: the leader's,
in its buffer, which the later stages attach (`kv_home`), since the lifecycle books a pipeline's KV on
its leader. The first stage keeps the sequences' tokens: the last stage's come back to it with its
next command (an `apply` op "next").
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from tangram_sim.arena import Key
from tangram_sim.core.clock import Measured
from tangram_sim.real.device_arena import DeviceArena, sync
from tangram_sim.real.engine import CausalLM, complete, greedy

if TYPE_CHECKING:
    from tangram_sim.real.backend import _Model, _Seq
    from tangram_sim.real.loader import Loader, Segment

__all__ = ["StageCommands", "pack", "unpack"]


def pack(x: torch.Tensor) -> tuple[bytes, tuple[int, ...], str]:
    """Hidden states as plain bytes, to pass between device processes (a pipeline's activations): no
    tensor crosses the pipe, so neither process's torch sharing strategy is involved."""
    host = x.detach().contiguous().cpu()
    return host.view(torch.uint8).numpy().tobytes(), tuple(host.shape), str(host.dtype).removeprefix("torch.")


def unpack(packed: tuple[bytes, tuple[int, ...], str], device: torch.device) -> torch.Tensor:
    """`pack`'s tensor, on `device`."""
    data, shape, dtype = packed
    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return flat.view(getattr(torch, dtype)).view(shape).to(device)


class StageCommands:
    """Commands of a backend for pipeline stages (see the module docstring); state is the backend's."""

    device: torch.device
    dev: DeviceArena
    loader: Loader
    models: dict[str, _Model]
    engines: dict[str, CausalLM]
    peers: dict[int, torch.Tensor]
    kv_home: dict[str, int]
    _stages: dict[str, tuple[int, int] | None]

    def apply(self, ops: Sequence[tuple]) -> None: ...  # noqa: D102 - the backend's
    def _views(self, m: _Model, offsets: dict[Key, int]) -> dict[str, torch.Tensor]: ...  # noqa: D102
    @staticmethod
    def _segments(m: _Model, key: Key, offset: int) -> list[Segment]: ...  # noqa: D102
    def _place(self, moves: Sequence[tuple[int, int, int]], ranges: Sequence[tuple[int, int, int, int]],
               segments: Sequence[Segment]) -> tuple[float, float, float, float, int, Any]: ...  # noqa: D102

    def _stage_pass(self, engine: CausalLM, seqs: list[_Seq], hidden: tuple | None, t0: float,
                    prefill: bool) -> Measured:
        """A pipeline stage's part of a prefill (each sequence's prompt) or of a decode step (one token
        each): from the embeddings (the first stage) or the previous stage's `hidden` states (`pack`ed),
        through its layers; value: its hidden states, packed for the next stage, or, from the last stage,
        the new tokens, which go to the first one (an `apply` op "next": the first stage keeps the
        sequences' tokens and the replay's record of them). The unpacking and packing are timed in it:
        they are the stage's side of the hop."""
        device = self.device
        x = None if hidden is None else unpack(hidden, device)
        if prefill:
            lengths = [len(s.tokens) for s in seqs]
            width = max(lengths)
            tokens = torch.tensor([s.tokens + [0] * (width - len(s.tokens)) for s in seqs], dtype=torch.long,
                                  device=device)
            positions = torch.arange(width, device=device).expand(len(seqs), width)
        else:
            lengths = None
            tokens = torch.tensor([[s.tokens[-1]] for s in seqs], dtype=torch.long, device=device)
            positions = torch.tensor([[s.length] for s in seqs], dtype=torch.long, device=device)
        with torch.inference_mode():
            out = engine(tokens, positions, [s.cache for s in seqs], lengths=lengths, hidden=x)
        value = greedy(out) if engine.has_head else pack(out)
        sync(device)
        seconds = time.perf_counter() - t0
        for i, seq in enumerate(seqs):
            seq.length = lengths[i] if prefill else seq.length + 1
        return Measured(value, t0, seconds)

    def load_units(self, ops: Sequence[tuple], reads: Sequence[tuple[str, Key, int]],
                   moves: Sequence[tuple[int, int, int]], copies: Sequence[tuple[int, int, int, int]]) -> Measured:
        """Units booked outside a cold start (a pipelined instance's leader loading the other stages'
        units before it consolidates): the plan's compaction copies, the copies from other arenas
        ((GPU, offset there, offset here, bytes)), then the reads of `reads` ((model, key, offset)) from
        their files. Value: (move_s, read_s, copy_s, read bytes, copied bytes)."""
        self.apply(ops)
        segments = [seg for model, key, off in reads for seg in self._segments(self.models[model], key, off)]
        t0, t1, t2, copy_s, copied, _ = self._place(moves, copies, segments)
        value = (t1 - t0 - copy_s, t2 - t1, copy_s, sum(s.nbytes for s in segments), copied)
        return Measured(value, t0, t2 - t0)

    def rebuild(self, ops: Sequence[tuple], model: str, offsets: dict[Key, int]) -> Measured:
        """A pipelined instance consolidated onto this leader: its stage engine made the whole model's, every
        parameter bound to its unit's view (`real.engine.complete`: no module built again; its KV, the
        other stages' layers included, is in this buffer's blocks already). Value: None."""
        self.apply(ops)
        m = self.models[model]
        t0 = time.perf_counter()
        self._stages[model] = None
        complete(self.engines[model], self._views(m, offsets))
        sync(self.device)
        return Measured(None, t0, time.perf_counter() - t0)

    def _blocks(self, model: str, offsets: Sequence[int]) -> list[torch.Tensor]:
        """KV block views at `offsets` of the buffer that holds the model's KV (`kv_home`)."""
        m = self.models[model]
        home = self.kv_home.get(model, -1)
        if home < 0:
            return [self.dev.tensor(off, m.dtype, m.block_shape) for off in offsets]
        buf = self.peers[home]
        n = m.dtype.itemsize * torch.Size(m.block_shape).numel()
        return [buf[off : off + n].view(m.dtype).view(m.block_shape) for off in offsets]

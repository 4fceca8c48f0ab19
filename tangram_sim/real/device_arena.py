"""The shared `Arena` mapped onto one device buffer, so its fragmentation is real memory.

One `torch.empty(capacity, dtype=torch.uint8, device=dev)` holds every weight unit and KV block;
the pure-Python `Arena` decides offsets and this class turns them into tensor views and copies.
Packing and KV plans are applied with the policy modules' own `execute_plan` / `execute_kv_plan`
(never a copy of them), with `copy_move` as the callback that moves the bytes before the arena
records the move, exactly where the simulator charges device-to-device time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from tangram_sim.arena import Arena, Key, Region
from tangram_sim.errors import ConfigError
from tangram_sim.policies.kv import KvPlan, execute_kv_plan
from tangram_sim.policies.packing import Move, PackingPlan, execute_plan

__all__ = ["MIN_ALIGNMENT", "DeviceArena", "sync"]

MIN_ALIGNMENT = 256  # every dtype's view is aligned, and CUDA copies of whole units stay coalesced
MOVE_CHUNK_BYTES = 64 * 2**20  # bound on the scratch buffer an overlapping move needs


class DeviceArena:
    """An `Arena` plus the uint8 device buffer its offsets index."""

    def __init__(
        self,
        capacity: int,
        device: str | torch.device = "cpu",
        alignment: int = MIN_ALIGNMENT,
        move_chunk_bytes: int = MOVE_CHUNK_BYTES,
    ) -> None:
        if alignment < MIN_ALIGNMENT:
            raise ConfigError(f"arena alignment {alignment}, expected at least {MIN_ALIGNMENT} bytes")
        if capacity < alignment:
            raise ConfigError(f"arena capacity {capacity} bytes, expected at least {alignment}")
        self.arena = Arena(int(capacity), alignment)  # offsets, states, pins: the shared policy state
        self.device = torch.device(device)
        self.buffer = torch.empty(self.arena.capacity, dtype=torch.uint8, device=self.device)
        self.move_chunk_bytes = max(alignment, move_chunk_bytes)
        self.moved_bytes = 0  # bytes copied by compaction since creation
        self.moves = 0  # compaction moves since creation

    @property
    def capacity(self) -> int:
        return self.arena.capacity

    # ---------------------------------------------------------------- views
    def bytes_at(self, offset: int, nbytes: int) -> torch.Tensor:
        """The raw bytes [offset, offset + nbytes) of the buffer (a view, no copy)."""
        if offset < 0 or nbytes < 0 or offset + nbytes > self.buffer.numel():
            raise IndexError(f"range {offset}+{nbytes} is outside the {self.buffer.numel()}-byte arena")
        return self.buffer[offset : offset + nbytes]

    def tensor(self, offset: int, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
        """A typed view at a byte offset: `buffer[off:off+n].view(dtype).view(shape)`."""
        numel = 1
        for d in shape:
            numel *= int(d)
        nbytes = numel * dtype.itemsize
        if offset % dtype.itemsize:
            raise ValueError(f"offset {offset} is not aligned for {dtype}")
        return self.bytes_at(offset, nbytes).view(dtype).view(tuple(int(d) for d in shape))

    # ---------------------------------------------------------------- plans
    def copy_move(self, move: Move) -> None:
        """`on_move` callback: copy a unit's bytes to its new offset; the ranges may overlap.

        torch refuses partially overlapping copies, so overlapping moves go in chunks in the safe
        direction (low to high when moving down, high to low when moving up): directly when the
        distance allows chunks of at least `move_chunk_bytes`, else through a bounded scratch buffer.
        """
        src, dst, n = move.src, move.dst, move.nbytes
        if src == dst or n <= 0:
            return
        buf = self.buffer
        distance = abs(src - dst)
        if distance >= n:
            buf[dst : dst + n].copy_(buf[src : src + n])
        else:
            direct = distance >= self.move_chunk_bytes
            step = distance if direct else min(n, self.move_chunk_bytes)
            scratch = None if direct else torch.empty(step, dtype=torch.uint8, device=self.device)
            starts = range(0, n, step)
            for a in starts if dst < src else reversed(starts):
                c = min(step, n - a)
                if scratch is None:
                    buf[dst + a : dst + a + c].copy_(buf[src + a : src + a + c])
                else:
                    scratch[:c].copy_(buf[src + a : src + a + c])
                    buf[dst + a : dst + a + c].copy_(scratch[:c])
        self.moved_bytes += n
        self.moves += 1

    def execute(
        self,
        plan: PackingPlan,
        owners: Callable[[Key], Iterable[str]],
        on_move: Callable[[Move], None] | None = None,
    ) -> list[Region]:
        """Apply a packing plan with the policy module's `execute_plan`, copying device bytes per move."""

        def move(m: Move) -> None:
            self.copy_move(m)
            if on_move is not None:
                on_move(m)

        return execute_plan(self.arena, plan, owners, on_move=move)

    def execute_kv(self, plan: KvPlan, key_prefix: tuple, first_index: int = 0) -> list[Key]:
        """Apply a KV plan with the policy module's `execute_kv_plan` (KV bytes need no copies)."""
        return execute_kv_plan(self.arena, plan, key_prefix, first_index)

    def check(self) -> None:
        """The arena's invariants, plus that the buffer still spans exactly its capacity."""
        self.arena.check_invariants()
        if self.buffer.numel() != self.arena.capacity:
            raise AssertionError("device buffer and arena capacity disagree")


def sync(device: torch.device) -> None:
    """Wait for the device's queued work: every measured duration (and benchmark) ends here."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)

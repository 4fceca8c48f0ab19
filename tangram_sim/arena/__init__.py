"""The per-GPU memory arena shared by the simulator and the real executor."""

from tangram_sim.arena.arena import Arena, ArenaError, Key, Region, State

# The one arena alignment of the simulator and the real replay, so that both take the same packing
# decisions (typed torch views need at least 256; CUDA copies of whole units stay coalesced).
ARENA_ALIGNMENT = 512

__all__ = ["ARENA_ALIGNMENT", "Arena", "ArenaError", "Key", "Region", "State"]

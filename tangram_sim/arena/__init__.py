"""The per-GPU memory arena shared by the simulator and the real executor."""

from tangram_sim.arena.arena import Arena, ArenaError, Key, Region, State

__all__ = ["Arena", "ArenaError", "Key", "Region", "State"]

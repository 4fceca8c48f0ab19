"""tangram-sim: serverless LLM cold starts, simulated and measured.

The policy modules (`tangram_sim.policies`), the memory arena (`tangram_sim.arena`) and the model
catalog (`tangram_sim.models`) are pure Python and shared by the SimPy simulator and the real
torch executor.
"""

__version__ = "0.1.0"

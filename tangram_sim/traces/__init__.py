"""Request traces: real (Azure, ServeGen, BurstGPT) and synthetic, in one canonical table.

Everything downstream (simulator, real replay, plots) consumes a pandas DataFrame with exactly the
columns `arrival_s` (float64 s, non-decreasing, first request at 0), `model` (str), `input_tokens`
and `output_tokens` (int64 >= 1). Readers turn files into it (`formats`), `mapping` assigns models
to traces that lack them, `synthetic` generates controlled workloads, `window` cuts and rescales, and
`spec.load_trace` does all of it from an experiment's `trace` section.
"""

from tangram_sim.traces.formats import (
    COLUMNS,
    FORMATS,
    detect_format,
    read_azure_functions,
    read_azure_functions_2021,
    read_azure_llm,
    read_burstgpt,
    read_servegen,
    read_table,
    read_trace,
    validate_trace,
)
from tangram_sim.traces.mapping import MAPPING_KINDS, apply_mapping, check_mapping, zipf_probabilities
from tangram_sim.traces.spec import KINDS, load_trace, resolve_path
from tangram_sim.traces.synthetic import Diurnal, synthesize
from tangram_sim.traces.window import window

__all__ = [
    "COLUMNS",
    "FORMATS",
    "KINDS",
    "MAPPING_KINDS",
    "Diurnal",
    "apply_mapping",
    "check_mapping",
    "detect_format",
    "load_trace",
    "read_azure_functions",
    "read_azure_functions_2021",
    "read_azure_llm",
    "read_burstgpt",
    "read_servegen",
    "read_table",
    "read_trace",
    "resolve_path",
    "synthesize",
    "validate_trace",
    "window",
    "zipf_probabilities",
]

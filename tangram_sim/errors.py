"""User-facing errors.

Anything a user can cause (bad YAML, unknown policy, malformed trace row, corrupt checkpoint) raises
a `TangramError` subclass whose message is one line naming the file/field and what was expected.
The CLI prints it as `error: <message>` and exits 2; it never shows a traceback for these.
"""

from __future__ import annotations


class TangramError(Exception):
    """Base class of errors caused by user input; the message is shown as is."""


class ConfigError(TangramError):
    """An experiment, system or policy configuration is invalid."""


class ModelError(TangramError):
    """A model name, config.json or safetensors checkpoint cannot be used."""


class TraceError(TangramError):
    """A trace file or trace specification is invalid."""


class CapacityError(TangramError):
    """A request can never be satisfied, e.g. a model larger than the GPU."""

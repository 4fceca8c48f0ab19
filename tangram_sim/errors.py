"""User-facing errors.

Anything a user can cause (bad YAML, unknown policy, malformed trace row, corrupt checkpoint) raises
a `TangramError` subclass whose message is one line naming the file/field and what was expected.
The CLI prints it as `error: <message>` and exits 2; it never shows a traceback for these.
"""

from __future__ import annotations

from typing import Any

SHOWN_CHARS = 200  # at most this much of a user's value is quoted in an error message
MESSAGE_CHARS = 2000  # and an error message itself is cut to this (a value may hide in a path, a list...)


def shown(value: Any, limit: int = SHOWN_CHARS) -> str:
    """`repr(value)` cut to about `limit` characters, saying how long it was: a 1 GB model name or a
    list of a million seeds is quoted as its start, not copied whole into an error message."""
    if isinstance(value, (str, bytes)) and len(value) > limit:
        return f"{value[: limit - 20]!r}... ({len(value)} characters)"
    if isinstance(value, (list, tuple, dict, set)) and len(value) > 20:
        head = list(value)[:5]
        return f"{type(value).__name__} of {len(value)} items starting {shown(head, limit)}"
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 20]}... ({len(text)} characters)"


def clip(message: str, limit: int = MESSAGE_CHARS) -> str:
    """`message` with its middle cut when it is longer than `limit` characters."""
    if len(message) <= limit:
        return message
    return f"{message[: limit // 2]} ...[{len(message) - limit} characters]... {message[-limit // 2:]}"


class TangramError(Exception):
    """Base class of errors caused by user input; the message is shown as is (cut in the middle
    beyond `MESSAGE_CHARS` characters)."""

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str):
            args = (clip(args[0]),)
        super().__init__(*args)


class ConfigError(TangramError):
    """An experiment, system or policy configuration is invalid."""


class ModelError(TangramError):
    """A model name, config.json or safetensors checkpoint cannot be used."""


class TraceError(TangramError):
    """A trace file or trace specification is invalid."""


class CapacityError(TangramError):
    """A request can never be satisfied, e.g. a model larger than the GPU."""

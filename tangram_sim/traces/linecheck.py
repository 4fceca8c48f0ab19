"""A text trace's longest line, found before any parser reads it.

A trace row is a few dozen bytes; a line of hundreds of megabytes (a damaged or concatenated file)
would be decoded, split and copied several times by the readers and run the machine out of memory.
The file is scanned in blocks with numpy (about a second per GB, cached per file version) and a line
longer than `MAX_LINE_BYTES` is one TraceError naming the line.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from tangram_sim.errors import TraceError

__all__ = ["MAX_LINE_BYTES", "check_line_lengths"]

MAX_LINE_BYTES = 1 << 20  # 1 MiB: far above any trace row, far below what the readers can copy
_BLOCK = 64 << 20


def check_line_lengths(path: Path, limit: int = MAX_LINE_BYTES) -> None:
    """TraceError when a line of `path` is longer than `limit` bytes."""
    try:
        st = os.stat(path)
    except OSError:
        return  # the reader says what is wrong with the file
    if st.st_size <= limit:
        return
    found = _longest(str(path), st.st_mtime_ns, st.st_size, limit)
    if found is not None:
        line, length = found
        raise TraceError(f"{path}:{line}: a line of {length / 2**20:.1f} MiB or more (a trace row is a few dozen "
                         f"bytes; at most {limit // 2**20} MiB); the file is damaged or not a trace")


@functools.lru_cache(maxsize=32)
def _longest(path: str, mtime_ns: int, size: int, limit: int) -> tuple[int, int] | None:
    """(line number, length so far) of the first line longer than `limit`, or None."""
    line_start = 0  # offset of the current line's first byte
    offset = 0
    line_no = 1
    with open(path, "rb") as f:
        while True:
            block = f.read(_BLOCK)
            if not block:
                break
            ends = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 10) + offset
            if len(ends):
                starts = np.concatenate(([line_start], ends[:-1] + 1))
                lengths = ends - starts
                long = np.flatnonzero(lengths > limit)
                if len(long):
                    return line_no + int(long[0]), int(lengths[long[0]])
                line_no += len(ends)
                line_start = int(ends[-1]) + 1
            offset += len(block)
            if offset - line_start > limit:
                return line_no, offset - line_start
    return None

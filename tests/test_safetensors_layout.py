"""Safetensors data layout: tensors must tile the data with no hole (raw files, no `safetensors` needed)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from tangram_sim.errors import ModelError
from tangram_sim.models import read_header


def write_raw(path: Path, header: dict, data_bytes: int) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * data_bytes)
    return path


def f32(begin: int, n: int) -> dict:
    return {"dtype": "F32", "shape": [n], "data_offsets": [begin, begin + 4 * n]}


@pytest.mark.parametrize(
    ("header", "data_bytes", "message"),
    [
        ({"a": f32(0, 2), "b": f32(16, 2)}, 24, "8 unused bytes after tensor 'a' (data offsets 8..16, before 'b')"),
        ({"a": f32(8, 2)}, 16, "8 unused bytes before the first tensor (data offsets 0..8, before 'a')"),
        ({"a": f32(0, 2)}, 12, "4 bytes after the last tensor's data"),
        # an empty tensor does not close a gap
        ({"a": f32(0, 2), "e": f32(8, 0), "b": f32(12, 1)}, 16, "4 unused bytes after tensor 'a'"),
    ],
)
def test_holes_and_trailing_bytes_are_one_line_errors(tmp_path: Path, header: dict, data_bytes: int,
                                                      message: str) -> None:
    path = write_raw(tmp_path / "holey.safetensors", header, data_bytes)
    with pytest.raises(ModelError) as info:
        read_header(path)
    text = str(info.value)
    assert text.startswith(f"{path}: {message}") and "expected" in text and "\n" not in text


def test_contiguous_tensors_in_any_header_order_are_accepted(tmp_path: Path) -> None:
    header = {"b": f32(8, 3), "e": f32(20, 0), "a": f32(0, 2), "__metadata__": {"k": "v"}}
    h = read_header(write_raw(tmp_path / "ok.safetensors", header, 20))
    assert [e.name for e in h.entries] == ["b", "e", "a"]
    assert h.file_size == h.data_start + 20

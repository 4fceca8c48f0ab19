"""Model specs from real safetensors checkpoints, reading only their headers.

A safetensors file is an 8-byte little-endian header length, a JSON header (name -> dtype, shape,
data_offsets relative to the end of the header) and the raw bytes. The header is all we need for a
ModelSpec, so a 100 GB checkpoint is inspected in milliseconds. Every inconsistency that would make
a later load fail (or read the wrong bytes) is reported up front as a one-line ModelError.

Checkpoints written by this project mark tensors shared with a base model by storing
`__metadata__["tangram.fingerprints"]` (JSON: tensor name -> fingerprint); other tensors are
fingerprinted by the file's resolved path, i.e. unique to the file.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tangram_sim.errors import ModelError
from tangram_sim.models.architectures import inventory_from_config, supported_model_types
from tangram_sim.models.spec import (
    DTYPE_BYTES,
    ArchInfo,
    ModelSpec,
    TensorSpec,
    dominant_dtype,
    logical_sort_key,
    natural_key,
    tensor_fingerprint,
)

# The safetensors format itself refuses headers above 100 MB.
MAX_HEADER_BYTES = 100_000_000
FINGERPRINTS_KEY = "tangram.fingerprints"
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True, slots=True)
class HeaderEntry:
    name: str  # tensor name as stored
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]  # dimensions
    start: int  # absolute byte offset of the first byte in the file
    end: int  # absolute byte offset one past the last byte


@dataclass(frozen=True, slots=True, eq=False)
class SafetensorsHeader:
    path: Path  # resolved file path
    file_size: int  # bytes of the whole file
    data_start: int  # 8 + header length: where tensor data begins
    entries: tuple[HeaderEntry, ...]  # tensors in header order
    metadata: dict[str, str]  # the `__metadata__` string map ({} when absent)


def _fail(path: Path | str, what: str, expected: str) -> ModelError:
    return ModelError(f"{path}: {what}, expected {expected}")


def read_header(path: str | Path) -> SafetensorsHeader:
    """Parse and validate one file's header without touching the weight bytes."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            file_size = f.seek(0, 2)
            f.seek(0)
            if file_size < 8:
                raise _fail(
                    path,
                    f"file is {file_size} bytes",
                    "at least 8 (the header length) for a safetensors file",
                )
            (n,) = struct.unpack("<Q", f.read(8))
            if n < 2 or n > MAX_HEADER_BYTES:
                raise _fail(
                    path,
                    f"header length {n} is absurd",
                    f"2..{MAX_HEADER_BYTES} bytes (is this a safetensors file?)",
                )
            if 8 + n > file_size:
                raise _fail(
                    path,
                    f"header length {n} runs past the end of the {file_size}-byte file",
                    "a complete header",
                )
            raw = f.read(n)
    except OSError as exc:
        raise _fail(
            path, f"cannot read file ({exc.strerror or exc})", "a readable .safetensors file"
        ) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _fail(path, "header is not valid UTF-8", "a UTF-8 JSON header") from None
    try:
        header = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _fail(
            path, f"header is not valid JSON ({exc.msg} at char {exc.pos})", "a JSON object"
        ) from None
    if not isinstance(header, dict):
        raise _fail(path, f"header is a JSON {type(header).__name__}", "a JSON object of tensors")
    data_start = 8 + n
    data_size = file_size - data_start
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _fail(path, "__metadata__ is not a string map", "an object of string keys and string values")
    entries = [_parse_entry(path, name, info, data_start, data_size) for name, info in header.items()]
    if not entries:
        raise _fail(path, "header lists no tensors", "at least one tensor")
    # The format requires the tensors to tile the data exactly, with no overlap, no gap and nothing
    # after the last one (the safetensors library refuses such files); a hole would also let a file
    # hide other content between tensors, which a loader reading whole ranges would copy along.
    prev: HeaderEntry | None = None
    cursor = data_start
    for e in sorted(entries, key=lambda e: (e.start, e.end)):
        if prev is not None and e.start < prev.end:
            raise _fail(path, f"tensors {prev.name!r} and {e.name!r} overlap", "disjoint data_offsets")
        if e.start > cursor:
            after = f"after tensor {prev.name!r}" if prev is not None else "before the first tensor"
            raise _fail(
                path,
                f"{e.start - cursor} unused bytes {after} (data offsets {cursor - data_start}.."
                f"{e.start - data_start}, before {e.name!r})",
                "tensors that cover the data without gaps",
            )
        if e.end > e.start:
            prev = e
        cursor = max(cursor, e.end)
    if cursor < file_size:
        raise _fail(
            path,
            f"{file_size - cursor} bytes after the last tensor's data",
            "the file to end where the last tensor ends",
        )
    return SafetensorsHeader(
        path=path.resolve(),
        file_size=file_size,
        data_start=data_start,
        entries=tuple(entries),
        metadata=metadata,
    )


def _parse_entry(path: Path, name: str, info: Any, data_start: int, data_size: int) -> HeaderEntry:
    where = f"tensor {name!r}"
    if not isinstance(info, dict):
        raise _fail(path, f"{where} is {type(info).__name__}", "an object with dtype, shape and data_offsets")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in info:
            raise _fail(path, f"{where} lacks {key!r}", "dtype, shape and data_offsets")
    dtype = info["dtype"]
    if dtype not in DTYPE_BYTES:
        raise _fail(path, f"{where} has unknown dtype {dtype!r}", f"one of {', '.join(DTYPE_BYTES)}")
    shape = info["shape"]
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise _fail(path, f"{where} has shape {shape!r}", "a list of non-negative integers")
    offsets = info["data_offsets"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise _fail(path, f"{where} has data_offsets {offsets!r}", "[begin, end] with 0 <= begin <= end")
    begin, end = offsets
    want = math.prod(shape) * DTYPE_BYTES[dtype]
    if end - begin != want:
        raise _fail(
            path,
            f"{where} spans {end - begin} bytes but shape {shape} of {dtype} needs {want}",
            "data_offsets matching shape x dtype size",
        )
    if end > data_size:
        raise _fail(
            path,
            f"{where} ends at data offset {end}, past the end of the data ({data_size} bytes)",
            "a complete (not truncated) file",
        )
    return HeaderEntry(
        name=name, dtype=dtype, shape=tuple(shape), start=data_start + begin, end=data_start + end
    )


def _header_fingerprints(header: SafetensorsHeader) -> dict[str, str]:
    raw = header.metadata.get(FINGERPRINTS_KEY)
    if raw is None:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in value.items()
    ):
        raise _fail(
            header.path,
            f"__metadata__[{FINGERPRINTS_KEY!r}] is not a JSON object of strings",
            "a JSON string mapping tensor name -> fingerprint",
        )
    return value


def _tensor_specs(header: SafetensorsHeader) -> list[TensorSpec]:
    marked = _header_fingerprints(header)
    namespace = str(header.path)
    return [
        TensorSpec(
            name=e.name,
            shape=e.shape,
            dtype=e.dtype,
            nbytes=e.end - e.start,
            fingerprint=marked.get(e.name) or tensor_fingerprint(namespace, e.name, e.dtype, e.shape),
        )
        for e in header.entries
    ]


# --- checkpoints: one file, or a folder of shards ----------------------------------------------------


def checkpoint_files(path: str | Path) -> list[Path]:
    """The files of a checkpoint: the file itself, the index's shards, or all *.safetensors in the folder."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise _fail(path, "no such file or folder", "a .safetensors file or a checkpoint folder")
    index = _find_index(path)
    if index is not None:
        return [path / shard for shard in _read_index(index).values()]
    files = sorted((p for p in path.glob("*.safetensors") if p.is_file()), key=lambda p: natural_key(p.name))
    if not files:
        raise _fail(path, "folder has no *.safetensors files", f"{INDEX_NAME} or .safetensors shards")
    return files


def _find_index(folder: Path) -> Path | None:
    if (folder / INDEX_NAME).is_file():
        return folder / INDEX_NAME
    found = sorted(folder.glob("*.safetensors.index.json"))
    return found[0] if len(found) == 1 else None


def _read_index(index: Path) -> dict[str, str]:
    """weight_map of a sharded checkpoint's index (tensor name -> shard file name), validated."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except OSError as exc:
        raise _fail(index, f"cannot read file ({exc.strerror or exc})", "a readable index") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(
            index, f"is not valid JSON ({exc})".replace("\n", " "), "a JSON object with weight_map"
        ) from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise _fail(
            index, "field 'weight_map' is missing or empty", "an object mapping tensor name -> shard file"
        )
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or "/" in shard or "\\" in shard or shard.startswith("."):
            raise _fail(index, f"weight_map[{name!r}] is {shard!r}", "a shard file name in the same folder")
    return weight_map


def _read_checkpoint(path: Path) -> tuple[list[TensorSpec], list[SafetensorsHeader]]:
    """All tensors of a file or folder (validated against the index when there is one)."""
    headers: list[SafetensorsHeader] = []
    weight_map: dict[str, str] | None = None
    index = _find_index(path) if path.is_dir() else None
    if index is not None:
        weight_map = _read_index(index)
        shards = list(dict.fromkeys(weight_map.values()))
        for shard in shards:
            if not (path / shard).is_file():
                raise _fail(
                    index, f"shard {shard!r} does not exist", "every weight_map file beside the index"
                )
        headers = [read_header(path / shard) for shard in shards]
    else:
        headers = [read_header(p) for p in checkpoint_files(path)]
    tensors: dict[str, TensorSpec] = {}
    owner: dict[str, Path] = {}
    for header in headers:
        for t in _tensor_specs(header):
            if t.name in tensors:
                raise _fail(
                    path,
                    f"tensor {t.name!r} is in both {owner[t.name].name} and {header.path.name}",
                    "each tensor in one shard",
                )
            tensors[t.name] = t
            owner[t.name] = header.path
    if weight_map is not None and index is not None:
        for name, shard in weight_map.items():
            if name not in tensors or owner[name].name != shard:
                raise _fail(
                    index,
                    f"tensor {name!r} is mapped to {shard} but that shard's header lacks it",
                    "the index to match the shard headers",
                )
    ordered = sorted(tensors.values(), key=lambda t: logical_sort_key(t.name))
    return ordered, headers


def _config_beside(folder: Path) -> tuple[str, ArchInfo | None, list[str]]:
    """(family, ArchInfo, config tensor order) from a config.json next to the weights, if any."""
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        return "safetensors", None, []
    config = load_config_json(cfg_path)
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in supported_model_types():
        return (model_type if isinstance(model_type, str) else "safetensors"), None, []
    entries, arch, _ = inventory_from_config(config, str(cfg_path))
    return model_type, arch, [name for name, _ in entries]


def load_config_json(path: str | Path) -> dict[str, Any]:
    """Read a config.json as a dict, with one-line errors."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise _fail(path, f"cannot read file ({exc.strerror or exc})", "a readable config.json") from None
    except UnicodeDecodeError:
        raise _fail(path, "is not valid UTF-8", "a UTF-8 JSON file") from None
    except json.JSONDecodeError as exc:
        raise _fail(path, f"is not valid JSON ({exc.msg} at line {exc.lineno})", "a JSON object") from None
    if not isinstance(data, dict):
        raise _fail(path, f"top level is a JSON {type(data).__name__}", "a JSON object")
    return data


def spec_from_safetensors(path: str | Path, name: str | None = None) -> ModelSpec:
    """A ModelSpec whose tensors come from safetensors headers (file or sharded folder).

    A config.json beside the weights supplies ArchInfo (KV bytes per token etc.) and, when it
    describes exactly these tensors, their logical order (attention before MLP inside a layer);
    otherwise tensors follow `logical_sort_key` (embeddings, layers numerically, head).
    """
    path = Path(path)
    tensors, _ = _read_checkpoint(path)
    folder = path if path.is_dir() else path.parent
    family, arch, config_order = _config_beside(folder)
    if config_order and set(config_order) == {t.name for t in tensors}:
        position = {n: i for i, n in enumerate(config_order)}
        tensors.sort(key=lambda t: position[t.name])
    if name is None:
        resolved = path.resolve()
        if resolved.is_file() and resolved.stem not in ("model", "pytorch_model"):
            name = resolved.stem
        else:
            name = (resolved if resolved.is_dir() else resolved.parent).name
    return ModelSpec(
        name=name,
        family=family,
        tensors=tuple(tensors),
        dtype=dominant_dtype(tensors),
        arch=arch,
        source=str(path.resolve()),
    )


def tensor_locations(path: str | Path) -> dict[str, tuple[str, int, int]]:
    """name -> (absolute file path, first byte, one past last byte) for a loader to pread from."""
    path = Path(path)
    _, headers = _read_checkpoint(path)
    out: dict[str, tuple[str, int, int]] = {}
    for header in headers:
        for e in header.entries:
            out[e.name] = (str(header.path), e.start, e.end)
    return out

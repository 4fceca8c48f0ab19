"""Safetensors header reading: real files written by `safetensors`, shards, fingerprints, corruption."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("safetensors", reason="writes real checkpoints with safetensors (pip install -e '.[real]')")

from safetensors.numpy import save_file  # noqa: E402

import tangram_sim.models.safetensors_header as sth  # noqa: E402
from tangram_sim.errors import ModelError  # noqa: E402
from tangram_sim.models import (  # noqa: E402
    build_model_spec,
    build_units,
    get_model,
    inventory_from_config,
    read_header,
    spec_from_safetensors,
    tensor_locations,
)
from tangram_sim.models.spec import tensor_block  # noqa: E402

TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 12,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "torch_dtype": "float16",
}


def tiny_tensors(config: dict = TINY_LLAMA, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    entries, _, _ = inventory_from_config(config)
    return {name: rng.standard_normal(shape).astype(np.float16) for name, shape in entries}


def write_sharded(folder: Path, tensors: dict[str, np.ndarray], shards: int, index: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    per = -(-len(names) // shards)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s * per : (s + 1) * per]}
        save_file(part, str(folder / file))
        weight_map |= {n: file for n in part}
    if index:
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": 0}, "weight_map": dict(sorted(weight_map.items()))})
        )


def test_single_file_matches_config_inventory(tmp_path: Path) -> None:
    tensors = tiny_tensors()
    save_file(tensors, str(tmp_path / "tiny.safetensors"))
    spec = spec_from_safetensors(tmp_path / "tiny.safetensors")
    from_config = build_model_spec(TINY_LLAMA, "tiny")
    assert spec.name == "tiny" and spec.family == "safetensors" and spec.arch is None
    assert {t.name for t in spec.tensors} == {t.name for t in from_config.tensors}
    # Without a config, order is by block (embeddings, layers numerically, head), names within a layer.
    assert [tensor_block(t.name) for t in spec.tensors] == [tensor_block(t.name) for t in from_config.tensors]
    assert spec.weight_bytes == from_config.weight_bytes == sum(a.nbytes for a in tensors.values())
    assert spec.dtype == "F16"
    # KV inferred from k/v projection shapes: 2 * 2 heads * 16 dims * 12 layers * 2 bytes
    assert spec.kv_bytes_per_token == from_config.kv_bytes_per_token == 2 * 2 * 16 * 12 * 2
    assert spec.flops_per_token == from_config.flops_per_token
    assert spec.source == str((tmp_path / "tiny.safetensors").resolve())


def test_natural_layer_order(tmp_path: Path) -> None:
    save_file(tiny_tensors(), str(tmp_path / "model.safetensors"))
    spec = get_model(str(tmp_path / "model.safetensors"))
    assert spec.name == tmp_path.name  # "model.safetensors" says nothing; the folder does
    layers = [int(t.name.split(".")[2]) for t in spec.tensors if ".layers." in t.name]
    assert layers == sorted(layers) and layers[-1] == 11
    assert spec.tensors[0].name == "model.embed_tokens.weight"
    assert spec.tensors[-1].name in ("lm_head.weight", "model.norm.weight")


def test_config_beside_weights_supplies_arch(tmp_path: Path) -> None:
    save_file(tiny_tensors(), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA | {"num_key_value_heads": 4}))
    spec = get_model(tmp_path)
    assert spec.family == "llama" and spec.arch is not None and spec.arch.num_kv_heads == 4
    assert spec.kv_bytes_per_token == 2 * 4 * 16 * 12 * 2  # from the config, not the shapes
    assert spec.num_tensors == len(tiny_tensors())  # tensors still from the header
    # ... in the config's logical order (attention before MLP inside a layer)
    assert [t.name for t in spec.tensors] == [t.name for t in build_model_spec(TINY_LLAMA, "x").tensors]


def test_sharded_with_index_and_locations(tmp_path: Path) -> None:
    tensors = tiny_tensors(seed=1)
    write_sharded(tmp_path / "ckpt", tensors, shards=3)
    spec = get_model(str(tmp_path / "ckpt"))
    single = tmp_path / "single.safetensors"
    save_file(tensors, str(single))
    ref = spec_from_safetensors(single)
    assert [t.name for t in spec.tensors] == [t.name for t in ref.tensors]
    assert spec.weight_bytes == ref.weight_bytes and spec.name == "ckpt"
    locations = tensor_locations(tmp_path / "ckpt")
    assert set(locations) == set(tensors)
    files = {f for f, _, _ in locations.values()}
    assert len(files) == 3 and all(Path(f).is_absolute() for f in files)
    for name, (file, start, end) in locations.items():
        with open(file, "rb") as f:
            f.seek(start)
            assert f.read(end - start) == tensors[name].tobytes(), name
    # shards from a different folder are different bytes: fingerprints differ from the single file
    assert not {t.fingerprint for t in spec.tensors} & {t.fingerprint for t in ref.tensors}


def test_sharded_without_index(tmp_path: Path) -> None:
    tensors = tiny_tensors()
    write_sharded(tmp_path / "ckpt", tensors, shards=2, index=False)
    spec = get_model(tmp_path / "ckpt")
    assert spec.num_tensors == len(tensors)
    assert len({f for f, _, _ in tensor_locations(tmp_path / "ckpt").values()}) == 2


def test_index_errors(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    write_sharded(folder, tiny_tensors(), shards=2)
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["model.norm.weight"] = "model-00009-of-00009.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(ModelError, match="does not exist"):
        spec_from_safetensors(folder)
    data["weight_map"]["model.norm.weight"] = "model-00001-of-00002.safetensors"
    data["weight_map"]["lm_head.weight"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(ModelError, match="header lacks it"):
        spec_from_safetensors(folder)
    index.write_text(json.dumps({"weight_map": {}}))
    with pytest.raises(ModelError, match="weight_map"):
        spec_from_safetensors(folder)


def test_metadata_fingerprints_mark_shared_tensors(tmp_path: Path) -> None:
    tensors = tiny_tensors()
    marked = {
        "model.embed_tokens.weight": "00112233aabbccdd",
        "model.layers.0.mlp.up_proj.weight": "feedfeedfeedfeed",
    }
    save_file(tensors, str(tmp_path / "a.safetensors"), metadata={"tangram.fingerprints": json.dumps(marked)})
    shutil.copy(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    a = spec_from_safetensors(tmp_path / "a.safetensors")
    b = spec_from_safetensors(tmp_path / "b.safetensors")
    for ta, tb in zip(a.tensors, b.tensors):
        if ta.name in marked:
            assert ta.fingerprint == tb.fingerprint == marked[ta.name]
        else:
            assert ta.fingerprint != tb.fingerprint  # namespace = the file's resolved path
    keys_a = {u.key for u in build_units(a, "tensor")}
    assert len(keys_a & {u.key for u in build_units(b, "tensor")}) == 2
    save_file(tensors, str(tmp_path / "c.safetensors"), metadata={"tangram.fingerprints": "[1, 2]"})
    with pytest.raises(ModelError, match="tangram.fingerprints"):
        spec_from_safetensors(tmp_path / "c.safetensors")


def test_reads_only_the_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = {"w": np.zeros((1024, 1024), dtype=np.float32)}  # 4 MiB of data
    path = tmp_path / "big.safetensors"
    save_file(big, str(path))
    header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
    read_sizes: list[int] = []

    class Counting:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def read(self, n=-1):
            data = self.f.read(n)
            read_sizes.append(len(data))
            return data

        def seek(self, *args):
            return self.f.seek(*args)

    monkeypatch.setattr(sth, "open", lambda p, mode="r": Counting(open(p, mode)), raising=False)
    header = read_header(path)
    assert sum(read_sizes) == 8 + header_len
    assert header.entries[0].end - header.entries[0].start == 4 * 2**20
    assert header.file_size == path.stat().st_size


def write_raw(path: Path, header: object, data: bytes = b"", length: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


GOOD = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}


@pytest.mark.parametrize(
    ("header", "data", "length", "message"),
    [
        (b"", b"", -1, "at least 8"),  # file shorter than 8 bytes
        (b"{}", b"", 2**40, "absurd"),
        (b'{"a":1}', b"", 500, "past the end"),
        (b"\xff\xfe{}", b"", None, "UTF-8"),
        (b"{not json", b"", None, "not valid JSON"),
        ([1, 2], b"", None, "JSON list"),
        ({}, b"", None, "no tensors"),
        ({"w": {"shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "lacks 'dtype'"),
        ({"w": {"dtype": "F32", "data_offsets": [0, 8]}}, b"\0" * 8, None, "lacks 'shape'"),
        ({"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, None, "lacks 'data_offsets'"),
        ({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "unknown dtype 'Q4'"),
        ({"w": {"dtype": "F32", "shape": [2, -1], "data_offsets": [0, 8]}}, b"\0" * 8, None, "shape"),
        ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, "needs 12"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, None, "data_offsets"),
        (GOOD, b"\0" * 10, None, "past the end of the data"),  # truncated file
        (
            GOOD | {"v": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}},
            b"\0" * 16,
            None,
            "overlap",
        ),
        (GOOD | {"__metadata__": {"a": 1}}, b"\0" * 16, None, "__metadata__"),
    ],
)
def test_corrupt_headers_are_one_line_errors(tmp_path: Path, header, data, length, message) -> None:
    path = tmp_path / "bad.safetensors"
    if length == -1:
        path.write_bytes(b"\x01\x02\x03")
    else:
        write_raw(path, header, data, length)
    with pytest.raises(ModelError) as info:
        read_header(path)
    msg = str(info.value)
    assert message in msg
    assert msg.startswith(f"{path}: ") and "expected" in msg and "\n" not in msg


def test_valid_raw_header_and_scalar(tmp_path: Path) -> None:
    header = GOOD | {
        "s": {"dtype": "BF16", "shape": [], "data_offsets": [16, 18]},
        "__metadata__": {"k": "v"},
    }
    path = write_raw(tmp_path / "ok.safetensors", header, b"\0" * 18)
    h = read_header(path)
    assert h.metadata == {"k": "v"} and len(h.entries) == 2
    spec = spec_from_safetensors(path)
    assert spec.weight_bytes == 18 and spec.num_params == 5 and spec.kv_bytes_per_token == 0


def test_missing_and_wrong_paths(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no such file"):
        get_model(str(tmp_path / "nope.safetensors"))
    with pytest.raises(ModelError, match="no such file"):
        tensor_locations(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"no \*\.safetensors"):
        spec_from_safetensors(tmp_path / "empty")


def test_fused_qkv_kv_inference_without_config(tmp_path: Path) -> None:
    neox = {
        "model_type": "gpt_neox", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
        "num_attention_heads": 4, "vocab_size": 50, "torch_dtype": "float16",
    }  # fmt: skip
    save_file(tiny_tensors(neox), str(tmp_path / "neox.safetensors"))
    spec = spec_from_safetensors(tmp_path / "neox.safetensors")
    assert spec.kv_bytes_per_token == build_model_spec(neox, "n").kv_bytes_per_token == 2 * 32 * 3 * 2
    phi3 = {
        "model_type": "phi3", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 50, "torch_dtype": "float16",
    }  # fmt: skip
    save_file(tiny_tensors(phi3), str(tmp_path / "phi3.safetensors"))
    spec = spec_from_safetensors(tmp_path / "phi3.safetensors")
    assert spec.kv_bytes_per_token == build_model_spec(phi3, "p").kv_bytes_per_token == 2 * 2 * 8 * 2 * 2

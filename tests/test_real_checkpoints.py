"""Random-weight checkpoints: HF layout, real names/shapes/dtypes, fingerprints, fine-tunes sharing bytes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from tangram_sim.cli import main  # noqa: E402
from tangram_sim.errors import ModelError  # noqa: E402
from tangram_sim.models import build_model_spec, get_model, inventory_from_config, list_models  # noqa: E402
from tangram_sim.models.catalog import catalog_config  # noqa: E402
from tangram_sim.models.safetensors_header import FINGERPRINTS_KEY, INDEX_NAME  # noqa: E402
from tangram_sim.real.checkpoints import (  # noqa: E402
    make_checkpoints,
    make_synthetic_checkpoint,
    parse_derive,
    scaled_config,
    synthetic_config,
)


def _all(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


@pytest.fixture(scope="module")
def ckdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ckpts")
    make_checkpoints(["llama-3-8b", "qwen2.5-3b"], out, "tiny", derive=["llama-ft=llama-3-8b:0.5"])
    return out


def test_layout_is_hf_sharded_with_index_and_config(ckdir: Path) -> None:
    folder = ckdir / "llama-3-8b"
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) >= 2 and shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((folder / INDEX_NAME).read_text())
    tensors = _all(folder)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and config["hidden_size"] == 64 and config["vocab_size"] == 256
    # Names, shapes and dtypes are exactly the architecture's inventory (bf16 as the config declares).
    entries, _, _ = inventory_from_config(config)
    assert {n: tuple(s) for n, s in entries} == {n: tuple(t.shape) for n, t in tensors.items()}
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}


def test_tiny_keeps_structure_and_head_ratio_for_every_catalog_model() -> None:
    for name in list_models():
        full, tiny = catalog_config(name), scaled_config(name, "tiny")
        f_entries, f_arch, _ = inventory_from_config(full)
        t_entries, t_arch, _ = inventory_from_config(tiny)
        assert t_arch.hidden_size == 64 and t_arch.num_layers == 2 and t_arch.vocab_size == 256
        assert f_arch.num_heads // f_arch.num_kv_heads == t_arch.num_heads // t_arch.num_kv_heads, name
        # Same tensors per layer and outside the layers, with the layer index pattern kept.
        strip = {n.replace(".0.", ".*.").replace(".1.", ".*.") for n, _ in t_entries}
        assert strip <= {n for n, _ in f_entries} | {
            n.replace(f".{i}.", ".*.") for n, _ in f_entries for i in range(2)
        }, name
        assert sum(f_arch.tie_word_embeddings is t for t in (True,)) == sum(
            t_arch.tie_word_embeddings is t for t in (True,)
        )


def test_fingerprints_written_and_read_back(ckdir: Path) -> None:
    folder = ckdir / "llama-3-8b"
    written: dict[str, str] = {}
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            written.update(json.loads(f.metadata()[FINGERPRINTS_KEY]))
    spec = get_model(folder)
    assert {t.name: t.fingerprint for t in spec.tensors} == written
    expected = build_model_spec(
        scaled_config("llama-3-8b"), "llama-3-8b", namespace="tangram-real/llama-3-8b/seed=0"
    )
    assert {t.name: t.fingerprint for t in expected.tensors} == written


def test_fine_tune_shares_identical_bytes_with_its_base(
    ckdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, ft = get_model(ckdir / "llama-3-8b"), get_model(ckdir / "llama-ft")
    base_t, ft_t = _all(ckdir / "llama-3-8b"), _all(ckdir / "llama-ft")
    shared = [t.name for t, u in zip(base.tensors, ft.tensors) if t.fingerprint == u.fingerprint]
    assert "model.embed_tokens.weight" in shared and "model.layers.0.mlp.down_proj.weight" in shared
    assert not any(".layers.1." in n for n in shared) and "lm_head.weight" not in shared
    for name in base_t:
        assert torch.equal(base_t[name], ft_t[name]) == (name in shared), name
    # Other models never share by accident.
    qwen = {t.fingerprint for t in get_model(ckdir / "qwen2.5-3b").tensors}
    assert not qwen & {t.fingerprint for t in base.tensors}
    # `models show DIR` reads the fingerprints back from the headers.
    assert main(["models", "show", str(ckdir / "llama-ft"), "--json"]) == 0
    shown = {t["name"]: t["fingerprint"] for t in json.loads(capsys.readouterr().out)["tensors"]}
    assert all(shown[n] == base.tensors[base.tensor_index(n)].fingerprint for n in shared)


def test_values_are_deterministic_per_seed(tmp_path: Path, ckdir: Path) -> None:
    make_checkpoints(["llama-3-8b"], tmp_path / "same", "tiny")
    make_checkpoints(["llama-3-8b"], tmp_path / "other", "tiny", seed=1)
    a, b, c = (
        _all(ckdir / "llama-3-8b"),
        _all(tmp_path / "same/llama-3-8b"),
        _all(tmp_path / "other/llama-3-8b"),
    )
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    fa = {t.fingerprint for t in get_model(ckdir / "llama-3-8b").tensors}
    assert not fa & {t.fingerprint for t in get_model(tmp_path / "other/llama-3-8b").tensors}


def test_cli_make_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(
        ["real", "make-checkpoints", "--models", "qwen2.5-3b", "--derive", "q-ft=qwen2.5-3b:1", "--out",
         str(tmp_path), "--dtype", "float16", "--shard-mb", "0.05"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0 and "shared with qwen2.5-3b" in out
    assert len(list((tmp_path / "qwen2.5-3b").glob("*.safetensors"))) > 3
    ft = get_model(tmp_path / "q-ft")
    assert ft.dtype == "F16" and ft.arch is not None and ft.arch.tie_word_embeddings
    base = get_model(tmp_path / "qwen2.5-3b")
    same = sum(t.fingerprint == u.fingerprint for t, u in zip(base.tensors, ft.tensors))
    assert same == len(base.tensors) - 1  # fraction 1: everything but the final norm
    rc = main(["real", "make-checkpoints", "--models", "no-such-model", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: unknown model 'no-such-model'") and err.count("\n") == 1


def test_parse_derive_and_scale_errors() -> None:
    d = parse_derive("ft=llama-3-8b:0.25")
    assert (d.name, d.base, d.fraction) == ("ft", "llama-3-8b", 0.25)
    assert parse_derive("ft=llama-3-8b").fraction == 0.5
    for bad in ("ft", "=x:0.5", "ft=llama-3-8b:2", "ft=llama-3-8b:x"):
        with pytest.raises(ModelError, match="NAME=BASE:FRACTION"):
            parse_derive(bad)
    with pytest.raises(ModelError, match="scale 'huge'"):
        scaled_config("llama-3-8b", "huge")


def test_synthetic_checkpoint_size(tmp_path: Path) -> None:
    cfg = synthetic_config(1.5)
    spec = build_model_spec(cfg, "s")
    assert 1.35e9 < spec.weight_bytes < 1.65e9
    small = make_synthetic_checkpoint(tmp_path, 0.03, dtype="float32")
    assert get_model(small.path).weight_bytes == small.nbytes

"""`tangram-sim models list|show` and the CLI's error contract (error: <message>, exit 2)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("safetensors", reason="writes checkpoints with safetensors (pip install -e '.[real]')")

from safetensors.numpy import save_file  # noqa: E402

from tangram_sim.cli import build_parser, main  # noqa: E402
from tangram_sim.models import get_model, list_models  # noqa: E402


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_list_table(capsys) -> None:
    rc, out, err = run(capsys, "models", "list")
    assert rc == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["name", "family"] and "KV bytes/token" in lines[0]
    assert len(lines) == 1 + len(list_models())
    row = next(line for line in lines if line.startswith("llama-3-8b "))
    assert row.split() == ["llama-3-8b", "llama", "8.03", "16.06", "291", "131072"]


def test_list_json(capsys) -> None:
    rc, out, _ = run(capsys, "models", "list", "--json")
    assert rc == 0
    data = json.loads(out)
    assert [d["name"] for d in data] == list_models()
    assert all("tensors" not in d for d in data)
    gpt = next(d for d in data if d["name"] == "gpt-neox-20b")
    assert gpt["weight_bytes"] == get_model("gpt-neox-20b").weight_bytes


def test_show_summary_and_tensors(capsys) -> None:
    rc, out, _ = run(capsys, "models", "show", "qwen2.5-3b")
    assert rc == 0 and "6,171,877,376" in out and "KV bytes/token:    36,864" in out
    assert "model.layers.0" not in out
    rc, out, _ = run(capsys, "models", "show", "qwen2.5-3b", "--tensors")
    assert rc == 0
    assert "model.layers.35.mlp.down_proj.weight" in out and "2048x11008" in out


def test_show_json_includes_tensors(capsys) -> None:
    rc, out, _ = run(capsys, "models", "show", "llava-1.5-7b", "--json")
    assert rc == 0
    data = json.loads(out)
    spec = get_model("llava-1.5-7b")
    assert data["weight_bytes"] == spec.weight_bytes and data["num_tensors"] == spec.num_tensors
    assert len(data["tensors"]) == spec.num_tensors
    assert data["tensors"][0]["name"] == "language_model.model.embed_tokens.weight"


def test_show_dtype_override(capsys) -> None:
    rc, out, _ = run(capsys, "models", "show", "llama-3-8b", "--json", "--dtype", "float32")
    assert rc == 0 and json.loads(out)["weight_bytes"] == 2 * get_model("llama-3-8b").weight_bytes


def test_show_safetensors_path(capsys, tmp_path: Path) -> None:
    path = tmp_path / "toy.safetensors"
    save_file({"model.embed_tokens.weight": np.zeros((4, 8), np.float32)}, str(path))
    rc, out, _ = run(capsys, "models", "show", str(path), "--json")
    assert rc == 0
    data = json.loads(out)
    assert data["name"] == "toy" and data["weight_bytes"] == 128 and data["tensors"][0]["shape"] == [4, 8]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["models", "show", "no-such-model"], "unknown model 'no-such-model'"),
        (["models", "show", "/no/such/dir/model.safetensors"], "no such file"),
        (["models", "show", "llama-3-8b", "--dtype", "int3"], "unknown dtype"),
    ],
)
def test_user_errors_print_one_line_and_exit_2(capsys, argv, needle) -> None:
    rc, out, err = run(capsys, *argv)
    assert rc == 2 and out == ""
    assert err.startswith("error: ") and needle in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_corrupt_file_error(capsys, tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x10\x00")
    rc, _, err = run(capsys, "models", "show", str(path))
    assert rc == 2 and err.startswith(f"error: {path}: ")


def test_usage_errors_and_help(capsys) -> None:
    assert run(capsys, "models", "show")[0] == 2  # missing argument (argparse)
    assert run(capsys, "nope")[0] == 2
    assert run(capsys)[0] == 2  # no command: help on stderr
    assert run(capsys, "models")[0] == 2
    rc, out, _ = run(capsys, "--version")
    assert rc == 0 and "tangram-sim" in out
    assert "models" in build_parser().format_help()


@pytest.mark.skipif(shutil.which("tangram-sim") is None, reason="console script not installed")
def test_console_script() -> None:
    proc = subprocess.run(
        ["tangram-sim", "models", "show", "bogus"], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 2 and proc.stderr.startswith("error: unknown model") and proc.stdout == ""

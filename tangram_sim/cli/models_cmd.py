"""`tangram-sim models list|show`: inspect the catalog and local checkpoints before an experiment."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from tangram_sim.models import ModelSpec, get_model, list_models


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("models", help="list catalog models or show one model's tensors")
    sub = parser.add_subparsers(title="models commands", metavar="ACTION")
    parser.set_defaults(func=lambda args: _help(parser))

    p_list = sub.add_parser("list", help="catalog models with sizes")
    p_list.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p_list.set_defaults(func=cmd_list)

    p_show = sub.add_parser("show", help="one model (catalog name or checkpoint path)")
    p_show.add_argument(
        "model", metavar="NAME_OR_PATH", help="catalog name, config.json, .safetensors or folder"
    )
    p_show.add_argument("--json", action="store_true", help="print the full spec (with tensors) as JSON")
    p_show.add_argument("--tensors", action="store_true", help="also list every tensor")
    p_show.add_argument(
        "--dtype", default=None, help="override torch_dtype of config-based models (e.g. float16)"
    )
    p_show.set_defaults(func=cmd_show)


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _table(rows: list[list[str]], right: set[int]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def cmd_list(args: argparse.Namespace) -> int:
    specs = [get_model(name) for name in list_models()]
    if args.json:
        print(json.dumps([s.to_json(include_tensors=False) for s in specs], indent=2))
        return 0
    rows = [["name", "family", "params (B)", "weight GB", "tensors", "KV bytes/token"]]
    for s in specs:
        rows.append(
            [
                s.name,
                s.family,
                f"{s.num_params / 1e9:.2f}",
                f"{s.weight_bytes / 1e9:.2f}",
                str(s.num_tensors),
                str(s.kv_bytes_per_token),
            ]
        )
    print(_table(rows, right={2, 3, 4, 5}))
    return 0


def _summary(spec: ModelSpec) -> str:
    lines = [
        f"name:              {spec.name}",
        f"family:            {spec.family}",
        f"source:            {spec.source}",
        f"dtype:             {spec.dtype}",
        f"parameters:        {spec.num_params:,} ({spec.num_params / 1e9:.2f} B)",
        f"weight bytes:      {spec.weight_bytes:,} ({spec.weight_bytes / 1e9:.2f} GB, "
        f"{spec.weight_bytes / 2**30:.2f} GiB)",
        f"tensors:           {spec.num_tensors}",
        f"KV bytes/token:    {spec.kv_bytes_per_token:,}",
        f"FLOPs/token:       {spec.flops_per_token:,}",
    ]
    if spec.arch is not None:
        arch = ", ".join(f"{k}={v}" for k, v in spec.arch.to_json().items() if v is not None)
        lines.append(f"architecture:      {arch}")
    return "\n".join(lines)


def cmd_show(args: argparse.Namespace) -> int:
    spec = get_model(args.model, dtype=args.dtype)
    if args.json:
        print(json.dumps(spec.to_json(include_tensors=True), indent=2))
        return 0
    print(_summary(spec))
    if args.tensors:
        rows = [["#", "name", "shape", "dtype", "bytes", "fingerprint"]]
        for i, t in enumerate(spec.tensors):
            shape = "x".join(str(d) for d in t.shape) or "scalar"
            rows.append([str(i), t.name, shape, t.dtype, str(t.nbytes), t.fingerprint])
        print()
        print(_table(rows, right={0, 4}))
    return 0

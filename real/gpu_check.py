"""Hardware check of the real executor: GPU tests + loader benchmark, written down with the card.

Run on a GPU machine from the repository root:

    python real/gpu_check.py --device cuda:0 --out $OUT

It runs `pytest -m gpu` on the real-executor tests, then `benchmarks/bench_loader.py` (tangram's
loader vs safetensors, pinned host->device bandwidth), reads the device memory through NVML, and writes
`gpu_check.json` (every figure), `gpu_check.md` (the same as a short report) and `pytest_gpu.txt`
into `--out`. Exit status: 0 when the tests passed (or were all skipped, as on the CPU), 1 otherwise.
`--device cpu` runs the same steps on the CPU in well under two minutes (the GPU tests skip).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/test_real_checkpoints.py", "tests/test_real_loader.py", "tests/test_real_engine.py"]


def run_pytest(out: Path, timeout: float) -> dict[str, Any]:
    """`pytest -m gpu` on the real-executor tests; the counts come from pytest's summary line."""
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider", *TESTS]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        text, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        text, rc = f"{exc.stdout or ''}\ntimed out after {timeout} s", -1
    (out / "pytest_gpu.txt").write_text(text, encoding="utf-8")
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|error)", text)}
    # rc 5: everything deselected (no GPU tests collected) is not a failure either.
    ok = rc in (0, 5) and not counts.get("failed") and not counts.get("error")
    return {"command": " ".join(cmd[2:]), "returncode": rc, "counts": counts, "ok": ok,
            "seconds": time.perf_counter() - t0}  # fmt: skip


def markdown(r: dict[str, Any], bench_text: str) -> str:
    info = r["device_info"]
    t = r["pytest"]
    counts = ", ".join(f"{n} {k}" for k, n in t["counts"].items()) or "no summary"
    lines = [
        f"# tangram-sim real executor check: {info.get('card', info['device'])}",
        "",
        f"- date: {r['date']}",
        f"- device: {info['device']}, card: {info.get('card')}, driver: {info.get('driver')}, "
        f"CUDA: {info.get('cuda')}, PCIe: {info.get('pcie')}",
        f"- torch {info['torch']}, python {r['python']}, host {r['host']}",
        f"- GPU tests (`pytest -m gpu`): {'ok' if t['ok'] else 'FAILED'} ({counts}, {t['seconds']:.1f} s)",
        f"- memory after the run: {r['memory']['summary']}",
        "",
        "## Loader benchmark",
        "",
        "```",
        bench_text,
        "```",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda:0", help="cuda:N, or cpu for a dry run")
    parser.add_argument("--out", required=True, help="folder for gpu_check.json / .md / pytest_gpu.txt")
    parser.add_argument(
        "--gb", type=float, default=None, help="synthetic checkpoint size (default: 0.5 on CPU)"
    )
    parser.add_argument(
        "--model", default=None, help="full-size catalog model instead (CUDA default: llama-3-8b)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="benchmark runs per loader")
    parser.add_argument("--skip-tests", action="store_true", help="only the benchmark")
    parser.add_argument("--test-timeout", type=float, default=300, help="seconds allowed for pytest")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    import torch

    from tangram_sim.real.memory import driver_info, read_memory
    from tangram_sim.real.setup import resolve_device

    device = resolve_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "host": platform.node(),
        "device_info": driver_info(device),
    }
    if args.skip_tests:
        result["pytest"] = {"command": None, "returncode": None, "counts": {}, "ok": True, "seconds": 0.0}
    else:
        print("running pytest -m gpu ...", flush=True)
        result["pytest"] = run_pytest(out, args.test_timeout)
    bench = importlib.import_module("benchmarks.bench_loader")  # ROOT is on sys.path
    gb = args.gb
    if gb is None and args.model is None and device.type == "cpu":
        gb = 0.5
    with tempfile.TemporaryDirectory(prefix="tangram-gpu-check-") as tmp:
        path = bench.make_checkpoint(Path(tmp), device.type, gb, args.model)
        result["bench"] = bench.run(path, str(device), args.repeats)
    bench_text = bench.report(result["bench"])
    print(bench_text)
    mem = read_memory(device)
    result["memory"] = {**mem.to_json(), "summary": mem.summary()}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    md = markdown(result, bench_text)
    (out / "gpu_check.md").write_text(md, encoding="utf-8")
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return 0 if result["pytest"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

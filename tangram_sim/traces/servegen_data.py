"""ServeGen's published client data (Alibaba Cloud Model Studio), read into plain arrays.

ServeGen (arXiv 2505.09999, github.com/alibaba/ServeGen, Apache-2.0) publishes, per pool of clients
(`language/m-mid`, `reason/deepseek-r1`, `multimodal/mm-image`, ...), one `chunk-N-trace.csv` per
client (one row per 600 s window: `timestamp,rate,cv,pattern,shape,scale`) and one
`chunk-N-dataset.json` (per 6 h: token-length PDFs as Python dict literals). This module reads either
that folder (a clone of the ServeGen repository or its `data/` folder) or the compact extract this
project ships (`traces/servegen/`: `windows.parquet` + `pdfs.parquet`, written by `write_extract`),
keeping only the windows of the requested span, and gives the generator (`servegen_pool`) one
`PoolData` per pool. A client whose dataset file is absent keeps its arrivals: the generator draws its
token lengths from the pool's other clients (see `servegen_pool`).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from tangram_sim.errors import TraceError

CATEGORIES = ("language", "reason", "multimodal")
WINDOW_S = 600  # ServeGen's rate windows
PATTERNS = ("Gamma", "Weibull")  # inter-arrival laws; code 1 and 2 in `PoolData.pattern` (0: idle)
EXTRACT_FILES = ("windows.parquet", "pdfs.parquet")
# reason_ratio (share of reasoning tokens) does not change a request's length: output_tokens holds them
UNUSED_FIELDS = ("reason_ratio",)
_CHUNK = re.compile(r"chunk-(\d+)-(trace\.csv|dataset\.json)$")


@dataclass(slots=True)
class PoolData:
    """One pool's clients over a span: active windows as parallel arrays, PDFs per (client, time)."""

    name: str  # pool name as in the data, e.g. "m-mid"
    category: str  # language | reason | multimodal
    clients: np.ndarray  # int64 client ids of the pool, ascending (idle ones included)
    has_file: np.ndarray  # bool per client: its dataset file exists
    client: np.ndarray  # per active window: client id
    timestamp: np.ndarray  # per active window: window start, seconds from the start of the data
    rate: np.ndarray  # per active window: the client's mean rate, requests/s (> 0)
    cv: np.ndarray  # per active window: coefficient of variation of its inter-arrival times
    pattern: np.ndarray  # per active window: 1 Gamma, 2 Weibull
    shape: np.ndarray  # per active window: Gamma shape a or Weibull shape c
    scale: np.ndarray  # per active window: the law's scale
    # (client, dataset timestamp) -> field -> (values ascending, probabilities); only entries whose
    # every field is non-empty (ServeGen skips an entry with an empty PDF)
    pdfs: dict[tuple[int, int], dict[str, tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)

    def dataset_times(self, client: int) -> list[int]:
        """Timestamps of the client's usable PDF entries, ascending."""
        return sorted(ts for c, ts in self.pdfs if c == client)


def parse_pdf(text: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    """`"{45: 0.25, 46: 0.75}"` -> (values, probabilities), values ascending; empty arrays for `{}`."""
    body = text.strip()
    if not (body.startswith("{") and body.endswith("}")):
        raise TraceError(f"{where}: expected a PDF like '{{value: probability, ...}}', got {text[:40]!r}")
    body = body[1:-1].strip()
    if not body:
        return np.empty(0), np.empty(0)
    try:
        flat = np.array(body.replace(":", ",").split(","), dtype=float)
    except ValueError:
        raise TraceError(f"{where}: expected numbers in the PDF, got {text[:40]!r}") from None
    if flat.size % 2:
        raise TraceError(f"{where}: expected value: probability pairs, got {text[:40]!r}")
    values, probs = flat[0::2], flat[1::2]
    if not (np.all(np.isfinite(flat)) and np.all(probs >= 0) and probs.sum() > 0):
        raise TraceError(f"{where}: expected finite values and probabilities >= 0, got {text[:40]!r}")
    order = np.argsort(values, kind="stable")
    return values[order], probs[order] / probs.sum()


def find_pools(data: Path) -> dict[str, tuple[str, Path | None]]:
    """Pool name -> (category, folder) in a ServeGen data folder; folder None in an extract."""
    if is_extract(data):
        table = read_extract(data)[0][["category", "pool"]].drop_duplicates()
        return {str(r.pool): (str(r.category), None) for r in table.itertuples()}
    root = data / "data" if (data / "data").is_dir() and not (data / "language").is_dir() else data
    pools: dict[str, tuple[str, Path | None]] = {}
    for category in CATEGORIES:
        folder = root / category
        if folder.is_dir():
            for sub in sorted(folder.iterdir()):
                if sub.is_dir() and any(sub.glob("chunk-*-trace.csv")):
                    pools[sub.name] = (category, sub)
    if not pools:
        raise TraceError(
            f"trace.data: {data} holds no ServeGen data (expected language/, reason/ or multimodal/ "
            f"folders of chunk-N-trace.csv files, or {' + '.join(EXTRACT_FILES)})"
        )
    return pools


def is_extract(data: Path) -> bool:
    return all((data / f).is_file() for f in EXTRACT_FILES)


def load_pool(data: Path, name: str, span: tuple[float, float]) -> PoolData:
    """The pool `name`'s windows overlapping `span` (seconds) and the PDFs they may use."""
    pools = find_pools(data)
    if name not in pools:
        raise TraceError(f"trace.pools.{name}: unknown pool; {data} has: {', '.join(sorted(pools))}")
    category, folder = pools[name]
    if folder is None:
        return _load_extract(data, name, category, span)
    return _load_folder(folder, name, category, span)


def _load_folder(folder: Path, name: str, category: str, span: tuple[float, float]) -> PoolData:
    traces: dict[int, Path] = {}
    datasets: dict[int, Path] = {}
    for p in folder.iterdir():
        m = _CHUNK.match(p.name)
        if m:
            (traces if m.group(2) == "trace.csv" else datasets)[int(m.group(1))] = p
    clients = np.array(sorted(traces), dtype=np.int64)
    parts = []
    last_end = 0.0
    for c in clients:
        rows = _read_window_csv(traces[int(c)])
        if len(rows):
            last_end = max(last_end, float(rows["timestamp"].max()) + WINDOW_S)
        rows = rows[(rows["timestamp"] + WINDOW_S > span[0]) & (rows["timestamp"] < span[1])]
        parts.append(rows.assign(client=int(c)))
    _check_span(name, span, last_end)
    windows = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    pool = _pool_from_windows(name, category, clients, np.isin(clients, list(datasets)), windows)
    for c, path in datasets.items():
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise TraceError(f"{path}: not a ServeGen dataset JSON file ({exc})") from None
        if not isinstance(entries, dict):
            raise TraceError(f"{path}: expected a mapping timestamp -> PDFs")
        for ts, fields in entries.items():
            if _is_int(ts) and int(ts) < span[1] and isinstance(fields, dict):
                _add_entry(pool, c, int(ts), fields, f"{path}: entry {ts}")
    return pool


def _read_window_csv(path: Path) -> pd.DataFrame:
    names = ["timestamp", "rate", "cv", "pattern", "shape", "scale"]
    try:
        df = pd.read_csv(path, header=None, names=names, dtype={"pattern": str}, keep_default_na=False)
    except (ValueError, pd.errors.ParserError) as exc:
        raise TraceError(f"{path}: expected rows 'timestamp,rate,cv,pattern,shape,scale' ({exc})") from None
    bad = ~df["pattern"].isin(("",) + PATTERNS)
    for col in ("timestamp", "rate", "cv", "shape", "scale"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
        bad |= ~np.isfinite(df[col].to_numpy(dtype=float))
    if bad.any():
        line = int(np.flatnonzero(bad.to_numpy())[0]) + 1
        raise TraceError(f"{path}:{line}: expected 'timestamp,rate,cv,Gamma|Weibull|,shape,scale' numbers")
    return df


def _pool_from_windows(name: str, category: str, clients: np.ndarray, has_file: np.ndarray,
                       windows: pd.DataFrame) -> PoolData:
    if len(windows):
        active = windows[(windows["rate"] > 0) & (windows["pattern"] != "")]
        active = active.sort_values(["timestamp", "client"], kind="stable")
    else:
        active = pd.DataFrame({c: [] for c in ("client", "timestamp", "rate", "cv", "pattern", "shape", "scale")})
    if len(active) and not ((active["shape"] > 0) & (active["scale"] > 0)).all():
        raise TraceError(f"trace.pools.{name}: a window has a non-positive shape or scale")
    codes = active["pattern"].map({p: i + 1 for i, p in enumerate(PATTERNS)}).to_numpy(dtype=np.int8)
    return PoolData(
        name=name, category=category, clients=clients, has_file=has_file,
        client=active["client"].to_numpy(dtype=np.int64), timestamp=active["timestamp"].to_numpy(dtype=np.int64),
        rate=active["rate"].to_numpy(dtype=float), cv=active["cv"].to_numpy(dtype=float), pattern=codes,
        shape=active["shape"].to_numpy(dtype=float), scale=active["scale"].to_numpy(dtype=float),
    )


def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit()


def _add_entry(pool: PoolData, client: int, ts: int, fields: dict, where: str) -> None:
    parsed = {}
    for name, text in fields.items():
        if name in UNUSED_FIELDS:
            continue
        if not isinstance(text, str):
            raise TraceError(f"{where}: field {name}: expected a PDF string, got {text!r}")
        values, probs = parse_pdf(text, f"{where}, field {name}")
        if not len(values):
            return  # ServeGen skips an entry with an empty field: the client had no data then
        parsed[name] = (values, probs)
    if parsed:
        pool.pdfs[(int(client), ts)] = parsed


def _check_span(name: str, span: tuple[float, float], data_end: float) -> None:
    if span[0] >= data_end:
        raise TraceError(
            f"trace.span: [{span[0]:g}, {span[1]:g}] is outside the data of pool {name} "
            f"(0 to {data_end:g} s)"
        )
    if span[1] > data_end:
        raise TraceError(
            f"trace.span: ends at {span[1]:g} s, after the end of pool {name}'s data ({data_end:g} s)"
        )


@functools.lru_cache(maxsize=4)
def _extract_tables(windows_path: Path, pdfs_path: Path, signature: tuple) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Both extract tables, read once per process (the signature re-reads an edited file)."""
    del signature  # part of the cache key only
    try:
        return pd.read_parquet(windows_path), pd.read_parquet(pdfs_path)
    except (OSError, ValueError) as exc:
        raise TraceError(f"trace.data: {windows_path.parent} is not a readable ServeGen extract ({exc})") from None


def read_extract(data: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    paths = [data / f for f in EXTRACT_FILES]
    signature = tuple((p.stat().st_mtime_ns, p.stat().st_size) for p in paths)
    return _extract_tables(paths[0], paths[1], signature)


def _load_extract(data: Path, name: str, category: str, span: tuple[float, float]) -> PoolData:
    all_windows, all_pdfs = read_extract(data)
    windows = all_windows[all_windows["pool"] == name]
    clients_table = windows[["client", "has_file"]].drop_duplicates("client").sort_values("client")
    data_end = float(windows["data_end"].iloc[0]) if len(windows) else 0.0
    _check_span(name, span, data_end)
    rows = windows[(windows["timestamp"] + WINDOW_S > span[0]) & (windows["timestamp"] < span[1])]
    pool = _pool_from_windows(name, category, clients_table["client"].to_numpy(dtype=np.int64),
                              clients_table["has_file"].to_numpy(dtype=bool), rows)
    pdfs = all_pdfs[(all_pdfs["pool"] == name) & (all_pdfs["timestamp"] < span[1])]
    # rows come sorted by (client, timestamp, field, value) from write_extract
    client = pdfs["client"].to_numpy(dtype=np.int64)
    ts = pdfs["timestamp"].to_numpy(dtype=np.int64)
    fcode = pdfs["field"].cat.codes.to_numpy()
    fnames = list(pdfs["field"].cat.categories)
    values = pdfs["value"].to_numpy(dtype=float)
    probs = pdfs["prob"].to_numpy(dtype=float)
    if len(client):
        change = np.flatnonzero((client[1:] != client[:-1]) | (ts[1:] != ts[:-1]) | (fcode[1:] != fcode[:-1])) + 1
        starts = np.concatenate([[0], change]).tolist()
        ends = np.concatenate([change, [len(client)]]).tolist()
        for s, e in zip(starts, ends):
            p = probs[s:e]
            pool.pdfs.setdefault((int(client[s]), int(ts[s])), {})[fnames[fcode[s]]] = (values[s:e], p / p.sum())
    return pool


def write_extract(data: Path, out: Path, pools: list[str], span: tuple[float, float]) -> dict[str, int]:
    """Write the windows of `span` and the PDFs they use, for `pools`, as `out`/windows.parquet +
    pdfs.parquet (the format `load_pool` reads). Returns row counts."""
    found = find_pools(data)
    win_parts, pdf_parts = [], []
    for name in pools:
        if name not in found:
            raise TraceError(f"unknown pool {name!r}; {data} has: {', '.join(sorted(found))}")
        category, folder = found[name]
        # a pool whose data ends earlier (reason and multimodal pools hold one day) is cut there
        end = min(span[1], _data_end(folder) if folder else _extract_end(data, name))
        if end <= span[0]:
            raise TraceError(f"--span: starts at {span[0]:g} s, after the end of pool {name}'s data ({end:g} s)")
        part = (span[0], end)
        pool = _load_folder(folder, name, category, part) if folder else _load_extract(data, name, category, part)
        # idle clients keep one row so the client list (and who lacks a dataset file) survives
        active = pd.DataFrame({
            "client": pool.client, "timestamp": pool.timestamp, "rate": pool.rate, "cv": pool.cv,
            "pattern": np.array(("",) + PATTERNS)[pool.pattern], "shape": pool.shape, "scale": pool.scale,
        })
        idle = np.setdiff1d(pool.clients, pool.client)
        idle_rows = pd.DataFrame({"client": idle, "timestamp": int(span[0]) // WINDOW_S * WINDOW_S, "rate": 0.0,
                                  "cv": 0.0, "pattern": "", "shape": 0.0, "scale": 0.0})
        w = pd.concat([active, idle_rows], ignore_index=True)
        w["has_file"] = np.isin(w["client"].to_numpy(), pool.clients[pool.has_file])
        w["pool"], w["category"], w["data_end"] = name, category, float(end)
        win_parts.append(w)
        for (c, ts), fields in pool.pdfs.items():
            for fname, (values, probs) in fields.items():
                pdf_parts.append(pd.DataFrame({"pool": name, "client": c, "timestamp": ts, "field": fname,
                                               "value": values.astype(np.int32), "prob": probs}))
    out.mkdir(parents=True, exist_ok=True)
    windows = pd.concat(win_parts, ignore_index=True).sort_values(["pool", "client", "timestamp"], kind="stable")
    pdfs = pd.concat(pdf_parts, ignore_index=True)
    pdfs = pdfs.sort_values(["pool", "client", "timestamp", "field", "value"], kind="stable")
    for df in (windows, pdfs):
        for col in ("pool", "field", "category", "pattern"):
            if col in df:
                df[col] = df[col].astype("category")
    windows.to_parquet(out / "windows.parquet", index=False, compression="zstd")
    pdfs.to_parquet(out / "pdfs.parquet", index=False, compression="zstd")
    return {"windows": len(windows), "pdf_rows": len(pdfs)}


def _extract_end(data: Path, name: str) -> float:
    windows = read_extract(data)[0]
    return float(windows.loc[windows["pool"] == name, "data_end"].iloc[0])


def _data_end(folder: Path) -> float:
    first = next(iter(sorted(folder.glob("chunk-*-trace.csv"))))
    return float(_read_window_csv(first)["timestamp"].max()) + WINDOW_S

"""Trace readers: every supported file format -> the canonical request table.

The canonical table has exactly the columns `arrival_s` (float64 seconds, non-decreasing, first request
at 0), `model` (str, or all None until a mapping assigns models), `input_tokens` and `output_tokens`
(int64 >= 1), indexed 0..n-1.

Parsing is vectorised (pandas' C parser with inferred dtypes, `traces.delimited`). Only when something
fails to parse is the file revisited, line by line, to name the exact line, column and text; clean files
pay nothing for good messages. With `skip_bad_rows=True` bad rows are dropped and counted in
`df.attrs["skipped_rows"]` instead (never dropped silently). Blank lines are ignored.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from tangram_sim.errors import TraceError
from tangram_sim.traces.delimited import (
    Col,
    check_file,
    first_line,
    float_col,
    int_col,
    label_col,
    parse_float,
    parse_int,
    parse_label,
    parse_timestamp,
    read_delimited,
    short,
    split,
)

COLUMNS = ("arrival_s", "model", "input_tokens", "output_tokens")
FORMATS = ("azure-llm", "azure-functions", "azure-functions-2021", "servegen", "burstgpt", "table")
SPREADS = ("poisson", "uniform")

# Token lengths given to function-trace requests when no LLM trace is given to sample them from.
DEFAULT_INPUT_TOKENS = 1024
DEFAULT_OUTPUT_TOKENS = 128

_TIMESTAMP_EXAMPLE = "timestamp like '2023-11-16 18:17:03.9799600'"
_PathLike = str | Path


# --------------------------------------------------------------------------------------------------
# Canonical table


def validate_trace(df: pd.DataFrame, source: str, *, require_model: bool = False) -> pd.DataFrame:
    """Check a table against the canonical schema and return a normalised copy.

    Normalising means: keep only the canonical columns, sort by arrival (stable), shift the first
    arrival to 0, use float64/int64/str dtypes and a 0..n-1 index. A missing `model` column becomes a
    column of None (unless `require_model`). Bad values raise TraceError naming `source`, the row and
    the column, so a hand-made table fails as clearly as a file.
    """
    for name in ("arrival_s", "input_tokens", "output_tokens"):
        if name not in df.columns:
            raise TraceError(f"{source}: missing column '{name}'; expected columns {', '.join(COLUMNS)}")
    if len(df) == 0:
        raise TraceError(f"{source}: the trace holds no requests")
    checks: list[tuple[str, str, np.ndarray, np.ndarray]] = []
    arrival, bad = parse_float(df["arrival_s"], None)
    checks.append(("arrival_s", "a finite number of seconds", arrival, bad))
    for name in ("input_tokens", "output_tokens"):
        values, bad = parse_int(df[name], 1)
        checks.append((name, "integer >= 1", values, bad))
    model: np.ndarray | None = None
    if "model" in df.columns and not df["model"].isna().all():
        model, bad = parse_label(df["model"])
        checks.append(("model", "a non-empty model name", model, bad))
    elif require_model:
        raise TraceError(f"{source}: column 'model' is missing or empty; expected a model name per request")
    any_bad = np.zeros(len(df), dtype=bool)
    for _, _, _, bad in checks:
        any_bad |= bad
    if any_bad.any():
        row = int(np.argmax(any_bad))
        name, what, _, _ = next(c for c in checks if c[3][row])
        value = short(df[name].iloc[row])
        raise TraceError(f"{source}: row {row + 1}: column '{name}': expected {what}, got '{value}'")
    return _canonical(arrival, model, checks[1][2], checks[2][2])


# Model column as given to `_canonical`: None, an array of names, or (codes, names) with codes
# indexing names; codes keep reordering cheap and let pyarrow build the string column.
_Models = np.ndarray | tuple[np.ndarray, Sequence[str]] | None


def _string_column(codes: np.ndarray, names: Sequence[str]) -> pd.Series:
    """names[codes] as a pandas string Series; via pyarrow when pandas stores strings there (10x faster)."""
    target = pd.Series([], dtype="str").dtype
    if isinstance(target, pd.StringDtype) and target.storage == "pyarrow":
        import pyarrow as pa

        arr = pa.DictionaryArray.from_arrays(
            pa.array(np.asarray(codes, dtype=np.int32)), pa.array([str(x) for x in names], pa.large_string())
        ).dictionary_decode()
        return pd.Series(arr, dtype=target)
    return pd.Series(np.asarray(names, dtype=object)[codes], dtype="str")


def _canonical(arrival: np.ndarray, model: _Models, inputs: np.ndarray, outputs: np.ndarray) -> pd.DataFrame:
    """Assemble the canonical table from parsed arrays (sorted, shifted, typed)."""
    arrival = np.asarray(arrival, dtype=np.float64)
    codes: np.ndarray | None = None
    names: Sequence[str] = ()
    if isinstance(model, tuple):
        codes, names = model
    elif model is not None:
        codes, uniques = pd.factorize(np.asarray(model, dtype=object))
        names = list(uniques)
    if len(arrival) > 1 and bool(np.any(np.diff(arrival) < 0)):
        order = np.argsort(arrival, kind="stable")
        arrival, inputs, outputs = arrival[order], inputs[order], outputs[order]
        codes = None if codes is None else codes[order]
    arrival = arrival - arrival[0]
    n = len(arrival)
    models = pd.Series([None] * n, dtype=object) if codes is None else _string_column(codes, names)
    return pd.DataFrame(
        {
            "arrival_s": arrival,
            "model": models,
            "input_tokens": np.asarray(inputs, dtype=np.int64),
            "output_tokens": np.asarray(outputs, dtype=np.int64),
        },
        index=pd.RangeIndex(n),
    )


def _finish(df: pd.DataFrame, path: Path, fmt: str, skipped: int, **extra: object) -> pd.DataFrame:
    df.attrs.update({"source": str(path), "format": fmt, "skipped_rows": int(skipped), **extra})
    return df


# --------------------------------------------------------------------------------------------------
# Format readers


def read_azure_llm(path: _PathLike, *, skip_bad_rows: bool = False) -> pd.DataFrame:
    """Azure LLM inference trace 2023/2024: `TIMESTAMP,ContextTokens,GeneratedTokens`, no model column.

    Timestamps may have 0-9 fractional digits and an optional UTC offset (the 2024 week-long files mix
    forms); offsets are honoured and naive times are taken as UTC, so mixed files order correctly.
    """
    p = check_file(path)
    cols = [
        Col("TIMESTAMP", _TIMESTAMP_EXAMPLE, parse_timestamp),
        int_col("ContextTokens"),
        int_col("GeneratedTokens"),
    ]
    v, skipped = read_delimited(p, cols, sep=",", header=True, skip_bad_rows=skip_bad_rows)
    ns = v["TIMESTAMP"]
    arrival = (ns - ns.min()) / 1e9
    df = _canonical(arrival, None, v["ContextTokens"], v["GeneratedTokens"])
    start = pd.Timestamp(int(ns.min()), tz="UTC").isoformat()
    return _finish(df, p, "azure-llm", skipped, start_time=start)


def read_servegen(
    path: _PathLike,
    *,
    model_ids: Sequence[str] | Mapping[int, str] | None = None,
    skip_bad_rows: bool = False,
) -> pd.DataFrame:
    """ServeGen-style multi-model trace (what the Tangram artifact replays).

    One request per line, whitespace-separated, no header: `timestamp_s model_id input_tokens
    output_tokens`. `model_ids` names the models: a list (id i -> model_ids[i]) or a dict; an id it
    does not name is a bad row. Without it the model column holds the ids as text.
    """
    p = check_file(path)
    cols = [
        float_col("timestamp_s"),
        int_col("model_id", 0),
        int_col("input_tokens"),
        int_col("output_tokens"),
    ]
    lookup: dict[int, str] | None = None
    if model_ids is not None:
        items = model_ids.items() if isinstance(model_ids, Mapping) else enumerate(model_ids)
        try:
            lookup = {int(k): str(v) for k, v in items}
        except (TypeError, ValueError):
            raise TraceError(
                f"model_ids: expected integer ids mapped to model names, got {model_ids!r}"
            ) from None
    row_check = None
    if lookup is not None:
        known = np.array(sorted(lookup), dtype=np.int64)
        expect = (
            f"a model id in 0..{len(known) - 1}"
            if np.array_equal(known, np.arange(len(known)))
            else f"one of the model ids {', '.join(map(str, known))}"
        )

        def row_check(v: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, str]]:
            return {"model_id": (~np.isin(v["model_id"], known), expect)}

    v, skipped = read_delimited(
        p, cols, sep=r"\s+", header=False, skip_bad_rows=skip_bad_rows, row_check=row_check
    )
    ids = v["model_id"]
    uniq, inverse = np.unique(ids, return_inverse=True)
    names = [lookup[int(i)] if lookup is not None else str(int(i)) for i in uniq]
    df = _canonical(v["timestamp_s"], (inverse, names), v["input_tokens"], v["output_tokens"])
    return _finish(df, p, "servegen", skipped, models_are_labels=lookup is None)


def read_burstgpt(path: _PathLike, *, skip_bad_rows: bool = False) -> pd.DataFrame:
    """BurstGPT: `Timestamp,Session ID,Elapsed time,Model,Request tokens,Response tokens,...`.

    The model column keeps BurstGPT's service names (ChatGPT, GPT-4) as labels to be mapped onto
    an experiment's models. Failed requests (0 response tokens) are bad rows: skip them explicitly.
    """
    p = check_file(path)
    cols = [
        float_col("Timestamp"),
        label_col("Model"),
        int_col("Request tokens"),
        int_col("Response tokens"),
    ]
    v, skipped = read_delimited(p, cols, sep=",", header=True, skip_bad_rows=skip_bad_rows)
    df = _canonical(v["Timestamp"], v["Model"], v["Request tokens"], v["Response tokens"])
    return _finish(df, p, "burstgpt", skipped, models_are_labels=True)


def read_table(path: _PathLike, *, skip_bad_rows: bool = False) -> pd.DataFrame:
    """A table already in canonical columns (CSV, or Parquet by extension); extra columns are ignored.

    `model` is optional (a None column until mapped); the other canonical columns are required.
    """
    p = check_file(path)
    needed = [float_col("arrival_s"), int_col("input_tokens"), int_col("output_tokens")]
    if p.suffix.lower() in (".parquet", ".pq"):
        return _read_parquet_table(p, needed, skip_bad_rows)
    first = first_line(p)
    has_model = "model" in [h.strip() for h in split(first, ",")]
    cols = needed + ([label_col("model")] if has_model else [])
    v, skipped = read_delimited(p, cols, sep=",", header=True, skip_bad_rows=skip_bad_rows)
    df = _canonical(v["arrival_s"], v.get("model"), v["input_tokens"], v["output_tokens"])
    return _finish(df, p, "table", skipped)


def _read_parquet_table(p: Path, needed: list[Col], skip_bad_rows: bool) -> pd.DataFrame:
    import pyarrow.parquet as pq

    try:
        schema_names = pq.read_schema(p).names
    except Exception as exc:  # pyarrow raises several types for a corrupt or non-Parquet file
        raise TraceError(f"{p}: not a readable Parquet file ({short(exc, 80)})") from None
    for c in needed:
        if c.name not in schema_names:
            raise TraceError(
                f"{p}: missing column '{c.name}'; expected columns {', '.join(COLUMNS)}, "
                f"got {', '.join(schema_names)}"
            )
    cols = needed + ([label_col("model")] if "model" in schema_names else [])
    frame = pd.read_parquet(p, columns=[c.name for c in cols])
    if len(frame) == 0:
        raise TraceError(f"{p}: no requests in the file")
    any_bad = np.zeros(len(frame), dtype=bool)
    values, bads = {}, []
    for c in cols:
        v, bad = c.parse(frame[c.name])
        values[c.name] = v
        bads.append((c, bad))
        any_bad |= bad
    if any_bad.any() and not skip_bad_rows:
        row = int(np.argmax(any_bad))
        c, _ = next(b for b in bads if b[1][row])
        got = short(frame[c.name].iloc[row])
        raise TraceError(f"{p}: row {row + 1}: column '{c.name}': expected {c.expect}, got '{got}'")
    skipped = int(any_bad.sum())
    if skipped == len(frame):
        raise TraceError(f"{p}: no requests in the file ({skipped} bad rows skipped)")
    if skipped:
        values = {k: v[~any_bad] for k, v in values.items()}
    df = _canonical(values["arrival_s"], values.get("model"), values["input_tokens"], values["output_tokens"])
    return _finish(df, p, "table", skipped)


def _sample_tokens(
    n: int,
    rng: np.random.Generator,
    token_table: pd.DataFrame | None,
    input_tokens: int,
    output_tokens: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Token lengths for traces that have none: (input, output) pairs drawn jointly from an LLM trace."""
    if token_table is None:
        return np.full(n, input_tokens, dtype=np.int64), np.full(n, output_tokens, dtype=np.int64)
    if len(token_table) == 0:
        raise TraceError("token_source: the token table holds no requests")
    rows = rng.integers(0, len(token_table), size=n)
    return (
        token_table["input_tokens"].to_numpy(dtype=np.int64)[rows],
        token_table["output_tokens"].to_numpy(dtype=np.int64)[rows],
    )


def _select_functions(
    labels: np.ndarray,
    totals: np.ndarray,
    top_functions: int | None,
    function_models: Mapping[str, str] | None,
    path: Path,
) -> tuple[np.ndarray, np.ndarray]:
    """Rows to keep (busiest first, ties by name) and the label each one gets."""
    order = np.lexsort((labels.astype(str), -totals))
    out_labels = labels.astype(object)
    if function_models is not None:
        present = set(labels.tolist())
        for name in function_models:
            if name not in present:
                raise TraceError(f"function_models: function '{short(name)}' is not in {path}")
        order = order[np.isin(labels[order], list(function_models))]
        out_labels = np.array([function_models.get(x, x) for x in labels.tolist()], dtype=object)
    if top_functions is not None:
        if top_functions < 1:
            raise TraceError(f"top_functions: expected an integer >= 1, got {top_functions}")
        order = order[:top_functions]
    return order, out_labels


def read_azure_functions(
    path: _PathLike,
    *,
    rng: np.random.Generator | None = None,
    spread: str = "poisson",
    token_table: pd.DataFrame | None = None,
    token_rng: np.random.Generator | None = None,
    input_tokens: int = DEFAULT_INPUT_TOKENS,
    output_tokens: int = DEFAULT_OUTPUT_TOKENS,
    top_functions: int | None = None,
    minutes: tuple[int, int] | None = None,
    function_models: Mapping[str, str] | None = None,
    skip_bad_rows: bool = False,
) -> pd.DataFrame:
    """Azure Functions 2019 `invocations_per_function_md.anon.dNN.csv` -> one request per invocation.

    The file has per-minute counts (`HashOwner,HashApp,HashFunction,Trigger,1..1440`); arrivals are
    spread inside each minute: `poisson` draws them i.i.d. uniform (a Poisson process conditioned on the
    count), `uniform` spaces them evenly with a random phase per function and minute. Each function
    becomes a model label (its HashFunction) to be mapped onto models, or a model directly through
    `function_models` (which also selects those functions). `top_functions` keeps the N busiest,
    `minutes=(first, last)` only expands those minute columns (1-based, inclusive) to bound the size.
    Token lengths are drawn from `token_table` (canonical columns) with `token_rng` (default: `rng`)
    or fixed. `attrs["start_offset_s"]` is the first request's time since the start of minute 1
    (arrival_s counts from that request).
    """
    p = check_file(path)
    if spread not in SPREADS:
        raise TraceError(f"spread: expected one of {', '.join(SPREADS)}, got '{spread}'")
    rng = np.random.default_rng(0) if rng is None else rng
    header = [h.strip() for h in split(first_line(p), ",")]
    minute_names = [h for h in header if h.isdigit()]
    if minutes is not None:
        lo, hi = minutes
        if not 1 <= lo <= hi:
            raise TraceError(f"minutes: expected [first, last] with 1 <= first <= last, got [{lo}, {hi}]")
        minute_names = [h for h in minute_names if lo <= int(h) <= hi]
    if not minute_names and "HashFunction" in header:
        raise TraceError(f"{p}:1: no per-minute count columns ('1'..'1440') in the header")
    cols = [label_col("HashFunction")] + [int_col(m, 0) for m in minute_names]
    v, skipped = read_delimited(p, cols, sep=",", header=True, skip_bad_rows=skip_bad_rows)
    labels = v["HashFunction"]
    counts = np.column_stack([v[m] for m in minute_names])
    order, out_labels = _select_functions(labels, counts.sum(axis=1), top_functions, function_models, p)
    counts = counts[order]
    labels = out_labels[order]
    flat = counts.ravel()
    nz = np.flatnonzero(flat)
    per = flat[nz]
    total = int(per.sum())
    if total == 0:
        raise TraceError(f"{p}: the selected functions and minutes hold no invocations")
    m = counts.shape[1]
    minute_start = 60.0 * (np.asarray([int(x) for x in minute_names], dtype=np.float64) - 1)
    base = np.repeat(minute_start[nz % m], per)
    if spread == "poisson":
        offset = rng.random(total) * 60.0
    else:
        first = np.repeat(np.cumsum(per) - per, per)
        k = np.arange(total) - first
        phase = np.repeat(rng.random(len(per)), per)
        offset = 60.0 * (k + phase) / np.repeat(per, per)
    arrival = base + offset
    model = (np.repeat(nz // m, per), labels.tolist())
    token_rng = rng if token_rng is None else token_rng
    inputs, outputs = _sample_tokens(total, token_rng, token_table, input_tokens, output_tokens)
    df = _canonical(arrival, model, inputs, outputs)
    return _finish(
        df,
        p,
        "azure-functions",
        skipped,
        models_are_labels=function_models is None,
        functions=len(order),
        start_offset_s=float(arrival.min()),
    )


def read_azure_functions_2021(
    path: _PathLike,
    *,
    rng: np.random.Generator | None = None,
    token_table: pd.DataFrame | None = None,
    token_rng: np.random.Generator | None = None,
    input_tokens: int = DEFAULT_INPUT_TOKENS,
    output_tokens: int = DEFAULT_OUTPUT_TOKENS,
    top_functions: int | None = None,
    function_models: Mapping[str, str] | None = None,
    skip_bad_rows: bool = False,
) -> pd.DataFrame:
    """Azure Functions trace 2021: `app,func,end_timestamp,duration`, one row per invocation.

    The arrival is the invocation start, `end_timestamp - duration` (seconds). Functions become model
    labels as in the 2019 reader; token lengths are drawn from `token_table` or fixed.
    """
    p = check_file(path)
    rng = np.random.default_rng(0) if rng is None else rng
    cols = [label_col("func"), float_col("end_timestamp", None), float_col("duration")]
    v, skipped = read_delimited(p, cols, sep=",", header=True, skip_bad_rows=skip_bad_rows)
    uniq, inverse, counts = np.unique(v["func"].astype(str), return_inverse=True, return_counts=True)
    order, out_labels = _select_functions(uniq, counts, top_functions, function_models, p)
    keep = np.isin(inverse, order)
    arrival = (v["end_timestamp"] - v["duration"])[keep]
    model = (inverse[keep], out_labels.tolist())
    token_rng = rng if token_rng is None else token_rng
    inputs, outputs = _sample_tokens(len(arrival), token_rng, token_table, input_tokens, output_tokens)
    df = _canonical(arrival, model, inputs, outputs)
    return _finish(
        df,
        p,
        "azure-functions-2021",
        skipped,
        models_are_labels=function_models is None,
        functions=len(order),
        start_offset_s=float(arrival.min()),
    )


# --------------------------------------------------------------------------------------------------
# Format detection and dispatch

_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def detect_format(path: _PathLike) -> str:
    """Guess the format from the extension and the first line (header names or 4 numbers)."""
    p = check_file(path)
    if p.suffix.lower() in (".parquet", ".pq"):
        return "table"
    first = first_line(p)
    names = {h.strip() for h in split(first, ",")}
    if {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} <= names:
        return "azure-llm"
    if "HashFunction" in names and "1" in names:
        return "azure-functions"
    if {"app", "func", "end_timestamp", "duration"} <= names:
        return "azure-functions-2021"
    if {"Timestamp", "Model", "Request tokens", "Response tokens"} <= names:
        return "burstgpt"
    if {"arrival_s", "input_tokens", "output_tokens"} <= names:
        return "table"
    fields = first.split()
    if len(fields) == 4 and all(_NUMBER.match(x) for x in fields):
        return "servegen"
    raise TraceError(
        f"{p}:1: cannot tell the trace format from '{short(first, 60)}'; expected an Azure LLM, "
        "Azure Functions, BurstGPT or canonical CSV header, or 4 numbers per line (servegen)"
    )


def read_trace(
    path: _PathLike, format: str = "auto", *, skip_bad_rows: bool = False, **options: object
) -> pd.DataFrame:
    """Read any supported format (`auto` detects it); `options` go to the format's reader."""
    p = check_file(path)
    fmt = detect_format(p) if format == "auto" else format
    readers: dict[str, Callable[..., pd.DataFrame]] = {
        "azure-llm": read_azure_llm,
        "azure-functions": read_azure_functions,
        "azure-functions-2021": read_azure_functions_2021,
        "servegen": read_servegen,
        "burstgpt": read_burstgpt,
        "table": read_table,
    }
    if fmt not in readers:
        raise TraceError(f"format: expected auto or one of {', '.join(FORMATS)}, got '{fmt}'")
    return readers[fmt](p, skip_bad_rows=skip_bad_rows, **options)

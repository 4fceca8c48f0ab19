"""Reading a delimited trace file fast, and naming exactly what is wrong when it cannot be read.

Column parsers map a Series (numbers or text) to (values, bad mask) without raising; `read_delimited`
parses with pandas' C parser and, only when something fails, revisits the file line by line to name the
exact line, column and text (`traces.formats` builds every format's reader on it).
"""

from __future__ import annotations

import csv
import io
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import pandas as pd

from tangram_sim.errors import TraceError
from tangram_sim.traces.linecheck import check_line_lengths

_PathLike = str | Path


# --------------------------------------------------------------------------------------------------
# Column parsers: each maps a Series (numbers or text) to (values, bad mask) without raising.


def parse_int(s: pd.Series, minimum: int) -> tuple[np.ndarray, np.ndarray]:
    if s.dtype == np.int64:
        values = s.to_numpy(dtype=np.int64)
        return values, values < minimum
    if pd.api.types.is_bool_dtype(s.dtype):
        return np.full(len(s), minimum, dtype=np.int64), np.ones(len(s), dtype=bool)
    numbers = s if pd.api.types.is_numeric_dtype(s.dtype) else pd.to_numeric(s, errors="coerce")
    f = numbers.to_numpy(dtype=np.float64, na_value=np.nan)
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(f) & (f == np.floor(f)) & (f >= minimum) & (f < 2.0**62)
    return np.where(ok, f, minimum).astype(np.int64), ~ok


def parse_float(s: pd.Series, minimum: float | None) -> tuple[np.ndarray, np.ndarray]:
    if pd.api.types.is_bool_dtype(s.dtype):
        return np.zeros(len(s)), np.ones(len(s), dtype=bool)
    numbers = s if pd.api.types.is_numeric_dtype(s.dtype) else pd.to_numeric(s, errors="coerce")
    f = numbers.to_numpy(dtype=np.float64, na_value=np.nan)
    ok = np.isfinite(f)
    if minimum is not None:
        with np.errstate(invalid="ignore"):
            ok &= f >= minimum
    return np.where(ok, f, 0.0), ~ok


def parse_timestamp(s: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """ISO timestamps with any number of fractional digits, with or without a UTC offset -> ns."""
    if not (pd.api.types.is_string_dtype(s.dtype) or s.dtype == object):
        return np.zeros(len(s), dtype=np.int64), np.ones(len(s), dtype=bool)
    ts = pd.to_datetime(s, format="ISO8601", utc=True, errors="coerce")
    bad = ts.isna().to_numpy()
    ns = ts.dt.tz_localize(None).to_numpy(dtype="datetime64[ns]").view(np.int64)
    return np.where(bad, 0, ns), bad


def parse_label(s: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    text = s.astype("str").str.strip()
    values = text.to_numpy(dtype=object, na_value="")
    bad = s.isna().to_numpy() | (text.str.len().to_numpy(dtype=np.float64, na_value=0) == 0)
    return values, bad


@dataclass(frozen=True)
class Col:
    """One column a reader needs: where it is, what it must hold and how to parse it."""

    name: str
    expect: str
    parse: Callable[[pd.Series], tuple[np.ndarray, np.ndarray]]


def int_col(name: str, minimum: int = 1) -> Col:
    return Col(name, f"integer >= {minimum}", lambda s: parse_int(s, minimum))


def float_col(name: str, minimum: float | None = 0.0) -> Col:
    what = "a number" if minimum is None else f"a number >= {minimum:g}"
    return Col(name, what, lambda s: parse_float(s, minimum))


def label_col(name: str) -> Col:
    return Col(name, "non-empty text", parse_label)


# --------------------------------------------------------------------------------------------------
# Delimited text files


def check_file(path: _PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise TraceError(f"{p}: file not found")
    if not p.is_file():
        raise TraceError(f"{p}: not a file")
    return p


def first_line(path: Path) -> str:
    """The first non-blank line, for header checks and format detection (empty file -> TraceError).
    A file with a line too long for a trace is refused first (`linecheck`)."""
    check_line_lengths(path)
    try:
        with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
            for line in islice(f, 1000):
                if line.strip():
                    return line.rstrip("\r\n")
    except OSError as exc:
        raise TraceError(f"{path}: cannot read: {exc.strerror or exc}") from None
    raise TraceError(f"{path}:1: empty file; expected a trace header or data rows")


def split(line: str, sep: str) -> list[str]:
    if sep == ",":
        return line.split(",") if '"' not in line else next(csv.reader([line]), [])
    return line.split()


def short(value: object, limit: int = 40) -> str:
    text = "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _raw_field(path: Path, line_no: int, pos: int, sep: str) -> str:
    """The original text of one field, re-read from the file for an error message."""
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        line = next(islice(f, line_no - 1, None), "")
    fields = split(line.rstrip("\r\n"), sep)
    return short(fields[pos].strip() if pos < len(fields) else "")


@dataclass
class _Raw:
    """Rows of a delimited file as read, before values are checked."""

    frame: pd.DataFrame  # columns are field positions
    lines: np.ndarray  # file line number of each row
    structural: list[tuple[int, str]]  # (line, message) of rows that could not be split into fields


def _read_fast(path: Path, nfields: int, sep: str, skip: int) -> _Raw | None:
    """pandas' C parser; None when the file has rows it cannot take (wrong field count, bad bytes).

    Dtypes are inferred (several times faster than forcing text); text parsers accept numbers.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", pd.errors.DtypeWarning)  # mixed columns are parsed below
            frame = pd.read_csv(
                path,
                sep=sep,
                header=None,
                skiprows=skip,
                skip_blank_lines=False,
                encoding="utf-8",
            )
    except pd.errors.EmptyDataError:
        frame = pd.DataFrame({pos: pd.Series([], dtype=object) for pos in range(nfields)})
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError):
        return None
    if frame.shape[1] != nfields:
        return None
    blank = frame.isna().all(axis=1).to_numpy()
    lines = np.arange(len(frame)) + skip + 1
    if blank.any():
        frame, lines = frame.loc[~blank].reset_index(drop=True), lines[~blank]
    return _Raw(frame, lines, [])


def _read_slow(path: Path, nfields: int, sep: str, skip: int, names: Sequence[str]) -> _Raw:
    """Find the lines with the wrong number of fields or bad bytes, then parse the rest with pandas."""
    data = path.read_bytes()
    undecodable: dict[int, str] = {}  # line number -> message
    try:
        lines: list[str | None] = list(data.decode("utf-8").split("\n"))
    except UnicodeDecodeError:
        lines = []
        for line_no, raw in enumerate(data.split(b"\n"), start=1):
            try:
                lines.append(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                lines.append(None)
                undecodable[line_no] = f"not UTF-8 text (byte {raw[exc.start]:#04x})"
    if data.endswith(b"\n"):
        lines.pop()
    good: list[str] = []
    line_numbers: list[int] = []
    structural: list[tuple[int, str]] = []
    what = "comma-separated" if sep == "," else "whitespace-separated"
    for line_no, text in enumerate(lines[skip:], start=skip + 1):
        if text is None:
            structural.append((line_no, undecodable[line_no]))
            continue
        if sep == "," and text.count('"') % 2:  # pandas would read on past the line and fail
            structural.append((line_no, "unbalanced double quote"))
            continue
        if sep == ",":
            count = text.count(",") + 1 if '"' not in text else len(split(text, sep))
        else:
            count = len(text.split())
        if count == nfields:
            good.append(text)
            line_numbers.append(line_no)
        elif text.strip():
            structural.append((line_no, f"expected {nfields} {what} fields ({','.join(names)}), got {count}"))
    if good:
        frame = pd.read_csv(
            io.StringIO("\n".join(good)),
            sep=sep,
            header=None,
            names=list(range(nfields)),
            skip_blank_lines=False,
        )
    else:
        frame = pd.DataFrame({pos: pd.Series([], dtype="str") for pos in range(nfields)})
    return _Raw(frame, np.asarray(line_numbers, dtype=np.int64), structural)


def read_delimited(
    path: Path,
    cols: Sequence[Col],
    *,
    sep: str,
    header: bool,
    skip_bad_rows: bool,
    row_check: Callable[[dict[str, np.ndarray]], dict[str, tuple[np.ndarray, str]]] | None = None,
) -> tuple[dict[str, np.ndarray], int]:
    """Read the needed columns of a delimited file, check every value, and drop or report bad rows.

    Returns the parsed column arrays (bad rows removed) and the number of rows skipped.
    `row_check` may flag further bad values that need several columns or outside knowledge (model ids).
    """
    first = first_line(path)
    skip = _header_line(path) if header else 0
    if header:
        names = [h.strip() for h in split(first, sep)]
        for c in cols:
            if c.name not in names:
                raise TraceError(
                    f"{path}:{skip}: missing column '{c.name}'; expected a header with "
                    f"{','.join(c.name for c in cols)}, got '{short(first, 80)}'"
                )
        pos_of = {c.name: names.index(c.name) for c in cols}
    else:
        names = [c.name for c in cols]
        pos_of = {c.name: i for i, c in enumerate(cols)}
    raw = _read_fast(path, len(names), sep, skip)
    if raw is None:
        raw = _read_slow(path, len(names), sep, skip, names)

    n = len(raw.frame)
    values: dict[str, np.ndarray] = {}
    bads: list[tuple[Col, np.ndarray, str]] = []
    any_bad = np.zeros(n, dtype=bool)
    for c in cols:
        v, bad = c.parse(raw.frame[pos_of[c.name]])
        values[c.name] = v
        bads.append((c, bad, c.expect))
        any_bad |= bad
    if row_check is not None and n:
        for name, (bad, expect) in row_check(values).items():
            bad = bad & ~any_bad
            bads.append((next(c for c in cols if c.name == name), bad, expect))
            any_bad |= bad

    if not skip_bad_rows:
        first_value = int(raw.lines[np.argmax(any_bad)]) if any_bad.any() else None
        first_struct = raw.structural[0] if raw.structural else None
        if first_struct is not None and (first_value is None or first_struct[0] < first_value):
            raise TraceError(f"{path}:{first_struct[0]}: {first_struct[1]}")
        if first_value is not None:
            row = int(np.argmax(any_bad))
            c, _, expect = next(b for b in bads if b[1][row])
            got = _raw_field(path, first_value, pos_of[c.name], sep)
            raise TraceError(f"{path}:{first_value}: column '{c.name}': expected {expect}, got '{got}'")
    skipped = int(any_bad.sum()) + len(raw.structural)
    if n - int(any_bad.sum()) == 0:
        detail = f" ({skipped} bad rows skipped)" if skipped else ""
        raise TraceError(f"{path}:{skip + 1}: no requests in the file{detail}")
    if any_bad.any():
        keep = ~any_bad
        values = {k: v[keep] for k, v in values.items()}
    return values, skipped


def _header_line(path: Path) -> int:
    """1-based line number of the header (the first non-blank line)."""
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for i, line in enumerate(islice(f, 1000), start=1):
            if line.strip():
                return i
    return 1
